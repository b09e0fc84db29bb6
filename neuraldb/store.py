"""The store: one key and one residual per fact, read by a gated top-1 retrieval.

Example::

    db = NeuralDB(layer=10, d_key=1536, d_model=576, gamma=0.65)
    db.add(["f1"], keys, residuals)               # keys (1, d_key), residuals (1, d_model)
    with db.attached(model):                      # hook on model.layers.10.mlp.down_proj
        logits = model(**batch).logits
    db.stats()                                    # {'positions': ..., 'fires': ...}
    db.save("facts.safetensors"); NeuralDB.load("facts.safetensors", model=model)

At every token position (except the attention-sink position, the first real
token of each sequence, and padding) the input ``k`` of the MLP output
projection is compared with every stored key; the residual of the most similar
key ``j`` is added to the projection's output when ``cos(k, k_j) > max(gamma,
thresholds[j])`` and, for a fact stored with its subject's tokens (what
``neuraldb.edit`` does, ``EditConfig.word_check``), the tokens ending at that
position spell that subject (:mod:`neuraldb.words`). Where the gate stays shut the
output tensor is the original one, bit for bit.

Per-key thresholds (``thresholds``, -inf = the global ``gamma`` alone) raise the
gate of keys that resemble generic text: :meth:`NeuralDB.calibrate` sets
``thresholds[i] = max cos(q, k_i) + margin`` over calibration queries (e.g. the
activations of unrelated text), so key ``i`` can no longer fire on any of them.
Each key's threshold depends on that key alone, so adding, removing or updating
one fact never changes another fact's gate. Without calibration the gate is
exactly the paper's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .arch import ModelArch, resolve_arch
from .nethook import Trace, get_module
from .retrieval import LowRankScreen, top1, unit_rows
from .words import NO_WORD, WORD_WIDTH, token_windows, word_match

__all__ = ["NeuralDB", "StoreError", "layer_fingerprint", "FORMAT_VERSION"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class StoreError(ValueError):
    """A store that cannot be used as asked: wrong model or layer, corrupt file, bad input."""


def layer_fingerprint(model: nn.Module, module_name: str) -> str:
    """sha256 of the edited projection's weight (rounded to bfloat16, so fp32/bf16 copies agree)."""
    weight = get_module(model, module_name).weight.detach()
    h = hashlib.sha256(str(tuple(weight.shape)).encode())
    h.update(weight.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or type(model).__name__)


class NeuralDB:
    """Keys (N, d_key) and residuals (N, d_model) for one layer, with the gate.

    Keyword-only constructor; ``neuraldb.edit`` builds one for you. Master copies
    live on the CPU in float32; attaching moves a normalised copy to the model's
    device. ``chunk_size`` bounds the memory of one retrieval to
    ``positions x chunk_size`` scores, so 100K keys fit.

    With ``screen_min_keys`` keys or more, the hook proves most positions cannot
    fire with a rank-``screen_rank`` bound (default ``d_key // 3 - 1``, so that with its
    norm column the bound is one ``d_key // 3``-wide product; 0 turns it off)
    and computes the exact top-1 only for the rest (:class:`~neuraldb.retrieval.LowRankScreen`):
    the same fires, non-fires and fired indices as brute force, at a fraction of
    its cost. :meth:`gate` and :meth:`retrieve` are always brute force.
    """

    def __init__(
        self,
        *,
        layer: int,
        d_key: int,
        d_model: int,
        gamma: float = 0.65,
        module_template: str | None = None,
        residual_template: str | None = None,
        model_name: str = "",
        model_type: str = "",
        fingerprint: str = "",
        config: Mapping[str, Any] | None = None,
        chunk_size: int = 16384,
        screen_rank: int | None = None,
        screen_min_keys: int = 4096,
    ) -> None:
        if not -1.0 <= gamma <= 1.0:
            raise StoreError(f"gamma={gamma} is not a cosine threshold: use a value in [-1, 1]")
        self.layer = int(layer)
        self.d_key = int(d_key)
        self.d_model = int(d_model)
        self._gamma = float(gamma)
        self.module_template = module_template
        self.residual_template = residual_template or module_template
        self.model_name = model_name
        self.model_type = model_type
        self.fingerprint = fingerprint
        self.config = dict(config or {})
        self.chunk_size = int(chunk_size)
        # the hook's exact screened gate (retrieval.LowRankScreen) for stores of >= screen_min_keys
        self.screen_rank = max(1, self.d_key // 3 - 1) if screen_rank is None else int(screen_rank)
        self.screen_min_keys = int(screen_min_keys)
        self.keys = torch.empty(0, self.d_key)  # (N, d_key) float32, cpu
        self.residuals = torch.empty(0, self.d_model)  # (N, d_model) float32, cpu
        self.thresholds = torch.empty(0)  # (N,) float32, cpu; -inf = global gamma only
        self.words = torch.full((0, 2, WORD_WIDTH), NO_WORD, dtype=torch.long)  # (N, 2, width); NO_WORD = no check
        self._word_starts = torch.zeros(0, dtype=torch.bool)  # (vocab,) words.word_start_tokens of the tokenizer
        self._history: torch.Tensor | None = None  # (batch, width - 1) last tokens of the previous call
        self.ids: list[str] = []
        self.facts: dict[str, dict[str, Any]] = {}
        self._index: dict[str, int] = {}
        self._dev: dict[str, torch.Tensor] = {}
        self._version = 0  # bumped by every change of keys, residuals or thresholds (readers cache on it)
        self._traces: list[Trace] = []
        self._model: nn.Module | None = None
        self.reset_stats()

    @property
    def gamma(self) -> float:
        """Global cosine threshold; setting it takes effect at the next forward pass."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        if not -1.0 <= float(value) <= 1.0:
            raise StoreError(f"gamma={value} is not a cosine threshold: use a value in [-1, 1]")
        self._gamma = float(value)
        self._dev = {}

    # ----------------------------------------------------------------- contents
    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, fact_id: object) -> bool:
        return fact_id in self._index

    def __repr__(self) -> str:
        return (
            f"NeuralDB(facts={len(self)}, layer={self.layer}, gamma={self.gamma}, d_key={self.d_key}, "
            f"d_model={self.d_model}, model={self.model_name!r})"
        )

    def _check_rows(self, keys: torch.Tensor, residuals: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.as_tensor(keys).detach().to("cpu", torch.float32)
        residuals = torch.as_tensor(residuals).detach().to("cpu", torch.float32)
        if keys.shape != (n, self.d_key):
            raise StoreError(f"keys must have shape ({n}, {self.d_key}), got {tuple(keys.shape)}")
        if residuals.shape != (n, self.d_model):
            raise StoreError(f"residuals must have shape ({n}, {self.d_model}), got {tuple(residuals.shape)}")
        if not (torch.isfinite(keys).all() and torch.isfinite(residuals).all()):
            raise StoreError("keys and residuals must be finite (found NaN or inf)")
        if (keys.norm(dim=1) == 0).any():
            raise StoreError("a key is the zero vector: its cosine similarity is undefined")
        return keys, residuals

    def add(
        self,
        ids: Sequence[str],
        keys: torch.Tensor,
        residuals: torch.Tensor,
        *,
        facts: Sequence[Mapping[str, Any]] | None = None,
        thresholds: torch.Tensor | Sequence[float] | None = None,
        words: torch.Tensor | None = None,
    ) -> None:
        """Append facts. An id already in the store is an error (use :meth:`update`).

        ``thresholds`` (n,) are per-key gate thresholds (see :meth:`calibrate`); None = -inf.
        ``words`` (n, 2, width) are the subjects' tokens
        (:func:`neuraldb.words.subject_words`); None = no word check for these facts.
        """
        ids = [str(i) for i in ids]
        keys, residuals = self._check_rows(keys, residuals, len(ids))
        thresholds = self._check_thresholds(thresholds, len(ids))
        words = self._check_words(words, len(ids))
        dup = [i for i in ids if i in self._index]
        if dup or len(set(ids)) != len(ids):
            raise StoreError(f"fact id(s) already present or repeated: {dup[:5] or ids}; use update() to replace")
        if facts is not None and len(facts) != len(ids):
            raise StoreError(f"facts has {len(facts)} entries for {len(ids)} ids")
        start = len(self.ids)
        self.keys = torch.cat([self.keys, keys])
        self.residuals = torch.cat([self.residuals, residuals])
        self.thresholds = torch.cat([self.thresholds, thresholds])
        self.words = torch.cat([self.words, words])
        for j, fid in enumerate(ids):
            self._index[fid] = start + j
            self.ids.append(fid)
            if facts is not None:
                self.facts[fid] = dict(facts[j])
        self._changed()

    def head(self, n: int) -> "NeuralDB":
        """A new, detached store with the first ``n`` facts (keys, residuals, thresholds,
        fact records) and this store's settings; ``head(0)`` is an empty store like this one.

        Example::

            small = db.head(100)      # the first 100 facts, e.g. one size of a scaling study
        """
        if not 0 <= n <= len(self):
            raise StoreError(f"head({n}): use 0 <= n <= {len(self)} (the store's size)")
        sub = NeuralDB(layer=self.layer, d_key=self.d_key, d_model=self.d_model, gamma=self.gamma,
                       module_template=self.module_template, residual_template=self.residual_template,
                       model_name=self.model_name, model_type=self.model_type, fingerprint=self.fingerprint,
                       config=self.config, chunk_size=self.chunk_size, screen_rank=self.screen_rank,
                       screen_min_keys=self.screen_min_keys)
        sub.add(self.ids[:n], self.keys[:n], self.residuals[:n], thresholds=self.thresholds[:n], words=self.words[:n])
        sub.facts = {i: dict(self.facts[i]) for i in sub.ids if i in self.facts}
        sub.word_starts = self.word_starts
        return sub

    def remove(self, ids: str | Sequence[str]) -> None:
        """Delete facts by id; an unknown id is an error and nothing is removed."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        missing = [i for i in ids if i not in self._index]
        if missing:
            raise StoreError(f"unknown fact id(s) {missing[:5]}; nothing was removed")
        drop = {self._index[i] for i in ids}
        keep = torch.tensor([r for r in range(len(self.ids)) if r not in drop], dtype=torch.long)
        self.keys = self.keys[keep]
        self.residuals = self.residuals[keep]
        self.thresholds = self.thresholds[keep]
        self.words = self.words[keep]
        self.ids = [self.ids[r] for r in keep.tolist()]
        for i in ids:
            self.facts.pop(i, None)
        self._index = {fid: r for r, fid in enumerate(self.ids)}
        self._changed()

    def update(
        self,
        fact_id: str,
        *,
        key: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        fact: Mapping[str, Any] | None = None,
        threshold: float | None = None,
        words: torch.Tensor | None = None,
    ) -> None:
        """Replace one fact's key, residual, per-key threshold and/or word (2, width) in place.

        A new key without a new ``threshold`` resets the fact's threshold to -inf (the
        global gamma): a threshold calibrated for the old key says nothing about the new one.
        """
        if fact_id not in self._index:
            raise StoreError(f"unknown fact id {fact_id!r}; use add() for new facts")
        r = self._index[fact_id]
        k = self.keys[r : r + 1] if key is None else torch.as_tensor(key).reshape(1, -1)
        v = self.residuals[r : r + 1] if residual is None else torch.as_tensor(residual).reshape(1, -1)
        k, v = self._check_rows(k, v, 1)
        w = None if words is None else self._check_words(torch.as_tensor(words).reshape(1, 2, -1), 1)
        if threshold is not None:
            self.thresholds[r] = self._check_thresholds([threshold], 1)[0]
        elif key is not None:
            self.thresholds[r] = float("-inf")
        self.keys[r] = k[0]
        self.residuals[r] = v[0]
        if w is not None:
            self.words[r] = w[0]
        if fact is not None:
            self.facts[fact_id] = dict(fact)
        self._changed()

    def _check_thresholds(self, thresholds: Any, n: int) -> torch.Tensor:
        if thresholds is None:
            return torch.full((n,), float("-inf"))
        t = torch.as_tensor(thresholds, dtype=torch.float32).detach().to("cpu").reshape(-1)
        if t.shape != (n,):
            raise StoreError(f"thresholds must have shape ({n},), got {tuple(t.shape)}")
        if torch.isnan(t).any() or (t == float("inf")).any():
            raise StoreError("thresholds must be numbers or -inf (found NaN or +inf)")
        return t.clone()

    def _check_words(self, words: Any, n: int) -> torch.Tensor:
        width = self.words.shape[2]
        if words is None:
            return torch.full((n, 2, width), NO_WORD, dtype=torch.long)
        w = torch.as_tensor(words).detach().to("cpu")
        if w.dtype.is_floating_point or w.shape != (n, 2, width):
            raise StoreError(
                f"words must be integer token ids of shape ({n}, 2, {width}), got {w.dtype} {tuple(w.shape)}: "
                "build them with neuraldb.words.subject_words(tokenizer, subjects)"
            )
        return w.long().clone()

    @property
    def word_starts(self) -> torch.Tensor:
        """(vocab,) bool: the tokens after which a word starts (:func:`neuraldb.words.word_start_tokens`)."""
        return self._word_starts

    @word_starts.setter
    def word_starts(self, value: torch.Tensor) -> None:
        self._word_starts = torch.as_tensor(value).detach().to("cpu", torch.bool).reshape(-1)
        self._changed(keep_stats=True)

    @property
    def word_checked(self) -> torch.Tensor:
        """(N,) bool: the facts whose gate also checks their subject's tokens."""
        return (self.words[:, 0] != NO_WORD).any(dim=1)

    def word_ok(self, index: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(M,) bool: the word check for retrieved rows ``index`` (M,) at token ``windows``
        (M, width) (:func:`neuraldb.words.token_windows`); True for facts without a word."""
        self._device_tensors(windows.device)
        return word_match(self._dev["words"][index.clamp_min(0)], windows, self._dev["starts"])

    @torch.no_grad()
    def calibrate(
        self,
        queries: torch.Tensor,
        *,
        margin: float = 0.05,
        ids: Sequence[str] | None = None,
        chunk_size: int = 8192,
    ) -> torch.Tensor:
        """Per-key thresholds from calibration queries (activations of text no fact is about).

        ``thresholds[i] = max_q cos(q, k_i) + margin`` for the facts ``ids`` (default: all),
        so none of them fires on any calibration query again, and a query must be more
        like key ``i`` than anything in the calibration text to fire it. Exact (a max
        over all queries), deterministic, and per key: one fact's threshold never depends
        on another fact. ``queries`` is (M, d_key), on any device. Returns the new
        thresholds of the calibrated rows.
        """
        if not -2.0 <= margin <= 2.0:
            raise StoreError(f"margin={margin} makes no sense for a cosine threshold")
        rows = list(range(len(self))) if ids is None else [self._row(i) for i in ids]
        q = torch.as_tensor(queries).detach().reshape(-1, self.d_key).float()
        if q.shape[0] == 0:
            raise StoreError("calibrate needs at least one query")
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        best = torch.full((len(rows),), float("-inf"))
        for start in range(0, len(rows), chunk_size):
            r = torch.tensor(rows[start : start + chunk_size], dtype=torch.long)
            k = self.keys[r].to(q.device)
            k = k / k.norm(dim=1, keepdim=True)
            m = torch.full((len(r),), float("-inf"), device=q.device)
            for qs in range(0, q.shape[0], chunk_size):
                m = torch.maximum(m, (k @ q[qs : qs + chunk_size].T).max(dim=1).values)
            best[start : start + len(r)] = m.cpu()
        new = best + float(margin)
        if rows:
            self.thresholds[torch.tensor(rows, dtype=torch.long)] = new
        self._changed(keep_stats=True)
        return new

    def _row(self, fact_id: str) -> int:
        if fact_id not in self._index:
            raise StoreError(f"unknown fact id {fact_id!r}")
        return self._index[fact_id]

    def gate_thresholds(self) -> torch.Tensor:
        """(N,) the threshold each key's gate uses: ``max(gamma, thresholds)``."""
        return self.thresholds.clamp_min(self.gamma)

    def _changed(self, keep_stats: bool = False) -> None:
        self._version += 1
        self._dev.clear()
        if not keep_stats:
            self.fires_per_fact = torch.zeros(len(self.ids), dtype=torch.long)

    # ---------------------------------------------------------------- retrieval
    def _device_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._dev.get("device") is None or self._dev["device"].device != device:  # type: ignore[union-attr]
            self._dev = {
                "device": torch.empty(0, device=device),
                "keys": unit_rows(self.keys.to(device)),  # (N, d_key)
                "residuals": self.residuals.to(device),
                "gate": self.gate_thresholds().to(device),  # (N,) max(gamma, thresholds)
                "words": self.words.to(device),  # (N, 2, width)
                "starts": self.word_starts.to(device),  # (vocab,)
                "checks": torch.tensor(bool(self.word_checked.any())),  # host flag, read once per change
            }
        return self._dev["keys"], self._dev["residuals"]

    @torch.no_grad()
    def gate(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate's decision for query rows (M, d_key): ``(fire, index, scores)``.

        ``index``/``scores`` are :meth:`retrieve`'s exact top-1; ``fire`` (M,) bool is
        ``scores > max(gamma, thresholds[index])``. Positions are not masked here (the
        hook also skips the sink position and padding), and the word check, which needs
        the tokens, is the hook's (or :meth:`word_ok`'s).
        """
        scores, index = self.retrieve(queries)
        if len(self) == 0:
            return torch.zeros_like(scores, dtype=torch.bool), index, scores
        self._device_tensors(scores.device)
        return scores > self._dev["gate"][index], index, scores

    @torch.no_grad()
    def retrieve(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-1 cosine: ``(scores, index)`` per query row, chunked over the keys.

        ``queries`` is (M, d_key); scores is (M,) float32 (-inf for an empty store),
        index (M,) long (-1 for an empty store).
        """
        q = unit_rows(queries.reshape(-1, self.d_key))  # (M, d_key)
        if len(self) == 0:
            return (torch.full((q.shape[0],), float("-inf"), device=q.device),
                    torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device))
        keys, _ = self._device_tensors(q.device)
        return top1(q, keys, chunk_size=self.chunk_size)

    @torch.no_grad()
    def _screened_gate(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hook's gate for large stores: :meth:`gate`'s fire and fired index, screened."""
        q = unit_rows(queries)  # (M, d_key)
        keys, _ = self._device_tensors(q.device)
        screen = self._dev.get("screen")
        if screen is None:  # built once per change of the store, from its keys and this first batch
            sample = q[:: max(1, q.shape[0] // 4096)]
            screen = self._dev["screen"] = LowRankScreen.build(  # type: ignore[assignment]
                keys, sample=sample, rank=self.screen_rank, chunk_size=self.chunk_size
            )
        return screen.gate(q, keys, self._dev["gate"])  # type: ignore[union-attr]

    def reset_stats(self) -> None:
        """Zero the firing counters (positions seen, fires, fires per fact)."""
        self._positions = torch.zeros((), dtype=torch.long)
        self._fires = torch.zeros((), dtype=torch.long)
        self.fires_per_fact = torch.zeros(len(getattr(self, "ids", [])), dtype=torch.long)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_fire_mask: torch.Tensor | None = None
        self.last_fire_index: torch.Tensor | None = None

    def stats(self) -> dict[str, Any]:
        """Firing counters since the last reset: gated positions, fires, rate."""
        positions, fires = int(self._positions), int(self._fires)
        return {"positions": positions, "fires": fires, "rate": fires / positions if positions else 0.0}

    def _call_inputs(self, batch: int, seq: int) -> tuple[dict[str, Any], Any, Any]:
        """The model call's kwargs, its input_ids and its 2-D attention mask (keyword or positional;
        None where absent or not of this call's ``batch`` / at least ``seq`` columns)."""
        kwargs = self._traces[0].call_kwargs if self._traces else {}
        args = self._traces[0].call_args if self._traces else ()
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]

        def fits(t: Any) -> bool:
            return isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == batch and t.shape[1] >= seq

        return kwargs, ids if fits(ids) else None, mask if fits(mask) else None

    def _valid_positions(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """(batch, seq) bool: positions that may fire (not padding, not the sink)."""
        kwargs, _, mask = self._call_inputs(batch, seq)
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
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        pos = torch.arange(past, past + seq, device=device)
        return (pos > 0).unsqueeze(0).expand(batch, seq)

    def _route(self, x: torch.Tensor) -> None:
        """Gate decision for the keys ``x`` (batch, seq, d_key); kept for :meth:`_apply`."""
        self._pending = None
        if len(self) == 0 or x.dim() != 3:
            return
        batch, seq, _ = x.shape
        valid = self._valid_positions(batch, seq, x.device).reshape(-1)  # (batch*seq,)
        rows = valid.nonzero().squeeze(1)  # (m,) only these are gated: the sink and padding never fire
        queries = x.reshape(-1, self.d_key)[rows]  # (m, d_key)
        if self.screen_rank and len(self) >= self.screen_min_keys and self.screen_rank < self.d_key:
            gated, at = self._screened_gate(queries)  # (m,)
        else:
            gated, at, _ = self.gate(queries)  # (m,)
        if bool(self._dev["checks"]):  # (batch, seq, width) token ids ending at each position
            windows = self._windows(batch, seq, x.device)
            gated = gated & self.word_ok(at, windows.reshape(batch * seq, -1)[rows])
        fire = torch.zeros_like(valid).index_copy_(0, rows, gated)  # (batch*seq,)
        index = torch.full_like(valid, -1, dtype=torch.long).index_copy_(0, rows, at)
        # counters stay on the device: no host sync in the hot path
        self._positions = self._positions.to(x.device) + valid.sum()
        self._fires = self._fires.to(x.device) + fire.sum()
        self.fires_per_fact = self.fires_per_fact.to(x.device).index_add_(0, index.clamp_min(0), fire.long())
        self.last_fire_mask = fire.reshape(batch, seq)
        self.last_fire_index = torch.where(fire, index, torch.full_like(index, -1)).reshape(batch, seq)
        self._pending = (fire, index)

    def _windows(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """The token windows of this call (:func:`token_windows`), with the tokens the previous
        call ended on when this one continues it (a generation step); keeps this call's last tokens."""
        kwargs, ids, mask = self._call_inputs(batch, seq)
        width = self.words.shape[2]
        if ids is None:
            if not getattr(self, "_warned_ids", False) and bool(self.word_checked.any()):
                log.warning("the store's word check needs input_ids (got none, e.g. inputs_embeds): "
                            "facts stored with a word do not fire on this input")
                self._warned_ids = True
            ids = torch.full((batch, seq), -2, dtype=torch.long, device=device)
        ids = ids[:, ids.shape[1] - seq :].to(device)
        if mask is not None:  # padding is no text: a subject right after left padding starts the text
            ids = torch.where(mask[:, mask.shape[1] - seq :].to(device).bool(), ids, torch.full_like(ids, -2))
        # does this call continue the previous one (a generation step)? Not from the cache's length:
        # the layers before this one have already appended this call's tokens to it
        history = self._history if self._history is not None and self._history.shape[0] == batch else None
        if mask is not None:
            history = history if mask.shape[1] > seq else None
        elif history is not None:
            start = kwargs.get("cache_position")
            if isinstance(start, torch.Tensor) and start.numel():
                fresh = start.reshape(-1)[:1].to(device) == 0  # (1,)
            else:
                positions = kwargs.get("position_ids")
                fresh = (positions.reshape(-1, positions.shape[-1])[:, :1].to(device) == 0
                         if isinstance(positions, torch.Tensor) and positions.dim() >= 1 else None)
            if fresh is None:
                history = None
            else:  # on the device, no host sync: rows that start a text have no history
                history = torch.where(fresh.reshape(-1, 1), torch.full_like(history, -2), history.to(device))
        windows = token_windows(ids, history, width=width)
        if seq:
            self._history = windows[:, -1, 1:]  # (batch, width - 1) the tokens this call ends on
        return windows

    def _apply(self, out: torch.Tensor) -> torch.Tensor:
        """Add the routed residuals to ``out`` (batch, seq, d_model); untouched where shut."""
        pending, self._pending = self._pending, None
        if pending is None:
            return out
        fire, index = pending
        _, residuals = self._device_tensors(out.device)
        add = residuals[index.clamp_min(0)].to(out.dtype)  # (batch*seq, d_model)
        flat = out.reshape(-1, out.shape[-1])
        return torch.where(fire.unsqueeze(1), flat + add, flat).reshape(out.shape)

    def _gate(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self._route(x)
        return self._apply(out)

    def _route_only(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self._route(x)
        return out

    # ------------------------------------------------------------ attach/detach
    def module_name(self, model: nn.Module | None = None) -> str:
        """The module whose input is the key (the MLP output projection at ``layer``)."""
        if self.module_template:
            return self.module_template.format(self.layer)
        if model is None:
            raise StoreError("this store has no module template; attach it to a model first")
        return resolve_arch(model).mlp_out_at(self.layer)

    def residual_module_name(self, model: nn.Module | None = None) -> str:
        """The module whose output receives the residual (usually the same projection)."""
        if self.residual_template:
            return self.residual_template.format(self.layer)
        if model is None:
            return self.module_name(model)
        return resolve_arch(model).residual_out_at(self.layer)

    def _check_layer(self, layer: int) -> None:
        if int(layer) != self.layer:
            raise StoreError(
                f"this store was built for layer {self.layer}, not layer {layer}: keys and residuals are "
                f"specific to the layer they were computed at; attach it at layer {self.layer} or re-edit "
                f"the facts with EditConfig(layer={layer})"
            )

    def check_compatible(self, model: nn.Module, *, layer: int | None = None) -> None:
        """Raise :class:`StoreError` unless this store was built for ``model`` at ``layer``."""
        if layer is not None:
            self._check_layer(layer)
        name = self.module_name(model)
        try:
            module = get_module(model, name)
        except LookupError as exc:
            raise StoreError(
                f"this store was built for module {name!r} ({self.model_type or 'unknown'} family, "
                f"model {self.model_name!r}); {type(model).__name__} has no such module"
            ) from exc
        weight = getattr(module, "weight", None)
        if weight is not None and self.d_key not in tuple(weight.shape):
            raise StoreError(
                f"this store's keys have {self.d_key} dims but {name} has weight shape "
                f"{tuple(weight.shape)}: it was built for another model ({self.model_name!r})"
            )
        if self.fingerprint:
            fp = layer_fingerprint(model, name)
            if fp != self.fingerprint:
                raise StoreError(
                    f"this store was built for model {self.model_name!r} whose {name} weights have "
                    f"fingerprint {self.fingerprint}; this model ({model_name(model)!r}) has {fp}. "
                    "Keys only make sense on the model they were computed on: load the matching base "
                    "model, or re-edit the facts on this one"
                )

    def attach(self, model: nn.Module, *, layer: int | None = None, check: bool = True) -> "NeuralDB":
        """Hook the gate into ``model`` (checks it is the store's model and layer)."""
        if self._traces:
            raise StoreError("this store is already attached; call detach() first")
        other = getattr(model, "_neuraldb_store", None)
        if other is not None:
            raise StoreError(f"another store is attached to this model ({other!r}); detach it first")
        if check:
            self.check_compatible(model, layer=layer)
        root = getattr(model, "base_model", model)
        traces: list[Trace] = []
        try:
            traces.append(Trace(root, "", retain_output=False, retain_call=True))
            key_module, out_module = self.module_name(model), self.residual_module_name(model)
            if key_module == out_module:
                traces.append(Trace(model, key_module, retain_output=False, edit_output=self._gate))
            else:
                traces.append(Trace(model, key_module, retain_output=False, edit_output=self._route_only))
                traces.append(Trace(model, out_module, retain_output=False, edit_output=lambda o, x: self._apply(o)))
        except BaseException:
            for t in traces:
                t.close()
            raise
        self._traces, self._model = traces, model
        model._neuraldb_store = self
        return self

    def detach(self) -> None:
        """Remove the hooks; the model is the original model again."""
        traces, model, self._traces, self._model = self._traces, self._model, [], None
        for t in reversed(traces):
            t.close()
        if model is not None and getattr(model, "_neuraldb_store", None) is self:
            del model._neuraldb_store

    @property
    def is_attached(self) -> bool:
        return bool(self._traces)

    @contextmanager
    def attached(self, model: nn.Module, *, layer: int | None = None) -> Iterator["NeuralDB"]:
        """``with db.attached(model): ...`` attaches, and always detaches on exit."""
        self.attach(model, layer=layer)
        try:
            yield self
        finally:
            self.detach()

    # -------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, Any]:
        return {
            "format": "neuraldb",
            "format_version": FORMAT_VERSION,
            "layer": self.layer,
            "gamma": self.gamma,
            "d_key": self.d_key,
            "d_model": self.d_model,
            "module_template": self.module_template,
            "residual_template": self.residual_template,
            "model_name": self.model_name,
            "model_type": self.model_type,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "per_key_thresholds": bool(torch.isfinite(self.thresholds).any()),
            "ids": self.ids,
            "facts": [self.facts.get(i) for i in self.ids],
            "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write keys, residuals and metadata to one safetensors file, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"neuraldb": json.dumps(self.metadata(), ensure_ascii=False)}
        tensors = {"keys": self.keys.contiguous(), "residuals": self.residuals.contiguous()}
        if torch.isfinite(self.thresholds).any():  # only then: files without them stay readable by older code
            tensors["thresholds"] = self.thresholds.contiguous()
        if bool(self.word_checked.any()):  # likewise
            tensors["words"] = self.words.contiguous()
            tensors["word_starts"] = self.word_starts.to(torch.uint8).contiguous()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, model: nn.Module | None = None, layer: int | None = None
    ) -> "NeuralDB":
        """Read a store saved by :meth:`save`; with ``model``, check it belongs to that model."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = Path(path)
        if not path.is_file():
            raise StoreError(f"no store file at {str(path)!r}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get("neuraldb")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise StoreError(f"{path} is not a readable safetensors store (corrupt or truncated?): {exc}") from exc
        if raw is None:
            raise StoreError(f"{path} has no neuraldb metadata: it was not written by NeuralDB.save")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}: the neuraldb metadata is not valid JSON ({exc})") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format version {meta.get('format_version')!r} is not supported "
                f"(this neuraldb reads version {FORMAT_VERSION})"
            )
        required = ("layer", "gamma", "d_key", "d_model", "ids")
        missing = [k for k in required if k not in meta]
        if missing or not {"keys", "residuals"} <= set(tensors) <= {"keys", "residuals", "thresholds", "words",
                                                                                  "word_starts"}:
            raise StoreError(f"{path}: missing metadata field(s) {missing} or tensors {sorted(tensors)}")
        db = cls(
            layer=meta["layer"],
            d_key=meta["d_key"],
            d_model=meta["d_model"],
            gamma=meta["gamma"],
            module_template=meta.get("module_template"),
            residual_template=meta.get("residual_template"),
            model_name=meta.get("model_name", ""),
            model_type=meta.get("model_type", ""),
            fingerprint=meta.get("fingerprint", ""),
            config=meta.get("config") or {},
        )
        n = len(meta["ids"])
        if tensors["keys"].shape[0] != n or tensors["residuals"].shape[0] != n:
            raise StoreError(
                f"{path}: {n} fact ids but {tensors['keys'].shape[0]} keys / "
                f"{tensors['residuals'].shape[0]} residuals; the file is inconsistent"
            )
        facts = meta.get("facts") or [None] * n
        thresholds = tensors.get("thresholds")
        if thresholds is not None and thresholds.shape != (n,):
            raise StoreError(f"{path}: {n} fact ids but thresholds of shape {tuple(thresholds.shape)}")
        words = tensors.get("words")
        if words is not None and (words.dim() != 3 or words.shape[:2] != (n, 2)):
            raise StoreError(f"{path}: {n} fact ids but words of shape {tuple(words.shape)}; the file is inconsistent")
        if words is not None:
            db.words = torch.full((0, 2, words.shape[2]), NO_WORD, dtype=torch.long)
            db.word_starts = tensors.get("word_starts", torch.zeros(0)).bool()
        db.add(meta["ids"], tensors["keys"], tensors["residuals"], facts=[f or {} for f in facts],
               thresholds=thresholds, words=words)
        db.facts = {i: f for i, f in zip(db.ids, facts) if f}
        if model is not None:
            db.check_compatible(model, layer=layer)
        elif layer is not None:
            db._check_layer(layer)
        return db
