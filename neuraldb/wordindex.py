"""An exact prefilter for the word-checked gate: from a position's token id to the keys it can fire.

Example::

    index = WordIndex.build(words)                          # words (N, F, width), as the store keeps them
    pos, row = index.pairs(windows[:, -1])                  # (p,) each: position x key pairs worth a look
    fire, at = word_checked_fire(q, windows, keys=unit_keys, words=words, starts=starts,
                                 thresholds=thr, index=index, fire=full_gate)   # == full_gate + word check

The word check (:func:`neuraldb.words.word_match`) passes at a position only where the
window of tokens ending there ends with one of the retrieved key's forms. A form's last
column is its subject's last token (a token id), ``NO_FORM`` (a padding form, matches
nothing), or, in a form that checks nothing or only a word start, a negative marker. So a
key all of whose forms end in token ids can pass the check only at a position whose own
token is one of them: :class:`WordIndex` maps each such token id to those keys (every form
and alias :func:`~neuraldb.words.subject_words` stored, so every variant the check accepts).

:func:`word_checked_fire` decides the gate as the store's hook decides it (exact top-1 cosine
over *all* keys, then ``cos > threshold[top1]`` and the word check of ``top1``) while computing
the full gate only at the positions that could fire: a position fires only if its top-1 key
``j`` passes its threshold and its word check; then ``j`` is one of the position's indexed
keys that passes the word check and whose cosine (computed here, with a slack far above
float32 rounding) passes its threshold. Positions with no such key cannot fire and are not
gated; the others get the full gate (the top-1 over all keys, so a nearer key of another
subject still shuts the gate, exactly as before). The decisions, fired key and residual of
every position are the full gate's.

Stores with any key that matches whatever its position's token (the paper's gate, keys added
without ``words``) are not indexed (:attr:`WordIndex.complete` is False): every position
goes through the full gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .words import NO_FORM, word_match

__all__ = ["WordIndex", "word_checked_fire", "COSINE_SLACK"]

# float32 cosines of unit vectors computed two ways (a product's sum here, a matrix product in
# the gate) differ by far less than this; the prefilter only lets more positions through
COSINE_SLACK = 1e-3


@dataclass(frozen=True)
class WordIndex:
    """Key rows grouped by the last token of their forms (CSR over the sorted distinct tokens).

    ``complete`` is False when some key can pass the word check at a position whatever its
    token (a form ending in ``NO_WORD`` or ``WORD_START``): the index then proves nothing.
    """

    tokens: torch.Tensor  # (T,) long, sorted distinct last tokens of the forms
    starts: torch.Tensor  # (T,) long, first entry of each token in `rows`
    counts: torch.Tensor  # (T,) long, keys per token
    rows: torch.Tensor  # (P,) long, key rows grouped by token, each group ascending
    complete: bool

    @classmethod
    @torch.no_grad()
    def build(cls, words: torch.Tensor) -> "WordIndex":
        """From the store's ``words`` (N, F, width) on the gate's device."""
        n = words.shape[0]
        last = words[:, :, -1]  # (N, F) each form's last column
        complete = not bool(((last < 0) & (last != NO_FORM)).any())
        rows = torch.arange(n, device=words.device).unsqueeze(1).expand_as(last)  # (N, F)
        real = last >= 0
        pair = torch.unique(last[real] * max(n, 1) + rows[real])  # sorted by token, then row; a key once per token
        tokens_all, rows_flat = pair // max(n, 1), pair % max(n, 1)
        tokens, counts = torch.unique_consecutive(tokens_all, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        return cls(tokens, starts, counts, rows_flat, complete)

    @torch.no_grad()
    def pairs(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pos, row)`` (p,) each: every (position, key) with a form ending in the position's token,
        for the positions' own tokens ``last`` (M,) (a window's last column)."""
        empty = torch.empty(0, dtype=torch.long, device=last.device)
        if self.tokens.numel() == 0 or last.numel() == 0:
            return empty, empty
        at = torch.searchsorted(self.tokens, last).clamp_max(self.tokens.numel() - 1)  # (M,)
        n = torch.where(self.tokens[at] == last, self.counts[at], torch.zeros_like(at))  # (M,) keys per position
        pos = torch.repeat_interleave(torch.arange(last.numel(), device=last.device), n)  # (p,)
        if pos.numel() == 0:
            return empty, empty
        offset = torch.arange(pos.numel(), device=last.device) - (torch.cumsum(n, 0) - n)[pos]  # (p,) within group
        return pos, self.rows[self.starts[at[pos]] + offset]


@torch.no_grad()
def word_checked_fire(queries: torch.Tensor, windows: torch.Tensor, *, keys: torch.Tensor, words: torch.Tensor,
                      starts: torch.Tensor, thresholds: torch.Tensor, index: WordIndex,
                      fire: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fire (M,) bool, index (M,) long)``: ``fire(queries)`` followed by the word check of the
    fired keys, computed only at the positions that could pass both (module docstring).

    ``queries`` (M, d_key) the key module's inputs, as ``fire`` takes them; ``windows`` (M, width) token ids ending at each position;
    ``keys`` (N, d_key) unit rows, ``words`` (N, F, width), ``starts`` (vocab,), ``thresholds``
    (N,) as the gate uses them; ``fire`` the store's full gate. ``index`` is -1 where shut.
    Needs ``index.complete``.
    """
    m = queries.shape[0]
    shut = torch.zeros(m, dtype=torch.bool, device=queries.device)
    none = torch.full((m,), -1, dtype=torch.long, device=queries.device)
    pos, row = index.pairs(windows[:, -1].contiguous())  # (p,) each
    if pos.numel() == 0:
        return shut, none
    spelt = word_match(words[row], windows[pos], starts)  # (p,) the key's own word check
    pos, row = pos[spelt], row[spelt]
    q = queries[pos].float()  # (p, d_key)
    cos = (q * keys[row]).sum(dim=1) / q.norm(dim=1).clamp_min(1e-12)  # (p,) cosines with unit keys
    near = cos > thresholds[row] - COSINE_SLACK
    need = torch.zeros(m, dtype=torch.bool, device=queries.device).index_fill_(0, pos[near], True)
    sel = need.nonzero().squeeze(1)  # (s,) the positions that could fire
    if sel.numel() == 0:
        return shut, none
    gated, at = fire(queries[sel])  # (s,) each: the full gate, top-1 over every key
    gated = gated & word_match(words[at.clamp_min(0)], windows[sel], starts)
    return shut.index_copy(0, sel, gated), none.index_copy(0, sel, torch.where(gated, at, -1))
