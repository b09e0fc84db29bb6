"""Is a store for this model? The edited module, its key width and its weights' fingerprint.

Example::

    fingerprint = layer_fingerprint(model, "model.layers.10.mlp.down_proj")   # saved with the store
    key_module(db, model)                # "model.layers.10.mlp.down_proj": what db.module_name(model) says
    check_compatible(db, model)          # what NeuralDB.load(path, model=model) and db.attach(model) run

Keys and residuals only mean something on the model (and layer) they were computed on: a
store loaded onto another model, another size of the family, or a fine-tuned copy is an
error that names both models and the fix, never a silent misfire.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from .arch import resolve_arch
from .nethook import get_module

__all__ = ["check_compatible", "check_layer", "key_module", "layer_fingerprint", "model_name", "model_width",
           "residual_module"]


def key_module(db: Any, model: nn.Module | None = None, *, error: type[ValueError] = ValueError) -> str:
    """The module whose input is ``db``'s key (the MLP output projection at its layer): from the
    store's module template, else from ``model``'s architecture (``error`` without either)."""
    if db.module_template:
        return db.module_template.format(db.layer)
    if model is None:
        raise error("this store has no module template; attach it to a model first")
    return resolve_arch(model).mlp_out_at(db.layer)


def residual_module(db: Any, model: nn.Module | None = None) -> str:
    """The module whose output receives ``db``'s residual (usually the key's module)."""
    if db.residual_template:
        return db.residual_template.format(db.layer)
    if model is None:
        return db.module_name(model)
    return resolve_arch(model).residual_out_at(db.layer)


def check_layer(db: Any, layer: int, *, error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` unless ``layer`` is the layer ``db``'s keys and residuals were computed at."""
    if int(layer) != db.layer:
        raise error(
            f"this store was built for layer {db.layer}, not layer {layer}: keys and residuals are "
            f"specific to the layer they were computed at; attach it at layer {db.layer} or re-edit "
            f"the facts with EditConfig(layer={layer})"
        )


def layer_fingerprint(model: nn.Module, module_name: str) -> str:
    """sha256 of the edited projection's weight (rounded to bfloat16, so fp32/bf16 copies agree)."""
    weight = get_module(model, module_name).weight.detach()
    h = hashlib.sha256(str(tuple(weight.shape)).encode())
    h.update(weight.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def model_width(model: nn.Module) -> int | None:
    """The model's residual-stream width (its input embeddings' width, what ``neuraldb.edit`` stores as
    ``d_model``), or None when the model does not say."""
    try:
        return int(model.get_input_embeddings().weight.shape[1])
    except (AttributeError, NotImplementedError, TypeError, IndexError):
        return None


def _check_width(db: Any, model: nn.Module, *, error: type[ValueError]) -> None:
    width = model_width(model)
    if width is not None and db.d_model != width:
        raise error(
            f"this store's metadata field 'd_model' is {db.d_model} (its residuals' width) but "
            f"{model_name(model)!r} adds residuals of width {width} (its hidden size): it was built for "
            f"another model ({db.model_name!r}); load the matching base model, or re-edit the facts on this one"
        )


def model_name(model: nn.Module) -> str:
    """The model's name or path from its config (else its class name)."""
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or type(model).__name__)


def check_compatible(db: Any, model: nn.Module, *, layer: int | None = None,
                     error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` unless ``db`` (a store) was built for ``model`` (and ``layer``, when given):
    its key module exists, has the store's key width, the model's width is the residuals' (``d_model``),
    and its weights have the store's fingerprint (required of a store read from a file)."""
    if layer is not None:
        check_layer(db, layer, error=error)
    name = db.module_name(model)
    try:
        module = get_module(model, name)
    except LookupError as exc:
        raise error(
            f"this store was built for module {name!r} ({db.model_type or 'unknown'} family, "
            f"model {db.model_name!r}); {type(model).__name__} has no such module"
        ) from exc
    weight = getattr(module, "weight", None)
    if weight is not None and db.d_key not in tuple(weight.shape):
        raise error(
            f"this store's keys have {db.d_key} dims but {name} has weight shape "
            f"{tuple(weight.shape)}: it was built for another model ({db.model_name!r})"
        )
    _check_width(db, model, error=error)
    if not db.fingerprint and getattr(db, "path", None) is not None:
        raise error(
            f"{db.path}: metadata field 'fingerprint' is empty, so this store cannot be checked against "
            f"{model_name(model)!r}; a store written by neuraldb.edit always has one (the file was edited or "
            "built by hand). Re-edit the facts, or set db.fingerprint = neuraldb.layer_fingerprint(model, "
            "db.module_name(model)) on the model you trust and save it again (attach(model, check=False) "
            "attaches it unchecked)"
        )
    if db.fingerprint:
        fp = layer_fingerprint(model, name)
        if fp != db.fingerprint:
            raise error(
                f"this store was built for model {db.model_name!r} whose {name} weights have "
                f"fingerprint {db.fingerprint}; this model ({model_name(model)!r}) has {fp}. "
                "Keys only make sense on the model they were computed on: load the matching base "
                "model, or re-edit the facts on this one"
            )
