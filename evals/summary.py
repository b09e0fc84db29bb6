"""What an evaluation report says beyond its cases: metric summaries, firing totals, model, edit and versions.

Example::

    from evals.summary import summarize_metrics, summarize_firing
    metrics = summarize_metrics("counterfact", ["efficacy"], cases, records, 0.95, None)
    metrics["efficacy"]["post"]["mean"]            # percent, with ["post"]["ci"] and the paired test

Each metric is summarised from the per-case values of the records (:func:`evals.stats.summarize_metric`):
a proportion (Wilson interval, exact McNemar test) when every case contributes one yes/no
outcome, else a mean (Student t interval, paired t-test); values are scaled to the metric's
unit (:mod:`evals.metrics.specs`). A metric that could not be computed is ``skipped`` with the
reason. Firing is totalled per prompt group over the cases (:func:`evals.report.firing_section`
also reads case records written when the section was called ``"gate"``).
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any, Mapping, Sequence

import torch

from evals import stats
from evals.cases import EvalCase
from evals.metrics import chat as chat_metric
from evals.metrics import mentions as mention_metric
from evals.metrics.fluency import word_tokenizer_name
from evals.metrics.specs import CHAT_METRICS, CHAT_TOKENS, EXTRA_METRICS, METRICS
from evals.metrics.tokens import model_device
from evals.report import firing_section
from evals.scoring import FIRING_GROUPS

__all__ = ["edit_summary", "metric_kind", "model_info", "summarize_firing", "summarize_metrics", "versions"]


def metric_kind(kind: str, name: str, cases: Sequence[EvalCase]) -> str:
    """'proportion' when every case contributes exactly one yes/no outcome (CounterFact rates)."""
    name = {"chat_efficacy": "efficacy", "chat_generalization": "generalization"}.get(name, name)
    if kind != "counterfact" or name not in ("efficacy", "generalization", "specificity"):
        return "mean"
    count = {"efficacy": lambda c: 1, "generalization": lambda c: len(c.fact.paraphrases),
             "specificity": lambda c: len(c.fact.neighborhood)}[name]
    return "proportion" if cases and all(count(c) == 1 for c in cases) else "mean"


def summarize_metrics(kind: str, metrics: Sequence[str], cases: Sequence[EvalCase],
                      records: Sequence[Mapping[str, Any]], confidence: float, reference_paths: Any,
                      chat_skip: str | None = None) -> dict[str, Any]:
    """``report["metrics"]``: per metric its unit, pre and post summaries, difference and test (or why skipped)."""
    out: dict[str, Any] = {}
    for name in metrics:
        spec = (METRICS[kind] | EXTRA_METRICS.get(kind, {}))[name]
        base = {"unit": spec.unit, "scale": spec.scale, "description": spec.description}
        pre = [r["pre"].get(name) for r in records]
        post = [r["post"].get(name) for r in records]
        if name in CHAT_METRICS and chat_skip is not None:
            out[name] = base | {"skipped": True, "reason": chat_skip}
            continue
        if name == "mentions":
            out[name] = base | mention_metric.summarize_mentions(pre=pre, post=post, confidence=confidence)
            out[name]["interval"] = stats.T_METHOD + "; per kind: " + mention_metric.INTERVALS
            continue
        if name == "consistency" and reference_paths is None:
            out[name] = base | {"skipped": True, "reason": (
                "consistency needs ROME's attribute_snippets.json, idf.npy and tfidf_vocab.json "
                "(not available offline); pass consistency_files= (or --consistency-dir) to compute it")}
            continue
        if all(v is None for v in post):
            out[name] = base | {"skipped": True, "reason": "no case has this metric's prompts "
                                "(e.g. no generation prompts in this CounterFact format)"}
            continue
        mkind = metric_kind(kind, name, cases)
        out[name] = base | stats.summarize_metric(pre, post, kind=mkind, confidence=confidence, scale=spec.scale)
        out[name]["interval"] = stats.WILSON_METHOD if mkind == "proportion" else stats.T_METHOD
        if name == "fluency":
            out[name]["word_tokenizer"] = word_tokenizer_name()
        if name == "consistency":
            out[name]["files"] = reference_paths
        if name in CHAT_METRICS:
            answers = {p: [(r.get("detail") or {}).get(p, {}).get("chat") for r in records] for p in ("pre", "post")}
            out[name] |= chat_metric.summary_extras(name=name, pre=answers["pre"], post=answers["post"],
                                                    max_new_tokens=CHAT_TOKENS)
            out[name]["examples"] = chat_metric.examples(cases=records)
    return out


def summarize_firing(db: Any, records: Sequence[Mapping[str, Any]], confidence: float) -> dict[str, Any]:
    """``report["firing"]``: per prompt group the totals over the cases, the share of prompts that fired."""
    groups: dict[str, dict[str, Any]] = {}
    keys = ("prompts", "positions", "fires", "prompts_fired", "own_fires", "prompts_fired_own")
    sections = [firing_section(r) for r in records]  # "gate" in cases written before the rename
    for g in FIRING_GROUPS:
        per = [s[g] for s in sections if g in s]
        if not per:
            continue
        tot = {k: sum(p[k] for p in per) for k in keys}
        tot["fire_rate"] = tot["fires"] / tot["positions"] if tot["positions"] else None
        tot["prompt_fire"] = stats.proportion_ci(tot["prompts_fired"], tot["prompts"], confidence=confidence)
        tot["own_prompt_rate"] = tot["prompts_fired_own"] / tot["prompts"] if tot["prompts"] else None
        tot["cases_fired"] = sum(1 for p in per if p["prompts_fired"])
        groups[g] = tot
    return {"gamma": db.gamma, "layer": db.layer, "facts": len(db), "groups": groups,
            "method": "one forward pass per prompt with the store attached; positions exclude padding and the "
                      "first token; prompt_fire: prompts with >= 1 fire (Wilson interval); own: a fire retrieved "
                      "the case's own fact"}


def model_info(model: Any) -> dict[str, Any]:
    """``report["model"]``: name, class, type, dtype, device and parameter count."""
    from neuraldb.store import model_name

    param = next(iter(model.parameters()), None)
    return {"name": model_name(model), "class": type(model).__name__,
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
            "device": model_device(model).type,
            "parameters": sum(p.numel() for p in model.parameters())}


def edit_summary(db: Any, cases: Sequence[EvalCase]) -> dict[str, Any] | None:
    """Mean and max final edit loss / NLL of the evaluated facts (from ``db.facts``)."""
    recs = [db.facts.get(c.fact.id, {}).get("edit") for c in cases]
    recs = [r for r in recs if isinstance(r, Mapping)]
    if not recs:
        return None
    out: dict[str, Any] = {"n": len(recs)}
    for key in ("loss", "nll", "steps"):
        vals = [float(r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = {"mean": sum(vals) / len(vals), "max": max(vals)}
    return out


def versions() -> dict[str, str | None]:
    """``report["versions"]``: neuraldb, torch, transformers, lm-eval, scipy, Python and the platform."""
    import neuraldb

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    import transformers

    return {"neuraldb": neuraldb.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": version("lm_eval") or version("lm-eval"), "scipy": version("scipy"),
            "python": platform.python_version(), "platform": platform.platform()}
