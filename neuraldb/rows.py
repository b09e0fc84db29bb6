"""What a store's rows must be: the checks ``NeuralDB.add`` and ``update`` run on their input.

Example::

    keys, residuals = check_rows(keys, residuals, 2, d_key=1536, d_model=576)   # float32 copies on the CPU
    thresholds = check_thresholds(None, 2)          # (2,) -inf: the global gamma alone
    words = check_words(None, 2, WORD_WIDTH)        # (2, 1, width) NO_WORD: no word check

Each returns the CPU tensor the store keeps (a copy, never the caller's tensor) or raises
``error`` (``NeuralDB`` passes :class:`~neuraldb.store.StoreError`) with a message that
names the fix.
"""

from __future__ import annotations

from typing import Any

import torch

from .words import NO_WORD

__all__ = ["check_rows", "check_thresholds", "check_words"]


def check_rows(keys: Any, residuals: Any, n: int, *, d_key: int, d_model: int,
               error: type[ValueError] = ValueError) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys`` (n, d_key) and ``residuals`` (n, d_model) as float32 on the CPU: finite, no zero key."""
    keys = torch.as_tensor(keys).detach().to("cpu", torch.float32)
    residuals = torch.as_tensor(residuals).detach().to("cpu", torch.float32)
    if keys.shape != (n, d_key):
        raise error(f"keys must have shape ({n}, {d_key}), got {tuple(keys.shape)}")
    if residuals.shape != (n, d_model):
        raise error(f"residuals must have shape ({n}, {d_model}), got {tuple(residuals.shape)}")
    if not (torch.isfinite(keys).all() and torch.isfinite(residuals).all()):
        raise error("keys and residuals must be finite (found NaN or inf)")
    if (keys.norm(dim=1) == 0).any():
        raise error("a key is the zero vector: its cosine similarity is undefined")
    return keys, residuals


def check_thresholds(thresholds: Any, n: int, *, error: type[ValueError] = ValueError) -> torch.Tensor:
    """(n,) float32 per-key thresholds: numbers or -inf; None = all -inf (the global gamma alone)."""
    if thresholds is None:
        return torch.full((n,), float("-inf"))
    t = torch.as_tensor(thresholds, dtype=torch.float32).detach().to("cpu").reshape(-1)
    if t.shape != (n,):
        raise error(f"thresholds must have shape ({n},), got {tuple(t.shape)}")
    if torch.isnan(t).any() or (t == float("inf")).any():
        raise error("thresholds must be numbers or -inf (found NaN or +inf)")
    return t.clone()


def check_words(words: Any, n: int, width: int, *, error: type[ValueError] = ValueError) -> torch.Tensor:
    """(n, forms, width) long: the subjects' word forms (:func:`neuraldb.words.subject_words`);
    None = ``NO_WORD`` rows (no word check for these facts)."""
    if words is None:
        return torch.full((n, 1, width), NO_WORD, dtype=torch.long)
    w = torch.as_tensor(words).detach().to("cpu")
    if w.dtype.is_floating_point or w.dim() != 3 or w.shape[0] != n or w.shape[1] < 1 or w.shape[2] != width:
        raise error(
            f"words must be integer token ids of shape ({n}, forms, {width}), got {w.dtype} {tuple(w.shape)}: "
            "build them with neuraldb.words.subject_words(tokenizer, subjects)"
        )
    return w.long().clone()
