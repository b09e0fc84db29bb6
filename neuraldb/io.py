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

import ctypes
import errno
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_dir", "atomic_write", "write_text", "sha256_file", "umask_mode", "make_dir_public",
           "default_data_dir", "remove_stale"]

_CHUNK = 1 << 20
log = logging.getLogger(__name__)


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
    it is not finished, ``"replace"`` swaps it out and deletes it (see :func:`_replace_dir`: one
    atomic exchange where the OS has one, so ``path`` always holds the old or the new folder).
    Files and folders inside get ordinary modes (0666 / 0777 less the umask); ``sync`` flushes
    the files to disk first. The temporary folder (``.<name>.tmp-<pid>-*``) is removed in every
    case but a kill; what a killed writer left is removed by the next write of ``path``
    (:func:`remove_stale`).
    """
    if existing not in ("error", "keep", "replace"):
        raise ValueError(f"existing={existing!r}; use 'error', 'keep' or 'replace'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        _public_tree(tmp, sync=sync)
        _commit_dir(tmp, path, existing=existing, complete=complete)
    finally:
        _remove(tmp)  # nothing left when the rename succeeded; the old folder after an exchange


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


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
    _replace_dir(tmp, path)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put the folder ``tmp`` at ``path`` (a non-empty folder); the old one ends at ``tmp``.

    Where the OS can exchange two names in one step (Linux ``renameat2(RENAME_EXCHANGE)``, macOS
    ``renamex_np(RENAME_SWAP)``), this is that one step: a kill at any moment leaves the old or
    the new folder at ``path``. Elsewhere (other systems, file systems without the exchange) it
    takes two renames, old folder aside then new folder in; an error between them puts the old
    folder back, but a kill there leaves ``path`` missing until the next write (a warning says so).
    """
    if _exchange(tmp, path):
        return
    log.warning("%s: this system cannot exchange two folders in one step; replacing it in two renames "
                "(a kill between them leaves no folder there)", path)
    aside = path.with_name(f".{path.name}.old-{os.getpid()}-{time.time_ns()}")
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)  # put the old folder back
        raise
    os.rename(aside, tmp)  # removed with the temporary folder


_RENAME_EXCHANGE, _RENAME_SWAP, _AT_FDCWD = 2, 2, -100
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically; False where the OS or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), _RENAME_SWAP)
        else:
            return False
    except OSError:  # no C library to ask
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (True when it cannot be told: then nothing is removed)."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers of ``path`` left beside it; return them.

    Only ``.<name>.tmp-<pid>-*`` and ``.<name>.old-<pid>-*`` (the names :func:`atomic_dir`
    gives them) whose process ``<pid>`` no longer runs on this machine are removed: a write in
    progress (here, or in a live process) is never touched. Writers on other machines sharing
    the folder are not told apart by pid: do not write one release folder from two machines.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)-")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _remove(entry)
            removed.append(entry)
            log.info("removed %s, left by a killed write of %s", entry, path)
    return removed


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
