"""The metrics an evaluation can report, per kind of dataset: name, unit, scale, description.

Example::

    from evals.metrics.specs import METRICS, select_metrics
    list(METRICS["counterfact"])                         # the default: all of the dataset's standard ones
    select_metrics("counterfact", "mentions efficacy")   # ['efficacy', 'mentions'] (canonical order)

* CounterFact: ``efficacy`` (ES), ``generalization`` (PS), ``specificity`` (NS), their
  magnitudes ``*_magnitude`` (mean P(new) - P(true), reversed for NS; ROME's ``*_diff``),
  ``fluency`` (ROME's n-gram entropy of top-5 samples from the generation prompts, x100)
  and ``consistency`` (ROME's TF-IDF reference score, x100; skipped with the reason unless
  ``consistency_files`` gives ROME's three files);
* zsRE: ``efficacy``, ``generalization``, ``specificity`` as teacher-forced top-1 token
  accuracy (specificity: the NQ question against its gold answer).

Opt-in CounterFact metrics (``EXTRA_METRICS``, computed only when named): ``mentions`` (ES and
gate recall per kind of mention variant, :mod:`evals.metrics.mentions`) and ``chat_efficacy`` /
``chat_generalization`` (the prompt as a chat question, greedy answer judged by containment,
:mod:`evals.metrics.chat`; skipped with the reason when the tokenizer has no chat template).

Report values are in the paper's units (``scale``): percent for rates and magnitudes, x100 for
fluency and consistency; per-case values in ``report["cases"]`` are raw (fractions, entropies).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

__all__ = ["CHAT_METRICS", "CHAT_TOKENS", "EXTRA_METRICS", "METRICS", "MetricSpec", "all_metric_names",
           "did_you_mean", "select_metrics", "split_names"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    scale: float
    description: str


_RATE = "%"
METRICS: dict[str, dict[str, MetricSpec]] = {
    "counterfact": {m.name: m for m in (
        MetricSpec("efficacy", _RATE, 100, "ES: P(target_new) > P(target_true) on the edit prompt"),
        MetricSpec("generalization", _RATE, 100, "PS: the same on the paraphrase prompts"),
        MetricSpec("specificity", _RATE, 100, "NS: P(target_true) > P(target_new) on the neighbourhood prompts"),
        MetricSpec("efficacy_magnitude", _RATE, 100, "mean P(new) - P(true) on the edit prompt (ROME's ES diff)"),
        MetricSpec("generalization_magnitude", _RATE, 100, "mean P(new) - P(true) on the paraphrases"),
        MetricSpec("specificity_magnitude", _RATE, 100, "mean P(true) - P(new) on the neighbourhood prompts"),
        MetricSpec("fluency", "x100", 100, "n-gram entropy (2/3 H2 + 4/3 H3, ROME) of top-5 samples"),
        MetricSpec("consistency", "x100", 100, "TF-IDF cosine of generations vs snippets about target_new"),
    )},
    "zsre": {m.name: m for m in (
        MetricSpec("efficacy", _RATE, 100, "token accuracy of target_new after the edit question"),
        MetricSpec("generalization", _RATE, 100, "token accuracy of target_new after the rephrased question"),
        MetricSpec("specificity", _RATE, 100, "token accuracy of the NQ gold answer after the NQ question"),
    )},
}
# computed only when asked for by name (not in the default "all of the dataset's")
EXTRA_METRICS: dict[str, dict[str, MetricSpec]] = {
    "counterfact": {m.name: m for m in (
        MetricSpec("mentions", _RATE, 100, "ES (P(new) > P(true)) over mention variants of the edit prompt and "
                   "paraphrases (lower-cased article, mid-sentence, possessive, quoted, article dropped, question); "
                   "per kind with gate recall in the mentions section"),
        MetricSpec("chat_efficacy", _RATE, 100, "the edit prompt as a chat question (chat template, greedy, 16 "
                   "tokens): the answer contains target_new and not target_true"),
        MetricSpec("chat_generalization", _RATE, 100, "the same for the paraphrases"),
    )},
    "zsre": {},
}
CHAT_METRICS = ("chat_efficacy", "chat_generalization")
CHAT_TOKENS = 16


def split_names(names: str) -> list[str]:
    """``"efficacy, mentions"`` or ``"efficacy mentions"`` -> ``["efficacy", "mentions"]``."""
    return [m for m in names.replace(",", " ").split() if m]


def all_metric_names() -> list[str]:
    """Every metric name of every kind of dataset, standard ones first."""
    return list(dict.fromkeys(n for table in (METRICS, EXTRA_METRICS) for kind in table.values() for n in kind))


def did_you_mean(unknown: Sequence[str], known: Sequence[str]) -> str:
    """`` (did you mean 'efficacy' for 'eficacy'?)`` for each unknown name with a close known one."""
    return "".join(f" (did you mean {difflib.get_close_matches(m, known, 1)[0]!r} for {m!r}?)"
                   for m in unknown if difflib.get_close_matches(m, known, 1))


def select_metrics(kind: str, metrics: Sequence[str] | str | None) -> list[str]:
    """The metrics to compute for a dataset ``kind``, in canonical order; default all of ``METRICS[kind]``."""
    if metrics is None:
        return list(METRICS[kind])
    known = METRICS[kind] | EXTRA_METRICS.get(kind, {})
    if isinstance(metrics, str):
        metrics = split_names(metrics)
    unknown = [m for m in metrics if m not in known]
    if unknown or not metrics:
        raise ValueError(f"unknown {kind} metric(s) {unknown}{did_you_mean(unknown, list(known))}; "
                         f"choose from {list(known)}")
    return [m for m in known if m in metrics]  # canonical order
