"""Paraphrase and edit-prompt recall of the false-fire report, for every gate on the same activations.

A paraphrase counts as recalled when any of its positions fires its own fact (``recall_any``)
and, more strictly, when the subject's last token does (``recall_subject``). Facts about one
subject share one residual (``EditConfig.share_subject_residuals``), so retrieving any of them
adds the right residual: recall counts them as the fact's own; ``recall_subject_own_id`` asks
for the fact's own entry.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from neuraldb import Fact, NeuralDB
from neuraldb.words import token_windows

from .gates import Gate, gated_queries


def measure_recall(model, tok, db: NeuralDB, gates: Sequence[Gate], facts: list[Fact], real: set[str], *,
                   layer: int, max_len: int, batch_size: int, progress: bool) -> None:
    """Fill each gate's ``recall`` with its paraphrase and edit-prompt figures (real facts only:
    generated fill-ups are not measured). ``facts`` are in the store's row order."""
    measured = [f for f in facts if f.id in real]
    row_of = {f.id: i for i, f in enumerate(facts)}
    subject_id: dict[str, int] = {}
    same = torch.tensor([subject_id.setdefault(f.subject, len(subject_id)) for f in facts])  # (rows,)
    for name, items in (("paraphrase", [(f, p) for f in measured for p in f.paraphrases]),
                        ("edit_prompt", [(f, f.text) for f in measured])):
        if not items:
            continue
        owner = torch.tensor([row_of[f.id] for f, _ in items])
        acc, has_subj = recall_pass(model, tok, db, gates, items, owner, same, desc=name, layer=layer,
                                    max_len=max_len, batch_size=batch_size, progress=progress)
        for g in gates:
            g.recall[name] = recall_figures(acc[g.name], has_subj, len(items))


def recall_pass(model, tok, db: NeuralDB, gates: Sequence[Gate], items: list[tuple[Fact, str]], owner: torch.Tensor,
                same: torch.Tensor, *, desc: str, layer: int, max_len: int, batch_size: int, progress: bool,
                ) -> tuple[dict[str, dict[str, Any]], torch.Tensor]:
    """Run the prompts of ``items`` once; tally every gate's hits by gate name, and which prompts
    have their subject located."""
    acc = {g.name: _empty_tally(len(items)) for g in gates}
    has_subj = torch.zeros(len(items), dtype=torch.bool)
    for rows, a, valid, qids, spos in gated_queries(model, tok, [p for _, p in items], layer=layer, max_len=max_len,
                                                 batch_size=batch_size, subjects=[f.subject for f, _ in items],
                                                 progress=progress, desc=desc):
        r = torch.tensor(rows)
        sp = spos.cpu()
        has_subj[r] = sp >= 0
        top_s, top_i = db.retrieve(a.reshape(-1, a.shape[-1]))
        windows = token_windows(qids).reshape(-1, db.words.shape[2])
        index = top_i.reshape(valid.shape).cpu()
        for g in gates:
            fire = (g.fire(top_s, top_i, windows).reshape(valid.shape) & valid).cpu()
            _tally(acc[g.name], fire, index, r, sp, owner, same)
    return acc, has_subj


def _empty_tally(n: int) -> dict[str, Any]:
    return {"any": torch.zeros(n, dtype=torch.bool), "subj": torch.zeros(n, dtype=torch.bool),
            "strict": torch.zeros(n, dtype=torch.bool), "wrong": 0, "miss_below": 0, "miss_other": 0}


def _tally(x: dict[str, Any], fire: torch.Tensor, index: torch.Tensor, r: torch.Tensor, sp: torch.Tensor,
           owner: torch.Tensor, same: torch.Tensor) -> None:
    """Add one batch of one gate's fires (b, t) at top-1 ``index`` (b, t) to its tally ``x``."""
    ok = sp >= 0
    shares = same[index.clamp_min(0)] == same[owner[r]].unsqueeze(1)  # (b, t) same residual
    own = fire & shares
    at = sp.clamp_min(0).unsqueeze(1)
    x["wrong"] += int((fire & ~own).sum())
    x["any"][r] = own.any(dim=1)
    x["subj"][r] = ok & own.gather(1, at).squeeze(1)
    x["strict"][r] = ok & (fire & (index == owner[r].unsqueeze(1))).gather(1, at).squeeze(1)
    # why the subject token missed: its top-1 shares its residual but is below the gate, or not
    top_own = shares.gather(1, at).squeeze(1)
    missed = ok & ~x["subj"][r]
    x["miss_below"] += int((missed & top_own).sum())
    x["miss_other"] += int((missed & ~top_own).sum())


def recall_figures(x: dict[str, Any], has_subj: torch.Tensor, prompts: int) -> dict[str, Any]:
    """One gate's recall entry (``paraphrase`` or ``edit_prompt``) from its tally."""
    located = bool(has_subj.any())
    return {"prompts": prompts, "recall_any": round(float(x["any"].float().mean()), 4),
            "recall_subject": round(float(x["subj"][has_subj].float().mean()), 4) if located else None,
            "recall_subject_own_id": round(float(x["strict"][has_subj].float().mean()), 4) if located else None,
            "subject_located": int(has_subj.sum()), "fires_on_other_facts": x["wrong"],
            "subject_misses": {"own_key_below_gate": x["miss_below"], "other_key_nearer": x["miss_other"]}}
