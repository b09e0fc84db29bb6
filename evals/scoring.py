"""One chunk of an evaluation: the metrics without the store ("pre"), with it ("post"), and its firing.

Example::

    from evals.scoring import ScoringPlan, score_chunk
    plan = ScoringPlan("counterfact", ("efficacy", "fluency"), batch_size=16, seed=0,
                       generation_prompts=None, generation_tokens=None)
    records = score_chunk(model, tok, db, cases, plan, reference=None, row_of={...}, timings={})

:func:`score_chunk` takes the store DETACHED: the metrics of the unedited model ("pre"); then
the store ATTACHED: the same metrics ("post") and the gate's firing on each prompt group; the
store is detached again on exit. Each case is first reduced to the prompts its metrics need
(:func:`reduce_case`). Per-case values are raw (fractions, entropies); the metrics are those of
:mod:`evals.metrics.specs`.

Firing: with the store attached, one forward pass over each prompt of each group alone -
``edit`` (the edit prompt), ``paraphrase``, ``neighborhood`` (CounterFact's neighbourhood
prompts, zsRE's NQ question) and ``generation`` (the post-edit generated texts, prompt +
continuation) - counting gated positions, fires (``NeuralDB.last_fire_mask``), prompts with any
fire, and prompts where a fire retrieved the case's own fact (``last_fire_index``). The store's
counters are reset before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from evals.cases import EvalCase
from evals.metrics import chat as chat_metric
from evals.metrics import mentions as mention_metric
from evals.metrics.consistency import consistency_scores, load_tfidf_reference
from evals.metrics.counterfact import counterfact_scores
from evals.metrics.fluency import fluency_scores
from evals.metrics.specs import CHAT_METRICS, CHAT_TOKENS
from evals.metrics.tokens import call_model, eval_mode, longest_first, model_device, pad_id
from evals.metrics.zsre import zsre_scores
from evals.report import clean_json
from neuraldb.keys import pad_batch

__all__ = ["FIRING_GROUPS", "ScoringPlan", "consistency_reference", "count_firing", "reduce_case", "score",
           "score_chunk"]

FIRING_GROUPS = ("edit", "paraphrase", "neighborhood", "generation")
_CF_GROUPS = {"rewrite": ("efficacy", "efficacy_magnitude"), "paraphrase": ("generalization", "generalization_magnitude"),
              "neighborhood": ("specificity", "specificity_magnitude")}
_CONSISTENCY_FILES = ("attribute_snippets", "idf", "tfidf_vocab")
_CONSISTENCY_NAMES = {"attribute_snippets": "attribute_snippets.json", "idf": "idf.npy", "tfidf_vocab": "tfidf_vocab.json"}


@dataclass(frozen=True)
class ScoringPlan:
    """What to compute for each case of a chunk."""

    kind: str
    metrics: tuple[str, ...]
    batch_size: int
    seed: int
    generation_prompts: int | None
    generation_tokens: int | None

    @property
    def fluency(self) -> bool:
        return self.kind == "counterfact" and ("fluency" in self.metrics or "consistency" in self.metrics)


def consistency_reference(files: Any) -> tuple[Any, dict[str, str] | None]:
    """ROME's TF-IDF reference and the paths it was read from, from a folder or a mapping of the three files."""
    if files is None:
        return None, None
    if isinstance(files, (str, os.PathLike)):
        paths = {k: str(Path(files) / name) for k, name in _CONSISTENCY_NAMES.items()}
    else:
        paths = {k: str(files[k]) for k in _CONSISTENCY_FILES if k in files}
        if len(paths) != 3:
            raise ValueError(f"consistency_files needs the keys {list(_CONSISTENCY_FILES)} (or one folder)")
    return load_tfidf_reference(**paths), paths


def reduce_case(case: EvalCase, plan: ScoringPlan) -> EvalCase:
    """The case with only the prompts the selected metrics need (fewer forward passes)."""
    m = set(plan.metrics)
    fact = case.fact
    if plan.kind == "counterfact":
        fact = dataclasses.replace(
            fact, paraphrases=fact.paraphrases if m & {*_CF_GROUPS["paraphrase"], "mentions", "chat_generalization"}
            else (),
            neighborhood=fact.neighborhood if m & set(_CF_GROUPS["neighborhood"]) else ())
        gen = case.generation_prompts[: plan.generation_prompts] if plan.generation_prompts is not None else case.generation_prompts
        return dataclasses.replace(case, fact=fact, generation_prompts=gen)
    fact = dataclasses.replace(fact, paraphrases=fact.paraphrases if "generalization" in m else ())
    loc = case.loc_prompt if "specificity" in m else None
    return dataclasses.replace(case, fact=fact, loc_prompt=loc)


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Adds the seconds the block took to ``timings[key]``."""
    t0 = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------- one chunk


def score_chunk(model: Any, tok: Any, db: Any, batch: Sequence[EvalCase], plan: ScoringPlan, reference: Any,
                row_of: Mapping[str, int], timings: dict[str, float],
                known_pre: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The records of ``batch`` (pre, post, firing, details, samples, seconds per case) as ``cases.jsonl`` keeps them.

    Expects the store detached; attaches it for the post phase and detaches it again (also on errors).
    ``known_pre`` (fact id -> an earlier record of the same case, :func:`evals.runs.earlier_pre`) gives
    the pre phase of those cases instead of scoring them again.
    """
    t_chunk = time.perf_counter()
    reduced = [reduce_case(c, plan) for c in batch]
    pre = _pre_phase(model, tok, batch, reduced, plan, reference, timings, known_pre or {})
    db.attach(model, check=False)
    try:
        post = score(model, tok, reduced, plan, reference, timings, "post")
        with _timed(timings, "firing"):
            db.reset_stats()
            firing = count_firing(model, tok, db, batch, [p.get("texts") for p in post], row_of, plan.batch_size)
        if "mentions" in plan.metrics:  # gate recall at the subject of each mention variant
            with _timed(timings, "mentions_gate"):
                fired = mention_metric.mention_gate(model=model, tokenizer=tok, db=db, cases=reduced,
                                                    batch_size=plan.batch_size)
                for p, f in zip(post, fired):
                    for variant_kind, g in f.items():
                        p["values"]["mentions"][variant_kind].update(g)
    finally:
        db.detach()
    per_case_s = (time.perf_counter() - t_chunk) / len(batch)
    records = []
    for c, a, b, g in zip(batch, pre, post, firing):
        rec = {"case_id": c.case_id, "fact_id": c.fact.id, "pre": a["values"], "post": b["values"], "firing": g,
               "detail": {"pre": a["detail"], "post": b["detail"]}, "seconds": per_case_s}
        if a.get("reused"):
            rec["pre_reused"] = True  # the pre phase is an earlier run's (EvalConfig.pre_from)
        if a.get("texts") or b.get("texts"):
            rec["samples"] = {"pre": (a.get("texts") or [None])[0], "post": (b.get("texts") or [None])[0]}
        records.append(clean_json(rec))
    return records


def _pre_phase(model: Any, tok: Any, batch: Sequence[EvalCase], reduced: Sequence[EvalCase], plan: ScoringPlan,
               reference: Any, timings: dict[str, float], known: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The pre phase of ``batch``: from ``known`` records of the same cases, the rest scored now."""
    def reusable(c: EvalCase) -> Mapping[str, Any] | None:
        rec = known.get(c.fact.id)
        return rec if rec is not None and rec.get("case_id") == c.case_id else None

    todo = [i for i, c in enumerate(batch) if reusable(c) is None]
    fresh = iter(score(model, tok, [reduced[i] for i in todo], plan, reference, timings, "pre") if todo else [])
    out = []
    for i, c in enumerate(batch):
        rec = reusable(c)
        if rec is None:
            out.append(next(fresh))
        else:
            sample = (rec.get("samples") or {}).get("pre")
            out.append({"values": rec["pre"], "detail": rec["detail"]["pre"], "texts": [sample] if sample else None,
                        "reused": True})
    return out


def score(model: Any, tok: Any, cases: Sequence[EvalCase], plan: ScoringPlan, reference: Any,
          timings: dict[str, float], phase: str) -> list[dict[str, Any]]:
    """Per-case metric values (raw units), details and generated texts, for the model as it is now."""
    out: list[dict[str, Any]] = []
    with _timed(timings, f"{phase}_scoring"):
        if plan.kind == "counterfact":
            for r in counterfact_scores(model=model, tokenizer=tok, cases=cases, batch_size=plan.batch_size):
                values = {"efficacy": r.efficacy, "generalization": r.generalization, "specificity": r.specificity,
                          "efficacy_magnitude": r.efficacy_diff, "generalization_magnitude": r.generalization_diff,
                          "specificity_magnitude": r.specificity_diff}
                detail = {g: [[c.nll_new, c.nll_true] for c in getattr(r, g)]
                          for g in ("rewrite", "paraphrase", "neighborhood")}
                out.append({"values": values, "detail": {"nll_new_true": detail}})
        else:
            for r in zsre_scores(model=model, tokenizer=tok, cases=cases, batch_size=plan.batch_size):
                values = {"efficacy": r.efficacy, "generalization": r.generalization, "specificity": r.specificity}
                detail = {"efficacy_correct": list(r.efficacy_correct),
                          "generalization_correct": [list(x) for x in r.generalization_correct],
                          "specificity_correct": list(r.specificity_correct)}
                out.append({"values": values, "detail": detail})
    if plan.fluency:
        with _timed(timings, f"{phase}_generation"):
            flu = fluency_scores(model=model, tokenizer=tok, cases=cases, max_new_tokens=plan.generation_tokens,
                                 seed=plan.seed, batch_size=plan.batch_size)
            cons = (consistency_scores(cases=cases, generations=[f.texts for f in flu], reference=reference)
                    if reference is not None else None)
            for k, f in enumerate(flu):
                out[k]["values"]["fluency"] = f.ngram_entropy
                if cons is not None and not cons.skipped:
                    out[k]["values"]["consistency"] = cons.per_case[k][1]
                else:
                    out[k]["values"]["consistency"] = None
                out[k]["texts"] = list(f.texts)
    _score_extras(model, tok, cases, plan, out, timings, phase)
    for o in out:
        o["values"] = {k: v for k, v in o["values"].items() if k in plan.metrics}
    return out


def _score_extras(model: Any, tok: Any, cases: Sequence[EvalCase], plan: ScoringPlan, out: list[dict[str, Any]],
                  timings: dict[str, float], phase: str) -> None:
    """The opt-in metrics (``EXTRA_METRICS``) into ``out``: mentions ES per kind (the gate recall is added
    with the store attached, see :func:`score_chunk`), chat answers (None when the tokenizer has no chat template)."""
    if "mentions" in plan.metrics:
        with _timed(timings, f"{phase}_mentions"):
            for o, m in zip(out, mention_metric.mention_scores(model=model, tokenizer=tok, cases=cases,
                                                               batch_size=plan.batch_size)):
                o["values"]["mentions"] = m
    if set(CHAT_METRICS) & set(plan.metrics):
        if chat_metric.missing_chat_template(tok) is not None:
            for o in out:
                o["values"].update(dict.fromkeys(CHAT_METRICS))
            return
        with _timed(timings, f"{phase}_chat"):
            results = chat_metric.chat_scores(model=model, tokenizer=tok, cases=cases, max_new_tokens=CHAT_TOKENS,
                                              batch_size=plan.batch_size,
                                              paraphrases="chat_generalization" in plan.metrics)
            for o, r in zip(out, results):
                o["values"].update({"chat_efficacy": r.efficacy, "chat_generalization": r.generalization})
                o["detail"]["chat"] = [list(a) for a in r.answers]


# ----------------------------------------------------------------------------- firing


def _firing_prompts(case: EvalCase, texts: Sequence[str] | None) -> dict[str, list[str]]:
    groups = {"edit": [case.fact.text], "paraphrase": list(case.fact.paraphrases),
              "neighborhood": list(case.fact.neighborhood) if case.kind == "counterfact"
              else ([case.loc_prompt] if case.loc_prompt else [])}
    if texts:
        groups["generation"] = list(texts)
    return {g: p for g, p in groups.items() if p}


@torch.no_grad()
def count_firing(model: Any, tok: Any, db: Any, cases: Sequence[EvalCase], texts: Sequence[Sequence[str] | None],
                 row_of: Mapping[str, int], batch_size: int) -> list[dict[str, dict[str, int]]]:
    """Per case and prompt group: prompts, gated positions, fires, prompts fired, prompts fired on the own fact."""
    items = []  # (case index, group, prompt ids)
    for k, (case, t) in enumerate(zip(cases, texts)):
        for group, prompts in _firing_prompts(case, t).items():
            for p in prompts:
                ids = list(tok(p, add_special_tokens=True)["input_ids"])
                if ids:
                    items.append((k, group, ids))
    per_case: list[dict[str, dict[str, int]]] = [{} for _ in cases]
    device, pad = model_device(model), pad_id(tok)
    with eval_mode(model):
        for idx in longest_first([len(item[2]) for item in items], batch_size):
            ids, mask = pad_batch([items[i][2] for i in idx], pad, torch.device("cpu"))  # right padded
            db.last_fire_mask = db.last_fire_index = None
            call_model(model, ids.to(device), mask.to(device), use_cache=False)
            fire = db.last_fire_mask.cpu() if db.last_fire_mask is not None else torch.zeros_like(mask, dtype=torch.bool)
            index = (db.last_fire_index.cpu() if db.last_fire_index is not None
                     else torch.full_like(mask, -1))
            for b, i in enumerate(idx):
                k, group, seq = items[i]
                own = row_of.get(cases[k].fact.id, -2)
                fires = int(fire[b].sum())
                own_fires = int((index[b] == own).sum()) if own >= 0 else 0
                c = per_case[k].setdefault(group, {"prompts": 0, "positions": 0, "fires": 0, "prompts_fired": 0,
                                                   "own_fires": 0, "prompts_fired_own": 0})
                c["prompts"] += 1
                c["positions"] += max(len(seq) - 1, 0)  # the store never gates the first token
                c["fires"] += fires
                c["prompts_fired"] += int(fires > 0)
                c["own_fires"] += own_fires
                c["prompts_fired_own"] += int(own_fires > 0)
    return per_case
