"""Per-model edit settings as data: which layer, learning rate and steps a model is edited with.

Example::

    resolved = resolve_settings(model)                       # or a PretrainedConfig
    resolved.config.layer, resolved.config.lr                # 8, 0.1 for Llama-3-8B
    resolved.sources["lr"]                                    # 'model row Llama-3-8B (...)'
    resolve_settings(model, config=EditConfig(lr=0.3)).config.lr   # 0.3: the user's field wins

The table is ``settings.json`` beside this file. For each field of ``SETTABLE`` the value
comes from, in order:

  1. the user's :class:`~neuraldb.config.EditConfig` (a field that is not None);
  2. the first model row whose ``match`` (a regular expression, searched case-insensitively)
     is found in the model's name or path, and whose ``model_type`` and ``n_layers`` are the
     model's (a name that matches a row of another shape is logged and skipped);
  3. the family row of ``config.model_type`` (``families``);
  4. the fallback: the layer ``round(layer_fraction * n_layers)`` of ``architectures.json``,
     ``lr`` / ``steps`` from :data:`neuraldb.config.FALLBACKS`.

The resolved values are logged at INFO; ``neuraldb.edit`` writes them into the store's config.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

from .arch import resolve_arch
from .config import FALLBACKS, EditConfig

__all__ = ["SETTABLE", "ResolvedSettings", "SettingsRow", "load_settings_table", "resolve_settings"]

log = logging.getLogger(__name__)

SETTABLE = ("layer", "lr", "steps")  # the EditConfig fields a row may set (None there = "the model's")
_ROW_KEYS = {"name", "match", "model_type", "n_layers", "settings", "source"}


@dataclass(frozen=True)
class SettingsRow:
    """One row of the table: the settings of the models it matches, and where they come from."""

    name: str
    settings: Mapping[str, Any]
    source: str
    match: str | None = None  # model rows: a regular expression for the name or path
    model_type: str | None = None
    n_layers: int | None = None


@dataclass(frozen=True)
class ResolvedSettings:
    """``config``: the EditConfig with every ``SETTABLE`` field filled; ``sources``: field -> where from."""

    config: EditConfig
    sources: Mapping[str, str]
    model_name: str
    model_type: str
    n_layers: int
    row: str | None  # the model or family row used, if any
    row_source: str | None = None  # where that row's values come from

    def lines(self) -> list[str]:
        """One line per field (``layer  8      model row Llama-3-8B``), then the row's source."""
        out = [f"{k:<6} {getattr(self.config, k)!s:<6} {self.sources[k]}" for k in SETTABLE]
        return out + ([f"row {self.row}: {self.row_source}"] if self.row and self.row_source else [])


def _check_row(where: str, row: Mapping[str, Any], *, model: bool) -> SettingsRow:
    unknown = sorted(set(row) - _ROW_KEYS)
    if unknown:
        raise ValueError(f"settings table {where}: unknown key(s) {unknown}; known: {sorted(_ROW_KEYS)}")
    settings = dict(row.get("settings") or {})
    bad = sorted(set(settings) - set(SETTABLE))
    if bad:
        raise ValueError(f"settings table {where}: field(s) {bad} cannot be set per model; a row sets {list(SETTABLE)}")
    try:
        EditConfig(**settings)  # the values are checked as EditConfig checks them
    except ValueError as exc:
        raise ValueError(f"settings table {where}: {exc}") from None
    if model:
        for key in ("match", "model_type", "n_layers"):
            if row.get(key) is None:
                raise ValueError(f"settings table {where}: a model row needs {key!r}")
        re.compile(row["match"])
    return SettingsRow(name=str(row.get("name") or where), settings=settings, source=str(row.get("source", "")),
                       match=row.get("match"), model_type=row.get("model_type"), n_layers=row.get("n_layers"))


def load_settings_table(table: Mapping[str, Any] | None = None) -> tuple[list[SettingsRow], dict[str, SettingsRow]]:
    """``(model rows, family rows by model_type)`` of ``table`` (default: the packaged ``settings.json``),
    checked: an unknown key or field is a ValueError naming the row."""
    if table is None:
        return _packaged()
    models = [_check_row(f"models[{i}]", r, model=True) for i, r in enumerate(table.get("models") or [])]
    families = {k: _check_row(f"families[{k!r}]", r, model=False) for k, r in (table.get("families") or {}).items()}
    return models, families


@lru_cache(maxsize=1)
def _packaged() -> tuple[list[SettingsRow], dict[str, SettingsRow]]:
    text = resources.files("neuraldb").joinpath("settings.json").read_text()
    return load_settings_table(json.loads(text))


def _name_of(config: Any, name: str | None) -> str:
    if name:
        return str(name)
    return str(getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", "") or "")


def _model_row(rows: list[SettingsRow], name: str, model_type: str, n_layers: int) -> SettingsRow | None:
    for row in rows:
        if not name or not re.search(row.match or "", name, flags=re.IGNORECASE):
            continue
        if row.model_type == model_type and row.n_layers == n_layers:
            return row
        log.warning("model %r matches the settings row %r, but is a %s model with %d layers (the row is for %s with "
                    "%d); the row is not used", name, row.name, model_type, n_layers, row.model_type, row.n_layers)
    return None


def resolve_settings(
    model_or_config: Any,
    *,
    config: EditConfig | None = None,
    name: str | None = None,
    table: Mapping[str, Any] | None = None,
) -> ResolvedSettings:
    """The EditConfig to edit ``model_or_config`` (a model or a ``PretrainedConfig``) with, and the
    source of each ``SETTABLE`` field (see the module docstring).

    ``name``: the model's name or path to match the rows against (default: the config's
    ``name_or_path``). ``table``: a settings table of the same shape as ``settings.json``.
    """
    config = config or EditConfig()
    hf_config = getattr(model_or_config, "config", model_or_config)
    arch = resolve_arch(hf_config, layers=config.layers_template, mlp_out=config.mlp_out_template,
                        residual_out=config.residual_out_template)
    rows, families = load_settings_table(table)
    model_name = _name_of(hf_config, name)
    row = _model_row(rows, model_name, arch.model_type, arch.n_layers)
    family = families.get(arch.model_type)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field in SETTABLE:
        given = getattr(config, field)
        if given is not None:
            values[field], sources[field] = given, "your EditConfig"
        elif row is not None and field in row.settings:
            values[field], sources[field] = row.settings[field], f"model row {row.name}"
        elif family is not None and field in family.settings:
            values[field], sources[field] = family.settings[field], f"family row {arch.model_type}"
        elif field == "layer":
            values[field] = arch.default_layer
            sources[field] = (f"family default: round({arch.layer_fraction:g} x {arch.n_layers} layers), "
                              f"{arch.model_type} in architectures.json")
        else:
            values[field], sources[field] = FALLBACKS[field], "EditConfig default (neuraldb.config.FALLBACKS)"
    arch.check_layer(values["layer"])
    used = [r for r, kind in ((row, "model row"), (family, "family row"))
            if r is not None and any(s.startswith(kind) for s in sources.values())]
    resolved = ResolvedSettings(config=replace(config, **values), sources=sources, model_name=model_name,
                                model_type=arch.model_type, n_layers=arch.n_layers,
                                row=used[0].name if used else None, row_source=used[0].source if used else None)
    log.info("edit settings for %s (%s, %d layers): %s", model_name or "the model", arch.model_type, arch.n_layers,
             "; ".join(resolved.lines()))
    return resolved
