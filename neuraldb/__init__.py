"""neuraldb: edit facts into Hugging Face causal LMs with a gated key-value store.

Example::

    import neuraldb
    model, tok = neuraldb.load_model("smollm2-135m")
    db = neuraldb.edit(model, tok, [neuraldb.Fact(prompt="{} is located in the city of",
                                                  subject="The Eiffel Tower", target_new="Rome")])
    with db.attached(model):
        ...                      # the model now says Rome; elsewhere it is the original model
"""

from __future__ import annotations

import logging
from typing import Any

from .arch import ModelArch, known_model_types, resolve_arch
from .facts import Fact, FactError, encode_completion, locate_subject, validate_facts
from .nethook import StopForward, Trace, TraceDict

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "EditConfig": ".config",
    "NeuralDB": ".store",
    "StoreError": ".store",
    "edit": ".editor",
    "compute_keys": ".keys",
    "context_templates": ".keys",
    "compute_residuals": ".residuals",
    "subject_words": ".words",
    "load_model": ".models",
    "evaluate": "evals.evaluate",
    "gate": "evals.gate",
    "save_release": "evals.release",
    "load_release": "evals.release",
}

__all__ = [
    "Fact",
    "FactError",
    "ModelArch",
    "StopForward",
    "Trace",
    "TraceDict",
    "encode_completion",
    "known_model_types",
    "locate_subject",
    "resolve_arch",
    "validate_facts",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name], __name__ if _LAZY[name].startswith(".") else None)
        return getattr(module, name)
    raise AttributeError(f"module 'neuraldb' has no attribute {name!r}")
