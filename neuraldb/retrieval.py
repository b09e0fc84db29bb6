"""Exact top-1 cosine retrieval, and a faster gate decision that stays exact.

Example::

    keys = unit_rows(raw_keys)                          # (N, d) float32
    low = keys.to(torch.bfloat16)                       # screening copy
    fire, index = gate_decision(unit_rows(q), keys, low, gamma=0.65)

``top1`` is the brute-force reference: every score in float32, chunked over the
keys. ``gate_decision`` first scores every (query, key) pair in bfloat16 (about
2-3x faster on CPUs with AVX512-BF16, far faster on tensor cores), whose error on
a cosine of unit vectors is bounded: rounding each operand to bfloat16 changes
it by at most 2^-8 relatively, so ``|s_bf16 - s| <= sum_i |q_i k_i| (2^-7 + 2^-16)
+ accumulation <= 0.008`` for unit vectors (float32 accumulation). A query whose
best screened score is below ``gamma - margin`` (default margin 0.02, above the
bound, also covering reduced-precision reductions on GPUs) cannot fire; every
other query is recomputed with :func:`top1`. So every fire and non-fire, and the
index of every fire, is identical to the brute-force top-1 cosine.
"""

from __future__ import annotations

import torch

__all__ = ["unit_rows", "top1", "gate_decision", "SCREEN_MARGIN"]

SCREEN_MARGIN = 0.02


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


def screen_max(q_low: torch.Tensor, keys_low: torch.Tensor, *, chunk_size: int = 16384) -> torch.Tensor:
    """Best low-precision score per query (M,), float32."""
    best = torch.full((q_low.shape[0],), float("-inf"), device=q_low.device)
    for start in range(0, keys_low.shape[0], chunk_size):
        best = torch.maximum(best, (q_low @ keys_low[start : start + chunk_size].T).amax(dim=1).float())
    return best


def gate_decision(
    q: torch.Tensor,
    keys: torch.Tensor,
    keys_low: torch.Tensor | None,
    *,
    gamma: float,
    margin: float = SCREEN_MARGIN,
    chunk_size: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fire (M,) bool, index (M,) long, score (M,) float32) for unit queries ``q`` (M, d).

    ``fire``, and ``index`` where it fires, equal the brute-force decision
    ``top1(q, keys)[0] > gamma``; ``score`` is exact for every query that was
    re-checked and a screened (low-precision) value elsewhere.
    """
    if keys_low is None:
        score, index = top1(q, keys, chunk_size=chunk_size)
        return score > gamma, index, score
    score = screen_max(q.to(keys_low.dtype), keys_low, chunk_size=chunk_size)  # (M,)
    index = torch.full_like(score, -1, dtype=torch.long)
    maybe = (score > gamma - margin).nonzero().squeeze(1)  # (m,) queries that may fire
    if maybe.numel():
        exact, idx = top1(q[maybe], keys, chunk_size=chunk_size)
        score = score.index_put((maybe,), exact)
        index = index.index_put((maybe,), idx)
    fire = (score > gamma) & (index >= 0)
    return fire, index, score
