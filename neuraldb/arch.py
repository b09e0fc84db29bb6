"""Architecture as data: where the layers and the MLP output projection live.

Example::

    arch = resolve_arch(model)                 # from model.config.model_type
    arch.mlp_out(10)                           # 'model.layers.10.mlp.down_proj'
    arch.default_layer                         # about a third of the depth

Templates per ``config.model_type`` are in ``architectures.json`` beside this
file. An unknown family is an error that says how to pass templates::

    resolve_arch(model, layers="decoder.blocks.{}", mlp_out="decoder.blocks.{}.ff.out")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = ["ModelArch", "resolve_arch", "known_model_types"]


@lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, Any]]:
    text = resources.files("neuraldb").joinpath("architectures.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def known_model_types() -> list[str]:
    """The ``config.model_type`` values that have built-in templates."""
    return sorted(_table())


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


@dataclass(frozen=True)
class ModelArch:
    """Resolved module paths and sizes for one model.

    ``layers`` and ``mlp_out`` are templates with ``{}`` for the layer index.
    """

    model_type: str
    layers: str
    mlp_out: str
    n_layers: int
    layer_fraction: float = 1 / 3
    residual_out: str = ""  # where residuals are added; "" = mlp_out

    def __post_init__(self) -> None:
        if not self.residual_out:
            object.__setattr__(self, "residual_out", self.mlp_out)

    def layer(self, i: int) -> str:
        return self.layers.format(i)

    def mlp_out_at(self, i: int) -> str:
        return self.mlp_out.format(i)

    def residual_out_at(self, i: int) -> str:
        return self.residual_out.format(i)

    @property
    def default_layer(self) -> int:
        return max(0, min(self.n_layers - 1, round(self.layer_fraction * self.n_layers)))

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(
                f"layer={layer!r} is out of range for this {self.model_type} model "
                f"with {self.n_layers} layers: pass 0 <= layer < {self.n_layers}"
            )
        return layer


def resolve_arch(
    model_or_config: Any,
    *,
    layers: str | None = None,
    mlp_out: str | None = None,
    residual_out: str | None = None,
    layer_fraction: float | None = None,
) -> ModelArch:
    """Resolve the module templates of a model (or a ``PretrainedConfig``).

    Explicit ``layers`` / ``mlp_out`` templates override (or replace, for an
    unknown family) the built-in ones.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None) or "unknown"
    entry = dict(_table().get(model_type, {}))
    if layers is not None:
        entry["layers"] = layers
    if mlp_out is not None:
        entry["mlp_out"] = mlp_out
        entry["residual_out"] = ""  # a custom projection: add residuals to its output unless told otherwise
    if residual_out is not None:
        entry["residual_out"] = residual_out
    if layer_fraction is not None:
        entry["layer_fraction"] = layer_fraction
    if "layers" not in entry or "mlp_out" not in entry:
        raise KeyError(
            f"unknown model family config.model_type={model_type!r}: neuraldb has templates for "
            f"{', '.join(known_model_types())}. Pass the module templates yourself, e.g. "
            "EditConfig(layers_template='model.layers.{}', mlp_out_template='model.layers.{}.mlp.down_proj') "
            "or resolve_arch(model, layers=..., mlp_out=...)"
        )
    for field_name in ("layers", "mlp_out"):
        if "{}" not in entry[field_name]:
            raise ValueError(f"{field_name} template {entry[field_name]!r} needs '{{}}' for the layer index")
    text = _text_config(config)
    n_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if not n_layers:
        raise ValueError(f"cannot read the number of layers from {type(config).__name__}")
    return ModelArch(
        model_type=model_type,
        layers=entry["layers"],
        mlp_out=entry["mlp_out"],
        n_layers=int(n_layers),
        layer_fraction=float(entry.get("layer_fraction", 1 / 3)),
        residual_out=entry.get("residual_out", ""),
    )
