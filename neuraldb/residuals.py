"""Residuals: the vector the edited layer's output must gain for the new target.

Example::

    res, info = compute_residuals(model, tok, facts, layer=10, templates=templates,
                                  config=EditConfig())        # res (n_facts, d_model)

docs/method.md, 'Residuals' (ROME/MEMIT ``compute_z``): optimise ``delta`` added to the
output hidden state of layer ``l`` at the subject's last token, on every
context template x prompt followed by ``target_new[:-1]``::

    loss = mean NLL(target_new) + kl_factor * KL(p_orig || p_edit) on kl_prompt
         + weight_decay * ||delta|| / ||h||^2

Adam, ``steps`` steps, clamp ``||delta|| <= clamp_norm_factor * ||h||``, a fact
stops once its loss < ``early_stop_loss``. Facts are independent, so a batch of
facts is optimised at once (the loss is a sum of per-fact losses, Adam is
element-wise, finished facts are frozen and dropped from the batch). Layers
0..l run once: their output is cached and those layers are bypassed during
the optimisation, and logits are computed only where the loss needs them.

Invariant: the model's parameters and ``requires_grad`` flags are the same at
the end of the function as at its beginning.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ModelArch, resolve_arch
from .config import EditConfig
from .facts import Fact, encode_completion, locate_subject
from .keys import model_device, pad_id
from .nethook import Trace, TraceDict, cache_argument, cache_of

__all__ = ["compute_residuals", "ResidualInfo", "lm_logits", "optimisation_model"]

log = logging.getLogger(__name__)


@dataclass
class ResidualInfo:
    """Per fact: loss at the end, steps taken, the norm of h and of delta."""

    loss: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    h_norm: list[float] = field(default_factory=list)
    delta_norm: list[float] = field(default_factory=list)


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final hidden states (already normed by the base model) -> logits, as the LM head does."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def optimisation_model(model: nn.Module, dtype: str | None) -> nn.Module:
    """The model the residual optimisation runs on: ``model`` itself, or a copy in ``dtype``.

    Example::

        fast = optimisation_model(model, "bfloat16")   # once per edit, not per batch

    On CPUs the copy uses eager attention: in torch 2.13 the bfloat16 backward of
    CPU scaled-dot-product attention is ~10x slower than float32, which would eat
    the gain of the bfloat16 matmuls.
    """
    if dtype is None or getattr(torch, dtype) == next(model.parameters()).dtype:
        return model
    twin = copy.deepcopy(model).to(getattr(torch, dtype)).eval()
    if model_device(model).type == "cpu" and hasattr(twin, "set_attn_implementation"):
        try:
            twin.set_attn_implementation("eager")
        except (ValueError, AttributeError) as exc:  # keep the model's own attention
            log.info("eager attention unavailable for %s: %s", type(twin).__name__, exc)
    return twin


def compute_residuals(
    model: nn.Module,
    tokenizer: Any,
    facts: Sequence[Fact],
    *,
    layer: int,
    templates: Sequence[str],
    config: EditConfig = EditConfig(),
    arch: ModelArch | None = None,
    prefix_cache: bool = True,
    groups: Sequence[int] | None = None,
) -> tuple[torch.Tensor, ResidualInfo]:
    """Residuals (n_facts, d_model) float32 on the model's device, and per-fact info.

    ``groups`` (one int per fact) makes the facts of a group share one residual,
    optimised on all their prompts at once (the group's loss is the mean of its facts'
    NLL + KL, plus the weight decay): ``neuraldb.edit`` groups facts about one subject,
    whose keys are nearly the same, so whichever of their keys is retrieved adds a
    residual that serves all of them. Default: every fact alone.

    Every sequence is laid out so that its subject's last token sits in one column
    ``s0``. Nothing before ``s0`` depends on ``delta``, so with ``prefix_cache`` the
    optimisation runs only columns ``s0..`` through the layers after ``layer``, with
    the keys and values of the earlier columns cached from one unedited pass
    (checked against the full pass; if the model's cache cannot do this, every
    column is recomputed instead).

    The steps, in order: lay the batch out (:func:`_layout`), compute the prefix once
    (:func:`_runner`), record the unedited layer output and KL distribution and check the
    shortcuts (:func:`_unedited`), then optimise ``delta`` with Adam (:func:`_optimise`).
    """
    arch = arch or resolve_arch(model)
    lay = _layout(tokenizer, facts, templates, config.kl_prompt, model_device(model))
    grp = _groups(groups, len(facts), lay.ids.device)
    run = _runner(model, arch, layer, lay, prefix_cache)
    init, ok = _unedited(run)
    if run.start and not ok:
        log.info("prefix cache does not reproduce the full pass for %s; recomputing every column", type(model).__name__)
        run = replace(run, start=0, cache=None)
        init, ok = _unedited(run)
    if not ok:
        raise RuntimeError(
            f"{type(model).__name__}: base_model + output embeddings do not reproduce the model's "
            "logits; this architecture post-processes logits in a way neuraldb does not know"
        )
    fact_h_norm = init.h[lay.bare_rows, lay.s0].norm(dim=1)  # (n_facts,) ROME's target_init
    return _optimise(run, init, grp, fact_h_norm, config)


# --- layout: which row is what, and where ---------------------------------------------


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
    *block* is the rows with one width after the subject; it runs only its own columns
    ``..block_end[b]``, so no compute is spent on right padding (the KL prompt is much
    shorter than the rest, and prompts differ in how many tokens follow the subject).
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


def _layout(tokenizer: Any, facts: Sequence[Fact], templates: Sequence[str], kl_prompt: str,
            device: torch.device) -> _Layout:
    seqs = _build(tokenizer, facts, templates, kl_prompt)
    ids, mask, s0 = _aligned(seqs, pad_id(tokenizer), device)  # (n_seq, width)
    widths = [len(s.ids) - s.subject_pos for s in seqs]
    distinct = sorted(set(widths))
    block = torch.tensor([distinct.index(w) for w in widths], device=device)  # (n_seq,)
    scored = [(r, s) for r, s in enumerate(seqs) if not s.kl]
    tok_row = torch.tensor([r for r, s in scored for _ in s.target_pos], device=device)
    kl_rows = torch.tensor([r for r, s in enumerate(seqs) if s.kl], dtype=torch.long, device=device)
    return _Layout(
        ids=ids, mask=mask, positions=(mask.cumsum(1) - 1).clamp_min(0), s0=s0,
        owner=torch.tensor([s.fact for s in seqs], device=device),
        block=block, block_end=[s0 + w for w in distinct],
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


# --- running the model: the prefix once, then columns start.. -------------------------


def _copy_cache(cache: Any, rows: torch.Tensor) -> Any:
    """A private copy of the prefix cache restricted to ``rows`` (the cache is mutated by a forward)."""
    sub = copy.deepcopy(cache)
    sub.batch_select_indices(rows)
    return sub


@dataclass(frozen=True)
class _Skip:
    """A layer's forward replaced: it returns its input hidden state, or ``output`` when given."""

    output: torch.Tensor | None
    as_tuple: bool  # the layer's own forward returns a tuple

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.output is not None:
            hidden = self.output
        return (hidden,) if self.as_tuple else hidden


@dataclass(frozen=True)
class _Runner:
    """Runs columns ``start..end`` of some rows of the layout through the base model.

    With a prefix cache (``start = s0``) the keys and values of the columns before
    ``s0``, which no delta can change, come from one unedited pass; without one
    (``start = 0``) every column runs. Both return final hidden states
    (len(sel), end - start, d_model); :meth:`logits` turns the few the loss needs into logits.
    """

    model: nn.Module
    base: nn.Module
    lay: _Layout
    layer_names: list[str]  # layers 0..l: the last one is edited
    dtype: torch.dtype  # the model's
    cache_kw: str
    start: int = 0
    cache: Any = None  # all rows' keys and values of columns 0..s0 when start = s0

    def cut(self, sel: torch.Tensor) -> Any:
        """A private copy of the prefix cache of rows ``sel`` (a forward appends to it); None without one."""
        return _copy_cache(self.cache, sel) if self.start else None

    def block_caches(self, on: torch.Tensor) -> list[Any]:
        """Per block, the prefix cache of its rows that are ``on`` (n_seq,) bool; None if none is."""
        sels = [self.lay.rows[on & (self.lay.block == b)] for b in range(len(self.lay.block_end))]
        return [self.cut(sel) if len(sel) else None for sel in sels]

    def logits(self, out: torch.Tensor, sel: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """float32 logits (len(rows), vocab) at (``rows``, ``cols``) from ``out``, the final states of ``sel``."""
        return lm_logits(self.model, self.lay.pick(out, sel, self.start, rows, cols)).float()

    def _inputs(self, sel: torch.Tensor, end: int, cache: Any) -> dict[str, Any]:
        lay, start = self.lay, self.start
        extra = {self.cache_kw: cache, "use_cache": True} if start else {"use_cache": False}
        return dict(input_ids=lay.ids[sel, start:end], attention_mask=lay.mask[sel, :end],
                    position_ids=lay.positions[sel, start:end], **extra)

    def record(self, sel: torch.Tensor, end: int) -> tuple[torch.Tensor, Trace]:
        """Every layer runs: the final hidden states, and the trace of layer l's output."""
        with Trace(self.model, self.layer_names[-1]) as t:
            last = self.base(**self._inputs(sel, end, self.cut(sel))).last_hidden_state
        return last, t

    def edited(self, sel: torch.Tensor, end: int, h_edit: torch.Tensor, as_tuple: bool, cache: Any) -> torch.Tensor:
        """Layers before l are skipped and layer l outputs ``h_edit`` (len(sel), end - start, d_model)."""
        skips = {name: _Skip(None, as_tuple) for name in self.layer_names[:-1]}
        skips[self.layer_names[-1]] = _Skip(h_edit.to(self.dtype), as_tuple)  # h is kept in float32
        with TraceDict(self.model, self.layer_names, retain_output=False, bypass=skips.__getitem__):
            return self.base(**self._inputs(sel, end, cache)).last_hidden_state


@torch.no_grad()
def _runner(model: nn.Module, arch: ModelArch, layer: int, lay: _Layout, prefix_cache: bool) -> _Runner:
    """The runner, with the prefix computed once when ``prefix_cache`` and the model's cache allow."""
    base = getattr(model, "base_model", model)
    run = _Runner(model, base, lay, [arch.layer(i) for i in range(layer + 1)], next(model.parameters()).dtype,
                  cache_argument(base) or "past_key_values")
    s0 = lay.s0
    if not prefix_cache or s0 == 0:
        return run
    try:  # keys and values of the columns before s0, which no delta can change
        out = base(input_ids=lay.ids[:, :s0], attention_mask=lay.mask[:, :s0], position_ids=lay.positions[:, :s0],
                   use_cache=True)
        cache = cache_of(out)
    except Exception as exc:  # noqa: BLE001 - a model without a usable cache: recompute every column
        log.info("no prefix cache for %s (%s); recomputing every column", type(model).__name__, exc)
        return run
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return run
    return replace(run, start=s0, cache=cache)


# --- the unedited pass, and the check of the shortcuts --------------------------------


@dataclass(frozen=True)
class _Unedited:
    h: torch.Tensor  # (n_seq, width, d_model) float32: layer l's output, columns start..
    p_orig: torch.Tensor  # (n_facts, vocab) log-probabilities after each KL prompt
    as_tuple: bool  # layer l returns a tuple


@torch.no_grad()
def _unedited(run: _Runner) -> tuple[_Unedited, bool]:
    """Layer l's output and p_orig, block by block, and whether the shortcuts (cached prefix,
    per-block columns, base model + LM head, skipped layers) reproduce the full model on
    the first fact's rows (the probe)."""
    lay, start = run.lay, run.start
    probe_tok = (lay.owner[lay.tok_row] == 0).nonzero().flatten()
    h = p_orig = None
    got = []  # per block: (probe tokens, their logits through the shortcuts, and through the skipped layers)
    for b, end in enumerate(lay.block_end):
        sel = lay.rows[lay.block == b]
        last, rec = run.record(sel, end)
        if h is None:
            h = torch.zeros(lay.n_seq, lay.ids.shape[1], rec.output.shape[-1], device=lay.ids.device)
        h[sel, start:end] = rec.output.float()
        k = (lay.kl_block == b).nonzero().flatten()  # facts whose KL row is in this block
        if len(k):
            lp = F.log_softmax(run.logits(last, sel, lay.kl_rows[k], lay.kl_col[k]), dim=-1)
            if p_orig is None:
                p_orig = torch.empty(lay.n_facts, lp.shape[-1], device=lp.device)
            p_orig[k] = lp
        t = probe_tok[lay.tok_block[probe_tok] == b]
        if len(t):
            direct = run.logits(last, sel, lay.tok_row[t], lay.tok_col[t])
            ps = lay.rows[(lay.owner == 0) & (lay.block == b)]
            again = run.edited(ps, end, h[ps, start:end], rec.output_is_tuple, run.cut(ps))
            got.append((t, direct, run.logits(again, ps, lay.tok_row[t], lay.tok_col[t])))
    return _Unedited(h, p_orig, rec.output_is_tuple), _reproduces(run, got)


@torch.no_grad()
def _reproduces(run: _Runner, got: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> bool:
    """Whether both logits of every (tokens, shortcut logits, skipped-layer logits) match one full pass."""
    lay = run.lay
    probe = lay.rows[lay.owner == 0]
    full = run.model(input_ids=lay.ids[probe], attention_mask=lay.mask[probe], position_ids=lay.positions[probe],
                     use_cache=False).logits
    tol = max(1e-3, 4 * torch.finfo(run.dtype).eps)  # a few roundings of the model's dtype
    for t, direct, skipped in got:
        want = lay.pick(full, probe, 0, lay.tok_row[t], lay.tok_col[t]).float()
        if not (torch.allclose(direct, want, atol=tol, rtol=tol) and torch.allclose(skipped, want, atol=tol, rtol=tol)):
            return False
    return True


# --- the optimisation -----------------------------------------------------------------


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _optimise(
    run: _Runner, init: _Unedited, grp: _Groups, fact_h_norm: torch.Tensor, config: EditConfig
) -> tuple[torch.Tensor, ResidualInfo]:
    """Adam on delta (n_groups, d_model) from zero; a group stops once its loss < early_stop_loss."""
    lay, device = run.lay, run.lay.ids.device
    n = lay.n_facts
    h_norm = grp.mean(fact_h_norm)  # (n_groups,)
    seq_group = grp.of_fact[lay.owner]  # (n_seq,)
    delta = torch.zeros(grp.n, init.h.shape[-1], device=device, requires_grad=True)  # (n_groups, d_model)
    opt = torch.optim.Adam([delta], lr=config.lr)
    active = torch.ones(grp.n, dtype=torch.bool, device=device)
    info = ResidualInfo(steps=[config.steps] * n)
    last_loss, last_nll = torch.zeros(grp.n, device=device), torch.zeros(n, device=device)
    max_norm = config.clamp_norm_factor * h_norm  # (n_groups,)
    caches = run.block_caches(active[seq_group])

    with _frozen(run.model), torch.enable_grad():
        for step in range(config.steps):
            seq_on, fact_on = active[seq_group], active[grp.of_fact]  # rows / facts still optimising
            nll, kl = _losses(run, init, delta, seq_group, seq_on, fact_on, caches)  # (n_facts,) each
            wd = config.weight_decay * delta.norm(dim=1) / h_norm**2  # (n_groups,)
            loss = grp.mean(nll + config.kl_factor * kl) + wd  # (n_groups,)
            loss_now = loss.detach()
            last_loss = torch.where(active, loss_now, last_loss)
            last_nll = torch.where(fact_on, nll.detach(), last_nll)
            done = active & (loss_now < config.early_stop_loss)
            if done.any():
                for i in done[grp.of_fact].nonzero().flatten().tolist():
                    info.steps[i] = step
                active = active & ~done
                if not active.any():
                    break
                loss = torch.where(active, loss, torch.zeros_like(loss))
                caches = run.block_caches(active[seq_group])
            frozen = delta.detach().clone()
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            _project(delta, frozen, active, max_norm)

    info.loss = last_loss[grp.of_fact].tolist()
    info.nll = last_nll.tolist()
    info.h_norm = fact_h_norm.tolist()
    info.delta_norm = delta.detach().norm(dim=1)[grp.of_fact].tolist()
    return delta.detach().float()[grp.of_fact], info


def _losses(
    run: _Runner, init: _Unedited, delta: torch.Tensor, seq_group: torch.Tensor, seq_on: torch.Tensor,
    fact_on: torch.Tensor, caches: Sequence[Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fact (n_facts,): the weighted NLL of its targets and KL(p_orig || p_edit) on its KL
    prompt, with each row's group's ``delta`` added to layer l's output at column ``s0``.
    Only the rows ``seq_on`` run."""
    lay, start = run.lay, run.start
    nll = torch.zeros(lay.n_facts, device=delta.device)
    kl = torch.zeros(lay.n_facts, device=delta.device)
    for b, end in enumerate(lay.block_end):
        sel = lay.rows[seq_on & (lay.block == b)]
        if len(sel) == 0:
            continue
        h_edit = init.h[sel, start:end].clone()  # (n_sel, end - start, d_model)
        h_edit[:, lay.s0 - start] += delta[seq_group[sel]]
        out = run.edited(sel, end, h_edit, init.as_tuple, copy.deepcopy(caches[b]))  # a forward appends to a cache
        tok_on = seq_on[lay.tok_row] & (lay.tok_block == b)
        logits = run.logits(out, sel, lay.tok_row[tok_on], lay.tok_col[tok_on])  # (n_tok, vocab)
        tok_nll = F.cross_entropy(logits, lay.tok_lab[tok_on], reduction="none") * lay.tok_w[tok_on]  # (n_tok,)
        nll = nll.index_add(0, lay.owner[lay.tok_row[tok_on]], tok_nll)
        kl_on = fact_on & (lay.kl_block == b)
        if kl_on.any():
            lp = F.log_softmax(run.logits(out, sel, lay.kl_rows[kl_on], lay.kl_col[kl_on]), -1)
            p = init.p_orig[kl_on]
            kl = kl.index_put((kl_on.nonzero().flatten(),), (p.exp() * (p - lp)).sum(-1))
    return nll, kl


@torch.no_grad()
def _project(delta: torch.Tensor, frozen: torch.Tensor, active: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Finished groups keep their delta exactly; the rest are clamped to ``||delta|| <= max_norm``."""
    delta[~active] = frozen[~active]
    norms = delta.norm(dim=1)
    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
    delta.mul_(scale.unsqueeze(1))
