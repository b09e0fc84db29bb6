"""The two thread primitives of the hooks and the store: per-thread state and a lock, both copyable.

Example::

    call = PerThread()            # each thread sees its own attributes
    call.pending = (fire, index)  # this thread's; another thread still reads its own (or none)
    lock = Lock()
    with lock:                    # e.g. build a cache once, or add to shared counters
        ...

A model with a store attached holds the store (``model._neuraldb_store``), so
``copy.deepcopy(model)`` copies the store and its hooks' state: a :class:`PerThread` copies
the calling thread's attributes (the copy is used from this thread first), a :class:`Lock`
is a new, unlocked lock. Pickling gives fresh ones (nothing per thread survives a process).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

__all__ = ["Lock", "PerThread"]


class PerThread(threading.local):
    """``threading.local`` that deep-copies (the calling thread's attributes) and pickles (empty)."""

    def __deepcopy__(self, memo: dict) -> "PerThread":
        new = type(self)()
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce__(self) -> tuple[Any, tuple]:
        return type(self), ()


class Lock:
    """A non-reentrant lock (``with lock: ...``) that copies and pickles as a new, unlocked one."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._lock.__exit__(*exc)

    def __deepcopy__(self, memo: dict) -> "Lock":
        return Lock()

    def __reduce__(self) -> tuple[Any, tuple]:
        return Lock, ()
