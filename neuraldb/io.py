"""Files: atomic writes with ordinary permissions, sha256, the data folder.

Example::

    from neuraldb.io import atomic_write, sha256_file
    with atomic_write("reports/run/report.json") as tmp:   # a temporary path beside the target
        tmp.write_text(json.dumps(report))                  # renamed over the target on success
    sha256_file("store.safetensors")                        # '3f1c...'

    with atomic_dir("releases/v3", existing="error") as tmp:   # a folder written whole, or not at all
        (tmp / "manifest.json").write_text("{}")

Every file the project writes (stores, reports, gate reports, releases, caches) goes
through :func:`atomic_write` (a folder of files through :func:`atomic_dir`): a reader never
sees a half-written file or folder, a failed or interrupted write leaves the old one (and no
temporary) behind, and the new file gets the mode an ordinary ``open()`` would give it (0666
less the umask, so 0644 under the usual umask 022), not the 0600 of ``tempfile.mkstemp``;
folders get 0777 less the umask (:func:`make_dir_public`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_dir", "atomic_write", "write_text", "sha256_file", "umask_mode", "make_dir_public",
           "default_data_dir"]

_CHUNK = 1 << 20


def umask_mode(base: int = 0o666) -> int:
    """``base`` less the process umask (read without changing it where the OS allows)."""
    try:  # Linux: the umask is in /proc without the set-and-restore race of os.umask
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return base & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


def make_dir_public(path: str | os.PathLike) -> None:
    """Give a folder made by ``tempfile.mkdtemp`` (0700) the mode ``mkdir`` would (0777 less the umask)."""
    os.chmod(path, umask_mode(0o777))


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The parent folder is created. On an exception the temporary file is removed and the
    target is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike, *, existing: str = "error", complete: Callable[[Path], bool] | None = None,
               sync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it is renamed to ``path``.

    A missing or empty ``path`` is replaced in one rename. A non-empty one is handled by
    ``existing``: ``"error"`` raises :class:`FileExistsError` (nothing is changed), ``"keep"``
    keeps it (another writer finished first: the new folder is dropped) unless ``complete`` says
    it is not finished, ``"replace"`` swaps it out and deletes it (restored if the swap fails).
    Files and folders inside get ordinary modes (0666 / 0777 less the umask); ``sync`` flushes
    the files to disk first. The temporary folder (``.<name>.tmp-*``) is removed in every case.
    """
    if existing not in ("error", "keep", "replace"):
        raise ValueError(f"existing={existing!r}; use 'error', 'keep' or 'replace'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _public_tree(tmp, sync=sync)
        _commit_dir(tmp, path, existing=existing, complete=complete)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left when the rename succeeded


def _public_tree(folder: Path, *, sync: bool) -> None:
    file_mode, dir_mode = umask_mode(0o666), umask_mode(0o777)
    os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, file_mode)
            if sync and not os.path.islink(file):
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())


def _commit_dir(tmp: Path, path: Path, *, existing: str, complete: Callable[[Path], bool] | None) -> None:
    try:
        os.rename(tmp, path)  # atomic; also replaces a missing or empty folder
        return
    except OSError:
        if not path.is_dir() or not any(path.iterdir()):
            raise
    if existing == "keep" and (complete is None or complete(path)):
        return
    if existing == "error":
        raise FileExistsError(f"{path} exists and is not empty; nothing was written")
    aside = path.with_name(f".{path.name}.old-{os.getpid()}-{time.time_ns()}")
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(aside, path)  # put the old folder back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, mode 0666 less the umask."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str | None:
    """``data_dir``, else ``$NEURALDB_DATA_DIR``, else None (the loaders then use public files).

    The data folder is laid out like the project's documented data layout
    (``evals.sources.DATA_DIR_LAYOUT``); tests and tox point it at a local copy.
    """
    if data_dir is not None:
        return str(data_dir)
    return os.environ.get("NEURALDB_DATA_DIR") or None
