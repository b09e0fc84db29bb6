"""Where an evaluation dataset's file comes from: a path or URL, the data dir, or the public file.

Example::

    path = resolve_source("counterfact")                     # $NEURALDB_DATA_DIR, else ROME's public file
    path = resolve_source("zsre", "https://host/z.json", sha256="...")   # downloaded once, then cached
    records = read_records(path)                             # the JSON list (or JSON lines)

The first that applies (a ``datasets.Dataset`` or hub id never gets here: :mod:`evals.hf_datasets`):
  1. ``source``: a local path, a ``file://`` URL, or an ``http(s)://`` URL (downloaded once
     into the cache dir; pass ``sha256=`` to pin it).
  2. ``data_dir=`` or ``$NEURALDB_DATA_DIR``: a folder laid out like ``DATA_DIR_LAYOUT``
     (:func:`choose_source`: the first existing candidate for the ``split`` that holds
     ``min_records``, else the first existing one; split ``"any"``: the eval candidates, then
     the train ones; none is an error, never a download).
  3. The public file in ``PUBLIC_FILES`` (ROME's ``counterfact.json`` / ``zsre_mend_eval.json``),
     downloaded atomically into ``cache_dir`` / ``$NEURALDB_CACHE_DIR`` /
     ``~/.cache/neuraldb/datasets``. Checksums: no published sha256 of either file could be
     found, so the table pins the size where it is known (counterfact.json: 45,108,470 bytes,
     from the data notes) and verifies ``sha256=`` when you pass it; otherwise the sha256 seen at
     the first download is recorded beside the file (``<file>.sha256``) and checked on every
     later load (trust on first use). A mismatch while downloading is a :class:`DatasetError`
     and nothing is kept; a cached file that no longer matches is an error that says to delete it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.cases import DatasetError, Kind
from neuraldb.io import atomic_write, default_data_dir, sha256_file, write_text

__all__ = ["DATA_DIR_LAYOUT", "PUBLIC_FILES", "RemoteFile", "SourceChoice", "choose_source", "count_records", "download",
           "read_records", "resolve_source"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str
    records: int
    size: int | None = None  # bytes, when known
    sha256: str | None = None  # None: no published value found (see module docstring)


PUBLIC_FILES: dict[str, RemoteFile] = {
    "counterfact": RemoteFile("https://rome.baulab.info/data/dsets/counterfact.json", "counterfact.json",
                              records=21919, size=45_108_470),
    # 8,091,864 characters per the data notes; the byte size is not recorded, so not pinned.
    "zsre": RemoteFile("https://rome.baulab.info/data/dsets/zsre_mend_eval.json", "zsre_mend_eval.json",
                       records=19086),
}

# (kind, split) -> candidate paths under the data dir, preferred first.
DATA_DIR_LAYOUT: dict[tuple[str, str], tuple[str, ...]] = {
    ("counterfact", "eval"): ("counterfact_rome/counterfact_rome_test2191.json",  # unbiased 10% split
                              "counterfact/counterfact.json",  # ROME's full file, if you add it
                              "counterfact/counterfact-edit.json"),  # MEND/EasyEdit format
    ("counterfact", "train"): ("counterfact/counterfact-train.json",),
    ("zsre", "eval"): ("zsre/zsre_mend_eval.json", "zsre_eval_subset/zsre_mend_eval_subset19.json"),
    ("zsre", "train"): ("zsre/zsre_mend_train.json", "zsre/zsre_mend_train-1k.json"),
}


@dataclass(frozen=True)
class SourceChoice:
    """The data-dir file :func:`choose_source` picked for ``(kind, split, n)``, and why.

    ``files``: every existing data-dir file of the kind, ``(split, path, records)``, preferred first.
    ``enough``: the file holds the ``n`` asked for (always True for ``n=None``, "all").
    """

    kind: str
    split: str
    path: Path
    records: int
    n: int | None
    reason: str
    files: tuple[tuple[str, Path, int], ...]

    @property
    def enough(self) -> bool:
        return self.n is None or self.records >= self.n

    def others_holding(self, n: int) -> list[tuple[str, Path, int]]:
        """The data-dir files (any split) that hold at least ``n`` records."""
        return [f for f in self.files if f[2] >= n]

    def describe_files(self) -> str:
        """``counterfact_rome/...json (eval): 2,191; counterfact/counterfact-edit.json (eval): 10,000; ...``"""
        return "; ".join(f"{p} ({s}): {r:,}" for s, p, r in self.files)


def count_records(path: Path) -> int:
    """The number of records in a dataset file (``read_records``)."""
    return len(read_records(path))


def _splits(kind: str, split: str) -> tuple[str, ...]:
    if split == "any":
        return tuple(s for k, s in DATA_DIR_LAYOUT if k == kind)
    if (kind, split) not in DATA_DIR_LAYOUT:
        splits = sorted(s for k, s in DATA_DIR_LAYOUT if k == kind) + ["any"]
        raise DatasetError(f"unknown {kind} split {split!r}; choose one of {splits}")
    return (split,)


def choose_source(kind: Kind, *, split: str = "eval", n: int | None = None,
                  data_dir: str | os.PathLike | None = None) -> SourceChoice:
    """The data-dir file to read ``n`` cases of ``kind`` from (``n=None``: as many as it holds).

    Candidates are ``DATA_DIR_LAYOUT[(kind, split)]`` in order (split ``"any"``: every split's,
    eval first). With ``n``: the first existing one that holds ``n`` records, else the largest
    (``choice.enough`` is False: the caller decides whether that is an error). With ``n=None``:
    the first existing one for a named split (as :func:`resolve_source` always did), the largest
    for ``"any"``. A :class:`DatasetError` when no data dir is set or none of its files exist.
    """
    root = default_data_dir(data_dir)
    if root is None:
        raise DatasetError(f"no data dir: set NEURALDB_DATA_DIR or data_dir= to a folder laid out like "
                           f"evals.sources.DATA_DIR_LAYOUT")
    wanted = _splits(kind, split)
    files: list[tuple[str, Path, int]] = []
    every = tuple(s for k, s in DATA_DIR_LAYOUT if k == kind)
    for sp in every:
        for rel in DATA_DIR_LAYOUT[(kind, sp)]:
            path = Path(root) / rel
            if path.is_file() and all(p != path for _, p, _ in files):
                files.append((sp, path, count_records(path)))
    candidates = [f for f in files if f[0] in wanted]
    if not candidates:
        looked = [str(Path(root) / rel) for sp in wanted for rel in DATA_DIR_LAYOUT[(kind, sp)]]
        raise DatasetError(f"no {kind} {split} file in data dir {root} (looked for {looked}); add one or pass "
                           "source=")
    what = f"{kind} file (any split)" if split == "any" else f"{kind} {split} file"
    first = candidates[0]
    largest = max(candidates, key=lambda f: f[2])  # the first of equal sizes
    if n is None:
        pick = largest if split == "any" else first
        reason = ("the largest " if split == "any" else "the preferred ") + f"{what} of the data dir"
    else:
        fits = [f for f in candidates if f[2] >= n]
        pick = fits[0] if fits else largest
        if not fits:
            reason = f"no {what} holds {n:,}; the largest holds {largest[2]:,}"
        elif pick is first:
            reason = f"the preferred {what}, holding {pick[2]:,} >= {n:,}"
        else:
            skipped = ", ".join(f"{p.name} ({r:,})" for _, p, r in candidates[: candidates.index(pick)])
            reason = f"the first {what} holding {n:,} cases; preferred but too small: {skipped}"
    if pick is not first and (n is None or pick[2] >= n):
        log.warning("%s: %s (%d records) is chosen: %s", what, pick[1], pick[2], reason)
    return SourceChoice(kind=kind, split=pick[0], path=pick[1], records=pick[2], n=n, reason=reason,
                        files=tuple(files))


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically (temp file in the same folder, then rename).

    ``size`` and ``sha256`` are checked before the rename; a mismatch deletes the temp file
    and raises :class:`DatasetError`. Without ``sha256`` the observed digest is written to
    ``<dest>.sha256`` so later loads can detect a changed file.
    """
    dest = Path(dest)
    h, n = hashlib.sha256(), 0
    try:
        with atomic_write(dest) as tmp:  # the temporary file is removed on any error
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
            digest = h.hexdigest()
            if size is not None and n != size:
                raise DatasetError(f"download of {url} is {n} bytes, expected {size}; nothing was kept "
                                   "(retry, or pass the file itself as source=)")
            if sha256 is not None and digest != sha256.lower():
                raise DatasetError(f"download of {url} has sha256 {digest}, expected {sha256}; nothing was kept "
                                   "(the file changed upstream or the transfer was corrupted)")
    except OSError as exc:  # URLError, HTTPError, timeouts, disk errors
        raise DatasetError(f"could not download {url} ({exc}); pass source= a local file, or set "
                           "data_dir= / NEURALDB_DATA_DIR to a folder that has it") from exc
    if sha256 is None:
        write_text(str(dest) + ".sha256", digest + "\n")
        log.warning("downloaded %s without a pinned sha256; recorded %s for later checks", url, digest)
    return dest


def _verify_cached(path: Path, *, sha256: str | None, size: int | None) -> None:
    side = Path(str(path) + ".sha256")
    expected = sha256 or (side.read_text().strip() if side.exists() else None)
    fix = f"delete {path} to download it again, or pass the right sha256="
    if size is not None and path.stat().st_size != size:
        raise DatasetError(f"cached {path} is {path.stat().st_size} bytes, expected {size}; {fix}")
    if expected is not None and sha256_file(path) != expected.lower():
        raise DatasetError(f"cached {path} does not match sha256 {expected}; {fix}")


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("NEURALDB_CACHE_DIR"):
        return Path(os.environ["NEURALDB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neuraldb" / "datasets"


def _fetch(url: str, dest: Path, *, sha256: str | None, size: int | None) -> Path:
    if dest.exists():
        _verify_cached(dest, sha256=sha256, size=size)
        return dest
    log.info("downloading %s to %s", url, dest)
    return download(url, dest, sha256=sha256, size=size)


def resolve_source(kind: Kind, source: str | os.PathLike | None = None, *,
                   data_dir: str | os.PathLike | None = None, split: str = "eval",
                   sha256: str | None = None, cache_dir: str | os.PathLike | None = None,
                   min_records: int | None = None) -> Path:
    """The local file a loader reads (downloading it if needed); see the module docstring.
    ``min_records``: in the data dir, prefer the first candidate that holds that many (:func:`choose_source`)."""
    if source is not None:
        text = str(source)
        scheme = urllib.parse.urlparse(text).scheme
        if scheme in ("http", "https"):
            name = Path(urllib.parse.urlparse(text).path).name or "data.json"
            tag = hashlib.sha1(text.encode()).hexdigest()[:10]
            return _fetch(text, _cache_dir(cache_dir) / f"{tag}-{name}", sha256=sha256, size=None)
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(text).path)) if scheme == "file" else Path(text)
        if not path.is_file():
            raise DatasetError(f"{kind} source {text!r} is not a file; give a path to a JSON file or a URL")
        if sha256 is not None and sha256_file(path) != sha256.lower():
            raise DatasetError(f"{path} does not match sha256 {sha256}")
        return path
    _splits(kind, split)
    root = default_data_dir(data_dir)
    if root is not None:
        first = next((Path(root) / rel for rel in DATA_DIR_LAYOUT.get((kind, split), ())
                      if (Path(root) / rel).is_file()), None)
        if first is None or min_records is not None or split == "any":  # counting the records is needed
            first = choose_source(kind, split=split, n=min_records, data_dir=root).path
        path = first
        if sha256 is not None and sha256_file(path) != sha256.lower():
            raise DatasetError(f"{path} does not match sha256 {sha256}")
        return path
    if split not in ("eval", "any"):
        raise DatasetError(f"there is no public {kind} {split} file to download; pass source= or data_dir=")
    remote = PUBLIC_FILES[kind]
    return _fetch(remote.url, _cache_dir(cache_dir) / remote.filename,
                  sha256=sha256 or remote.sha256, size=remote.size)


def read_records(path: Path) -> list[Any]:
    """The records of a JSON file (a list of objects) or a ``.jsonl`` file (one per line)."""
    try:
        with open(path, encoding="utf-8") as fh:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in fh if line.strip()]
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); is it the right file?") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data
