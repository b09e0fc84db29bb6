"""Releases: a store, the base model it belongs to, and the evidence it may be used, in one folder.

Example::

    import neuraldb
    neuraldb.save_release("releases/cf-v3", "smollm2-135m", db, report="gate/gate.json",
                          evaluation="gate/report.json")
    model, tok, db = neuraldb.load_release("releases/cf-v3")      # db is attached to model
    model, tok, db = neuraldb.load_release("releases/cf-v3", gamma=0.75)   # override the gate

Layout (``format_version`` 1)::

    <dir>/
        manifest.json        # what the release is and the checksums of the files below
        store.safetensors    # NeuralDB.save: keys, residuals, fact metadata
        gate.json            # the report given to save_release (report.json for an evaluation report)
        report.json          # the evaluation report behind it (evaluation=), if given

``manifest.json``::

    {"format": "neuraldb-release", "format_version": 1,
     "base_model": "smollm2-135m",            # what load_model is given to rebuild the base model
     "base_model_revision": null,             # the hub commit, when the model came from the hub
     "layer_fingerprint": "3f0c...",          # db.fingerprint: sha256 of the edited projection's weight
     "module": "model.layers.10.mlp.down_proj",
     "neuraldb_version": "0.1.0", "gamma": 0.65, "layer": 10, "facts": 12,
     "per_key_thresholds": false,             # NeuralDB.calibrate was used: gamma is then a floor
     "created": "2025-01-01T00:00:00+00:00",
     "files": {"store": {"path": "store.safetensors", "sha256": "...", "size": 123},
               "report": {"path": "gate.json", "sha256": "...", "size": 456, "kind": "gate"},
               "evaluation": {"path": "report.json", "sha256": "...", "size": 789, "kind": "evaluation"}}}

Guarantees:

* :func:`save_release` writes into a hidden temporary sibling (``.<name>.tmp-<pid>-*``) and
  renames it into place, so a release folder is either complete or absent; it refuses a
  non-empty target unless ``overwrite=True``. An overwrite exchanges the new folder with the old
  one in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(RENAME_SWAP)``),
  then removes the old one: a kill at any moment leaves the old or the new release at the
  target, still a plain folder, so ``load_release(path)``, ``cp -r`` and CI artifacts are
  unchanged. Where the file system cannot exchange (other systems, some network file systems)
  it falls back to two renames and logs a warning: a kill between them leaves no release there.
  Temporaries a killed save left behind (hidden full copies) are removed by the next save to the
  same target, once their writer's process is gone (:func:`neuraldb.io.remove_stale`).
* :func:`load_release` checks, before anything is loaded, that the manifest has every field
  (naming the missing ones) and that every file has the size and sha256 the manifest records (a
  truncated or tampered store is refused); then it loads the base model and the store, which
  checks that the edited layer's weights match the fingerprint (:class:`neuraldb.StoreError`
  otherwise) and that manifest and store agree on layer, fingerprint and fact count.
* ``gamma`` in the manifest is the release's gate threshold and is applied to the loaded store
  (so a release can be re-tuned, or deliberately broken for a test, by editing it);
  ``load_release(..., gamma=...)`` overrides both. Per-key thresholds set by
  ``NeuralDB.calibrate`` live in the store file and still apply (gamma is their floor).

Every problem is a :class:`ReleaseError` (a :class:`neuraldb.StoreError`, so a ``ValueError``)
whose message names the file or field and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from neuraldb.config import check_gamma
from neuraldb.io import atomic_dir, sha256_file
from neuraldb.store import NeuralDB, StoreError

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "REQUIRED_FIELDS", "STORE_FILE", "ReleaseError",
    "load_release", "load_store", "read_manifest", "release_report", "save_release", "verify_release",
]

log = logging.getLogger(__name__)

FORMAT = "neuraldb-release"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE_FILE = "store.safetensors"
REQUIRED_FIELDS = ("format", "format_version", "base_model", "layer_fingerprint", "neuraldb_version", "gamma",
                   "layer", "facts", "created", "files")


class ReleaseError(StoreError):
    """A release folder that cannot be written or used as asked; the message says why and what to do."""


def _file_entry(folder: Path, name: str, **extra: Any) -> dict[str, Any]:
    path = folder / name
    return {"path": name, "sha256": sha256_file(path), "size": path.stat().st_size, **extra}


def _json_object(path: Path, *, what: str, fix: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; a ReleaseError naming ``what`` (and ``fix``) otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"{what} is not valid JSON ({exc}){fix}") from None
    if not isinstance(data, dict):
        raise ReleaseError(f"{what} is not a JSON object{fix}")
    return data


def _report_payload(report: Mapping[str, Any] | str | os.PathLike, *,
                    prefer: str = "gate.json") -> tuple[dict[str, Any], str]:
    """The report as a dict and its file name in the release (gate.json or report.json)."""
    if isinstance(report, Mapping):
        data = dict(report)
    else:
        path = Path(report)
        if path.is_dir():
            names = ("gate.json", "report.json") if prefer == "gate.json" else ("report.json",)
            path = next((path / n for n in names if (path / n).is_file()), path / prefer)
        if not path.is_file():
            raise ReleaseError(f"no report at {str(path)!r}; pass a gate.json / report.json file, a dict or None")
        data = _json_object(path, what=f"the report {path}")
    kind = "gate" if str(data.get("schema", "")).startswith("neuraldb.gate") else "evaluation"
    return data, ("gate.json" if kind == "gate" else "report.json")


def _model_reference(model_name_or_path: Any) -> tuple[str, str | None]:
    """(name for load_model, hub revision or None) from a name, a path or a loaded model."""
    if isinstance(model_name_or_path, (str, os.PathLike)):
        name = os.fspath(model_name_or_path)
        path = Path(name).expanduser()
        return (str(path.resolve()) if path.is_dir() else name), None
    from neuraldb.store import model_name

    cfg = getattr(model_name_or_path, "config", None)
    return model_name(model_name_or_path), getattr(cfg, "_commit_hash", None)


def save_release(
    directory: str | os.PathLike,
    model_name_or_path: Any,
    db: NeuralDB,
    report: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    evaluation: Mapping[str, Any] | str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``db`` (and ``report``) as a release into ``directory``; return its path.

    ``model_name_or_path``: what :func:`neuraldb.load_model` should load as the base model (a
    built-in alias, a local directory, a hub id), or the loaded model itself (its name is used
    and the store is checked against it before anything is written). ``report``: a gate or
    evaluation report (dict or JSON file), stored as ``gate.json`` / ``report.json``.
    ``evaluation``: the evaluation report behind a gate report, stored as ``report.json`` (a
    later ``neuraldb gate --baseline <release>/report.json`` compares against it).
    ``directory`` must not exist or be empty unless ``overwrite=True``.
    """
    target = Path(directory)
    if not isinstance(db, NeuralDB):
        raise ReleaseError(f"db must be a neuraldb.NeuralDB, got {type(db).__name__}")
    if len(db) == 0:
        raise ReleaseError("the store is empty: a release needs at least one fact")
    if not db.fingerprint:
        raise ReleaseError("the store has no layer fingerprint (field 'fingerprint' is empty), so a release could "
                           "not pin its base model; release a store written by neuraldb.edit")
    if target.exists() and not target.is_dir():
        raise ReleaseError(f"{target} exists and is not a folder; choose another release folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ReleaseError(f"{target} exists and is not empty; nothing was written. Choose a new folder, or pass "
                           "overwrite=True to replace it")
    if not isinstance(model_name_or_path, (str, os.PathLike)):
        db.check_compatible(model_name_or_path)  # a loaded model: refuse a store of another model now
    base, revision = _model_reference(model_name_or_path)
    if not base:
        raise ReleaseError("model_name_or_path is empty; give the base model's alias, folder or hub id")
    payload = _report_payload(report) if report is not None else None
    extra = _report_payload(evaluation, prefer="report.json") if evaluation is not None else None
    if extra is not None and (extra[1] != "report.json" or (payload is not None and payload[1] == "report.json")):
        raise ReleaseError("evaluation= takes the evaluation report (report.json) and report= the gate report "
                           "(gate.json); pass each once")

    try:
        with atomic_dir(target, existing="replace" if overwrite else "error", sync=True) as tmp:
            _write_release(tmp, db, base, revision, payload, extra)
    except FileExistsError:  # a non-empty folder appeared while the release was being written
        raise ReleaseError(f"{target} appeared while the release was being written; nothing was overwritten") from None
    log.info("release of %d facts written to %s", len(db), target)
    return target


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_release(tmp: Path, db: NeuralDB, base: str, revision: str | None, payload: Any, extra: Any) -> None:
    """The files of a release (store, reports, manifest last) into the temporary folder ``tmp``."""
    import neuraldb

    db.save(tmp / STORE_FILE)
    files: dict[str, Any] = {"store": _file_entry(tmp, STORE_FILE)}
    if payload is not None:
        data, name = payload
        _write_json(tmp / name, data)
        files["report"] = _file_entry(tmp, name, kind="gate" if name == "gate.json" else "evaluation")
    if extra is not None:
        _write_json(tmp / extra[1], extra[0])
        files["evaluation"] = _file_entry(tmp, extra[1], kind="evaluation")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base,
        "base_model_revision": revision,
        "store_model_name": db.model_name,
        "layer_fingerprint": db.fingerprint,
        "module": db.module_template.format(db.layer) if db.module_template else None,
        "neuraldb_version": neuraldb.__version__,
        "gamma": db.gamma,
        "layer": db.layer,
        "facts": len(db),
        "per_key_thresholds": _calibrated(db),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    if payload is not None:
        manifest["gate"] = _gate_summary(payload[0])
    _write_json(tmp / MANIFEST, manifest)


def _calibrated(db: NeuralDB) -> bool:
    """Whether the store has per-key gate thresholds (NeuralDB.calibrate); gamma is then only a floor."""
    import torch

    thresholds = getattr(db, "thresholds", None)
    return bool(thresholds is not None and len(thresholds) and torch.isfinite(thresholds).any())


def _gate_summary(data: Mapping[str, Any]) -> dict[str, Any] | None:
    if "passed" not in data:
        return None
    return {"passed": bool(data["passed"]), "policy": (data.get("policy") or {}).get("path"),
            "failed": list(data.get("failed") or [])}


# ----------------------------------------------------------------------------- reading


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the release in ``directory``, with every required field checked."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ReleaseError(f"no release folder at {str(folder)!r}")
    path = folder / MANIFEST
    if not path.is_file():
        raise ReleaseError(f"{folder} has no {MANIFEST}: it is not a release (write one with neuraldb.save_release)")
    manifest = _json_object(path, what=str(path), fix="; the release is corrupt: write it again")
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise ReleaseError(f"{path} lacks the field(s) {', '.join(missing)}; the release is incomplete or was "
                           "edited by hand: write it again with neuraldb.save_release")
    if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
        raise ReleaseError(f"{path}: format {manifest['format']!r} version {manifest['format_version']!r} is not "
                           f"supported (this neuraldb reads {FORMAT!r} version {FORMAT_VERSION})")
    files = manifest["files"]
    if not isinstance(files, dict) or not isinstance(files.get("store"), dict):
        raise ReleaseError(f"{path}: field 'files' must hold a 'store' entry with path, sha256 and size")
    for role, entry in files.items():
        if entry is not None:
            _check_file_entry(path, role, entry)
    check_gamma(manifest["gamma"], where=f"{path}: gamma", error=ReleaseError)
    for key in ("layer", "facts"):
        if isinstance(manifest[key], bool) or not isinstance(manifest[key], int) or manifest[key] < 0:
            raise ReleaseError(f"{path}: field {key!r} must be an integer >= 0, got {manifest[key]!r}")
    if not isinstance(manifest["base_model"], str) or not manifest["base_model"]:
        raise ReleaseError(f"{path}: field 'base_model' must name the base model (alias, folder or hub id)")
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_file_entry(path: Path, role: str, entry: Any) -> None:
    """One ``files.<role>`` entry of the manifest: a file name, a sha256 hex digest and a byte count."""
    lacking = [k for k in ("path", "sha256", "size") if not isinstance(entry, dict) or k not in entry]
    if lacking:
        raise ReleaseError(f"{path}: files.{role} lacks {', '.join(lacking)}; write the release again")
    fix = "; the manifest was edited by hand or is corrupt: write the release again"
    name, digest, size = entry["path"], entry["sha256"], entry["size"]
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ReleaseError(f"{path}: files.{role}.path must be a file name inside the release, got {name!r}{fix}")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ReleaseError(f"{path}: files.{role}.sha256 must be a sha256 hex digest (64 of 0-9a-f), "
                           f"got {str(digest)[:80]!r}{fix}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ReleaseError(f"{path}: files.{role}.size must be a byte count (an integer >= 0), got "
                           f"{str(size)[:80]!r} ({type(size).__name__}){fix}")


def verify_release(directory: str | os.PathLike) -> dict[str, Any]:
    """Check the manifest and the size and sha256 of every file it lists; return the manifest.

    Reads the files but loads nothing (no model, no tensors).
    """
    folder = Path(directory)
    manifest = read_manifest(folder)
    for role, entry in manifest["files"].items():
        if entry is None:
            continue
        path = folder / entry["path"]
        if not path.is_file():
            raise ReleaseError(f"{folder}: the {role} file {entry['path']} listed in the manifest is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ReleaseError(f"{path} has {size} bytes but the manifest records {entry['size']}: the file is "
                               "truncated or was modified; refusing to load it (restore it or write the release again)")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ReleaseError(f"{path} has sha256 {digest[:16]}... but the manifest records "
                               f"{entry['sha256'][:16]}...: "
                               "the file is corrupt or was tampered with; refusing to load it")
    return manifest


def release_report(directory: str | os.PathLike, role: str = "report") -> dict[str, Any] | None:
    """A report saved in the release (checksum verified): ``report`` (gate) or ``evaluation``; or None."""
    manifest = verify_release(directory)
    entry = manifest["files"].get(role)
    if not entry:
        return None
    return json.loads((Path(directory) / entry["path"]).read_text(encoding="utf-8"))


def load_store(directory: str | os.PathLike, *, model: Any = None, gamma: float | None = None,
               manifest: Mapping[str, Any] | None = None) -> NeuralDB:
    """The release's store (verified first unless ``manifest`` is given), with the release's gamma."""
    folder = Path(directory)
    manifest = verify_release(folder) if manifest is None else manifest
    db = NeuralDB.load(folder / manifest["files"]["store"]["path"])
    mismatch = [f"{k}: manifest {manifest[m]!r}, store {v!r}" for k, m, v in (
        ("layer", "layer", db.layer), ("fingerprint", "layer_fingerprint", db.fingerprint), ("facts", "facts", len(db)))
        if manifest[m] != v]
    if mismatch:
        raise ReleaseError(f"{folder}: the manifest does not describe its store ({'; '.join(mismatch)}); "
                           "the release is inconsistent: write it again")
    release_gamma = check_gamma(manifest["gamma"] if gamma is None else gamma, where="gamma", error=ReleaseError)
    if release_gamma != db.gamma:
        log.info("release %s: gamma %s (the store file says %s)", folder, release_gamma, db.gamma)
    db.gamma = release_gamma
    if model is not None:
        try:
            db.check_compatible(model)
        except StoreError as exc:
            raise ReleaseError(f"release {folder} was made for base model {manifest['base_model']!r}: {exc}") from None
    return db


def load_release(
    directory: str | os.PathLike,
    *,
    gamma: float | None = None,
    model: Any = None,
    tokenizer: Any = None,
    device: Any = None,
    dtype: Any = None,
    cache_dir: str | os.PathLike | None = None,
    attach: bool = True,
) -> tuple[Any, Any, NeuralDB]:
    """``(model, tokenizer, db)`` from a release, the store attached to the model.

    Files are verified against the manifest before anything is loaded. The base model is
    ``manifest["base_model"]`` loaded with :func:`neuraldb.load_model` (``device``, ``dtype``,
    ``cache_dir``) unless ``model`` (and ``tokenizer``) are given; either way the store must
    match its edited layer. ``gamma`` overrides the release's gate threshold.
    """
    folder = Path(directory)
    manifest = verify_release(folder)
    if gamma is not None:
        check_gamma(gamma, where="gamma", error=ReleaseError)
    if model is None:
        from neuraldb.models import load_model

        try:
            model, loaded_tok = load_model(manifest["base_model"], device=device, dtype=dtype, cache_dir=cache_dir)
        except (OSError, ValueError) as exc:
            raise ReleaseError(f"could not load the release's base model {manifest['base_model']!r}: {exc}") from None
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    db = load_store(folder, model=model, gamma=gamma, manifest=manifest)
    if tokenizer is None:
        from evals.evaluate import resolve_tokenizer

        tokenizer = resolve_tokenizer(model)
    if attach:
        db.attach(model)
    return model, tokenizer, db
