"""The edit-time self-check: can each fact's own prompt (and paraphrases) fire its key?

Example::

    db = neuraldb.edit(model, tok, facts)        # runs this check; warns and records what it finds
    db.unreachable()                             # {fact_id: [{"text": ..., "reason": ...}], ...}
    neuraldb.edit(model, tok, facts, strict=True)   # raises UnreachableFactError instead

A fact whose own texts never open the gate is stored and changes nothing: a silent
failure. This check runs each fact's filled-in prompt and paraphrases through the
model with the store attached, up to the edited layer only, and asks whether the
gate fired anywhere in the text with a residual of that subject (the fact's own
entry, or another fact about the same subject, which shares its residual). For a
text where it did not, the reason:

* ``subject_at_sink``: the subject's last token is the first token of the text (a
  tokenizer without BOS, a one-token subject at the start): the first position is
  the attention sink and is never gated; put text before the subject, or use a
  tokenizer that adds BOS;
* ``no_word_match``: the word check finds no mention of the subject in the text
  (the paraphrase names it in a form the check does not accept): add an alias;
* ``gate_shut``: the subject is there but the cosine with its key stays below the threshold;
* ``outranked``: the cosine passes the threshold, but another stored fact's key is nearer at
  the subject, and the gate retrieves only the nearest key (whose word check then fails there
  or whose fact is another subject's).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from .facts import Fact, FactError, locate_subject
from .hook import detached
from .keys import model_device, pad_batch, pad_id
from .nethook import layer_input
from .words import mention_positions

__all__ = ["UnreachableFactError", "find_unreached", "unreachable", "REASONS"]

log = logging.getLogger(__name__)
REASONS = ("subject_at_sink", "no_word_match", "gate_shut", "outranked")


class UnreachableFactError(ValueError):
    """Raised by ``neuraldb.edit(..., strict=True)`` when a fact's own texts cannot fire its key."""


def _fired_subjects(model: nn.Module, tokenizer: Any, db: Any, texts: Sequence[str], rows: Sequence[int], *,
                    batch_size: int) -> tuple[list[set[str]], list[list[float]]]:
    """For each text: the subjects of the facts the gate fired with anywhere in it, and the cosine
    of every position's query with the key of row ``rows[i]`` (the fact the text is about)."""
    subjects = [(db.facts.get(fid) or {}).get("subject") for fid in db.ids]
    fired: list[set[str]] = []
    cosines: list[list[float]] = []
    device = model_device(model)
    with detached(model, db):
        db.attach(model, check=False)
        try:
            keys, _ = db.device_tensors(device)  # (N, d_key) unit rows
            for start in range(0, len(texts), batch_size):
                seqs = [tokenizer(t)["input_ids"] for t in texts[start : start + batch_size]]
                ids, mask = pad_batch(seqs, pad_id(tokenizer), device)
                db.last_fire_index = None
                q = layer_input(model, db.module_name(model), input_ids=ids, attention_mask=mask).float()
                index = db.last_fire_index  # (batch, seq), -1 where shut (the store's hook ran first)
                own = keys[torch.tensor(rows[start : start + len(seqs)], device=device)]  # (batch, d_key)
                cos = (q @ own.unsqueeze(2)).squeeze(2) / q.norm(dim=2).clamp_min(1e-12)  # (batch, seq)
                for b, seq in enumerate(seqs):
                    row = index[b].tolist() if index is not None else []
                    fired.append({subjects[i] for i in row if i >= 0})
                    cosines.append(cos[b, : len(seq)].tolist())
        finally:
            db.detach()
    return fired, cosines


def _reason(tokenizer: Any, db: Any, fact: Fact, text: str, row: int, cosines: list[float]) -> dict[str, Any]:
    """Why ``text`` did not fire ``fact``: its reason, and the best cosine with the fact's key
    where the subject is (anywhere, when no mention is found) against the key's threshold."""
    found: dict[str, Any] = {"text": text}
    mentions = mention_positions(tokenizer, fact.subject, text, words=db.words[row : row + 1], starts=db.word_starts)
    where = [p for p in mentions if p < len(cosines)] or range(len(cosines))
    threshold = max(db.gamma, float(db.thresholds[row]))  # this key's gate_thresholds() entry alone
    if where:
        found |= {"cosine": round(max(cosines[p] for p in where), 3), "threshold": round(threshold, 3)}
    if text == fact.text:
        try:
            _, last = locate_subject(tokenizer, fact.prompt, fact.subject)
            special = set(tokenizer.all_special_ids)
            real = [i for i, t in enumerate(tokenizer(text)["input_ids"]) if t not in special]
            if real and last == real[0]:
                return {"reason": "subject_at_sink"} | found
        except FactError:
            pass
    if bool(db.word_checked[row]) and not mentions:
        return {"reason": "no_word_match"} | found
    if "cosine" in found and found["cosine"] > threshold:
        return {"reason": "outranked"} | found
    return {"reason": "gate_shut"} | found


@torch.no_grad()
def find_unreached(model: nn.Module, tokenizer: Any, db: Any, facts: Sequence[Fact], *,
                   batch_size: int = 32) -> dict[str, list[dict[str, Any]]]:
    """``{fact_id: [{"reason", "text", "cosine", "threshold"}, ...]}`` for the facts of ``facts``
    (stored in ``db``) whose prompt or a paraphrase does not fire a residual of their subject;
    facts that do are absent. ``cosine``: the best cosine of the text's queries with the fact's
    key where the subject is mentioned (anywhere, when it is not found)."""
    row_of = {fid: r for r, fid in enumerate(db.ids)}
    texts, owners = [], []
    for f in facts:
        if f.id in row_of:
            for t in (f.text, *f.paraphrases):
                texts.append(t)
                owners.append(f)
    rows = [row_of[f.id] for f in owners]
    fired, cosines = _fired_subjects(model, tokenizer, db, texts, rows, batch_size=batch_size)
    found: dict[str, list[dict[str, Any]]] = {}
    for f, text, row, subjects, cos in zip(owners, texts, rows, fired, cosines):
        if f.subject not in subjects:
            found.setdefault(f.id, []).append(_reason(tokenizer, db, f, text, row, cos))
    return found


def unreachable(db: Any) -> dict[str, list[dict[str, str]]]:
    """``{fact_id: [{"text", "reason"}, ...]}``: the facts of ``db`` whose own prompt or paraphrases
    could not fire them when they were edited, as :func:`find_unreached` recorded them (what
    ``db.unreachable()`` returns)."""
    out = {}
    for fid in db.ids:
        texts = (db.facts.get(fid, {}).get("edit") or {}).get("unreached")
        if texts:
            out[fid] = list(texts)
    return out
