"""``neuraldb.edit``: facts in, a :class:`NeuralDB` out.

Example::

    model, tok = neuraldb.load_model("smollm2-135m")
    facts = [Fact(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")]
    db = neuraldb.edit(model, tok, facts, config=EditConfig(layer=10))
    db.attach(model)                     # the model now says Rome

Every key and residual is computed on the unedited model, so facts are
independent: they are processed in batches and an interrupted run resumes
from its checkpoint (``checkpoint=path``) without recomputing finished facts.

A store holds one fact per identity ``(subject, prompt)`` (:mod:`neuraldb.identity`):
editing a stored identity with another target replaces the stored fact (its row goes,
the facts sharing its subject's residual are re-fitted with the new one), the same fact
again is a no-op, and two facts of one identity in one call are a
:class:`~neuraldb.facts.FactConflictError`. ``db.last_edit`` says what the call did.

Invariant: the model (weights, hooks) is the same at the end as at the beginning;
if a store is attached to it, it is detached during the edit and re-attached.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import resolve_arch
from .config import GROUPING_ONLY, LEGACY, EditConfig
from .hook import detached
from .facts import Fact, FactError, check_conflicts, validate_facts
from .identity import EditReport, UpsertPlan, plan_upsert
from .keys import chat_context, compute_keys, context_templates
from .reach import UnreachableFactError, find_unreached
from .residuals import compute_residuals, copy_dtype, optimisation_model, settle_residual_dtype
from .settings import resolve_settings
from .timing import phase
from .store import NeuralDB, StoreError, layer_fingerprint, model_name
from .words import subject_words, word_start_tokens

__all__ = ["edit", "batch_bytes_per_fact", "copy_bytes", "facts_per_batch"]

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


def stored_fact(db: NeuralDB, fact_id: str) -> Fact | None:
    """The stored fact ``fact_id`` rebuilt from its record (None for a row without one)."""
    rec = db.facts.get(fact_id)
    if not rec or "subject" not in rec:
        return None
    return Fact.from_dict({k: v for k, v in rec.items() if k != "edit"})


def _stored_by_subject(db: NeuralDB, exclude: Iterable[str] = ()) -> dict[str, list[Fact]]:
    """The facts already in ``db`` (rebuilt from their stored records), by subject, less ``exclude``."""
    out: dict[str, list[Fact]] = {}
    skip = set(exclude)
    for fact in (stored_fact(db, fid) for fid in db.ids if fid not in skip):
        if fact is not None:
            out.setdefault(fact.subject, []).append(fact)
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


def _why(unreached: dict[str, Any]) -> str:
    """The cosine behind a ``gate_shut`` / ``outranked`` reason, for the warning."""
    if "cosine" not in unreached:
        return ""
    if unreached["reason"] == "gate_shut":
        return f" (cosine {unreached['cosine']} <= {unreached['threshold']})"
    if unreached["reason"] == "outranked":
        return f" (cosine {unreached['cosine']} > {unreached['threshold']}, but another fact's key is nearer)"
    return ""


def _self_check(model: nn.Module, tokenizer: Any, db: NeuralDB, facts: Sequence[Fact], *, strict: bool,
                batch_size: int) -> None:
    """Record, then warn about (or with ``strict`` raise on) the facts whose own texts cannot fire them."""
    found = find_unreached(model, tokenizer, db, facts, batch_size=batch_size)
    for fid, texts in found.items():
        record = db.facts.setdefault(fid, {})
        record["edit"] = dict(record.get("edit") or {}, unreached=texts)
    if not found:
        return
    lines = [f"  {fid}: {t['reason']}{_why(t)}: {t['text']!r}" for fid, texts in found.items() for t in texts]
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
    distributed: bool = False,
) -> NeuralDB | None:
    """Compute a key and a residual for each fact; return the store (not attached).

    Args:
        facts: :class:`Fact` objects or mappings; validated before any work. Two facts with
            one identity ``(subject, prompt)`` are a :class:`~neuraldb.facts.FactConflictError`.
        config: :class:`EditConfig`; its ``layer`` / ``lr`` / ``steps`` left None are the model's
            settings (:func:`neuraldb.settings.resolve_settings`, logged at INFO), else the fallbacks.
        db: add to this store instead of a new one (an upsert, :mod:`neuraldb.identity`): a fact
            whose identity is stored with another target replaces the stored fact (logged at
            INFO, old and new target; the facts about its subject are re-fitted with it); one
            already stored with the same target, or whose id is stored, is skipped (a no-op,
            so a half-finished store resumes). ``db.last_edit`` (:class:`~neuraldb.identity.EditReport`)
            lists what was added, replaced, left unchanged and re-fitted.
        checkpoint: a store file written every ``checkpoint_every`` batches; if
            it exists, the run resumes from it (its config must match).
        progress: show a tqdm progress bar.
        check: after editing, run each new fact's prompt and paraphrases with the store
            attached (up to the edited layer) and record every text that cannot fire the
            fact (:mod:`neuraldb.reach`): a warning lists them, ``db.unreachable()`` returns them.
        strict: raise :class:`~neuraldb.reach.UnreachableFactError` (with the finished store
            as its ``db`` attribute) instead of warning.
        distributed: shard the facts across the ranks of ``torch.distributed`` (every rank makes
            this same call, e.g. under ``torchrun``): :func:`neuraldb.distributed.edit_distributed`.
            Rank 0 gets the whole store, equal to this function's; the other ranks get None.
    """
    if distributed:
        if db is not None:
            raise StoreError("distributed=True edits into a new store only (db= is given): edit the facts into a "
                             "new store, or add them to this one in a single process")
        from .distributed import edit_distributed

        return edit_distributed(model, tokenizer, facts, config=config, checkpoint=checkpoint,
                                checkpoint_every=checkpoint_every, progress=progress, check=check, strict=strict)
    config = resolve_settings(model, config=config).config  # layer / lr / steps: yours, else the model's row
    facts = validate_facts(facts)
    check_conflicts(facts)
    arch = resolve_arch(
        model, layers=config.layers_template, mlp_out=config.mlp_out_template,
        residual_out=config.residual_out_template,
    )
    layer = arch.check_layer(config.layer)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    db, templates, config = _resume(model, config, layer, db, ckpt)
    with detached(model), _eval_mode(model):  # keys and residuals are always computed on the unedited model
        if not templates:
            with phase("context_templates"):
                templates = context_templates(model, tokenizer, prefixes=config.context_prefixes,
                                              length=config.context_length, seed=config.context_seed)
        db = db if db is not None else _new_store(model, config, layer, templates)
        plan = _plan(db, facts)
        if not plan.todo:
            return db
        residual_templates = templates + _chat_contexts(tokenizer, config)
        _check_lengths(model, tokenizer, plan.todo, residual_templates)  # before any work (a bfloat16 copy)
        step = make_step(model, tokenizer, config, arch=arch, layer=layer, templates=templates,
                         residual_templates=residual_templates)
        old = [r.old_id for r in plan.replaced]
        stored = _stored_by_subject(db, exclude=old) if config.share_subject_residuals else {}
        todo, replaces, refit = list(plan.todo), plan.old_ids, []
        fits = facts_per_batch(model, config, layer=layer, templates=len(residual_templates))
        per_batch = -(-len(todo) // -(-len(todo) // fits))  # as many batches as needed, of even sizes
        t0 = time.perf_counter()
        with tqdm(total=len(todo), desc="neuraldb.edit", unit="fact", disable=not progress) as bar:
            for b, start in enumerate(range(0, len(todo), per_batch)):
                batch = todo[start : start + per_batch]
                refit += _edit_batch(step, db, batch, stored, replaces)
                bar.update(len(batch))
                if ckpt is not None and ((b + 1) % checkpoint_every == 0 or start + len(batch) >= len(todo)):
                    db.save(ckpt)
        log.info("edited %d facts in %.1f s", len(todo), time.perf_counter() - t0)
        new = {f.id for f in todo}
        db.last_edit = EditReport(added=tuple(f.id for f in todo), replaced=plan.replaced, unchanged=plan.unchanged,
                                  removed=tuple(old), refit=tuple(dict.fromkeys(i for i in refit if i not in new)))
        if check or strict:
            with phase("self_check"):
                _self_check(model, tokenizer, db, todo, strict=strict, batch_size=config.batch_size)
    return db


def batch_bytes_per_fact(model: nn.Module, config: EditConfig, *, layer: int | None = None,
                         templates: int | None = None) -> int:
    """Estimated peak bytes one fact adds to a batch of the residual optimisation.

    Example::

        batch_bytes_per_fact(model, EditConfig())   # SmolLM2-135M: 55 MB (README, "Benchmarks")

    Per fact, one row per residual template (``templates``, default: the bare prompt and one per
    context prefix, + the chat turn) and one KL row, each of about 24 tokens; per row: the
    activations kept for the backward pass through the layers after ``layer`` (about 10 columns
    after the subject, ~3 d_ff + 8 d_model values per column and layer, in ``residual_dtype``),
    the cached prefix's keys and values of every layer and the per-step copy of them, and the
    float32 logits of ~3 scored tokens (logits, log-softmax, gradient). ``_FIT`` scales the sum to
    what ``benchmarks/edit_memory.py`` measures on SmolLM2-135M.
    """
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text_config", None) or cfg
    arch = resolve_arch(model, layers=config.layers_template, mlp_out=config.mlp_out_template,
                        residual_out=config.residual_out_template)
    layer = layer if layer is not None else (config.layer if config.layer is not None else arch.default_layer)
    d_model = int(model.get_input_embeddings().weight.shape[1])
    d_ff = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * d_model)
    heads = int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    kv_dim = d_model // heads * kv_heads
    vocab = int(model.get_output_embeddings().weight.shape[0])
    dtype = copy_dtype(model, config.residual_dtype) or next(model.parameters()).dtype
    b = torch.finfo(dtype).bits // 8
    if templates is None:
        templates = 1 + len(config.context_prefixes) + int(config.chat_residuals)
    after = max(arch.n_layers - layer - 1, 1)
    per_row = (b * (after * 10 * (3 * d_ff + 8 * d_model) + arch.n_layers * 24 * 2 * kv_dim * 2)
               + 4 * 3 * 3 * vocab)
    return int(_FIT * (templates + 1) * per_row)


_FIT = 0.75  # measured / estimated bytes per fact, SmolLM2-135M float32: 55 / 73 MB (benchmarks/edit_memory.py)


def facts_per_batch(model: nn.Module, config: EditConfig, *, layer: int | None = None,
                    templates: int | None = None) -> int:
    """How many facts one optimisation batch holds: ``config.batch_size``, fewer when
    ``config.memory_budget_gb``, less the copy of the model the optimisation runs on
    (:func:`copy_bytes`), cannot hold that many (:func:`batch_bytes_per_fact`); at least 1.

    Example::

        facts_per_batch(model, EditConfig())                        # SmolLM2-135M, bfloat16 copy: 128 -> 56
        facts_per_batch(model, EditConfig(memory_budget_gb=None))   # 128
    """
    if config.memory_budget_gb is None:
        return config.batch_size
    per_fact = batch_bytes_per_fact(model, config, layer=layer, templates=templates)
    fits = max(1, int((config.memory_budget_gb * 2**30 - copy_bytes(model, config)) // per_fact))
    if fits < config.batch_size:
        log.debug("memory_budget_gb=%s: %d facts per batch (estimated %.0f MB per fact) instead of %d",
                  config.memory_budget_gb, fits, per_fact / 2**20, config.batch_size)
    return min(config.batch_size, fits)


def copy_bytes(model: nn.Module, config: EditConfig) -> int:
    """Bytes of the copy of ``model`` the residual optimisation runs on (``config.residual_dtype``
    other than the model's dtype), 0 when it runs on the model itself.

    Example::

        copy_bytes(model, EditConfig(residual_dtype="bfloat16"))   # SmolLM2-135M float32: 270 MB
    """
    dtype = copy_dtype(model, config.residual_dtype)
    if dtype is None:
        return 0
    return sum(t.numel() for t in (*model.parameters(), *model.buffers())) * (torch.finfo(dtype).bits // 8)


def _context_limit(model: nn.Module) -> tuple[int, str] | None:
    """(the model's context in tokens, the config field it comes from), or None when it has none."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def _check_lengths(model: nn.Module, tokenizer: Any, facts: Sequence[Fact], templates: Sequence[str]) -> None:
    """A :class:`FactError` naming the first fact whose edit text (its prompt in a context template,
    with the target) has more tokens than the model's context, before any work is done."""
    found = _context_limit(model)
    if found is None:
        return
    limit, field = found
    for f in facts:
        texts = [t.replace("{}", f.prompt).format(f.subject) + " " + f.target_new.strip() for t in templates]
        if max(len(x.encode("utf-8")) for x in texts) + 8 <= limit:
            continue  # a token covers at least a byte: cannot be too long
        n = max(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]) - 1  # last not fed
        if n > limit:
            raise FactError(
                f"fact {f.id!r}: its edit text is {n} tokens long (the prompt in its longest context template, "
                f"with the target), more than the model's context of {limit} tokens (config.{field}); "
                "shorten the prompt (or EditConfig.context_length)")


def _plan(db: NeuralDB, facts: Sequence[Fact]) -> UpsertPlan:
    """:func:`~neuraldb.identity.plan_upsert`, logged; ``db.last_edit`` says what it found
    (updated once the edit is done)."""
    plan = plan_upsert(db, facts)
    if plan.unchanged:
        log.info("skipping %d facts already in the store", len(plan.unchanged))
    for r in plan.replaced:
        log.info("%s", r.describe())
    db.last_edit = EditReport(unchanged=plan.unchanged)
    return plan


def make_step(model: nn.Module, tokenizer: Any, config: EditConfig, *, arch: Any, layer: int,
              templates: list[str], residual_templates: list[str] | None = None) -> "_Step":
    """What every batch of an edit (or a re-fit, :func:`neuraldb.forget`) shares, for a model
    already detached and in eval mode; ``residual_templates`` default: ``templates`` and the chat
    turn when ``config.chat_residuals`` asks for it."""
    if residual_templates is None:
        residual_templates = templates + _chat_contexts(tokenizer, config)
    with phase("optimisation_model"):
        optimised = optimisation_model(model, config.residual_dtype)
    return _Step(model=model, tokenizer=tokenizer, config=config, arch=arch, layer=layer,
                 key_templates=templates if config.bare_weight > 0 else templates[1:],
                 residual_templates=residual_templates,
                 optimised=optimised)


def _resume(model: nn.Module, config: EditConfig, layer: int, db: NeuralDB | None,
            ckpt: Path | None) -> tuple[NeuralDB | None, list[str], EditConfig]:
    """The store to add to (``db``, else the checkpoint if it exists), its context templates and
    the config with ``residual_dtype="auto"`` settled (the store's value, else the machine's:
    :func:`~neuraldb.residuals.settle_residual_dtype`); a store built with another EditConfig is an
    error (``batch_size`` and ``memory_budget_gb`` only group facts)."""
    if db is None and ckpt is not None and ckpt.exists():
        db = NeuralDB.load(ckpt, model=model, layer=layer)
        log.info("resuming from %s: %d facts already done", ckpt, len(db))
    config = settle_residual_dtype(model, config, LEGACY | db.config if db is not None else None)
    if db is None:
        return None, [], config
    db.check_compatible(model, layer=layer)
    ignore = ("context_templates", "layer", *GROUPING_ONLY)
    defaults = EditConfig().to_dict() | LEGACY  # a field added since the store was written: what it was made with
    saved = {k: db.config.get(k, v) for k, v in defaults.items() if k not in ignore}
    given = {k: v for k, v in config.to_dict().items() if k not in ignore}
    if db.config and saved != given:
        differ = "; ".join(f"{k}: stored {saved.get(k)!r}, given {given.get(k)!r}"
                           for k in sorted(set(saved) | set(given)) if saved.get(k) != given.get(k))
        raise StoreError(
            f"the store (or checkpoint) was built with a different EditConfig ({differ}); resume with "
            f"the same config or start a new store. Stored: {saved}"
        )
    return db, list(db.config.get("context_templates") or []), config


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class _Step:
    """What every batch of one edit call shares."""

    model: nn.Module
    tokenizer: Any
    config: EditConfig
    arch: Any
    layer: int
    key_templates: list[str]
    residual_templates: list[str]
    optimised: nn.Module  # the model, or its bfloat16 copy (EditConfig.residual_dtype)


def _edit_batch(step: _Step, db: NeuralDB, batch: list[Fact], stored: dict[str, list[Fact]],
                replaces: Mapping[str, Sequence[str]]) -> list[str]:
    """Keys and residuals of ``batch``, added to ``db`` in place of the stored facts they replace
    (``replaces``: new id -> old ids). Facts stored earlier about a subject of the batch are
    optimised again with it, so that every fact about one subject ends with the same residual
    (``EditConfig.share_subject_residuals``; ``stored`` is kept up to date). Returns their ids."""
    config, tokenizer = step.config, step.tokenizer
    earlier = [g for subject in dict.fromkeys(f.subject for f in batch) for g in stored.get(subject, [])]
    with phase("keys"):
        keys = compute_keys(step.model, tokenizer, batch, layer=step.layer, templates=step.key_templates,
                            bare_weight=config.bare_weight, arch=step.arch)  # (n, d_key)
    together = batch + earlier
    residuals, info = compute_residuals(
        step.optimised, tokenizer, together, layer=step.layer, templates=step.residual_templates, config=config,
        arch=step.arch, groups=_subject_groups(together) if config.share_subject_residuals else None,
    )  # (n + len(earlier), d_model)
    for j, f in enumerate(earlier, start=len(batch)):
        db.update(f.id, residual=residuals[j])
    if earlier:
        log.info("re-optimised %d stored facts that share a subject with this batch", len(earlier))
    records = [f.to_dict() | {"edit": {"loss": info.loss[i], "nll": info.nll[i], "steps": info.steps[i]}}
               for i, f in enumerate(batch)]
    words = (subject_words(tokenizer, [f.subject for f in batch], aliases=[f.aliases for f in batch])
             if config.word_check else None)
    if words is not None and db.word_starts.numel() == 0:
        db.word_starts = word_start_tokens(tokenizer)
    old = [o for f in batch for o in replaces.get(f.id, ())]
    if old:
        db.remove(old, stale_ok=True)  # their siblings were re-optimised above, without them
    with phase("store_add"):
        db.add([f.id for f in batch], keys, residuals[: len(batch)], facts=records, words=words)
    if config.share_subject_residuals:
        for f in batch:
            stored.setdefault(f.subject, []).append(f)
    return [f.id for f in earlier]
