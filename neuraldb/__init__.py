"""neuraldb: edit facts into Hugging Face causal LMs with a gated key-value store.

Example::

    import neuraldb
    model, tok = neuraldb.load_model("smollm2-135m")
    db = neuraldb.edit(model, tok, [neuraldb.Fact(prompt="{} is located in the city of",
                                                  subject="The Eiffel Tower", target_new="Rome")])
    with db.attached(model):
        ...                      # the model now says Rome; elsewhere it is the original model
    neuraldb.forget(model, tok, db, db.ids)   # as if it had never been edited

The core (this package) does not import ``evals`` or ``properties``. Four functions of
``evals`` are re-exported as thin façades for convenience - :func:`evaluate`, :func:`gate`,
:func:`save_release` and :func:`load_release` - each a real function here that imports its
``evals`` module when called (``evaluate`` and ``gate`` need the ``eval`` extra); their
parameters and docs are those of the ``evals`` function named in each docstring.
"""

from __future__ import annotations

import logging
from typing import Any

from .arch import ModelArch, known_model_types, resolve_arch
from .facts import Fact, FactConflictError, FactError, check_conflicts, encode_completion, locate_subject, validate_facts
from .nethook import StopForward, Trace, TraceDict

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "EditConfig": ".config",
    "NeuralDB": ".store",
    "StoreError": ".store",
    "edit": ".editor",
    "edit_distributed": ".distributed",
    "forget": ".refit",
    "EditReport": ".identity",
    "Replacement": ".identity",
    "compute_keys": ".keys",
    "context_templates": ".keys",
    "compute_residuals": ".residuals",
    "subject_words": ".words",
    "mention_positions": ".words",
    "detached": ".hook",
    "UnreachableFactError": ".reach",
    "load_model": ".models",
    "resolve_settings": ".settings",
}

__all__ = [
    "Fact",
    "FactConflictError",
    "FactError",
    "ModelArch",
    "StopForward",
    "Trace",
    "TraceDict",
    "check_conflicts",
    "encode_completion",
    "known_model_types",
    "locate_subject",
    "resolve_arch",
    "validate_facts",
    *_LAZY,
    "evaluate",
    "gate",
    "load_release",
    "save_release",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'neuraldb' has no attribute {name!r}")


# ----------------------------------------------------------------------------- façades of evals
# Each imports its evals module when called, never when neuraldb is imported.


def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The model without and with a store on CounterFact or zsRE: :func:`evals.evaluate.evaluate`.

    A façade: imports ``evals.evaluate`` (the ``eval`` extra) when called; see that function
    for the parameters and the report it returns.
    """
    from evals.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def gate(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The release gate: judge a store (or a saved report) against a release policy (:func:`evals.gate.gate`).

    A façade: imports ``evals.gate`` (the ``eval`` extra) when called; see that function for
    the parameters and the result it returns.
    """
    from evals.gate import gate as _gate

    return _gate(*args, **kwargs)


def save_release(*args: Any, **kwargs: Any) -> Any:
    """Write a release folder (store, manifest, checksums, gate report): :func:`evals.release.save_release`.

    A façade: imports ``evals.release`` when called; see that function for the parameters.
    """
    from evals.release import save_release as _save_release

    return _save_release(*args, **kwargs)


def load_release(*args: Any, **kwargs: Any) -> Any:
    """Verify and load a release folder, ``(model, tokenizer, db)``: :func:`evals.release.load_release`.

    A façade: imports ``evals.release`` when called; see that function for the parameters.
    """
    from evals.release import load_release as _load_release

    return _load_release(*args, **kwargs)
