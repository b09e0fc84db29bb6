"""The batch of one :func:`neuraldb.residuals.compute_residuals` call: which row is what, and where.

Example::

    lay = _layout(tok, facts, templates, config.kl_prompt, device)   # rows, columns, scored tokens
    grp = _groups([0, 0, 1], n=3, device=device)                     # facts sharing one residual

Per fact, one rewrite prompt per context template (followed by ``target_new[:-1]``) and
one KL prompt; every row is left-padded so that its subject's last token sits in one
column ``s0``, and rows of nearby widths after the subject form a *block* (:func:`_merge_widths`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .facts import Fact, encode_completion, locate_subject
from .keys import pad_id


@dataclass(frozen=True)
class _Seq:
    fact: int
    ids: list[int]
    subject_pos: int
    target_pos: list[int]  # positions whose next-token prediction is scored
    target_ids: list[int]
    kl: bool = False
    bare: bool = False


def _build(tokenizer: Any, facts: Sequence[Fact], templates: Sequence[str], kl_prompt: str) -> list[_Seq]:
    seqs: list[_Seq] = []
    for i, f in enumerate(facts):
        for t in templates:
            template = t.replace("{}", f.prompt)
            ids, pos = locate_subject(tokenizer, template, f.subject)
            p_ids, t_ids = encode_completion(tokenizer, template.format(f.subject), f.target_new)
            if p_ids != ids:
                raise RuntimeError(f"fact {f.id}: inconsistent tokenisation of {template!r}")
            seqs.append(
                _Seq(i, p_ids + t_ids[:-1], pos, [len(p_ids) - 1 + j for j in range(len(t_ids))], t_ids,
                     bare=t == templates[0])
            )
        ids, pos = locate_subject(tokenizer, kl_prompt, f.subject)
        seqs.append(_Seq(i, ids, pos, [len(ids) - 1], [], kl=True))
    return seqs


def _aligned(seqs: Sequence[_Seq], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-pad so every subject's last token sits in one column ``s0``; right-pad the rest.

    Returns (ids, mask) of shape (n_seq, width) and ``s0``. Positions count real tokens only.
    """
    s0 = max(s.subject_pos for s in seqs)
    width = s0 + max(len(s.ids) - s.subject_pos for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        left = s0 - s.subject_pos
        ids[r, left : left + len(s.ids)] = torch.tensor(s.ids)
        mask[r, left : left + len(s.ids)] = 1
    return ids.to(device), mask.to(device), s0


@dataclass(frozen=True)
class _Layout:
    """The batch of one call: per fact, a rewrite prompt per template and one KL prompt.

    Rows are left-padded so that every subject's last token sits in column ``s0``. A
    *block* is the rows of some widths after the subject; it runs only its own columns
    ``..block_end[b]`` (the widest of its rows; shorter rows are right-padded and masked).
    Widths share a block when the padding costs less than running another block
    (``BLOCK_COST_TOKENS``): the KL prompt is much shorter than the rest, and prompts differ
    in how many tokens follow the subject.
    """

    ids: torch.Tensor  # (n_seq, width) token ids
    mask: torch.Tensor  # (n_seq, width)
    positions: torch.Tensor  # (n_seq, width) real-token positions
    s0: int  # the column of every subject's last token
    owner: torch.Tensor  # (n_seq,) the fact of each row
    block: torch.Tensor  # (n_seq,) the block of each row
    block_end: list[int]  # per block, its last column (exclusive)
    bare_rows: torch.Tensor  # (n_facts,) each fact's bare rewrite prompt
    tok_row: torch.Tensor  # (n_tok,) scored target tokens: their row,
    tok_col: torch.Tensor  # (n_tok,) the column predicting them,
    tok_lab: torch.Tensor  # (n_tok,) the token,
    tok_w: torch.Tensor  # (n_tok,) 1 / (#target tokens * #templates): per fact, mean over prompts of mean NLL
    tok_block: torch.Tensor  # (n_tok,) and the block of their row
    kl_rows: torch.Tensor  # (n_facts,) each fact's KL prompt, in fact order
    kl_col: torch.Tensor  # (n_facts,) its last column
    kl_block: torch.Tensor  # (n_facts,) its block

    @property
    def n_seq(self) -> int:
        return self.ids.shape[0]

    @property
    def n_facts(self) -> int:
        return self.kl_rows.shape[0]

    @property
    def rows(self) -> torch.Tensor:  # (n_seq,)
        return torch.arange(self.n_seq, device=self.ids.device)

    def pick(self, out: torch.Tensor, sel: torch.Tensor, start: int, rows: torch.Tensor, cols: torch.Tensor
             ) -> torch.Tensor:
        """From ``out`` (len(sel), end - start, d), computed for the rows ``sel`` and the columns
        ``start..end``, the vectors at (``rows``, ``cols``) of the layout: (len(rows), d)."""
        local = torch.full((self.n_seq,), -1, dtype=torch.long, device=sel.device)
        local[sel] = torch.arange(len(sel), device=sel.device)
        return out[local[rows], cols - start]


# The fixed work of one more block per optimisation step (a forward and a backward through the layers
# after the edited one: ~50 small operations per layer), in tokens of right padding it is worth:
# SmolLM2-135M on a 2-core CPU, 10 facts, 5 widths in 5 blocks: 38.6 s float32 / 20.1 s bfloat16;
# merged at 64: 27.9 s / 15.4 s (README, "Edit latency").
BLOCK_COST_TOKENS = 64


def _merge_widths(widths: Sequence[int], cost: int | None = None) -> list[int]:
    """The blocks' widths: rows of nearby widths share a block when running a separate block would
    cost more than the right padding it saves. Minimises sum over blocks of (rows x width + cost)
    (``cost``: the fixed work of one more forward and backward per step, in tokens), over
    partitions of the sorted distinct widths into runs (the optimum is one; dynamic programming)."""
    cost = BLOCK_COST_TOKENS if cost is None else cost
    distinct = sorted(set(widths))
    count = [sum(1 for w in widths if w == d) for d in distinct]
    best, cut = [0.0], [0]  # best[j]: the cheapest cover of the j smallest widths; cut[j]: where its last run starts
    for j in range(1, len(distinct) + 1):
        options = [(best[i] + sum(count[i:j]) * distinct[j - 1] + cost, i) for i in range(j)]
        value, i = min(options)
        best.append(value)
        cut.append(i)
    ends, j = [], len(distinct)
    while j:
        ends.append(distinct[j - 1])
        j = cut[j]
    return ends[::-1]


def _layout(tokenizer: Any, facts: Sequence[Fact], templates: Sequence[str], kl_prompt: str,
            device: torch.device) -> _Layout:
    seqs = _build(tokenizer, facts, templates, kl_prompt)
    ids, mask, s0 = _aligned(seqs, pad_id(tokenizer), device)  # (n_seq, width)
    widths = [len(s.ids) - s.subject_pos for s in seqs]
    ends = _merge_widths(widths)  # per block, its width after s0
    block = torch.tensor([next(b for b, e in enumerate(ends) if w <= e) for w in widths], device=device)  # (n_seq,)
    scored = [(r, s) for r, s in enumerate(seqs) if not s.kl]
    tok_row = torch.tensor([r for r, s in scored for _ in s.target_pos], device=device)
    kl_rows = torch.tensor([r for r, s in enumerate(seqs) if s.kl], dtype=torch.long, device=device)
    return _Layout(
        ids=ids, mask=mask, positions=(mask.cumsum(1) - 1).clamp_min(0), s0=s0,
        owner=torch.tensor([s.fact for s in seqs], device=device),
        block=block, block_end=[s0 + w for w in ends],
        bare_rows=torch.tensor([r for r, s in enumerate(seqs) if s.bare], dtype=torch.long, device=device),
        tok_row=tok_row,
        tok_col=torch.tensor([p + s0 - s.subject_pos for _, s in scored for p in s.target_pos], device=device),
        tok_lab=torch.tensor([t for _, s in scored for t in s.target_ids], device=device),
        tok_w=torch.tensor([1.0 / (len(s.target_ids) * len(templates)) for _, s in scored for _ in s.target_pos],
                           device=device),
        tok_block=block[tok_row],
        kl_rows=kl_rows,
        kl_col=torch.tensor([s.target_pos[0] + s0 - s.subject_pos for s in seqs if s.kl], device=device),
        kl_block=block[kl_rows],
    )


@dataclass(frozen=True)
class _Groups:
    """Facts sharing one residual, numbered 0..n-1."""

    of_fact: torch.Tensor  # (n_facts,)
    size: torch.Tensor  # (n_groups,) float, facts per group

    @property
    def n(self) -> int:
        return self.size.shape[0]

    def mean(self, per_fact: torch.Tensor) -> torch.Tensor:
        """(n_facts,) -> (n_groups,) the mean over each group's facts."""
        return torch.zeros(self.n, device=per_fact.device).index_add(0, self.of_fact, per_fact) / self.size


def _groups(groups: Sequence[int] | None, n: int, device: torch.device) -> _Groups:
    group = torch.tensor(list(groups) if groups is not None else range(n), dtype=torch.long, device=device)
    if group.shape != (n,) or bool((group < 0).any()):
        raise ValueError(f"groups: give one int >= 0 per fact ({n} facts), got {list(groups or [])!r}")
    group = torch.unique(group, return_inverse=True)[1]  # 0..n_groups-1
    size = torch.zeros(int(group.max()) + 1, device=device).index_add_(0, group, torch.ones(n, device=device))
    return _Groups(group, size)
