"""Running a residual batch through the model: the prefix once, then columns ``start..``.

Example::

    run = _runner(model, arch, layer, lay, prefix_cache=True)   # the prefix's keys and values, once
    init, ok = _unedited(run)   # layer l's output, p_orig, and whether the shortcuts reproduce the model

Nothing before the subject's column ``s0`` depends on the residual, so with a prefix
cache only columns ``s0..`` run after one unedited pass; the layers before the edited
one are skipped (their output is replayed) and logits are computed only where the loss
needs them. :func:`_unedited` checks these shortcuts against one full pass.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ModelArch
from .nethook import Trace, TraceDict, cache_argument, cache_of
from .residual_batch import _Layout
from .timing import phase

__all__ = ["lm_logits", "logits_close", "shortcut_tolerance"]

log = logging.getLogger(__name__)


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final hidden states (already normed by the base model) -> logits, as the LM head does."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


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
    n_layers: int  # the model's depth (the tolerance of the shortcuts' check grows with it)
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
                  cache_argument(base) or "past_key_values", arch.n_layers)
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
def _unedited(run: _Runner, check: bool = True) -> tuple[_Unedited, bool]:
    """Layer l's output and p_orig, block by block, and whether the shortcuts (cached prefix,
    per-block columns, base model + LM head, skipped layers) reproduce the full model on
    the first fact's rows (the probe); without ``check`` (already verified for this model,
    layer and mode, :func:`neuraldb.residuals.compute_residuals`) True without looking."""
    lay, start = run.lay, run.start
    probe_tok = (lay.owner[lay.tok_row] == 0).nonzero().flatten()
    h = p_orig = None
    got = []  # per block: (probe tokens, their logits through the shortcuts, and through the skipped layers)
    for b, end in enumerate(lay.block_end):
        sel = lay.rows[lay.block == b]
        with phase("unedited_pass"):
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
        if check and len(t):
            direct = run.logits(last, sel, lay.tok_row[t], lay.tok_col[t])
            ps = lay.rows[(lay.owner == 0) & (lay.block == b)]
            with phase("shortcut_check"):
                again = run.edited(ps, end, h[ps, start:end], rec.output_is_tuple, run.cut(ps))
                got.append((t, direct, run.logits(again, ps, lay.tok_row[t], lay.tok_col[t])))
    if not check:
        return _Unedited(h, p_orig, rec.output_is_tuple), True
    with phase("shortcut_check"):
        ok = _reproduces(run, got)
    return _Unedited(h, p_orig, rec.output_is_tuple), ok


def shortcut_tolerance(dtype: torch.dtype, n_layers: int) -> float:
    """How far (as a fraction of a row's largest |logit|) the shortcuts' logits may be from the
    full pass's in ``dtype``: ``max(1e-3, 3 * sqrt(n_layers) * eps(dtype))``.

    Example::

        shortcut_tolerance(torch.bfloat16, 30)   # 0.128: bfloat16 rounding over 30 layers
        shortcut_tolerance(torch.float32, 30)    # 0.001

    The shortcuts run other shapes than the full pass (other batch rows, widths, a cached
    prefix), so their roundings differ: a few ``eps`` per layer, growing like the square root
    of the depth. SmolLM2-135M in bfloat16 (30 layers) differs by up to 4.0% of the largest
    logit, which an absolute bound of ``4 * eps`` (0.03) rejected. A wrong architecture (an LM
    head that scales, caps or shifts the logits) is off by a large fraction of the scale.
    """
    return max(1e-3, 3.0 * math.sqrt(max(n_layers, 1)) * torch.finfo(dtype).eps)


def logits_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    """Whether every row of ``got`` is within ``tol * max(1, max |want[row]|)`` of ``want`` (both (n, vocab)).

    Example::

        logits_close(shortcut, full, shortcut_tolerance(torch.bfloat16, 30))
    """
    scale = want.abs().amax(dim=-1).clamp_min(1.0)  # (n,)
    return bool(((got - want).abs().amax(dim=-1) <= tol * scale).all())


@torch.no_grad()
def _reproduces(run: _Runner, got: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> bool:
    """Whether both logits of every (tokens, shortcut logits, skipped-layer logits) match one full pass
    in the model's dtype, within :func:`shortcut_tolerance` of it."""
    lay = run.lay
    probe = lay.rows[lay.owner == 0]
    full = run.model(input_ids=lay.ids[probe], attention_mask=lay.mask[probe], position_ids=lay.positions[probe],
                     use_cache=False).logits
    tol = shortcut_tolerance(run.dtype, run.n_layers)
    for t, direct, skipped in got:
        want = lay.pick(full, probe, 0, lay.tok_row[t], lay.tok_col[t]).float()
        for shortcut, what in ((direct, "base model + LM head"), (skipped, "skipped layers")):
            if not logits_close(shortcut, want, tol):
                err = ((shortcut - want).abs().amax(-1) / want.abs().amax(-1).clamp_min(1.0)).max()
                log.info("shortcut (%s) differs from the full pass by %.4f of the logits' scale (tolerance %.4f)",
                         what, float(err), tol)
                return False
    return True
