"""A store on disk: one safetensors file, tensors plus JSON metadata, written atomically.

Example::

    write_store(db, "facts.safetensors")          # what db.save(path) does
    db = read_store("facts.safetensors")           # what NeuralDB.load(path) does, before the model check

Tensors: ``keys`` (N, d_key) and ``residuals`` (N, d_model) float32; ``thresholds`` (N,)
only when a key is calibrated, ``words`` (N, F, width) and ``word_starts`` (vocab,) only
when a fact is word-checked (so files without them stay readable by older code). The
metadata (``"neuraldb"``: JSON) holds the layer, gamma, shapes, module templates, model
name, type and layer fingerprint, the edit config, the retrieval settings, fact ids and
fact records. Nothing is unpickled: a corrupt or foreign file is a :class:`StoreError`
naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write
from .store import NeuralDB, StoreError
from .words import NO_WORD

__all__ = ["FORMAT_VERSION", "read_store", "store_metadata", "write_store"]

FORMAT_VERSION = 1
_TENSORS = {"keys", "residuals", "thresholds", "words", "word_starts"}


def store_metadata(db: NeuralDB) -> dict[str, Any]:
    """The JSON metadata saved with ``db``."""
    return {
        "format": "neuraldb",
        "format_version": FORMAT_VERSION,
        "layer": db.layer,
        "gamma": db.gamma,
        "d_key": db.d_key,
        "d_model": db.d_model,
        "module_template": db.module_template,
        "residual_template": db.residual_template,
        "model_name": db.model_name,
        "model_type": db.model_type,
        "fingerprint": db.fingerprint,
        "config": db.config,
        "retrieval": {"chunk_size": db.chunk_size, "screen_rank": db.screen_rank,
                      "screen_min_keys": db.screen_min_keys},
        "per_key_thresholds": bool(torch.isfinite(db.thresholds).any()),
        "ids": db.ids,
        "facts": [db.facts.get(i) for i in db.ids],
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_store(db: NeuralDB, path: str | os.PathLike) -> Path:
    """Write ``db`` to ``path`` atomically (mode 0666 less the umask); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"neuraldb": json.dumps(store_metadata(db), ensure_ascii=False)}
    tensors = {"keys": db.keys.contiguous(), "residuals": db.residuals.contiguous()}
    if torch.isfinite(db.thresholds).any():
        tensors["thresholds"] = db.thresholds.contiguous()
    if bool(db.word_checked.any()):
        tensors["words"] = db.words.contiguous()
        tensors["word_starts"] = db.word_starts.to(torch.uint8).contiguous()
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not path.is_file():
        raise StoreError(f"no store file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("neuraldb")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StoreError(f"{path} is not a readable safetensors store (corrupt or truncated?): {exc}") from exc
    if raw is None:
        raise StoreError(f"{path} has no neuraldb metadata: it was not written by NeuralDB.save")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: the neuraldb metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise StoreError(f"{path}: the neuraldb metadata is not a JSON object")
    return meta, tensors


def _check_meta(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Types and presence of the metadata fields: a wrong one names the field."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {meta.get('format_version')!r} is not supported "
            f"(this neuraldb reads version {FORMAT_VERSION})"
        )
    missing = [k for k in ("layer", "gamma", "d_key", "d_model", "ids") if k not in meta]
    if missing or not {"keys", "residuals"} <= set(tensors) <= _TENSORS:
        raise StoreError(f"{path}: missing metadata field(s) {missing} or tensors {sorted(tensors)}")

    def integer(name: str, low: int) -> None:
        v = meta[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise StoreError(f"{path}: metadata field {name!r} must be an integer >= {low}, got {v!r}; "
                             "the file is corrupt or was not written by NeuralDB.save")

    integer("layer", 0)
    integer("d_key", 1)
    integer("d_model", 1)
    gamma = meta["gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise StoreError(f"{path}: metadata field 'gamma' must be a number in [-1, 1], got {gamma!r}")
    ids = meta["ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise StoreError(f"{path}: metadata field 'ids' must be a list of fact id strings")
    for name in ("module_template", "residual_template", "model_name", "model_type", "fingerprint"):
        if meta.get(name) is not None and not isinstance(meta[name], str):
            raise StoreError(f"{path}: metadata field {name!r} must be a string, got {meta[name]!r}")
    for name in ("config", "retrieval"):
        if meta.get(name) is not None and not isinstance(meta[name], dict):
            raise StoreError(f"{path}: metadata field {name!r} must be a JSON object, got {meta[name]!r}")


def _check_shapes(path: Path, n: int, tensors: dict[str, torch.Tensor]) -> None:
    if tensors["keys"].shape[0] != n or tensors["residuals"].shape[0] != n:
        raise StoreError(
            f"{path}: {n} fact ids but {tensors['keys'].shape[0]} keys / "
            f"{tensors['residuals'].shape[0]} residuals; the file is inconsistent"
        )
    thresholds = tensors.get("thresholds")
    if thresholds is not None and thresholds.shape != (n,):
        raise StoreError(f"{path}: {n} fact ids but thresholds of shape {tuple(thresholds.shape)}")
    words = tensors.get("words")
    if words is not None and (words.dim() != 3 or words.shape[0] != n or words.shape[1] < 1):
        raise StoreError(f"{path}: {n} fact ids but words of shape {tuple(words.shape)}; the file is inconsistent")


def read_store(path: str | os.PathLike, *, cls: type[NeuralDB] = NeuralDB) -> NeuralDB:
    """Read a store written by :func:`write_store` (no model check: see ``NeuralDB.load``)."""
    path = Path(path)
    meta, tensors = _read(path)
    _check_meta(path, meta, tensors)
    retrieval = meta.get("retrieval") or {}
    db = cls(
        layer=meta["layer"], d_key=meta["d_key"], d_model=meta["d_model"], gamma=meta["gamma"],
        module_template=meta.get("module_template"), residual_template=meta.get("residual_template"),
        model_name=meta.get("model_name") or "", model_type=meta.get("model_type") or "",
        fingerprint=meta.get("fingerprint") or "", config=meta.get("config") or {},
        **{k: retrieval[k] for k in ("chunk_size", "screen_rank", "screen_min_keys") if k in retrieval},
    )
    n = len(meta["ids"])
    _check_shapes(path, n, tensors)
    facts = meta.get("facts") or [None] * n
    words = tensors.get("words")
    if words is not None:
        db.words = torch.full((0, words.shape[1], words.shape[2]), NO_WORD, dtype=torch.long)
        db.word_starts = tensors.get("word_starts", torch.zeros(0)).bool()
    db.add(meta["ids"], tensors["keys"], tensors["residuals"], facts=[f or {} for f in facts],
           thresholds=tensors.get("thresholds"), words=words)
    db.facts = {i: f for i, f in zip(db.ids, facts) if f}
    db.path = path
    return db
