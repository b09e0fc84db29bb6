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
stops once its NLL (``early_stop="nll"``) or its whole loss (``"loss"``, the paper's rule)
is below ``early_stop_loss``. Facts are independent, so a batch of
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
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ModelArch, resolve_arch
from .config import EditConfig
from .facts import Fact
from .keys import model_device
from .residual_batch import _groups, _Groups, _layout
from .model_cache import PerModel
from .timing import phase
from .residual_runner import _runner, _Runner, _Unedited, _unedited

__all__ = ["compute_residuals", "ResidualInfo", "copy_dtype", "fast_residual_dtype", "optimisation_model",
           "settle_residual_dtype"]

log = logging.getLogger(__name__)
_VERIFIED = PerModel(per_model=16)  # (layer names, prefix cache or not) whose shortcuts matched the full model


@dataclass
class ResidualInfo:
    """Per fact: loss at the end, steps taken, the norm of h and of delta."""

    loss: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    h_norm: list[float] = field(default_factory=list)
    delta_norm: list[float] = field(default_factory=list)


def fast_residual_dtype(model: nn.Module) -> str | None:
    """What ``residual_dtype="auto"`` means for ``model``: "bfloat16" for a float32 model on a CPU
    whose instructions multiply bfloat16 natively (AVX512-BF16 or AMX tiles), else None (the model's dtype).

    Example::

        fast_residual_dtype(model)   # "bfloat16" on an AMD EPYC (Zen 4) or a Sapphire Rapids Xeon

    On such a CPU the optimisation runs 1.8x faster (SmolLM2-135M, 1 and 10 facts, README "Edit
    latency"); elsewhere bfloat16 is emulated and no faster. GPU models keep their dtype.
    """
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        return None
    cpu = getattr(torch, "cpu", None)
    probes = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    return "bfloat16" if any(bool(p()) for p in probes if p is not None) else None


def settle_residual_dtype(model: nn.Module, config: EditConfig, stored: Mapping[str, Any] | None = None
                          ) -> EditConfig:
    """``config`` with ``residual_dtype="auto"`` made concrete: the stored config's value when
    adding to a store, resuming a checkpoint or a run (``stored``, a store's ``config``), so its
    facts are all optimised alike; else :func:`fast_residual_dtype`. Other values are kept.

    Example::

        config = settle_residual_dtype(model, EditConfig())          # residual_dtype "bfloat16" or None
        config = settle_residual_dtype(model, EditConfig(), db.config)   # the store's own
    """
    if config.residual_dtype != "auto":
        return config
    if stored and "residual_dtype" in stored and stored["residual_dtype"] != "auto":
        return replace(config, residual_dtype=stored["residual_dtype"])
    return replace(config, residual_dtype=fast_residual_dtype(model))


_TWINS = PerModel(per_model=2)  # per model and dtype: its copy for the optimisation, while the model is unchanged


def optimisation_model(model: nn.Module, dtype: str | None) -> nn.Module:
    """The model the residual optimisation runs on: ``model`` itself, or a copy in ``dtype``.

    Example::

        fast = optimisation_model(model, "bfloat16")   # made once per model, while it is unchanged

    The copy is kept beside the model (:mod:`neuraldb.model_cache`: dropped with the model, made
    again when its weights change), so an edit of a few facts does not copy the model each time
    (SmolLM2-135M: 0.3-1.3 s, and a bfloat16 copy of 270 MB held). ``"auto"``:
    :func:`fast_residual_dtype`. On CPUs the copy uses eager attention: in torch 2.13 the bfloat16
    backward of CPU scaled-dot-product attention is ~10x slower than float32, which would eat the
    gain of the bfloat16 matmuls.
    """
    to = copy_dtype(model, dtype)
    return model if to is None else _TWINS.get(model, to, lambda: _twin(model, to))


def copy_dtype(model: nn.Module, dtype: str | None) -> torch.dtype | None:
    """The dtype of the copy of ``model`` the optimisation runs on for ``EditConfig.residual_dtype``
    ``dtype`` ("auto": :func:`fast_residual_dtype`), or None when it runs on the model itself.

    Example::

        copy_dtype(model, "auto")   # torch.bfloat16 for SmolLM2 float32 on a CPU with bfloat16 units
    """
    name = fast_residual_dtype(model) if dtype == "auto" else dtype
    to = getattr(torch, name) if name else None
    return None if to is None or to == next(model.parameters()).dtype else to


def _twin(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    twin = copy.deepcopy(model).to(dtype).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
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
    (checked against the full pass once per model, layers and mode while the model is
    unchanged: :mod:`neuraldb.model_cache`; if the model's cache cannot do this, every
    column is recomputed instead).

    The steps, in order: lay the batch out (:mod:`neuraldb.residual_batch`), compute the
    prefix once (:mod:`neuraldb.residual_runner`), record the unedited layer output and KL
    distribution and check the shortcuts (``_unedited``), then optimise ``delta`` with
    Adam (:func:`_optimise`).
    """
    config = config.filled()  # lr / steps None (no settings resolved): EditConfig's fallbacks
    arch = arch or resolve_arch(model)
    with phase("layout"):
        lay = _layout(tokenizer, facts, templates, config.kl_prompt, model_device(model))
        grp = _groups(groups, len(facts), lay.ids.device)
    with phase("prefix_pass"):
        run = _runner(model, arch, layer, lay, prefix_cache)
    init, ok = _unedited(run, check=not _VERIFIED.has(model, (*run.layer_names, bool(run.start))))
    if run.start and not ok:
        log.info("prefix cache does not reproduce the full pass for %s; recomputing every column", type(model).__name__)
        run = replace(run, start=0, cache=None)
        init, ok = _unedited(run, check=not _VERIFIED.has(model, (*run.layer_names, False)))
    if ok:
        _VERIFIED.put(model, (*run.layer_names, bool(run.start)), True)
    else:
        raise RuntimeError(
            f"{type(model).__name__}: base_model + output embeddings do not reproduce the model's "
            "logits; this architecture post-processes logits in a way neuraldb does not know"
        )
    fact_h_norm = init.h[lay.bare_rows, lay.s0].norm(dim=1)  # (n_facts,) ROME's target_init
    with phase("adam_loop"):
        return _optimise(run, init, grp, fact_h_norm, config)


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
    """Adam on delta (n_groups, d_model) from zero; a group stops once its mean NLL (``early_stop="nll"``)
    or its loss (``"loss"``) is below ``early_stop_loss``."""
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
            with phase("adam_forward"):  # part of adam_loop
                nll, kl = _losses(run, init, delta, seq_group, seq_on, fact_on, caches)  # (n_facts,) each
            wd = config.weight_decay * delta.norm(dim=1) / h_norm**2  # (n_groups,)
            loss = grp.mean(nll + config.kl_factor * kl) + wd  # (n_groups,)
            loss_now = loss.detach()
            last_loss = torch.where(active, loss_now, last_loss)
            last_nll = torch.where(fact_on, nll.detach(), last_nll)
            crit = grp.mean(nll.detach()) if config.early_stop == "nll" else loss_now  # (n_groups,)
            done = active & (crit < config.early_stop_loss)
            if done.any():
                for i in done[grp.of_fact].nonzero().flatten().tolist():
                    info.steps[i] = step
                active = active & ~done
                if not active.any():
                    break
                loss = torch.where(active, loss, torch.zeros_like(loss))
                caches = run.block_caches(active[seq_group])
            with phase("adam_backward"):  # part of adam_loop
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
        with phase("cache_copy"):  # part of adam_forward
            cache = copy.deepcopy(caches[b])  # a forward appends to a cache
        out = run.edited(sel, end, h_edit, init.as_tuple, cache)
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
