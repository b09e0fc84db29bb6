"""Intervals and tests behind every report and every release gate decision (all computed with scipy).

Example::

    from evals import stats
    stats.mean_ci([0.5, 1.0, 0.75], confidence=0.95)        # Student t interval of a mean
    stats.proportion_ci(17, 20, confidence=0.95)            # Wilson score interval
    stats.paired_test(pre, post, test="mcnemar_exact")       # {'name': 'mcnemar_exact', 'p_value': ...}
    stats.display_name("wilcoxon")                           # 'Wilcoxon signed-rank'
    stats.summarize_metric(pre, post, kind="proportion")    # pre/post intervals, difference, paired test

Tests are named by one id each (:data:`TEST_IDS`), which is what reports store in
``test["name"]``; :func:`display_name` gives the words shown in tables. Reports written by
earlier versions stored other strings (``"exact McNemar (binomial test on discordant pairs)"``,
``"paired t-test"``, ...): :func:`canonical_test` maps any of them to its id, so old reports still read.

* intervals: Wilson score for proportions (``binomtest(...).proportion_ci(method="wilson")``),
  Student t (``t.interval``, ``sd / sqrt(n)``, ``ddof=1``) for means;
* paired tests of post vs pre on per-case values: ``mcnemar_exact`` (two-sided binomial test on
  the discordant pairs), ``t`` (``ttest_rel``), ``wilcoxon`` (``wilcoxon``, zero differences
  dropped);
* unpaired comparisons of two aggregates (reports keep no per-example scores of general tasks):
  ``fisher_exact`` for two proportions, ``z_intervals`` (a z-test from the two intervals) otherwise.

A metric of an evaluation report (:func:`summarize_metric`, on per-case values) where every case
contributes ONE yes/no outcome (CounterFact's efficacy: one edit prompt per case) is a
proportion: Wilson score interval, pre vs post by ``mcnemar_exact``; every other metric (means
over several prompts or tokens per case, magnitudes, fluency) is a mean of per-case values:
Student t interval, paired ``t``. The difference post - pre always gets the t interval of the
per-case differences. Cases without a value (e.g. no paraphrase) are left out; paired
statistics use the cases that have both values.
"""

from __future__ import annotations

import math
from statistics import fmean
from typing import Any, Mapping, Sequence

__all__ = [
    "DEFAULT_TEST", "TEST_IDS", "canonical_test", "display_name", "mean_ci", "paired_test", "perplexity_ci",
    "proportion_ci", "significant", "summarize_metric", "unpaired_test",
]

#: test id -> the name shown in tables and gate rows
TEST_IDS: dict[str, str] = {
    "mcnemar_exact": "McNemar exact",
    "t": "paired t-test",
    "wilcoxon": "Wilcoxon signed-rank",
    "fisher_exact": "Fisher exact (unpaired)",
    "z_intervals": "z-test from the intervals (unpaired)",
    "none": "none (no intervals in the reports)",
}
PAIRED_TESTS = ("mcnemar_exact", "t", "wilcoxon")
#: the paired test of a metric kind: one yes/no outcome per case, or a mean of per-case values
DEFAULT_TEST = {"proportion": "mcnemar_exact", "mean": "t"}
_BY_NAME = {shown: ident for ident, shown in TEST_IDS.items()}  # gate rows and report.py wrote these
#: the interval of a metric summary, as the report names it
T_METHOD = "Student t interval of the mean of per-case values"
WILSON_METHOD = "Wilson score interval (one yes/no outcome per case)"


def canonical_test(name: str | None) -> str | None:
    """The id of a test from its id, display name or a name an earlier version wrote (else ``name``)."""
    if not name:
        return None
    if name in TEST_IDS:
        return name
    if name.startswith("exact McNemar"):  # report.py before evals.stats
        return "mcnemar_exact"
    return _BY_NAME.get(name, name)


def display_name(name: str | None) -> str | None:
    """The table name of a test given by id or by any older name (unknown names are kept)."""
    ident = canonical_test(name)
    return TEST_IDS.get(ident, ident) if ident else None


def significant(p: float | None, alpha: float) -> bool:
    return p is not None and p < alpha


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- intervals


def mean_ci(values: Sequence[float], *, confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample sd and the Student t interval of the mean (None below 2 values)."""
    from scipy import stats

    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci": None, "method": "t"}
    mean = fmean(values)
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci": None, "method": "t"}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if sd == 0:
        ci = [mean, mean]
    else:
        lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=sd / math.sqrt(n))
        ci = [float(lo), float(hi)]
    return {"n": n, "mean": mean, "sd": sd, "ci": ci, "method": "t"}


def proportion_ci(successes: int, n: int, *, confidence: float = 0.95) -> dict[str, Any]:
    """``successes / n`` with its Wilson score interval (None when n = 0)."""
    from scipy import stats

    if n == 0:
        return {"n": 0, "successes": 0, "mean": None, "ci": None, "method": "wilson"}
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return {"n": int(n), "successes": int(successes), "mean": successes / n,
            "ci": [float(ci.low), float(ci.high)], "method": "wilson"}


def perplexity_ci(log_likelihoods: Sequence[float], *, confidence: float = 0.95) -> list[float] | None:
    """The t interval of the mean log-likelihood mapped through ``exp(-x)``: an interval of the perplexity."""
    ci = mean_ci(log_likelihoods, confidence=confidence)["ci"]
    return None if ci is None else [math.exp(-ci[1]), math.exp(-ci[0])]


# ----------------------------------------------------------------------------- paired tests


def paired_test(pre: Sequence[float], post: Sequence[float], *, test: str) -> dict[str, Any]:
    """Two-sided paired test of post vs pre: ``test`` is ``mcnemar_exact`` (0/1 values), ``t`` or ``wilcoxon``.

    Returns ``{"name": test, "n", "statistic", "p_value", ...}``: McNemar adds ``gained`` (0 -> 1)
    and ``lost`` (1 -> 0); Wilcoxon ``nonzero`` and ``mean_difference``. p is 1 when no case changed.
    """
    if len(pre) != len(post):
        raise ValueError(f"paired test needs equal lengths, got {len(pre)} and {len(post)}")
    pre, post = [float(v) for v in pre], [float(v) for v in post]
    if test == "mcnemar_exact":
        return _mcnemar(pre, post)
    if test == "t":
        return _paired_t(pre, post)
    if test == "wilcoxon":
        return _wilcoxon(pre, post)
    raise ValueError(f"unknown paired test {test!r}; use one of {', '.join(PAIRED_TESTS)}")


def _mcnemar(pre: list[float], post: list[float]) -> dict[str, Any]:
    from scipy import stats

    gained = sum(1 for a, b in zip(pre, post) if b > a)
    lost = sum(1 for a, b in zip(pre, post) if b < a)
    p = stats.binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return {"name": "mcnemar_exact", "n": len(pre), "gained": gained, "lost": lost, "statistic": None,
            "p_value": _finite(p)}


def _paired_t(pre: list[float], post: list[float]) -> dict[str, Any]:
    from scipy import stats

    n = len(pre)
    if n < 2:
        return {"name": "t", "n": n, "statistic": None, "p_value": None}
    diffs = [b - a for a, b in zip(pre, post)]
    if all(d == diffs[0] for d in diffs):  # zero variance: t is 0/0 or +-inf
        return {"name": "t", "n": n, "statistic": None, "p_value": 1.0 if diffs[0] == 0 else 0.0,
                "note": "all per-case differences are equal"}
    res = stats.ttest_rel(post, pre)
    return {"name": "t", "n": n, "statistic": _finite(res.statistic), "p_value": _finite(res.pvalue)}


def _wilcoxon(pre: list[float], post: list[float]) -> dict[str, Any]:
    from scipy import stats

    diffs = [b - a for a, b in zip(pre, post)]
    nonzero = sum(1 for d in diffs if d != 0)
    out = {"name": "wilcoxon", "n": len(diffs), "nonzero": nonzero,
           "mean_difference": fmean(diffs) if diffs else 0.0}
    if nonzero == 0:
        return out | {"statistic": None, "p_value": 1.0, "note": "no case changed"}
    res = stats.wilcoxon(pre, post, zero_method="wilcox")
    return out | {"statistic": float(res.statistic), "p_value": _finite(res.pvalue)}


# ----------------------------------------------------------------------------- a metric's summary


def _scaled(summary: Mapping[str, Any], scale: float) -> dict[str, Any]:
    out = dict(summary)
    for key in ("mean", "sd"):
        if out.get(key) is not None:
            out[key] = out[key] * scale
    if out.get("ci") is not None:
        out["ci"] = [c * scale for c in out["ci"]]
    return out


def summarize_metric(pre: Sequence[float | None], post: Sequence[float | None], *, kind: str = "mean",
                     confidence: float = 0.95, scale: float = 1.0) -> dict[str, Any]:
    """Pre and post summaries, the paired difference and test, for aligned per-case values.

    ``kind``: "proportion" (values are 0/1: Wilson intervals, McNemar) or "mean"
    (t intervals, paired t). Means and intervals are multiplied by ``scale``.
    """
    if len(pre) != len(post):
        raise ValueError(f"pre has {len(pre)} values, post {len(post)}")
    if kind not in ("proportion", "mean"):
        raise ValueError(f"kind must be 'proportion' or 'mean', got {kind!r}")

    def one(values: Sequence[float | None]) -> dict[str, Any]:
        vals = [float(v) for v in values if v is not None]
        if kind == "proportion":
            return proportion_ci(sum(1 for v in vals if v >= 0.5), len(vals), confidence=confidence)
        return mean_ci(vals, confidence=confidence)

    pairs = [(float(a), float(b)) for a, b in zip(pre, post) if a is not None and b is not None]
    diff = mean_ci([b - a for a, b in pairs], confidence=confidence)
    test = paired_test([a for a, _ in pairs], [b for _, b in pairs], test=DEFAULT_TEST[kind])
    return {
        "kind": kind,
        "pre": _scaled(one(pre), scale),
        "post": _scaled(one(post), scale),
        "difference": _scaled(diff, scale),
        "test": test,
    }


# ----------------------------------------------------------------------------- unpaired


def unpaired_test(old: float, new: float, *, n: tuple[Any, Any], ci: tuple[Any, Any], proportion: bool,
                  log_scale: bool = False, confidence: float = 0.95) -> dict[str, Any]:
    """Two aggregates without per-example values: Fisher exact for proportions with counts, else a z-test.

    ``n``: the two sample sizes; ``ci``: the two ``confidence`` intervals; ``log_scale``: compare
    on the log scale (perplexity). ``name`` is ``none`` (p None) when there is nothing to test with.
    """
    from scipy import stats

    n_old, n_new = n
    if proportion and isinstance(n_old, int) and isinstance(n_new, int) and n_old and n_new:
        so, sn = round(old * n_old), round(new * n_new)
        res = stats.fisher_exact([[so, n_old - so], [sn, n_new - sn]])
        return {"name": "fisher_exact", "p_value": float(res.pvalue), "n": [n_old, n_new]}
    ca, cb = ci
    if not (ca and cb) or None in (*ca, *cb) or (log_scale and min(*ca, *cb) <= 0):
        return {"name": "none", "p_value": None}
    tf = math.log if log_scale else (lambda x: x)
    z = stats.norm.ppf(0.5 + confidence / 2)
    se = math.hypot((tf(ca[1]) - tf(ca[0])) / (2 * z), (tf(cb[1]) - tf(cb[0])) / (2 * z))
    if se == 0:
        return {"name": "z_intervals", "p_value": 1.0 if old == new else 0.0}
    stat = (tf(new) - tf(old)) / se
    return {"name": "z_intervals", "statistic": stat, "p_value": float(2 * stats.norm.sf(abs(stat)))}
