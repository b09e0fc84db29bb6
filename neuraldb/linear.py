"""The linear reading of the same store (the paper's baseline, docs/method.md, 'Linear reader').

Example::

    c0 = estimate_c0(model, tok, texts, layer=db.layer)          # E[k k^T] on generic text
    reader = LinearReader(db, c0=c0)                              # same keys, same residuals
    with reader.attached(model):                                  # W += R K^T (K K^T + lam C0)^-1
        ...                                                       # every input is perturbed a little

MEMIT writes edits into the projection's weight in closed form,
``delta_W = R K^T (K K^T + lam * C0)^-1`` with ``K`` (d_key, N) the raw keys and
``R`` (d_model, N) the residuals; ``C0`` estimates the second moment of keys the
edit must leave alone (``lam * I`` alone is the cheapest variant). Comparing this
reader with the gated one on the same facts is the paper's central experiment.
``LinearReader`` offers the store's reading interface (``attached``, ``stats``...)
so the evaluation code can run either reader. Detaching restores the weight bit
for bit.

``lam`` defaults to 15000 with a ``C0`` (MEMIT's ``mom2_update_weight`` for GPT-J and,
in AlphaEdit's settings, Llama-3-8B; 20000 for GPT-2 XL; MEMIT estimates ``C0`` on
100,000 Wikipedia samples and spreads each residual over 5-6 layers). Those values
are tuned for MEMIT's multi-layer edit, not for one layer of another model: choose
``lam`` on held-out facts (``neuraldb study --linear-lams``, :mod:`evals.linear_sweep`).
"""

from __future__ import annotations

from typing import Any, ContextManager, Sequence

import torch
from torch import nn

from .keys import model_device, pad_batch, pad_id
from .hook import attached, attached_reader, mark_attached
from .nethook import get_module, layer_input
from .store import NeuralDB, StoreError

__all__ = ["LinearReader", "estimate_c0", "estimate_c0s", "linear_delta", "written_share"]


@torch.no_grad()
def estimate_c0(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, layer: int, module_template: str | None = None,
    max_length: int = 128, batch_size: int = 8,
) -> torch.Tensor:
    """``E[k k^T]`` (d_key, d_key) float64 over every real token of ``texts`` (each cut at ``max_length`` tokens)."""
    if not texts:
        raise ValueError("estimate_c0 needs at least one text")
    return estimate_c0s(model, tokenizer, texts, sizes=[len(texts)], layer=layer, module_template=module_template,
                        max_length=max_length, batch_size=batch_size)[len(texts)]


@torch.no_grad()
def estimate_c0s(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, sizes: Sequence[int], layer: int,
    module_template: str | None = None, max_length: int = 128, batch_size: int = 8,
) -> dict[int, torch.Tensor]:
    """``{n: E[k k^T] over texts[:n]}`` for every ``n`` in ``sizes``, in one pass over ``texts[:max(sizes)]``.

    Example::

        c0s = estimate_c0s(model, tok, passages, sizes=[200, 1000], layer=db.layer)   # C0 size sweep

    MEMIT estimates the same moment on 100,000 Wikipedia samples (``mom2_n_samples``);
    a few hundred passages of generic text give a usable estimate for small models.
    """
    from .arch import resolve_arch

    wanted = sorted({int(n) for n in sizes})
    if not wanted or wanted[0] < 1 or wanted[-1] > len(texts):
        raise ValueError(f"estimate_c0s: sizes {list(sizes)} must lie in 1..{len(texts)} (the number of texts)")
    name = (module_template or resolve_arch(model).mlp_out).format(layer)
    device = model_device(model)
    out: dict[int, torch.Tensor] = {}
    total, count, done = None, 0, 0
    while done < wanted[-1]:
        stop = min(done + batch_size, next(n for n in wanted if n > done))  # never straddle a requested size
        seqs = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts[done:stop]]
        ids, mask = pad_batch(seqs, pad_id(tokenizer), device)
        k = layer_input(model, name, input_ids=ids, attention_mask=mask)[mask.bool()].double()  # (tokens, d_key)
        total = k.T @ k if total is None else total + k.T @ k
        count += k.shape[0]
        done = stop
        if done in wanted:
            out[done] = (total / count).cpu()
    return out


def written_share(keys: torch.Tensor, residuals: torch.Tensor, delta: torch.Tensor) -> float:
    """Mean over facts of ``<delta k_i, r_i> / ||r_i||^2``: the share of each residual the weight edit
    writes at its own stored key (1 = every fact stored exactly; ``lam`` and ``C0`` pull it down)."""
    r = residuals.double()  # (N, d_model)
    written = keys.double() @ delta.double().T  # (N, d_model): delta k_i for every fact
    return float(((written * r).sum(1) / r.pow(2).sum(1).clamp_min(1e-30)).mean()) if len(r) else float("nan")


def linear_delta(keys: torch.Tensor, residuals: torch.Tensor, *, c0: torch.Tensor | None, lam: float) -> torch.Tensor:
    """``R K^T (K K^T + lam C0)^-1`` as (d_model, d_key) float64; ``C0 = I`` when None."""
    k = keys.double().T  # (d_key, N)
    r = residuals.double().T  # (d_model, N)
    c = torch.eye(k.shape[0], dtype=torch.float64) if c0 is None else c0.double()
    a = k @ k.T + lam * c  # (d_key, d_key), symmetric positive definite
    return torch.linalg.solve(a, k @ r.T).T  # (d_model, d_key)


class LinearReader:
    """Read a :class:`NeuralDB` linearly: its facts written into the projection weight."""

    def __init__(self, db: NeuralDB, *, c0: torch.Tensor | None = None, lam: float | None = None) -> None:
        if db.residual_template and db.module_template and db.residual_template != db.module_template:
            raise StoreError(
                "the linear reader writes residuals into the MLP output projection; for this family the "
                f"residual is added after {db.residual_template!r}, so a weight edit is not equivalent"
            )
        self.db = db
        self.c0 = c0
        self.lam = float(lam if lam is not None else (15000.0 if c0 is not None else 1.0))
        self._saved: tuple[nn.Module, torch.Tensor] | None = None  # (projection, its original weight)
        self._model: nn.Module | None = None
        self._delta: tuple[int, torch.Tensor] | None = None

    def __getattr__(self, name: str) -> Any:  # ids, facts, layer, gamma, config ... from the store
        return getattr(self.db, name)

    def __len__(self) -> int:
        return len(self.db)

    def __contains__(self, fact_id: object) -> bool:
        return fact_id in self.db

    @property
    def is_attached(self) -> bool:
        return self._saved is not None

    @property
    def model(self) -> nn.Module | None:
        """The model whose weight this reader changed (None when detached)."""
        return self._model

    def delta(self) -> torch.Tensor:
        """The weight change (d_model, d_key) float64 for the store as it is now (cached until it changes)."""
        version = self.db._version  # the store's change counter
        if self._delta is None or self._delta[0] != version:  # the harness attaches around every model call
            self._delta = (version, linear_delta(self.db.keys, self.db.residuals, c0=self.c0, lam=self.lam))
        return self._delta[1]

    def attach(self, model: nn.Module, *, layer: int | None = None, check: bool = True) -> "LinearReader":
        if self._saved is not None:
            raise StoreError("this linear reader is already attached; call detach() first")
        other = attached_reader(model)
        if other is not None:
            raise StoreError(f"another store is attached to this model ({other!r}); detach it first")
        if check:
            self.db.check_compatible(model, layer=layer)
        module = get_module(model, self.db.module_name(model))
        delta = self.delta()  # (d_model, d_key)
        if type(module).__name__ == "Conv1D":  # GPT-2 stores the weight as (in, out)
            delta = delta.T
        original = module.weight.detach().clone()
        module.weight.data += delta.to(module.weight.dtype).to(module.weight.device)
        self._saved, self._model = (module, original), model
        mark_attached(model, self)
        return self

    def detach(self) -> None:
        saved, model, self._saved, self._model = self._saved, self._model, None, None
        if saved is not None:
            module, original = saved
            module.weight.data.copy_(original)
        if model is not None and attached_reader(model) is self:
            mark_attached(model, None)

    def attached(self, model: nn.Module, *, layer: int | None = None) -> ContextManager["LinearReader"]:
        """``with reader.attached(model): ...`` attaches, and always detaches on exit."""
        return attached(self, model, layer=layer)

    # the linear reader has no gate: every position is changed a little
    def reset_stats(self) -> None:
        self.db.reset_stats()

    def stats(self) -> dict[str, Any]:
        return {"positions": 0, "fires": 0, "rate": 0.0, "reader": "linear"}

    last_fire_mask = None
