"""``neuraldb.forget`` (this module: ``neuraldb.refit``): remove facts as if they had never been edited.

Example::

    db = neuraldb.edit(model, tok, [sport, citizenship])      # two facts about LeBron James
    report = neuraldb.forget(model, tok, db, [sport.id])      # sport gone; citizenship re-fitted
    report.refit                                              # (citizenship.id,)

Facts about one subject share one residual, optimised on all their prompts
(``EditConfig.share_subject_residuals``), so a removed fact's target lives on in its
siblings' residual. ``forget`` removes the facts' rows and optimises the residual of the
facts left about each of their subjects again, on those facts alone, with the store's
own edit config and context templates: the result is what editing the remaining facts
would have given (keys, thresholds and words are unchanged: they do not depend on the
target). A subject with no fact left adds nothing. ``db.remove`` refuses facts with
siblings and names this function.

The siblings' residual still fires on every prompt about the subject, the forgotten
prompt included, where a residual optimised for other prompts alone can move the answer
(SmolLM2, "LeBron James plays the sport of": unedited " baseball", edited " football", a
fresh edit of his citizenship alone " k"). So by default (``restore=True``) the re-fit also
holds each forgotten prompt to the unedited model's next token (" baseball" again): the
forgotten prompt answers as before the edit, and the store is a fresh edit of the siblings
plus that constraint. ``restore=False`` gives exactly a fresh edit of the siblings.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any, Sequence

import torch
from torch import nn

from .arch import resolve_arch
from .config import LEGACY, EditConfig
from .editor import _eval_mode, _subject_groups, facts_per_batch, make_step, stored_fact
from .facts import Fact, encode_completion
from .hook import detached
from .identity import EditReport
from .keys import model_device
from .residuals import compute_residuals
from .store import NeuralDB, StoreError

__all__ = ["forget", "refit_siblings", "stored_config"]

log = logging.getLogger(__name__)


def forget(model: nn.Module, tokenizer: Any, db: NeuralDB, ids: str | Sequence[str], *,
           restore: bool = True) -> EditReport:
    """Remove the facts ``ids`` from ``db`` and re-fit the facts that shared their residual.

    Example::

        report = neuraldb.forget(model, tok, db, ["fact-1a2b3c"])
        report.removed, report.refit          # ('fact-1a2b3c',), ('fact-4d5e6f',)

    ``model`` and ``tokenizer`` must be those the store was edited with (checked like
    ``neuraldb.edit`` checks a store). An unknown id is a :class:`~neuraldb.store.StoreError`
    and nothing changes; the rows go only once the re-fit has succeeded. A fact without
    siblings is removed as ``db.remove`` would. ``restore`` (default): the siblings' residual is also
    optimised to give each forgotten prompt the unedited model's next token; False = exactly what
    editing the siblings alone gives (see the module docstring). Returns the :class:`~neuraldb.identity.EditReport` (also ``db.last_edit``).
    """
    ids = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
    missing = [i for i in ids if i not in db]
    if missing:
        raise StoreError(f"unknown fact id(s) {missing[:5]}; nothing was removed")
    siblings = db.siblings(ids)
    held = [f for f in (stored_fact(db, i) for i in ids) if f is not None] if restore else []
    residuals = refit_siblings(model, tokenizer, db, siblings, restore=held) if siblings else {}
    db.remove(ids, stale_ok=True)
    for fid, residual in residuals.items():
        db.update(fid, residual=residual)
    log.info("forgot %d facts; re-fitted %d facts that shared their residual", len(ids), len(residuals))
    db.last_edit = EditReport(removed=tuple(ids), refit=tuple(residuals))
    return db.last_edit


def stored_config(db: NeuralDB) -> EditConfig:
    """The :class:`EditConfig` ``db`` was edited with (fields it lacks have their ``LEGACY`` value, else
    their defaults)."""
    if not db.config:
        raise StoreError("the store has no edit config (it was not built by neuraldb.edit); it cannot be re-fitted")
    known = {f.name for f in fields(EditConfig)}
    saved = {k: v for k, v in db.config.items() if k in known}
    return EditConfig.from_dict(LEGACY | saved | {"layer": db.layer})


def refit_siblings(model: nn.Module, tokenizer: Any, db: NeuralDB, ids: Sequence[str], *,
                   restore: Sequence[Fact] = ()) -> dict[str, torch.Tensor]:
    """New residuals ``{id: (d_model,)}`` for the stored facts ``ids``, the facts of one subject
    sharing one residual optimised on their prompts alone (every fact of a subject must be in
    ``ids``), and on ``restore`` (facts whose prompts keep the unedited next token); ``db`` is
    not changed."""
    config = stored_config(db)
    facts = [_fact(db, i) for i in ids]
    subjects = {f.subject for f in facts}
    arch = resolve_arch(model, layers=config.layers_template, mlp_out=config.mlp_out_template,
                        residual_out=config.residual_out_template)
    db.check_compatible(model, layer=db.layer)
    out: dict[str, torch.Tensor] = {}
    with detached(model), _eval_mode(model):
        step = make_step(model, tokenizer, config, arch=arch, layer=db.layer,
                         templates=list(db.config.get("context_templates") or []))
        facts += _unedited_answers(model, tokenizer, [f for f in restore if f.subject in subjects])
        per_batch = facts_per_batch(model, config, layer=db.layer, templates=len(step.residual_templates))
        for chunk in _subject_chunks(facts, per_batch):  # memory_budget_gb bounds a chunk as it bounds an edit's batch
            residuals, _ = compute_residuals(step.optimised, tokenizer, chunk, layer=db.layer,
                                             templates=step.residual_templates, config=config, arch=arch,
                                             groups=_subject_groups(chunk))
            out.update({f.id: residuals[j].cpu() for j, f in enumerate(chunk) if f.id in ids})
    return out


@torch.no_grad()
def _unedited_answers(model: nn.Module, tokenizer: Any, facts: Sequence[Fact]) -> list[Fact]:
    """For each fact, a fact of its prompt whose target is the (detached) model's next token
    there; a token that does not round-trip as a completion (``encode_completion``) is skipped."""
    out = []
    for f in facts:
        enc = tokenizer(f.text, return_tensors="pt").to(model_device(model))
        token = int(model(**enc).logits[0, -1].argmax())
        target = tokenizer.decode([token]).strip()
        if not target or encode_completion(tokenizer, f.text, target)[1] != [token]:
            log.info("forget(restore=True): the unedited next token of %r (%r) is not a completion "
                     "target; that prompt is not held", f.text, tokenizer.decode([token]))
            continue
        out.append(Fact(prompt=f.prompt, subject=f.subject, target_new=target, id=f"restore:{f.id}"))
    return out


def _fact(db: NeuralDB, fact_id: str) -> Fact:
    fact = stored_fact(db, fact_id)
    if fact is None:
        raise StoreError(f"fact {fact_id!r} has no stored record (subject, prompt, target): it cannot be re-fitted")
    return fact


def _subject_chunks(facts: Sequence[Fact], size: int) -> list[list[Fact]]:
    """``facts`` grouped by subject, whole subjects per chunk, about ``size`` facts a chunk."""
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        by_subject.setdefault(f.subject, []).append(f)
    chunks: list[list[Fact]] = [[]]
    for group in by_subject.values():
        if chunks[-1] and len(chunks[-1]) + len(group) > size:
            chunks.append([])
        chunks[-1].extend(group)
    return [c for c in chunks if c]
