"""``neuraldb.edit``: facts in, a :class:`NeuralDB` out.

Example::

    model, tok = neuraldb.load_model("smollm2-135m")
    facts = [Fact(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")]
    db = neuraldb.edit(model, tok, facts, config=EditConfig(layer=10))
    db.attach(model)                     # the model now says Rome

Every key and residual is computed on the unedited model, so facts are
independent: they are processed in batches and an interrupted run resumes
from its checkpoint (``checkpoint=path``) without recomputing finished facts.

Invariant: the model (weights, hooks) is the same at the end as at the beginning;
if a store is attached to it, it is detached during the edit and re-attached.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import resolve_arch
from .config import EditConfig
from .hook import detached
from .facts import Fact, validate_facts
from .keys import chat_context, compute_keys, context_templates
from .reach import UnreachableFactError, find_unreached
from .residuals import compute_residuals, optimisation_model
from .store import NeuralDB, StoreError, layer_fingerprint, model_name
from .words import subject_words, word_start_tokens

__all__ = ["edit"]

log = logging.getLogger(__name__)


def _new_store(model: nn.Module, config: EditConfig, layer: int, templates: list[str]) -> NeuralDB:
    arch = resolve_arch(
        model, layers=config.layers_template, mlp_out=config.mlp_out_template,
        residual_out=config.residual_out_template,
    )
    module = model.get_submodule(arch.mlp_out_at(layer))
    weight = module.weight
    # nn.Linear is (out=d_model, in=d_key); GPT-2's Conv1D is (in, out)
    d_key = weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1]
    d_model = model.get_input_embeddings().weight.shape[1]
    cfg = config.to_dict() | {"layer": layer, "context_templates": templates}
    return NeuralDB(
        layer=layer,
        d_key=int(d_key),
        d_model=int(d_model),
        gamma=config.gamma,
        module_template=arch.mlp_out,
        residual_template=arch.residual_out,
        model_name=model_name(model),
        model_type=arch.model_type,
        fingerprint=layer_fingerprint(model, arch.mlp_out_at(layer)),
        config=cfg,
    )


def _subject_groups(facts: Sequence[Fact]) -> list[int]:
    """One group index per fact: facts with the same subject share it."""
    index: dict[str, int] = {}
    return [index.setdefault(f.subject, len(index)) for f in facts]


def _stored_by_subject(db: NeuralDB) -> dict[str, list[Fact]]:
    """The facts already in ``db`` (rebuilt from their stored records), by subject."""
    out: dict[str, list[Fact]] = {}
    for fid in db.ids:
        rec = db.facts.get(fid)
        if rec and "subject" in rec:
            out.setdefault(rec["subject"], []).append(Fact.from_dict({k: v for k, v in rec.items() if k != "edit"}))
    return out


def _chat_contexts(tokenizer: Any, config: EditConfig) -> list[str]:
    """``[the chat turn template]`` when ``config.chat_residuals`` asks for it and the tokenizer has one."""
    if not config.chat_residuals:
        return []
    chat = chat_context(tokenizer)
    if chat is None:
        log.warning("EditConfig.chat_residuals: the tokenizer has no chat template; residuals are optimised "
                    "on the plain prompts only")
        return []
    return [chat]


def _self_check(model: nn.Module, tokenizer: Any, db: NeuralDB, facts: Sequence[Fact], *, strict: bool,
                batch_size: int) -> None:
    """Record, then warn about (or with ``strict`` raise on) the facts whose own texts cannot fire them."""
    found = find_unreached(model, tokenizer, db, facts, batch_size=batch_size)
    for fid, texts in found.items():
        record = db.facts.setdefault(fid, {})
        record["edit"] = dict(record.get("edit") or {}, unreached=texts)
    if not found:
        return
    lines = [f"  {fid}: {t['reason']}"
             + (f" (cosine {t['cosine']} <= {t['threshold']})" if t["reason"] == "gate_shut" and "cosine" in t else "")
             + f": {t['text']!r}" for fid, texts in found.items() for t in texts]
    message = (f"{len(found)} of {len(facts)} edited facts cannot fire on their own prompt or a paraphrase "
               f"(db.unreachable() lists them; reasons: neuraldb.reach):\n" + "\n".join(lines[:20])
               + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""))
    if strict:
        error = UnreachableFactError(message)
        error.db = db  # type: ignore[attr-defined]  # nothing computed is lost
        raise error
    log.warning(message)


def edit(
    model: nn.Module,
    tokenizer: Any,
    facts: Iterable[Fact | Mapping[str, Any]],
    *,
    config: EditConfig | None = None,
    db: NeuralDB | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    progress: bool = True,
    check: bool = True,
    strict: bool = False,
) -> NeuralDB:
    """Compute a key and a residual for each fact; return the store (not attached).

    Args:
        facts: :class:`Fact` objects or mappings; validated before any work.
        config: :class:`EditConfig` (layer None = the family's default).
        db: add to this store instead of a new one; facts whose id is already in
            it are skipped (so a half-finished store resumes).
        checkpoint: a store file written every ``checkpoint_every`` batches; if
            it exists, the run resumes from it (its config must match).
        progress: show a tqdm progress bar.
        check: after editing, run each new fact's prompt and paraphrases with the store
            attached (up to the edited layer) and record every text that cannot fire the
            fact (:mod:`neuraldb.reach`): a warning lists them, ``db.unreachable()`` returns them.
        strict: raise :class:`~neuraldb.reach.UnreachableFactError` (with the finished store
            as its ``db`` attribute) instead of warning.
    """
    config = config or EditConfig()
    facts = validate_facts(facts)
    arch = resolve_arch(
        model, layers=config.layers_template, mlp_out=config.mlp_out_template,
        residual_out=config.residual_out_template,
    )
    layer = arch.check_layer(config.layer if config.layer is not None else arch.default_layer)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if db is None and ckpt is not None and ckpt.exists():
        db = NeuralDB.load(ckpt, model=model, layer=layer)
        log.info("resuming from %s: %d facts already done", ckpt, len(db))
    if db is not None:
        db.check_compatible(model, layer=layer)
        templates = list(db.config.get("context_templates") or [])
        # batch_size only groups independent facts, so a run may resume with another one
        ignore = ("context_templates", "layer", "batch_size")
        defaults = EditConfig().to_dict()  # a field added since the store was written has its default
        saved = {k: db.config.get(k, v) for k, v in defaults.items() if k not in ignore}
        if db.config and saved != {k: v for k, v in config.to_dict().items() if k not in ignore}:
            raise StoreError(
                "the store (or checkpoint) was built with a different EditConfig; resume with the same "
                f"config or start a new store. Stored: {saved}"
            )
    with detached(model):  # keys and residuals are always computed on the unedited model
        was_training = model.training
        model.eval()
        try:
            if db is None or not templates:
                templates = context_templates(
                    model, tokenizer, prefixes=config.context_prefixes, length=config.context_length,
                    seed=config.context_seed,
                )
            if db is None:
                db = _new_store(model, config, layer, templates)
            todo = [f for f in facts if f.id not in db]
            if len(todo) < len(facts):
                log.info("skipping %d facts already in the store", len(facts) - len(todo))
            key_templates = templates if config.bare_weight > 0 else templates[1:]
            residual_templates = templates + _chat_contexts(tokenizer, config)
            optimised = optimisation_model(model, config.residual_dtype) if todo else model
            bar = tqdm(total=len(todo), desc="neuraldb.edit", unit="fact", disable=not progress)
            t0 = time.perf_counter()
            stored = _stored_by_subject(db) if config.share_subject_residuals else {}
            for b, start in enumerate(range(0, len(todo), config.batch_size)):
                batch = todo[start : start + config.batch_size]
                # facts stored earlier about a subject of this batch are optimised again with it, so that
                # every fact about one subject ends with the same residual (see share_subject_residuals)
                earlier = [g for subject in dict.fromkeys(f.subject for f in batch) for g in stored.get(subject, [])]
                keys = compute_keys(
                    model, tokenizer, batch, layer=layer, templates=key_templates,
                    bare_weight=config.bare_weight, arch=arch,
                )
                together = batch + earlier
                residuals, info = compute_residuals(
                    optimised, tokenizer, together, layer=layer, templates=residual_templates, config=config, arch=arch,
                    groups=_subject_groups(together) if config.share_subject_residuals else None,
                )
                for j, f in enumerate(earlier, start=len(batch)):
                    db.update(f.id, residual=residuals[j])
                if earlier:
                    log.info("re-optimised %d stored facts that share a subject with this batch", len(earlier))
                records = []
                for i, f in enumerate(batch):
                    rec = f.to_dict()
                    rec["edit"] = {"loss": info.loss[i], "nll": info.nll[i], "steps": info.steps[i]}
                    records.append(rec)
                words = (subject_words(tokenizer, [f.subject for f in batch], aliases=[f.aliases for f in batch])
                         if config.word_check else None)
                if words is not None and db.word_starts.numel() == 0:
                    db.word_starts = word_start_tokens(tokenizer)
                db.add([f.id for f in batch], keys, residuals[: len(batch)], facts=records, words=words)
                if config.share_subject_residuals:
                    for f in batch:
                        stored.setdefault(f.subject, []).append(f)
                bar.update(len(batch))
                if ckpt is not None and ((b + 1) % checkpoint_every == 0 or start + len(batch) >= len(todo)):
                    db.save(ckpt)
            bar.close()
            if todo:
                log.info("edited %d facts in %.1f s", len(todo), time.perf_counter() - t0)
            if todo and (check or strict):
                _self_check(model, tokenizer, db, todo, strict=strict, batch_size=config.batch_size)
        finally:
            model.train(was_training)
    return db
