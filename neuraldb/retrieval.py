"""Exact top-1 cosine retrieval, and a faster gate decision that stays exact.

Example::

    keys = unit_rows(raw_keys)                                    # (N, d) float32
    best, index = top1(unit_rows(q), keys)                        # brute force
    screen = LowRankScreen.build(keys, sample=unit_rows(q), rank=768)
    fire, index = screen.gate(unit_rows(q), keys, thresholds)     # the same fires

``top1`` is the brute-force reference: every score in float32, chunked over the
keys. :class:`LowRankScreen` is what the store's hook uses for large stores: a
cheap upper bound on every cosine that proves most (query, key) pairs cannot
reach the gate, then exact float32 cosines for the rest.

The bound is one bfloat16 product of unit vectors, whose error is bounded:
rounding each operand to bfloat16 changes it by at most 2^-8 relatively, so
``|s_bf16 - s| <= sum_i |q_i k_i| (2^-7 + 2^-16) + accumulation <= 0.008`` for
unit vectors (float32 accumulation), plus at most 0.004 for rounding the result.
A single query (a batch-1 decoding step) is bounded with a float16 copy of the same
lifted keys instead (2^-11 per operand: at most 0.002 with its rounding): on CPUs torch's
float16 matrix-vector product runs at memory bandwidth (4.0 ms for 100K keys of rank 511
on this project's CPU, against 9.4 ms in bfloat16), while for several queries the bfloat16
product is the fast one (7.7 against 31 ms at 8).
``SCREEN_MARGIN`` (0.02) is above that, so every fire and non-fire, and the index
of every fire, is identical to the brute-force top-1 cosine.
"""

from __future__ import annotations

import torch

from .threads import Lock
from .wordindex import WordIndex, word_checked_fire
from .words import NO_WORD, word_match

__all__ = ["unit_rows", "top1", "max_cosines", "LowRankScreen", "DeviceIndex", "SCREEN_MARGIN"]

SCREEN_MARGIN = 0.02
_LOWER = 2.0**-8  # > half a bfloat16 ulp on [-1, 1]: rounding level - _LOWER stays below level


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def top1(q: torch.Tensor, keys: torch.Tensor, *, chunk_size: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: (best score (M,), index (M,)) of unit queries (M, d) against unit keys (N, d)."""
    best = torch.full((q.shape[0],), float("-inf"), device=q.device)
    arg = torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
    for start in range(0, keys.shape[0], chunk_size):
        s = q @ keys[start : start + chunk_size].T  # (M, chunk)
        m, a = s.max(dim=1)
        better = m > best
        best = torch.where(better, m, best)
        arg = torch.where(better, a + start, arg)
    return best, arg


class LowRankScreen:
    """An exact gate for large stores: a rank-``r`` upper bound on every cosine, then exact top-1.

    Example::

        screen = LowRankScreen.build(keys, sample=queries, rank=768)   # unit rows
        fire, index = screen.gate(q, keys, thresholds)                 # == brute force

    For an orthonormal basis ``P`` (d, r) and unit vectors, ``q . k = (P^T q).(P^T k)
    + q_perp . k_perp <= (P^T q).(P^T k) + |q_perp| |k_perp|`` (Cauchy-Schwarz on the
    part outside the basis). Appending ``|q_perp|`` to ``P^T q`` and ``|k_perp|`` to
    ``P^T k`` turns the bound into one (M, r+1) x (r+1, N) product of unit vectors,
    done in bfloat16 on CPUs (error <= 0.012, see the module docstring; float32
    elsewhere). A query whose bound stays below ``min(thresholds) - margin`` for
    every key cannot fire; for every other query the exact cosines of the pairs
    whose bound reaches that floor give its top-1. So every fire, every non-fire
    and the index of every fire equal the brute-force decision whatever the basis;
    the basis only decides how many pairs are re-checked. It is the top
    eigenvectors of ``K^T K + w Q^T Q`` for a sample of keys and of queries, ``w`` giving
    the queries ``query_share`` of the keys' weight (activations of real text fall largely
    outside the keys' own principal subspace, so the queries matter). Built once per
    store change.
    """

    def __init__(self, basis: torch.Tensor, keys_low: torch.Tensor, *, keys_one: torch.Tensor | None = None,
                 margin: float = SCREEN_MARGIN, chunk_size: int = 16384) -> None:
        self.basis = basis  # (d, r) float32, orthonormal columns
        self.keys_low = keys_low  # (N, r + 1) [P^T k, |k_perp|], bfloat16 on CPU
        self.keys_one = keys_one  # (N, r + 1) the same in float16 on CPU, for one query at a time; else None
        self.margin = float(margin)
        self.chunk_size = int(chunk_size)
        self.rechecked = 0  # queries with at least one pair re-checked exactly (for benchmarks)
        self.screened = 0
        self._count = Lock()  # the two counters, from any thread

    @staticmethod
    def _lift(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        low = x @ basis  # (n, r)
        rest = (1.0 - low.pow(2).sum(1, keepdim=True)).clamp_min(0.0).sqrt()  # (n, 1) |x_perp|
        return torch.cat([low, rest], dim=1)  # (n, r + 1), unit rows

    @classmethod
    @torch.no_grad()
    def build(cls, keys: torch.Tensor, *, sample: torch.Tensor | None = None, rank: int,
              max_keys: int = 16384, query_share: float = 0.3, margin: float = SCREEN_MARGIN,
              chunk_size: int = 16384) -> "LowRankScreen":
        """``keys`` (N, d) unit rows; ``sample`` (M, d) unit query rows (e.g. the first batch seen)."""
        step = max(1, keys.shape[0] // max_keys)
        k = keys[::step].float()  # (n, d)
        gram = k.T @ k  # (d, d)
        if sample is not None and sample.numel():
            s = sample.to(keys.device, torch.float32)  # (m, d)
            # the queries get a fixed share of the weight however few they are: the
            # bound's slack |q_perp| |k_perp| has a query factor too
            gram = gram + (query_share * k.shape[0] / s.shape[0]) * (s.T @ s)
        _, vecs = torch.linalg.eigh(gram)  # ascending
        basis = vecs[:, -rank:].contiguous()  # (d, r)
        cpu = keys.device.type == "cpu"
        keys_low = torch.cat([cls._lift(keys[i : i + chunk_size], basis) for i in range(0, keys.shape[0], chunk_size)])
        return cls(basis, keys_low.to(torch.bfloat16 if cpu else torch.float32),
                   keys_one=keys_low.to(torch.float16) if cpu else None, margin=margin, chunk_size=chunk_size)

    @torch.no_grad()
    def gate(self, q: torch.Tensor, keys: torch.Tensor, thresholds: torch.Tensor,
             dense_after: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(fire (M,) bool, index (M,) long; -1 where it does not fire) for unit queries ``q``.

        ``thresholds`` (N,) are the per-key gates (``max(gamma, thresholds)``); a query
        fires when its exact top-1 cosine exceeds its top-1 key's threshold. Per chunk of
        keys, a query is re-checked only if some bound reaches ``max(floor, best - margin)``
        (``floor = min(thresholds) - margin``, ``best`` its best exact cosine so far):
        first the key with the highest bound, then every other key whose bound still
        reaches that level once ``best`` is updated (a dense product for a query with
        more than ``dense_after`` such keys, default ``chunk_size // 16``). A key left out
        has a bound, hence a cosine, below the floor or below a cosine already found, so
        the best found is the brute-force top-1 whenever that top-1 could pass any
        threshold (ties go to the lowest index, as in :func:`top1`).
        """
        m = q.shape[0]
        fire = torch.zeros(m, dtype=torch.bool, device=q.device)
        index = torch.full((m,), -1, dtype=torch.long, device=q.device)
        if keys.shape[0] == 0 or m == 0:
            return fire, index
        dense_after = max(1, self.chunk_size // 16) if dense_after is None else dense_after
        floor = thresholds.min().float() - self.margin
        lifted = self.keys_one if m == 1 and self.keys_one is not None else self.keys_low  # module docstring
        q_low = self._lift(q.float(), self.basis).to(lifted.dtype)  # (M, r + 1)
        best = torch.full((m,), float("-inf"), device=q.device)
        arg = torch.full((m,), -1, dtype=torch.long, device=q.device)
        touched = torch.zeros(m, dtype=torch.bool, device=q.device)
        for c0 in range(0, keys.shape[0], self.chunk_size):
            chunk = keys[c0 : c0 + self.chunk_size]  # (C, d)
            bound = q_low @ lifted[c0 : c0 + self.chunk_size].T  # (M, C)
            hot = (bound.amax(dim=1).float() >= torch.maximum(best - self.margin, floor)).nonzero().squeeze(1)  # (h,)
            if hot.numel() == 0:
                continue
            touched[hot] = True
            bound = bound[hot]  # (h, C)
            first = bound.max(dim=1).indices  # (h,) the key with the highest bound: its exact cosine first
            best, arg = _merge(best, arg, hot, (q[hot] * chunk[first]).sum(dim=1), first + c0)
            level = torch.maximum(best[hot] - self.margin, floor)  # (h,)
            # compared in the bound's dtype: lowered by more than its rounding, so never above `level`
            maybe = bound >= (level - _LOWER).to(bound.dtype).unsqueeze(1)  # (h, C) bounds still in reach
            maybe[torch.arange(hot.numel(), device=q.device), first] = False
            many = torch.count_nonzero(maybe, dim=1) > dense_after  # (h,)
            dense = hot[many]  # queries near many keys: one product
            if dense.numel():
                s, a = (q[dense] @ chunk.T).max(dim=1)
                best, arg = _merge(best, arg, dense, s, a + c0)
            qi, kj = maybe[~many].nonzero(as_tuple=True)  # (p,) pairs of the other queries
            if qi.numel():
                qi = hot[(~many).nonzero().squeeze(1)[qi]]
                s = (q[qi] * chunk[kj]).sum(dim=1)  # (p,) exact cosines of the pairs
                top = torch.full((m,), float("-inf"), device=q.device).scatter_reduce(0, qi, s, "amax")
                tie = s == top[qi]
                low = torch.full((m,), keys.shape[0], dtype=torch.long, device=q.device).scatter_reduce(
                    0, qi[tie], kj[tie] + c0, "amin")  # lowest index among ties, as argmax
                rows = torch.unique(qi)
                best, arg = _merge(best, arg, rows, top[rows], low[rows])
        rechecked = int(touched.sum())
        with self._count:
            self.screened += m
            self.rechecked += rechecked
        hit = (arg >= 0) & (best > thresholds[arg.clamp_min(0)])
        return hit, torch.where(hit, arg, index)


def _merge(best: torch.Tensor, arg: torch.Tensor, rows: torch.Tensor, score: torch.Tensor,
           at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, for each of ``rows``, the better of (best, arg) and (score, at): higher score, then lower index."""
    old_s, old_a = best[rows], arg[rows]
    take = (score > old_s) | ((score == old_s) & (at < old_a))
    best, arg = best.clone(), arg.clone()
    best[rows] = torch.where(take, score, old_s)
    arg[rows] = torch.where(take, at, old_a)
    return best, arg


@torch.no_grad()
def max_cosines(keys: torch.Tensor, queries: torch.Tensor, *, chunk_size: int = 8192) -> torch.Tensor:
    """(N,) float32: for each key row (N, d), its largest cosine with any query row (M, d), on
    the queries' device; exact, chunked over both so N x M never sits in memory at once."""
    q = unit_rows(queries.float())  # (M, d)
    best = torch.full((keys.shape[0],), float("-inf"), device=q.device)
    for start in range(0, keys.shape[0], chunk_size):
        k = unit_rows(keys[start : start + chunk_size].to(q.device).float())  # (n, d)
        m = torch.full((k.shape[0],), float("-inf"), device=q.device)
        for qs in range(0, q.shape[0], chunk_size):
            m = torch.maximum(m, (k @ q[qs : qs + chunk_size].T).max(dim=1).values)
        best[start : start + k.shape[0]] = m
    return best


class DeviceIndex:
    """A store's tensors on one device, as its gate reads them: unit keys, residuals, per-key gate
    thresholds, word forms and the word-start table, built from the store's CPU tensors at first use
    and dropped by the store on every change (with the screen built from them).

    Example::

        dev = DeviceIndex(db.keys, db.residuals, db.gate_thresholds(), db.words, db.word_starts, device="cuda")
        fire, index, scores = dev.gate(queries, chunk_size=16384)     # what db.gate(queries) does

    The store's retrieval settings (``chunk_size``, ``screen_rank``, ``screen_min_keys``) are
    passed with each call, so changing them on the store takes effect at once.
    """

    def __init__(self, keys: torch.Tensor, residuals: torch.Tensor, gate_thresholds: torch.Tensor,
                 words: torch.Tensor, word_starts: torch.Tensor, *, device: torch.device | str) -> None:
        self.keys = unit_rows(keys.to(device))  # (N, d_key)
        self.device = self.keys.device
        self.residuals = residuals.to(device)  # (N, d_model)
        self.gate_thresholds = gate_thresholds.to(device)  # (N,) max(gamma, thresholds)
        self.words = words.to(device)  # (N, F, width)
        self.word_starts = word_starts.to(device)  # (vocab,)
        self.checks_words = bool((words[:, 0] != NO_WORD).any())  # host flag, read once per change
        # token id -> keys that can pass the word check there (exact prefilter; complete only when
        # every key is word-checked)
        self.word_index = WordIndex.build(self.words) if self.checks_words else None
        self.screen: LowRankScreen | None = None  # built by the first screened batch
        self._build = Lock()  # one thread builds the screen; the others wait and use it

    def __len__(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def retrieve(self, queries: torch.Tensor, *, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-1 cosine ``(scores, index)`` of query rows (M, d_key); -inf / -1 without keys."""
        q = unit_rows(queries.reshape(-1, self.keys.shape[1]))  # (M, d_key)
        if len(self) == 0:
            return (torch.full((q.shape[0],), float("-inf"), device=q.device),
                    torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device))
        return top1(q, self.keys, chunk_size=chunk_size)

    @torch.no_grad()
    def gate(self, queries: torch.Tensor, *, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(fire, index, scores)``: :meth:`retrieve`'s exact top-1 and ``fire = scores > gate_thresholds[index]``.

        Positions are not masked here (the hook also skips the sink position and padding), and
        the word check, which needs the tokens, is the hook's (:meth:`word_ok`).
        """
        scores, index = self.retrieve(queries, chunk_size=chunk_size)
        if len(self) == 0:
            return torch.zeros_like(scores, dtype=torch.bool), index, scores
        return scores > self.gate_thresholds[index], index, scores

    @torch.no_grad()
    def fire(self, queries: torch.Tensor, *, rank: int, min_keys: int,
             chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`gate`'s ``(fire, index)``, through :meth:`screened_gate` from ``min_keys`` keys on
        (``rank`` 0 or at least the key width: always brute force)."""
        if rank and len(self) >= min_keys and rank < self.keys.shape[1]:
            return self.screened_gate(queries, rank=rank, chunk_size=chunk_size)
        fire, index, _ = self.gate(queries, chunk_size=chunk_size)
        return fire, index

    @torch.no_grad()
    def screened_gate(self, queries: torch.Tensor, *, rank: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`gate`'s fire and fired index for query rows (M, d_key), through the :class:`LowRankScreen`
        (built once, from the keys and this first batch)."""
        q = unit_rows(queries)  # (M, d_key)
        return self._screen(q, rank=rank, chunk_size=chunk_size).gate(q, self.keys, self.gate_thresholds)

    def _screen(self, q: torch.Tensor, *, rank: int, chunk_size: int) -> LowRankScreen:
        """The screen, built once from the keys and the unit queries ``q`` of the first screened batch
        (under a lock: of threads arriving at once, one builds it; every basis gives the same gate)."""
        screen = self.screen
        if screen is not None:
            return screen
        with self._build:
            if self.screen is None:
                self.screen = LowRankScreen.build(self.keys, sample=q[:: max(1, q.shape[0] // 4096)], rank=rank,
                                                  chunk_size=chunk_size)
            return self.screen

    @torch.no_grad()
    def fire_checked(self, queries: torch.Tensor, windows: torch.Tensor, *, rank: int, min_keys: int,
                     chunk_size: int, prefilter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The hook's decision with the word check: :meth:`fire`'s ``(fire, index)`` for query rows
        (M, d_key), shut where :meth:`word_ok` fails at token ``windows`` (M, width); ``index`` is the
        fired key where it fires (elsewhere -1 or the unfired top-1).

        With ``prefilter`` and every key word-checked, only the positions whose token ends a stored
        form, spelt out and with a cosine near its key's threshold, are gated at all
        (:func:`neuraldb.wordindex.word_checked_fire`): the same fires and fired keys.
        """
        index = self.word_index
        if prefilter and index is not None and index.complete:
            return word_checked_fire(
                queries, windows, keys=self.keys, words=self.words, starts=self.word_starts,
                thresholds=self.gate_thresholds, index=index,
                fire=lambda q: self.fire(q, rank=rank, min_keys=min_keys, chunk_size=chunk_size))
        fire, at = self.fire(queries, rank=rank, min_keys=min_keys, chunk_size=chunk_size)
        return fire & self.word_ok(at, windows), at

    def word_ok(self, index: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(M,) bool: the word check (:func:`neuraldb.words.word_match`) for retrieved rows ``index`` (M,)
        at token ``windows`` (M, width); True for facts without a word."""
        return word_match(self.words[index.clamp_min(0)], windows, self.word_starts)
