"""The gates the false-fire report measures on the same activations, and those activations."""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from neuraldb import NeuralDB, resolve_arch
from neuraldb.keys import pad_batch, pad_id
from neuraldb.nethook import layer_input
from neuraldb.words import NO_WORD, word_match

from .measure import subject_last_positions


@torch.no_grad()
def gated_queries(model, tok, texts: Sequence[str], *, layer: int, max_len: int, batch_size: int,
                  subjects: Sequence[str | None] | None = None, progress: bool = False, desc: str = "text"):
    """Yield (rows, acts (b, t, d), valid (b, t), ids (b, t), subj_pos (b,)) per batch.

    ``valid`` is what the store's hook gates: real tokens except the first of each text.
    """
    from tqdm.auto import tqdm

    arch = resolve_arch(model)
    device = next(model.parameters()).device
    enc, spos = [], []
    for i, t in enumerate(texts):
        if subjects is not None and subjects[i]:
            ids, p = subject_last_positions(tok, t, subjects[i])
        else:
            ids, p = tok(t)["input_ids"], None
        enc.append(list(ids)[:max_len]), spos.append(-1 if p is None or p >= max_len else p)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, mininterval=5):
        rows = order[start: start + batch_size]
        ids, mask = pad_batch([enc[r] for r in rows], pad_id(tok), device)
        x = layer_input(model, arch.mlp_out_at(layer), input_ids=ids, attention_mask=mask)
        valid = mask.bool().clone()
        valid[:, 0] = False
        yield rows, x, valid, ids, torch.tensor([spos[r] for r in rows], device=device)


_TRAILING_WORD = re.compile(r"[\w'’.-]*$")
_FUNCTION_WORDS = frozenset("a an the of and or in on at to for by with from de del della di da du des la le les el "
                            "los las von van der den ter y et".split())


def fired_on_subject_word(tok: Any, ids: torch.Tensor | Sequence[int], subject: str) -> bool:
    """Whether the token that fired ends (or begins, 4+ letters) a word of ``subject``.

    ``ids`` are the text's tokens up to and including the fired one. A text about "Mr.
    Henderson" that fires the key of "Erin Henderson" at "Henderson" is not unrelated to
    that fact; a fire at "Steinberg" on the key of "Brad Silverberg" is a false fire, and
    so is a fire anywhere else in a text that happens to contain "Brad" or "of".
    """
    text = tok.decode([int(i) for i in ids], skip_special_tokens=True)
    m = _TRAILING_WORD.search(text)
    word = (m.group(0) if m else "").lower().strip(".-'’")
    for suffix in ("'s", "’s"):
        word = word.removesuffix(suffix)
    if not word:
        return False
    words = [w.strip(".,;:!?()\"'’").lower() for w in subject.split()]
    words = [w for w in words if w and w not in _FUNCTION_WORDS]  # "of" in "University of X" names no one
    return any(word == w or (len(word) >= 4 and w.startswith(word)) for w in words)


class Gate:
    """One gate configuration measured on the same activations: a gamma, with or without thresholds."""

    def __init__(self, db: NeuralDB, gamma: float, calibrated: bool, shift: float = 0.0, margin: float | None = None,
                 word_check: bool = False):
        self.db = NeuralDB(layer=db.layer, d_key=db.d_key, d_model=1, gamma=gamma)
        self.db.keys, self.db.ids, self.db._index = db.keys, db.ids, db._index
        self.db.residuals = torch.zeros(len(db), 1)
        self.db.thresholds = db.thresholds + shift if calibrated else torch.full((len(db),), float("-inf"))
        self.db.words = db.words if word_check else torch.full_like(db.words, NO_WORD)
        self.db.word_starts = db.word_starts
        self.name = f"gamma={gamma}" + (f" +per-key thresholds (margin {margin})" if calibrated else " (global gamma only)")
        self.name += " +word check" if word_check else ""
        self.margin = margin
        self.gamma, self.calibrated, self.word_check = gamma, calibrated, word_check
        self.fires = self.mentions = self.words = 0
        self.worst: list[tuple[float, str, str, int, int]] = []
        self.per_fact: dict[str, int] = {}
        self.recall: dict[str, dict[str, Any]] = {}
        self._thr: torch.Tensor | None = None
        self._words: torch.Tensor | None = None

    def fire(self, scores: torch.Tensor, index: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(M,) this gate's decision for the shared top-1 ``(scores, index)`` (M,) at token ``windows`` (M, width)."""
        if self._thr is None or self._thr.device != scores.device:  # no normalised key copy per gate
            self._thr, self._words = self.db.gate_thresholds().to(scores.device), self.db.words.to(scores.device)
            self._starts = self.db.word_starts.to(scores.device)
        fire = scores > self._thr[index]
        return fire & word_match(self._words[index], windows, self._starts) if self.word_check else fire
