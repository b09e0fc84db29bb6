"""Files: atomic writes with ordinary permissions, sha256, the data folder.

Example::

    from neuraldb.io import atomic_write, sha256_file
    with atomic_write("reports/run/report.json") as tmp:   # a temporary path beside the target
        tmp.write_text(json.dumps(report))                  # renamed over the target on success
    sha256_file("store.safetensors")                        # '3f1c...'

Every file the project writes (stores, reports, gate reports, releases, caches) goes
through :func:`atomic_write`: a reader never sees a half-written file, a failed or
interrupted write leaves the old file (and no temporary) behind, and the new file gets
the mode an ordinary ``open()`` would give it (0666 less the umask, so 0644 under the
usual umask 022), not the 0600 of ``tempfile.mkstemp``; folders get 0777 less the umask
(:func:`make_dir_public`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write", "write_text", "sha256_file", "umask_mode", "make_dir_public", "default_data_dir"]

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
    (``evals.datasets.DATA_DIR_LAYOUT``); tests and tox point it at a local copy.
    """
    if data_dir is not None:
        return str(data_dir)
    return os.environ.get("NEURALDB_DATA_DIR") or None
