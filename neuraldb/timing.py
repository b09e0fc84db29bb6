"""Where an edit's time goes: named phases, logged at DEBUG and summed in a collector.

Example::

    from neuraldb.timing import collect_phases
    with collect_phases() as phases:              # {phase: seconds}, summed over calls
        neuraldb.edit(model, tok, facts)
    phases                                        # {'context_templates': 0.9, 'keys': 0.2, ...}

The library wraps its phases in :func:`phase`; with no collector active a phase only logs
(``logging.getLogger("neuraldb.timing").setLevel(logging.DEBUG)`` shows them). The collector
lives in a :class:`contextvars.ContextVar`, so threads and nested edits do not mix their sums.
A phase does not synchronise a GPU: benchmarks that want device time call their own sync.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

__all__ = ["collect_phases", "phase"]

log = logging.getLogger(__name__)
_phases: ContextVar[dict[str, float] | None] = ContextVar("neuraldb_phases", default=None)


@contextmanager
def collect_phases() -> Iterator[dict[str, float]]:
    """Sum the seconds of every :func:`phase` run inside the block into the yielded dict."""
    out: dict[str, float] = {}
    token = _phases.set(out)
    try:
        yield out
    finally:
        _phases.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as ``name``: logged at DEBUG, added to the active collector if any."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        out = _phases.get()
        if out is not None:
            out[name] = out.get(name, 0.0) + dt
        log.debug("%s: %.3f s", name, dt)
