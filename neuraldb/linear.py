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
"""

from __future__ import annotations

from typing import Any, ContextManager, Sequence

import torch
from torch import nn

from .keys import model_device, pad_batch, pad_id
from .hook import attached, attached_reader, mark_attached
from .nethook import get_module, layer_input
from .store import NeuralDB, StoreError

__all__ = ["LinearReader", "estimate_c0", "linear_delta"]


@torch.no_grad()
def estimate_c0(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, layer: int, module_template: str | None = None,
    max_length: int = 128, batch_size: int = 8,
) -> torch.Tensor:
    """``E[k k^T]`` (d_key, d_key) float64 over every real token of ``texts``."""
    from .arch import resolve_arch

    name = (module_template or resolve_arch(model).mlp_out).format(layer)
    device = model_device(model)
    total, count = None, 0
    for start in range(0, len(texts), batch_size):
        seqs = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts[start : start + batch_size]]
        ids, mask = pad_batch(seqs, pad_id(tokenizer), device)
        k = layer_input(model, name, input_ids=ids, attention_mask=mask)[mask.bool()].double()  # (tokens, d_key)
        total = k.T @ k if total is None else total + k.T @ k
        count += k.shape[0]
    if total is None:
        raise ValueError("estimate_c0 needs at least one text")
    return (total / count).cpu()


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

    def attach(self, model: nn.Module, *, layer: int | None = None, check: bool = True) -> "LinearReader":
        if self._saved is not None:
            raise StoreError("this linear reader is already attached; call detach() first")
        other = attached_reader(model)
        if other is not None:
            raise StoreError(f"another store is attached to this model ({other!r}); detach it first")
        if check:
            self.db.check_compatible(model, layer=layer)
        module = get_module(model, self.db.module_name(model))
        version = self.db._version  # the store's change counter
        if self._delta is None or self._delta[0] != version:  # the harness attaches around every model call
            self._delta = (version, linear_delta(self.db.keys, self.db.residuals, c0=self.c0, lam=self.lam))
        delta = self._delta[1]  # (d_model, d_key)
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
