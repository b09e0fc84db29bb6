"""What depends only on a model, computed once while the model lives and is unchanged.

Example::

    _TEMPLATES = PerModel(per_model=8)
    templates = _TEMPLATES.get(model, ("The", "I"), lambda: context_templates_uncached(...))

Entries are held per model object through a weak reference (a model that is garbage
collected takes its entries with it; two models never share one), at most ``per_model``
keys per model (the oldest goes first), and each is tied to the model's state: every
parameter's storage and in-place version counter, and its own forward hooks. Loading
other weights, training a step or ``model.to(...)`` changes the state, so the entry is
recomputed.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Hashable, TypeVar

from torch import nn

__all__ = ["PerModel", "model_state"]

T = TypeVar("T")


def model_state(model: nn.Module) -> tuple[Any, ...]:
    """A cheap token of ``model``'s state: (storage, in-place version) of every parameter and the
    number of forward hooks on the model itself (post-processing of its outputs)."""
    params = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())
    return params, len(model._forward_hooks), len(model._forward_pre_hooks)


class PerModel:
    """A small cache of values per live model, invalidated when the model's state changes."""

    def __init__(self, *, per_model: int = 8) -> None:
        self._per_model = per_model
        # per live model: key -> (the model's state when stored, the value)
        self._entries: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[Any, Any]]] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    def get(self, model: nn.Module, key: Hashable, compute: Callable[[], T]) -> T:
        """The value stored for (``model``, ``key``) in the model's current state, else ``compute()`` stored."""
        state = model_state(model)
        with self._lock:
            found = self._entries.get(model, {}).get(key)
        if found is not None and found[0] == state:
            return found[1]
        value = compute()
        self.put(model, key, value, state=state)
        return value

    def has(self, model: nn.Module, key: Hashable) -> bool:
        """Whether (``model``, ``key``) holds a value for the model's current state."""
        with self._lock:
            found = self._entries.get(model, {}).get(key)
        return found is not None and found[0] == model_state(model)

    def put(self, model: nn.Module, key: Hashable, value: Any, *, state: Any = None) -> None:
        state = model_state(model) if state is None else state
        with self._lock:
            entries = self._entries.setdefault(model, {})
            entries.pop(key, None)
            entries[key] = (state, value)
            while len(entries) > self._per_model:
                entries.pop(next(iter(entries)))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
