"""The store's hook: reads each model call, gates its positions, adds the residuals.

Example::

    hook = StoreHook(db, model)          # what db.attach(model) does
    logits = model(**batch).logits       # residuals added where the gate fires
    hook.close()                         # what db.detach() does: the original model again

    with detached(model):                # whatever store or reader is on the model is off here
        clean = model(**batch).logits    # ... and back on afterwards

Like lm-eval's ``hf_steered``, the hook is a thin layer over one primitive
(:class:`neuraldb.nethook.Trace`): a trace on the model's root keeps the call's
arguments (``input_ids``, ``attention_mask``, ``position_ids``, ``cache_position``);
a trace on the MLP output projection at the store's layer reads its input (the
queries) and edits its output. Per position (batch, seq):

1. which positions may fire (:func:`valid_positions`): not padding, not the first
   real token of a sequence (the attention sink);
2. the store's gate on those positions (``NeuralDB.fire``: top-1 cosine over the
   keys against the threshold, screened for large stores);
3. the word check (:mod:`neuraldb.words`) on the tokens ending at each position,
   with the tokens the previous call ended on when this call continues it (a
   generation step);
4. the retrieved residual added where all of it passes, the output left bit for bit
   where it does not; the store's firing counters (:class:`Firing`, ``db.firing``) updated
   on the device (no host sync).

Threads may call the model at once: the call's arguments, its routing and the word check's
history are kept per thread (a thread's generation continues its own text), the counters are
added to under a lock. Attaching, detaching and changing the store are not thread-safe.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from .nethook import Trace, cache_of
from .threads import Lock, PerThread
from .words import UNKNOWN, token_windows

__all__ = ["Firing", "Reader", "StoreHook", "attached_reader", "call_inputs", "detached", "valid_positions"]

log = logging.getLogger(__name__)
ATTRIBUTE = "_neuraldb_store"  # the reader attached to a model, on the model itself


@runtime_checkable
class Reader(Protocol):
    """What reads a store into a model: the gated :class:`~neuraldb.store.NeuralDB` itself, or
    :class:`~neuraldb.linear.LinearReader` (its facts written into the projection weight)."""

    @property
    def is_attached(self) -> bool: ...

    @property
    def model(self) -> nn.Module | None: ...

    def attach(self, model: nn.Module, *, layer: int | None = None, check: bool = True) -> Any: ...

    def detach(self) -> None: ...

    def reset_stats(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


def attached_reader(model: nn.Module) -> Reader | None:
    """The store (or reader) attached to ``model``, else None."""
    return getattr(model, ATTRIBUTE, None)


def mark_attached(model: nn.Module, reader: Reader | None) -> None:
    """Record ``reader`` as attached to ``model`` (None: nothing is)."""
    if reader is None:
        if ATTRIBUTE in model.__dict__:
            delattr(model, ATTRIBUTE)
    else:
        setattr(model, ATTRIBUTE, reader)


@contextmanager
def detached(model: nn.Module | None, *readers: Reader) -> Iterator[Reader | None]:
    """Inside the block ``model`` is the unedited model: the reader attached to it, and each of
    ``readers`` wherever it is attached, are detached; on exit each is attached back where it was.

    Example::

        with detached(model):            # e.g. keys and residuals are computed on the unedited model
            neuraldb.compute_keys(model, tok, facts, layer=10)

    Yields the reader that was attached to ``model`` (or None).
    """
    on_model = attached_reader(model) if model is not None else None
    saved: list[tuple[Reader, nn.Module]] = []
    for reader in (*readers, on_model):
        if reader is not None and reader.is_attached and all(reader is not r for r, _ in saved):
            saved.append((reader, reader.model))
            reader.detach()
    try:
        yield on_model
    finally:
        for reader, where in reversed(saved):
            if reader.is_attached:
                reader.detach()
            if where is not None:
                reader.attach(where, check=False)


@contextmanager
def attached(reader: Any, model: nn.Module, *, layer: int | None = None) -> Iterator[Any]:
    """``with attached(reader, model): ...`` attaches ``reader`` and always detaches it on exit
    (what ``db.attached(model)`` and ``LinearReader.attached(model)`` do)."""
    reader.attach(model, layer=layer)
    try:
        yield reader
    finally:
        reader.detach()


def call_inputs(trace: Trace | None, batch: int, seq: int) -> tuple[dict[str, Any], Any, Any]:
    """The model call's kwargs, its input_ids and its 2-D attention mask (keyword or positional;
    None where absent or not of this call's ``batch`` / at least ``seq`` columns)."""
    kwargs = trace.call_kwargs if trace is not None else {}
    args = trace.call_args if trace is not None else ()
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]

    def fits(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == batch and t.shape[1] >= seq

    return kwargs, ids if fits(ids) else None, mask if fits(mask) else None


def valid_positions(kwargs: dict[str, Any], mask: Any, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """(batch, seq) bool: positions that may fire (not padding, not the sink)."""
    if mask is not None:
        mask = mask.to(device).bool()
        total = mask.shape[1]
        first = mask.long().argmax(dim=1, keepdim=True)  # (batch, 1) first real token = sink
        pos = torch.arange(total - seq, total, device=device).unsqueeze(0)  # (1, seq)
        return mask[:, total - seq :] & (pos > first)
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.shape[-1] == seq:
        # absolute positions of this chunk (generation passes them): position 0 is the sink
        return (positions.to(device) > 0).expand(batch, seq)
    past = 0
    cache = cache_of(kwargs)
    if cache is not None and hasattr(cache, "get_seq_length"):
        past = int(cache.get_seq_length())
    pos = torch.arange(past, past + seq, device=device)
    return (pos > 0).unsqueeze(0).expand(batch, seq)


class Firing:
    """A store's firing counters since the last reset: gated positions, fires, fires per fact
    (``per_fact`` (N,)), and the last call's ``last_mask`` / ``last_index`` (batch, seq; -1 where
    shut). The counters stay on the device they were counted on: no host sync in the hook's hot path.

    Safe under threads: the counters are added to under a lock (they count every thread's
    calls), and ``last_mask`` / ``last_index`` are per thread (the calling thread's last call).
    """

    def __init__(self, facts: int = 0) -> None:
        self._lock = Lock()
        self.reset(facts)

    def reset(self, facts: int) -> None:
        """Zero every counter, for a store of ``facts`` facts; every thread's last call is forgotten."""
        with self._lock:
            self.positions = torch.zeros((), dtype=torch.long)
            self.fires = torch.zeros((), dtype=torch.long)
            self.per_fact = torch.zeros(facts, dtype=torch.long)
            self._last = PerThread()  # .mask, .index of each thread's last call

    @property
    def last_mask(self) -> torch.Tensor | None:
        """(batch, seq) bool: where this thread's last call fired (None before one)."""
        return getattr(self._last, "mask", None)

    @last_mask.setter
    def last_mask(self, value: torch.Tensor | None) -> None:
        self._last.mask = value

    @property
    def last_index(self) -> torch.Tensor | None:
        """(batch, seq) long: the fact fired at each position of this thread's last call, -1 where shut."""
        return getattr(self._last, "index", None)

    @last_index.setter
    def last_index(self, value: torch.Tensor | None) -> None:
        self._last.index = value

    def record(self, valid: torch.Tensor, fire: torch.Tensor, index: torch.Tensor, batch: int, seq: int) -> None:
        """Count one call's gated positions and fires (each (batch*seq,)); keep its masks for this thread."""
        positions, fires, at = valid.sum(), fire.sum(), index.clamp_min(0)
        with self._lock:
            self.positions = self.positions.to(fire.device) + positions
            self.fires = self.fires.to(fire.device) + fires
            self.per_fact = self.per_fact.to(fire.device).index_add_(0, at, fire.long())
        self.last_mask = fire.reshape(batch, seq)
        self.last_index = torch.where(fire, index, torch.full_like(index, -1)).reshape(batch, seq)

    def stats(self) -> dict[str, Any]:
        """Gated positions, fires and their rate since the last reset (reads the counters to the host)."""
        with self._lock:
            positions, fires = self.positions, self.fires
        positions, fires = int(positions), int(fires)
        return {"positions": positions, "fires": fires, "rate": fires / positions if positions else 0.0}


class _Call(PerThread):
    """A thread's state in one attachment: the routing decided at the key module until the residual
    module adds it, and the tokens its last call ended on (the word check's history)."""

    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (fire, index), (batch*seq,) each
    history: torch.Tensor | None = None  # (batch, width - 1) last tokens of the previous call


class StoreHook:
    """The hooks of one attachment of ``db`` to ``model``; :meth:`close` removes them all.

    Keeps per attachment and per thread (:class:`_Call`) the tokens the last call ended on
    (the word check's history for the next generation step) and the routing decided at the
    key module until the residual module adds it (the same module for most families); the
    root trace keeps each thread's call arguments. So threads may call the model at once,
    each getting what it would alone, and each thread's ``generate`` continues its own text.
    Opening and closing the hooks (attach, detach) is not safe while other threads call the model.
    """

    def __init__(self, db: Any, model: nn.Module) -> None:
        self.db = db
        self.model = model
        self._call = _Call()  # this thread's routing and word-check history
        self._warned_ids = False
        self._traces: list[Trace] = []
        root = getattr(model, "base_model", model)
        key_module, out_module = db.module_name(model), db.residual_module_name(model)
        try:
            self._traces.append(Trace(root, "", retain_output=False, retain_call=True))
            if key_module == out_module:
                self._traces.append(Trace(model, key_module, retain_output=False, edit_output=self._gate))
            else:
                self._traces.append(Trace(model, key_module, retain_output=False, edit_output=self._route_only))
                self._traces.append(Trace(model, out_module, retain_output=False,
                                          edit_output=lambda o, x: self._apply(o)))
        except BaseException:
            self.close()
            raise

    @classmethod
    def attach(cls, db: Any, model: nn.Module, *, layer: int | None = None, check: bool = True,
               error: type[ValueError] = ValueError) -> "StoreHook":
        """``db``'s hooks on ``model``, marked as its reader (what ``db.attach(model)`` does): ``error``
        while another reader is attached there, or with ``check`` unless ``db`` was built for it."""
        other = attached_reader(model)
        if other is not None:
            raise error(f"another store is attached to this model ({other!r}); detach it first")
        if check:
            db.check_compatible(model, layer=layer)
        hook = cls(db, model)
        mark_attached(model, db)
        return hook

    def detach(self) -> None:
        """Remove the hooks and the model's mark (what ``db.detach()`` does): the original model again."""
        self.close()
        if attached_reader(self.model) is self.db:
            mark_attached(self.model, None)

    def close(self) -> None:
        """Remove the hooks (the model's mark stays: see :meth:`detach`)."""
        traces, self._traces = self._traces, []
        for t in reversed(traces):
            t.close()

    # --------------------------------------------------------------- one call
    def _gate(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self._route(x)
        return self._apply(out)

    def _route_only(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self._route(x)
        return out

    def _route(self, x: torch.Tensor) -> None:
        """Gate decision for the keys ``x`` (batch, seq, d_key); kept for :meth:`_apply`."""
        self._call.pending = None
        db = self.db
        if len(db) == 0 or x.dim() != 3:
            return
        batch, seq, _ = x.shape
        kwargs, ids, mask = call_inputs(self._traces[0] if self._traces else None, batch, seq)
        valid = valid_positions(kwargs, mask, batch, seq, x.device).reshape(-1)  # (batch*seq,)
        rows = valid.nonzero().squeeze(1)  # (m,) only these are gated: the sink and padding never fire
        queries = x.reshape(-1, db.d_key)[rows]  # (m, d_key)
        if db.checks_words(x.device):  # (batch, seq, width) token ids ending at each position
            windows = self._windows(kwargs, ids, mask, batch, seq, x.device)
            gated, at = db.fire_checked(queries, windows.reshape(batch * seq, -1)[rows])  # (m,) each
        else:
            gated, at = db.fire(queries)  # (m,) each
        fire = torch.zeros_like(valid).index_copy_(0, rows, gated)  # (batch*seq,)
        index = torch.full_like(valid, -1, dtype=torch.long).index_copy_(0, rows, at)
        db.firing.record(valid, fire, index, batch, seq)
        self._call.pending = (fire, index)

    def _windows(self, kwargs: dict[str, Any], ids: Any, mask: Any, batch: int, seq: int,
                 device: torch.device) -> torch.Tensor:
        """The token windows of this call (:func:`token_windows`), with the tokens the previous
        call ended on when this one continues it (a generation step); keeps this call's last tokens."""
        width = self.db.words.shape[2]
        if ids is None:
            if not self._warned_ids and bool(self.db.word_checked.any()):
                log.warning("the store's word check needs input_ids (got none, e.g. inputs_embeds): "
                            "facts stored with a word do not fire on this input")
                self._warned_ids = True
            ids = torch.full((batch, seq), UNKNOWN, dtype=torch.long, device=device)
        ids = ids[:, ids.shape[1] - seq :].to(device)
        if mask is not None:  # padding is no text: a subject right after left padding starts the text
            ids = torch.where(mask[:, mask.shape[1] - seq :].to(device).bool(), ids, torch.full_like(ids, UNKNOWN))
        windows = token_windows(ids, self._continued_history(kwargs, mask, batch, seq, device), width=width)
        if seq:
            self._call.history = windows[:, -1, 1:]  # (batch, width - 1) the tokens this call ends on
        return windows

    def _continued_history(self, kwargs: dict[str, Any], mask: Any, batch: int, seq: int,
                           device: torch.device) -> torch.Tensor | None:
        """The previous call's last tokens for the rows this call continues, else None / UNKNOWN.

        Not decided from the cache's length: the layers before this one have already
        appended this call's tokens to it.
        """
        history = self._call.history
        if history is None or history.shape[0] != batch:
            return None
        if mask is not None:
            return history if mask.shape[1] > seq else None
        start = kwargs.get("cache_position")
        if isinstance(start, torch.Tensor) and start.numel():
            fresh = start.reshape(-1)[:1].to(device) == 0  # (1,)
        else:
            positions = kwargs.get("position_ids")
            if not (isinstance(positions, torch.Tensor) and positions.dim() >= 1):
                return None
            fresh = positions.reshape(-1, positions.shape[-1])[:, :1].to(device) == 0
        # on the device, no host sync: rows that start a text have no history
        return torch.where(fresh.reshape(-1, 1), torch.full_like(history, UNKNOWN), history.to(device))

    def _apply(self, out: torch.Tensor) -> torch.Tensor:
        """Add the routed residuals to ``out`` (batch, seq, d_model); untouched where shut."""
        call = self._call
        pending, call.pending = call.pending, None
        if pending is None:
            return out
        fire, index = pending
        _, residuals = self.db.device_tensors(out.device)
        add = residuals[index.clamp_min(0)].to(out.dtype)  # (batch*seq, d_model)
        flat = out.reshape(-1, out.shape[-1])
        return torch.where(fire.unsqueeze(1), flat + add, flat).reshape(out.shape)
