"""zsRE efficacy, generalization and specificity (token-level teacher-forced accuracy).

Card
----
Measures: whether the model produces the edit's target on the edit question, on its
rephrasing, and whether it still answers an unrelated Natural Questions question.

Definition (per case; all three use :func:`evals.metrics.tokens.score_targets`):

* efficacy       = mean over the tokens ``t_i`` of ``target_new`` of
  ``[argmax p(. | src + t_<i) == t_i]``, prompt ``fact.text`` (the ``src`` question);
* generalization = the same on each paraphrase (``rephrase``), averaged over paraphrases;
* specificity    = the same on ``loc_prompt`` (``loc + "?"``) against its gold ``loc_answer``
  (so it is capped by the unedited model's own NQ accuracy).

Corpus values are the mean over cases of the per-case values (ROME's ``summarize.py``
averages each case's token flags, then the cases), as fractions: multiply by 100 to
report. Follows ROME/MEMIT/AlphaEdit ``experiments/py/eval_utils_zsre.py`` (which feeds
``prompt + decode(target[:i])`` and compares the next top-1 token) and NeuralDB
(Fei et al. 2025) section 5; here the target ids are taken once from
``encode_completion`` instead of decode/re-encode, which avoids the tokenizer-specific
hacks in that code (e.g. AlphaEdit's Llama special case).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import fmean
from typing import Any, Sequence

from .tokens import score_targets

__all__ = ["ZsreCaseResult", "summarize_zsre", "zsre_scores"]


@dataclass(frozen=True)
class ZsreCaseResult:
    case_id: int
    efficacy: float
    generalization: float | None  # None when the case has no paraphrase
    specificity: float | None  # None when the case has no loc prompt
    efficacy_correct: tuple[bool, ...]
    generalization_correct: tuple[tuple[bool, ...], ...]
    specificity_correct: tuple[bool, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def zsre_scores(*, model: Any, tokenizer: Any, cases: Sequence[Any], batch_size: int = 16) -> list[ZsreCaseResult]:
    """Per-case zsRE metrics for :class:`evals.cases.EvalCase` objects (one batched pass)."""
    pairs: list[tuple[str, str]] = []
    spans = []
    for case in cases:
        fact = case.fact
        start = len(pairs)
        pairs.append((fact.text, fact.target_new))
        pairs += [(p, fact.target_new) for p in fact.paraphrases]
        has_loc = case.loc_prompt is not None and case.loc_answer is not None
        if has_loc:
            pairs.append((case.loc_prompt, case.loc_answer))
        spans.append((start, len(fact.paraphrases), has_loc))
    scores = score_targets(model=model, tokenizer=tokenizer, pairs=pairs, batch_size=batch_size)
    out = []
    for case, (start, n_para, has_loc) in zip(cases, spans):
        edit = scores[start]
        para = scores[start + 1: start + 1 + n_para]
        loc = scores[start + 1 + n_para] if has_loc else None
        out.append(ZsreCaseResult(
            case_id=case.case_id,
            efficacy=edit.accuracy,
            generalization=fmean(s.accuracy for s in para) if para else None,
            specificity=loc.accuracy if loc is not None else None,
            efficacy_correct=edit.correct,
            generalization_correct=tuple(s.correct for s in para),
            specificity_correct=loc.correct if loc is not None else (),
        ))
    return out


def summarize_zsre(results: Sequence[ZsreCaseResult]) -> dict[str, float | int | None]:
    """Mean over cases of each metric (fractions in [0, 1]; None when no case has it)."""
    summary: dict[str, float | int | None] = {"n_cases": len(results)}
    for key in ("efficacy", "generalization", "specificity"):
        values = [getattr(r, key) for r in results if getattr(r, key) is not None]
        summary[key] = fmean(values) if values else None
    return summary
