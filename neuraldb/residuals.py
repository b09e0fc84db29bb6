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
import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ModelArch, resolve_arch
from .config import EditConfig
from .facts import Fact, encode_completion, locate_subject
from .keys import model_device, pad_id
from .nethook import TraceDict

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


@dataclass(frozen=True)
class _Seq:
    fact: int
    ids: list[int]
    subject_pos: int
    target_pos: list[int]  # positions whose next-token prediction is scored
    target_ids: list[int]
    kl: bool = False
    bare: bool = False


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final hidden states (already normed by the base model) -> logits, as the LM head does."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


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


def _copy_cache(cache: Any, rows: torch.Tensor) -> Any:
    """A private copy of the prefix cache restricted to ``rows`` (the cache is mutated by a forward)."""
    sub = copy.deepcopy(cache)
    sub.batch_select_indices(rows)
    return sub


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
    """
    arch = arch or resolve_arch(model)
    device = model_device(model)
    seqs = _build(tokenizer, facts, templates, config.kl_prompt)
    n = len(facts)
    ids, mask, s0 = _aligned(seqs, pad_id(tokenizer), device)  # (n_seq, width)
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # (n_seq, width) real-token positions
    rows = torch.arange(len(seqs), device=device)
    owner = torch.tensor([s.fact for s in seqs], device=device)  # (n_seq,)
    is_kl = torch.tensor([s.kl for s in seqs], device=device)
    # Rows are grouped by their width after the subject, and each group runs only its own
    # columns: no compute is spent on right padding (the KL prompt is much shorter than
    # the rest, and prompts differ in how many tokens follow the subject).
    widths = [len(s.ids) - s.subject_pos for s in seqs]
    distinct = sorted(set(widths))
    group_of = torch.tensor([distinct.index(w) for w in widths], device=device)  # (n_seq,)
    group_end = [s0 + w for w in distinct]  # last column (exclusive) of each group

    def col(s: _Seq, p: int) -> int:  # a sequence position -> its column in the aligned layout
        return p + s0 - s.subject_pos

    # scored columns, flattened: (n_tok,) rows / columns / labels
    tok_row = torch.tensor([r for r, s in enumerate(seqs) if not s.kl for _ in s.target_pos], device=device)
    tok_col = torch.tensor([col(s, p) for s in seqs if not s.kl for p in s.target_pos], device=device)
    tok_lab = torch.tensor([t for s in seqs if not s.kl for t in s.target_ids], device=device)
    tok_w = torch.tensor(  # 1 / (#target tokens * #templates): per-fact mean over prompts of mean NLL
        [1.0 / (len(s.target_ids) * len(templates)) for s in seqs if not s.kl for _ in s.target_pos],
        device=device,
    )
    kl_rows = rows[is_kl]  # (n_facts,) in fact order
    kl_col = torch.tensor([col(s, s.target_pos[0]) for s in seqs if s.kl], device=device)
    base = getattr(model, "base_model", model)
    dtype = next(model.parameters()).dtype
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    layer_names = [arch.layer(i) for i in range(layer + 1)]

    layer_name = arch.layer(layer)
    state: dict[str, Any] = {}
    start, cache = 0, None
    with torch.no_grad():
        if prefix_cache and s0 > 0:
            try:  # keys and values of the columns before s0, which no delta can change
                out = base(input_ids=ids[:, :s0], attention_mask=mask[:, :s0], position_ids=positions[:, :s0], use_cache=True)
                cache = getattr(out, "cache", None) if hasattr(out, "cache") else getattr(out, "past_key_values", None)
                start = s0 if cache is not None and hasattr(cache, "batch_select_indices") else 0
            except Exception as exc:  # noqa: BLE001 - a model without a usable cache: recompute every column
                log.info("no prefix cache for %s (%s); recomputing every column", type(model).__name__, exc)

    def bypass(name: str):
        def run(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            if name == layer_name:
                hidden = state["h"]
            return (hidden,) if state["tuple_out"] else hidden

        return run

    def run(sel: torch.Tensor, end: int, sub_cache: Any, h_edit: torch.Tensor | None = None) -> Any:
        """Final hidden states (len(sel), end - start, d_model) of columns ``start..end``.

        With ``h_edit`` the layers up to ``layer`` are bypassed and layer ``layer``
        outputs ``h_edit``; without it every layer runs and layer ``layer``'s output is
        recorded in ``state["rec"]``.
        """
        kwargs = {cache_kw: sub_cache, "use_cache": True} if start else {"use_cache": False}
        call = dict(input_ids=ids[sel, start:end], attention_mask=mask[sel, :end],
                    position_ids=positions[sel, start:end], **kwargs)
        if h_edit is None:
            with TraceDict(model, [layer_name]) as td:
                last = base(**call).last_hidden_state
            state["rec"] = td[layer_name]
            return last
        state["h"] = h_edit.to(dtype)  # the model's dtype (h is kept in float32)
        with TraceDict(model, layer_names, retain_output=False, bypass=bypass):
            return base(**call).last_hidden_state

    def remap_of(sel: torch.Tensor) -> torch.Tensor:
        remap = torch.full((len(seqs),), -1, dtype=torch.long, device=device)
        remap[sel] = torch.arange(len(sel), device=device)
        return remap

    probe = rows[owner == 0]  # the first fact's sequences check the shortcuts against the full model
    probe_tok = (owner[tok_row] == 0).nonzero().flatten()

    @torch.no_grad()
    def initial() -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Layer ``layer``'s output h (n_seq, width, d_model) for columns ``start..``, p_orig,
        and whether the shortcuts (cached prefix, per-group columns, base model + LM head,
        bypassed layers) reproduce the full model on the probe sequences."""
        h = p_orig = None
        got = {}
        for g, end in enumerate(group_end):
            sel = rows[group_of == g]
            remap = remap_of(sel)
            last = run(sel, end, _copy_cache(cache, sel) if start else None)
            rec = state["rec"]
            state["tuple_out"] = rec.output_is_tuple
            if h is None:
                h = torch.zeros(len(seqs), ids.shape[1], rec.output.shape[-1], device=device)
            h[sel, start:end] = rec.output.float()
            k = (kl_group == g).nonzero().flatten()  # facts whose KL row is in this group
            if len(k):
                lp = F.log_softmax(lm_logits(model, last[remap[kl_rows[k]], kl_col[k] - start]).float(), dim=-1)
                if p_orig is None:
                    p_orig = torch.empty(n, lp.shape[-1], device=device)
                p_orig[k] = lp
            t = probe_tok[tok_group[probe_tok] == g]
            if len(t):
                got[g] = (t, lm_logits(model, last[remap[tok_row[t]], tok_col[t] - start]).float())
                # the bypass used by the optimisation gives the same final states
                ps = probe[group_of[probe] == g]
                again = run(ps, end, _copy_cache(cache, ps) if start else None, h[ps, start:end])
                got[g] += (lm_logits(model, again[remap_of(ps)[tok_row[t]], tok_col[t] - start]).float(),)
        full = model(input_ids=ids[probe], attention_mask=mask[probe], position_ids=positions[probe],
                     use_cache=False).logits
        local = remap_of(probe)
        ok = True
        tol = max(1e-3, 4 * torch.finfo(dtype).eps)  # a few roundings of the model's dtype
        for t, direct, bypassed in got.values():
            want = full[local[tok_row[t]], tok_col[t]].float()
            ok = ok and torch.allclose(direct, want, atol=tol, rtol=tol)
            ok = ok and torch.allclose(bypassed, want, atol=tol, rtol=tol)
        return h, p_orig, ok

    tok_group, kl_group = group_of[tok_row], group_of[kl_rows]
    h, p_orig, ok = initial()
    if start and not ok:
        log.info("prefix cache does not reproduce the full pass for %s; recomputing every column", type(model).__name__)
        start = 0
        h, p_orig, ok = initial()
    if not ok:
        raise RuntimeError(
            f"{type(model).__name__}: base_model + output embeddings do not reproduce the model's "
            "logits; this architecture post-processes logits in a way neuraldb does not know"
        )
    fact_h_norm = h[rows[torch.tensor([s.bare for s in seqs], device=device)], s0].norm(dim=1)  # ROME's target_init
    group = torch.tensor(list(groups) if groups is not None else range(n), dtype=torch.long, device=device)  # (n,)
    if group.shape != (n,) or bool((group < 0).any()):
        raise ValueError(f"groups: give one int >= 0 per fact ({n} facts), got {list(groups or [])!r}")
    group = torch.unique(group, return_inverse=True)[1]  # (n_facts,) -> 0..n_groups-1
    n_groups = int(group.max()) + 1
    size = torch.zeros(n_groups, device=device).index_add_(0, group, torch.ones(n, device=device))  # (n_groups,)
    h_norm = torch.zeros(n_groups, device=device).index_add_(0, group, fact_h_norm) / size  # (n_groups,)
    seq_group = group[owner]  # (n_seq,)

    delta = torch.zeros(n_groups, h.shape[-1], device=device, requires_grad=True)  # (n_groups, d_model)
    opt = torch.optim.Adam([delta], lr=config.lr)
    active = torch.ones(n_groups, dtype=torch.bool, device=device)
    info = ResidualInfo(steps=[config.steps] * n)
    last_loss = torch.zeros(n_groups, device=device)
    last_nll = torch.zeros(n, device=device)
    max_norm = config.clamp_norm_factor * h_norm  # (n_groups,)
    cuts: dict[int, tuple[tuple[int, ...], Any]] = {}  # group -> (its active rows, their prefix cache)

    with _frozen(model), torch.enable_grad():
        for step in range(config.steps):
            seq_on = active[seq_group]  # (n_seq,) sequences of facts still optimising
            fact_on = active[group]  # (n_facts,)
            nll = torch.zeros(n, device=device)
            kl = torch.zeros(n, device=device)
            for g, end in enumerate(group_end):
                sel = rows[seq_on & (group_of == g)]
                if len(sel) == 0:
                    continue
                step_cache = None
                if start:
                    key = tuple(sel.tolist())
                    if g not in cuts or cuts[g][0] != key:  # the active set changed: cut the cache again
                        cuts[g] = (key, _copy_cache(cache, sel))
                    step_cache = copy.deepcopy(cuts[g][1])  # a forward appends to the cache
                remap = remap_of(sel)
                h_edit = h[sel, start:end].clone()  # (n_sel, end - start, d_model)
                h_edit[:, s0 - start] += delta[seq_group[sel]]
                out = run(sel, end, step_cache, h_edit)  # (n_sel, end - start, d_model)
                tok_on = seq_on[tok_row] & (tok_group == g)
                logits = lm_logits(model, out[remap[tok_row[tok_on]], tok_col[tok_on] - start]).float()  # (n_tok, vocab)
                tok_nll = F.cross_entropy(logits, tok_lab[tok_on], reduction="none") * tok_w[tok_on]
                nll = nll.index_add(0, owner[tok_row[tok_on]], tok_nll)
                kl_on = fact_on & (kl_group == g)
                if kl_on.any():
                    lp = F.log_softmax(lm_logits(model, out[remap[kl_rows[kl_on]], kl_col[kl_on] - start]).float(), -1)
                    kl = kl.index_put((kl_on.nonzero().flatten(),), (p_orig[kl_on].exp() * (p_orig[kl_on] - lp)).sum(-1))
            wd = config.weight_decay * delta.norm(dim=1) / h_norm**2  # (n_groups,)
            per_fact = nll + config.kl_factor * kl  # (n_facts,)
            loss = torch.zeros(n_groups, device=device).index_add(0, group, per_fact) / size + wd  # (n_groups,)
            loss_now = loss.detach()
            last_loss = torch.where(active, loss_now, last_loss)
            last_nll = torch.where(fact_on, nll.detach(), last_nll)
            done = active & (loss_now < config.early_stop_loss)
            if done.any():
                for i in done[group].nonzero().flatten().tolist():
                    info.steps[i] = step
                active = active & ~done
                if not active.any():
                    break
                loss = torch.where(active, loss, torch.zeros_like(loss))
            frozen = delta.detach().clone()
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                delta[~active] = frozen[~active]  # finished facts keep their delta exactly
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                delta.mul_(scale.unsqueeze(1))
    info.loss = last_loss[group].tolist()
    info.nll = last_nll.tolist()
    info.h_norm = fact_h_norm.tolist()
    info.delta_norm = delta.detach().norm(dim=1)[group].tolist()
    return delta.detach().float()[group], info
