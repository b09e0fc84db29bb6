"""CounterFact efficacy (ES), paraphrase (PS) and neighborhood (NS) scores and magnitudes.

Card
----
Measures: whether the edited model prefers ``target_new`` over ``target_true`` on the edit
prompt and its paraphrases, and still prefers ``target_true`` on neighbourhood prompts
(other subjects that share the original object).

Definition. For a prompt ``x`` and a target string ``y`` let ``NLL(y | x)`` be the mean
over ``y``'s tokens of ``-log p(y_i | x, y_<i)`` (teacher forced, see
:mod:`evals.metrics.tokens`) and ``P(y | x) = exp(-NLL(y | x))``. Per case:

* ES = mean over the edit prompt(s) of ``[NLL(new) < NLL(true)]``;
* PS = the same over ``fact.paraphrases``;
* NS = mean over ``fact.neighborhood`` of ``[NLL(true) < NLL(new)]``;
* magnitudes: ``ES_diff``/``PS_diff`` = mean of ``P(new) - P(true)``,
  ``NS_diff`` = mean of ``P(true) - P(new)``.

Ties count as failures for both sides. Corpus values are means over cases of the per-case
means (fractions; x100 to report); ``score`` is the harmonic mean of ES, PS and NS.

Followed: ROME ``experiments/py/eval_utils_counterfact.py`` (``test_batch_prediction``:
per-token-mean NLL of ``" " + target`` after the prompt) and MEMIT/ROME
``experiments/summarize.py`` (``*_success`` compares the NLLs, ``*_diff`` is
``exp(-nll_new) - exp(-nll_true)``, reversed for the neighbourhood; per-case mean, then mean
over cases; ``score`` = hmean). NeuralDB (Fei et al. 2025) section 5 reports ES/PS/NS as
Efficacy/Generalization/Specificity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import fmean
from typing import Any, Sequence

from .tokens import score_targets

__all__ = ["CounterFactCaseResult", "PromptComparison", "counterfact_scores", "summarize_counterfact"]


@dataclass(frozen=True)
class PromptComparison:
    prompt: str
    nll_new: float
    nll_true: float

    @property
    def p_new(self) -> float:
        return math.exp(-self.nll_new)

    @property
    def p_true(self) -> float:
        return math.exp(-self.nll_true)


def _rate(items: Sequence[PromptComparison], new_wins: bool) -> float | None:
    if not items:
        return None
    return fmean(float(c.nll_new < c.nll_true) if new_wins else float(c.nll_true < c.nll_new) for c in items)


def _diff(items: Sequence[PromptComparison], new_minus_true: bool) -> float | None:
    if not items:
        return None
    return fmean((c.p_new - c.p_true) if new_minus_true else (c.p_true - c.p_new) for c in items)


@dataclass(frozen=True)
class CounterFactCaseResult:
    case_id: int
    rewrite: tuple[PromptComparison, ...]
    paraphrase: tuple[PromptComparison, ...]
    neighborhood: tuple[PromptComparison, ...]

    @property
    def efficacy(self) -> float | None:
        return _rate(self.rewrite, True)

    @property
    def generalization(self) -> float | None:
        return _rate(self.paraphrase, True)

    @property
    def specificity(self) -> float | None:
        return _rate(self.neighborhood, False)

    @property
    def efficacy_diff(self) -> float | None:
        return _diff(self.rewrite, True)

    @property
    def generalization_diff(self) -> float | None:
        return _diff(self.paraphrase, True)

    @property
    def specificity_diff(self) -> float | None:
        return _diff(self.neighborhood, False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in _METRICS:
            d[key] = getattr(self, key)
        return d


_METRICS = ("efficacy", "generalization", "specificity", "efficacy_diff", "generalization_diff", "specificity_diff")


def counterfact_scores(*, model: Any, tokenizer: Any, cases: Sequence[Any],
                       batch_size: int = 16) -> list[CounterFactCaseResult]:
    """Per-case ES/PS/NS inputs for :class:`evals.cases.EvalCase` objects (one batched pass)."""
    pairs: list[tuple[str, str]] = []
    groups = []
    for case in cases:
        fact = case.fact
        if fact.target_true is None:
            raise ValueError(f"case {case.case_id!r}: CounterFact metrics need fact.target_true")
        prompts = ((fact.text,), tuple(fact.paraphrases), tuple(fact.neighborhood))
        groups.append((len(pairs), prompts))
        for group in prompts:
            for p in group:
                pairs += [(p, fact.target_new), (p, fact.target_true)]
    scores = score_targets(model=model, tokenizer=tokenizer, pairs=pairs, batch_size=batch_size)
    out = []
    for case, (at, prompts) in zip(cases, groups):
        compared = []
        for group in prompts:
            items = []
            for p in group:
                items.append(PromptComparison(p, scores[at].mean_nll, scores[at + 1].mean_nll))
                at += 2
            compared.append(tuple(items))
        out.append(CounterFactCaseResult(case.case_id, *compared))
    return out


def _hmean(values: Sequence[float]) -> float:
    """Harmonic mean (scipy's convention: 0 when any value is 0)."""
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def summarize_counterfact(results: Sequence[CounterFactCaseResult]) -> dict[str, float | int | None]:
    """Means over cases (fractions); ``score`` = harmonic mean of efficacy, generalization, specificity."""
    summary: dict[str, float | int | None] = {"n_cases": len(results)}
    for key in _METRICS:
        values = [v for v in (getattr(r, key) for r in results) if v is not None]
        summary[key] = fmean(values) if values else None
    parts = [summary["efficacy"], summary["generalization"], summary["specificity"]]
    summary["score"] = _hmean(parts) if all(p is not None for p in parts) else None
    return summary
