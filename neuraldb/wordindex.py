"""An exact prefilter for the word-checked gate: from a position's token id to the keys it can fire.

Example::

    index = WordIndex.build(words)                     # words (N, F, width), as the store keeps them
    pos, row = index.candidates(windows, starts)       # (p,) each: (position, key) whose word check passes
    fire, at = word_checked_fire(q, windows, keys=unit_keys, words=words, starts=starts,
                                 thresholds=thr, index=index, fire=full_gate)   # == full_gate + word check

The word check (:func:`neuraldb.words.word_match`) passes at a position only where the
window of tokens ending there ends with one of the retrieved key's forms. A form's last
column is its subject's last token (a token id), ``NO_FORM`` (a padding form, matches
nothing), or, in a form that checks nothing or only a word start, a negative marker. So a
key all of whose forms end in token ids can pass the check only at a position whose own
token is one of them: :class:`WordIndex` maps each such token id to those keys (every form
and alias :func:`~neuraldb.words.subject_words` stored, so every variant the check accepts),
and computes the word check once per subject (keys with the same forms) at those positions only.

:func:`word_checked_fire` decides the gate as the store's hook decides it (exact top-1 cosine
over *all* keys, then ``cos > threshold[top1]`` and the word check of ``top1``) while computing
the full gate only at the positions that could fire: a position fires only if its top-1 key
``j`` passes its threshold and its word check; then ``j`` is one of the position's candidate
keys (word check passed) whose cosine (computed here, with a slack far above float32
rounding) passes its threshold. Positions with no such key cannot fire and are not gated; the
others get the full gate (the top-1 over all keys, so a nearer key of another subject still
shuts the gate, exactly as before). The decisions, fired key and residual of every position
are the full gate's.

Stores with any key that matches whatever its position's token (the paper's gate, keys added
without ``words``) are not prefiltered (:attr:`WordIndex.complete` is False): every position
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
    """Stored word forms grouped by their last token, and keys grouped by their forms.

    Example::

        index = WordIndex.build(db.words)                   # (N, F, width); DeviceIndex keeps one
        pos, row = index.candidates(windows, db.word_starts)  # where word_match(db.words[row], ...) passes

    Keys with the same forms (facts about one subject) share one *group*: the word check is
    computed once per (position, group), however many facts the subject has. CSR over the
    sorted distinct last tokens (token -> groups) and over the groups (group -> key rows).
    ``complete`` is False when some key can pass the word check at a position whatever its
    token (a form ending in ``NO_WORD`` or ``WORD_START``): the index then proves nothing.
    """

    tokens: torch.Tensor  # (T,) long, sorted distinct last tokens of the forms
    token_starts: torch.Tensor  # (T,) long, first entry of each token in `token_groups`
    token_counts: torch.Tensor  # (T,) long, groups per token
    token_groups: torch.Tensor  # (P,) long, the groups with a form ending in each token, by token
    words: torch.Tensor  # (G, F, width) each group's forms
    key_starts: torch.Tensor  # (G,) long, first entry of each group in `key_rows`
    key_counts: torch.Tensor  # (G,) long, keys per group
    key_rows: torch.Tensor  # (N,) long, key rows by group, each group ascending
    complete: bool

    @classmethod
    @torch.no_grad()
    def build(cls, words: torch.Tensor) -> "WordIndex":
        """From the store's ``words`` (N, F, width) on the gate's device."""
        n, forms, width = words.shape
        last = words[:, :, -1]  # (N, F) each form's last column
        complete = not bool(((last < 0) & (last != NO_FORM)).any())
        flat, group = torch.unique(words.reshape(n, -1), dim=0, return_inverse=True)  # (G, F*width), (N,)
        g = flat.shape[0]
        key_rows = torch.sort(group * max(n, 1) + torch.arange(n, device=words.device)).values % max(n, 1)
        key_counts = torch.bincount(group, minlength=g)
        group_words = flat.reshape(g, forms, width)
        glast = group_words[:, :, -1]  # (G, F)
        groups = torch.arange(g, device=words.device).unsqueeze(1).expand_as(glast)
        real = glast >= 0
        pair = torch.unique(glast[real] * max(g, 1) + groups[real])  # sorted by token, then group; once each
        tokens, token_counts = torch.unique_consecutive(pair // max(g, 1), return_counts=True)
        return cls(tokens, _starts(token_counts), token_counts, pair % max(g, 1), group_words,
                   _starts(key_counts), key_counts, key_rows, complete)

    @torch.no_grad()
    def candidates(self, windows: torch.Tensor, starts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pos, row)`` (p,) each, by position: every (position, key) whose word check
        passes at the tokens ``windows`` (M, width) ending at each position, as
        :func:`~neuraldb.words.word_match` of every key finds them (for a :attr:`complete` index);
        ``starts`` as there."""
        last = windows[:, -1].contiguous()  # (M,) each position's own token
        empty = torch.empty(0, dtype=torch.long, device=windows.device)
        if self.tokens.numel() == 0 or last.numel() == 0:
            return empty, empty
        at = torch.searchsorted(self.tokens, last).clamp_max(self.tokens.numel() - 1)  # (M,)
        n = torch.where(self.tokens[at] == last, self.token_counts[at], torch.zeros_like(at))  # (M,) groups
        pos, i = _expand(n, self.token_starts[at])  # (p,) (position, group) pairs
        group = self.token_groups[i]
        spelt = word_match(self.words[group], windows[pos], starts)  # (p,) once per subject
        pos, group = pos[spelt], group[spelt]
        if pos.numel() == 0:
            return empty, empty
        k, i = _expand(self.key_counts[group], self.key_starts[group])  # (q,) every key of each group
        return pos[k], self.key_rows[i]


def _starts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


def _expand(counts: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``counts`` (m,) entries from ``starts`` (m,) each: ``(owner (p,), entry (p,))``, p = counts.sum()."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)  # (p,)
    within = torch.arange(owner.numel(), device=counts.device) - _starts(counts)[owner]
    return owner, starts[owner] + within


@torch.no_grad()
def word_checked_fire(queries: torch.Tensor, windows: torch.Tensor, *, keys: torch.Tensor, words: torch.Tensor,
                      starts: torch.Tensor, thresholds: torch.Tensor, index: WordIndex,
                      fire: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fire (M,) bool, index (M,) long)``: ``fire(queries)`` followed by the word check of the
    fired keys, computed only at the positions that could pass both (module docstring).

    ``queries`` (M, d_key) the key module's inputs, as ``fire`` takes them; ``windows`` (M, width)
    token ids ending at each position; ``keys`` (N, d_key) unit rows, ``words`` (N, F, width),
    ``starts`` (vocab,), ``thresholds`` (N,) as the gate uses them; ``fire`` the store's full
    gate. ``index`` is -1 where shut. Needs ``index.complete``.
    """
    m = queries.shape[0]
    shut = torch.zeros(m, dtype=torch.bool, device=queries.device)
    none = torch.full((m,), -1, dtype=torch.long, device=queries.device)
    pos, row = index.candidates(windows, starts)  # (p,) each: the keys whose word check passes
    if pos.numel() == 0:
        return shut, none
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
