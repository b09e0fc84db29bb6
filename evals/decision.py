"""The release gate's decision: every policy criterion checked against an evaluation report (pure: runs nothing).

Example::

    from evals.decision import decide
    result = decide(report, "evals/policies/default.yaml", baseline=old_report)
    result["passed"], result["failed"], result["criteria"][0]     # one row per criterion

* a minimum (efficacy, generalization) compares the post-edit mean - or an end of its interval,
  ``criteria.minimum_rule`` - with the threshold;
* a drop (specificity pre -> post; each general task before -> after; with a baseline, new vs
  baseline) FAILS only when it is larger than the policy's margin AND significant (p < 1 -
  confidence). The tests (:mod:`evals.stats`): the report's own for edit metrics, or the one
  ``criteria.paired_test`` asks for, recomputed from the per-case values; the report's
  per-example test for general tasks. Against a baseline, edit metrics are paired on the cases
  both reports share; general tasks are compared unpaired (reports keep aggregates only);
* a firing rate (gate fires / gated positions on each general task's inputs) fails above its
  maximum (a descriptive rate, no test).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from evals import report as rep
from evals import stats
from evals.policy import Policy, resolve_policy

__all__ = ["Check", "EXIT_ERROR", "EXIT_FAIL", "EXIT_PASS", "GateError", "decide", "n_cases", "report_confidence"]

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
_UNBOUNDED = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
_LOWER_IS_BETTER = _UNBOUNDED


class GateError(ValueError):
    """The inputs of the release gate cannot be decided on (missing data, mismatched report); the message says why."""


@dataclass
class Check:
    """One row of the decision."""

    name: str  # e.g. "efficacy", "general sciq drop"
    field: str  # the policy field, e.g. "criteria.efficacy_min"
    kind: str  # minimum | max_drop | max_rate | min_cases
    status: str  # pass | fail | off
    value: float | None = None  # what was compared with the threshold
    threshold: float | None = None
    unit: str = ""
    test: str | None = None  # the test's display name (evals.stats.display_name)
    p_value: float | None = None
    significant: bool | None = None
    rule: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    group: str = "absolute"  # absolute | regression

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _off(name: str, fld: str, kind: str = "max_drop", group: str = "absolute") -> Check:
    return Check(name, fld, kind, "off", rule="switched off by the policy", group=group)


def _drop(name: str, fld: str, drop: float, margin: float, test: Mapping[str, Any], policy: Policy, *,
          unit: str, rule: str, detail: dict[str, Any], group: str = "absolute") -> Check:
    """A drop row: fails when ``drop`` > ``margin`` and ``test`` is significant at the policy's level."""
    p = test.get("p_value")
    sig = stats.significant(p, policy.alpha)
    return Check(name, fld, "max_drop", "fail" if (drop > margin and sig) else "pass", value=drop, threshold=margin,
                 unit=unit, test=stats.display_name(test.get("name")), p_value=p, significant=sig, group=group,
                 rule=f"{rule} and p < {policy.alpha:.3g}",
                 detail=detail | {"test": {k: v for k, v in test.items() if k != "name"}})


# ----------------------------------------------------------------------------- reading a report


def report_confidence(report: Mapping[str, Any]) -> float:
    return float(((report.get("config") or {}).get("evaluate") or {}).get("confidence") or 0.95)


def n_cases(report: Mapping[str, Any]) -> int:
    n = (report.get("dataset") or {}).get("n_cases")
    return int(n) if n is not None else len(report.get("cases") or [])


def _metric(report: Mapping[str, Any], name: str, field_name: str) -> Mapping[str, Any]:
    metrics = report.get("metrics") or {}
    m = metrics.get(name)
    if m is None:
        raise GateError(f"policy field {field_name} needs the metric {name!r}, which the report lacks (it has "
                        f"{', '.join(metrics) or 'none'}); evaluate it (evaluation.metrics), or set {field_name}: null")
    if m.get("skipped"):
        raise GateError(f"policy field {field_name} needs the metric {name!r}, which the report skipped "
                        f"({m.get('reason', 'no reason given')}); use data that has it, or set {field_name}: null")
    return m


def _case_values(report: Mapping[str, Any], name: str, phase: str) -> dict[str, float]:
    """fact id -> the per-case raw value of ``name`` in ``phase`` (cases without one left out)."""
    out = {}
    for c in report.get("cases") or []:
        v = (c.get(phase) or {}).get(name)
        if v is not None and c.get("fact_id") is not None:
            out[str(c["fact_id"])] = float(v)
    return out


def _paired(pre: Sequence[float], post: Sequence[float], *, test: str, kind: str) -> dict[str, Any]:
    """The policy's paired test (``report``: the report's own for a metric of ``kind``) on per-case values."""
    return stats.paired_test(pre, post, test=stats.DEFAULT_TEST.get(kind, "t") if test == "report" else test)


# ----------------------------------------------------------------------------- edit metrics


def _minimum_check(report: Mapping[str, Any], name: str, threshold: float | None, policy: Policy) -> Check:
    fld = f"criteria.{name}_min"
    if threshold is None:
        return _off(name, fld, "minimum")
    m = _metric(report, name, fld)
    post = dict(m.get("post") or {})
    rule = policy.criteria.minimum_rule
    note = ""
    if rule != "mean" and abs(report_confidence(report) - policy.confidence) > 1e-9:
        vals = list(_case_values(report, name, "post").values())
        if vals:
            post = stats.summarize_metric(vals, vals, kind=m.get("kind", "mean"), confidence=policy.confidence,
                                          scale=float(m.get("scale", 100)))["post"]
            note = f"interval recomputed from the per-case values at the policy's {policy.confidence:g} level"
    mean, ci = post.get("mean"), post.get("ci")
    if mean is None:
        raise GateError(f"policy field {fld}: the report has no post-edit value of {name!r} (no case has it)")
    value = mean
    if rule in ("ci_low", "ci_high"):
        if ci:
            value = ci[0] if rule == "ci_low" else ci[1]
        else:
            note = "no interval (fewer than 2 cases): the mean is used"
    words = {"mean": "post-edit mean", "ci_low": "lower end of the post-edit interval",
             "ci_high": "upper end of the post-edit interval"}[rule]
    return Check(name, fld, "minimum", "pass" if value >= threshold else "fail", value=value, threshold=threshold,
                 unit=m.get("unit", "%"), rule=f"{words} >= threshold",
                 detail={"mean": mean, "ci": ci, "n": post.get("n"), "interval": m.get("interval"), "note": note})


def _drop_check(report: Mapping[str, Any], name: str, margin: float | None, policy: Policy) -> Check:
    fld = f"criteria.{name}_max_drop"
    if margin is None:
        return _off(f"{name} drop", fld)
    m = _metric(report, name, fld)
    pre, post = (m.get("pre") or {}).get("mean"), (m.get("post") or {}).get("mean")
    if pre is None or post is None:
        raise GateError(f"policy field {fld}: the report has no pre/post value of {name!r}")
    test = dict(m.get("test") or {})
    source = "report"
    if policy.criteria.paired_test != "report" or test.get("p_value") is None:
        before, after = _case_values(report, name, "pre"), _case_values(report, name, "post")
        ids = [i for i in before if i in after]
        if ids:
            test = _paired([before[i] for i in ids], [after[i] for i in ids], test=policy.criteria.paired_test,
                           kind=m.get("kind", "mean"))
            source = "recomputed from the report's per-case values"
        elif policy.criteria.paired_test != "report":
            raise GateError(f"criteria.paired_test={policy.criteria.paired_test} needs per-case values of {name!r}, "
                            "but the report has no 'cases'; use paired_test: report, or a full report.json")
    return _drop(f"{name} drop", fld, pre - post, margin, test, policy, unit="points",
                 rule="fails when pre - post > margin",
                 detail={"pre": pre, "post": post, "test_source": source, "n": test.get("n")})


# ----------------------------------------------------------------------------- general tasks


def _general_metric(task: str, res: Mapping[str, Any], policy: Policy, fld: str) -> tuple[str, Mapping[str, Any]]:
    metric = policy.criteria.general_metric.get(task) or res.get("metric")
    metrics = res.get("metrics") or {}
    m = metrics.get(metric) if metric else None
    if m is None and metric and res.get("metric") == metric:
        m = res
    if m is None:
        raise GateError(f"policy field {fld}: general task {task!r} has no metric {metric!r} in the report (it has "
                        f"{', '.join(metrics) or 'none'}); fix criteria.general_metric")
    return str(metric), m


def _orient(metric: str, m: Mapping[str, Any], old: float | None, new: float | None) -> tuple[float | None, str, bool]:
    """(drop, unit, bounded): how much worse ``new`` is than ``old`` - points x100 or percent relative."""
    if old is None or new is None:
        return None, "", True
    hib = m.get("higher_is_better")
    if hib is None:
        hib = metric not in _LOWER_IS_BETTER
    bounded = metric not in _UNBOUNDED and 0.0 <= old <= 1.0 and 0.0 <= new <= 1.0
    if bounded:
        return 100.0 * ((old - new) if hib else (new - old)), "points", True
    if old == 0:
        return (0.0 if new == old else math.inf), "% relative", False
    rel = 100.0 * (new - old) / abs(old)
    return (-rel if hib else rel), "% relative", False


def _general_tasks(report: Mapping[str, Any]) -> Mapping[str, Any]:
    general = report.get("general") or {}
    return (general.get("tasks") if isinstance(general, Mapping) else None) or {}


def _task_drop(task: str, res: Mapping[str, Any], policy: Policy) -> Check:
    cr = policy.criteria
    fld = (f"criteria.general_max_drop_per_task.{task}" if task in cr.general_max_drop_per_task
           else "criteria.general_max_drop")
    margin = cr.general_max_drop_per_task.get(task, cr.general_max_drop)
    if margin is None:
        return _off(f"{task} drop", fld)
    metric, m = _general_metric(task, res, policy, fld)
    drop, unit, _ = _orient(metric, m, m.get("before"), m.get("after"))
    if drop is None:
        raise GateError(f"policy field {fld}: general task {task!r} has no before/after value of {metric!r}")
    return _drop(f"{task} drop", fld, drop, margin, m.get("test") or {}, policy, unit=unit,
                 rule=f"{metric}: fails when the drop > margin",
                 detail={"metric": metric, "before": m.get("before"), "after": m.get("after"), "n": res.get("n"),
                         "shots": res.get("shots"), "identical_fraction": res.get("identical_fraction")})


def _task_firing(task: str, res: Mapping[str, Any], limit: float | None) -> Check:
    fld = "criteria.general_max_firing_rate"
    if limit is None:
        return _off(f"{task} firing", fld, "max_rate")
    firing = res.get("firing")
    if not isinstance(firing, Mapping) or firing.get("rate") is None:
        raise GateError(f"policy field {fld}: general task {task!r} has no gate firing record in the report; "
                        "evaluate with a neuraldb that records it, or set the criterion to null")
    rate = float(firing["rate"])
    return Check(f"{task} firing", fld, "max_rate", "fail" if rate > limit else "pass", value=rate, threshold=limit,
                 unit="fires/position", rule="gate fires / gated positions <= maximum",
                 detail={k: firing.get(k) for k in ("fires", "positions", "examples_fired", "examples",
                                                    "unmatched_requests")})


def _general_checks(report: Mapping[str, Any], policy: Policy) -> list[Check]:
    cr = policy.criteria
    tasks = _general_tasks(report)
    if not tasks:
        if cr.general_max_drop is not None or cr.general_max_firing_rate is not None or cr.general_max_drop_per_task:
            raise GateError("the policy checks general tasks (criteria.general_max_drop / general_max_firing_rate) "
                            "but the report has no general-task results; evaluate with general tasks "
                            "(evaluation.general_tasks, --general-tasks), or set both criteria to null")
        return [_off("general tasks", "criteria.general_max_drop")]
    checks = []
    for task, res in tasks.items():
        checks += [_task_drop(task, res, policy), _task_firing(task, res, cr.general_max_firing_rate)]
    return checks


# ----------------------------------------------------------------------------- against a baseline


def _comparable(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> None:
    ma, mb = (baseline.get("model") or {}).get("name"), (report.get("model") or {}).get("name")
    if ma and mb and ma != mb:
        raise GateError(f"the baseline was evaluated on model {ma!r} and the new report on {mb!r}: they are not "
                        "comparable; compare reports of the same base model")
    ka, kb = (baseline.get("dataset") or {}).get("kind"), (report.get("dataset") or {}).get("kind")
    if ka and kb and ka != kb:
        raise GateError(f"the baseline is a {ka} report and the new one a {kb} report; compare the same dataset")


def _edit_regression(report: Mapping[str, Any], baseline: Mapping[str, Any], name: str, policy: Policy) -> Check:
    margin = getattr(policy.require_regression(), f"{name}_max_drop")
    fld = f"regression.{name}_max_drop"
    if margin is None:
        return _off(f"{name} vs baseline", fld, group="regression")
    m_new, m_old = _metric(report, name, fld), _metric(baseline, name, fld + " (baseline)")
    old, new = _case_values(baseline, name, "post"), _case_values(report, name, "post")
    ids = [i for i in new if i in old]
    if not ids:
        raise GateError(f"{fld}: the baseline and the new report share no case with a post-edit {name} value "
                        "(matched by fact id); compare reports of the same facts")
    scale = float(m_new.get("scale", 100))
    a, b = [old[i] for i in ids], [new[i] for i in ids]
    test = _paired(a, b, test=policy.criteria.paired_test, kind=m_new.get("kind", m_old.get("kind", "mean")))
    return _drop(f"{name} vs baseline", fld, scale * (sum(a) - sum(b)) / len(ids), margin, test, policy,
                 unit="points", group="regression",
                 rule=f"post-edit, baseline - new on {len(ids)} shared cases: fails when > margin",
                 detail={"baseline": scale * sum(a) / len(ids), "new": scale * sum(b) / len(ids),
                         "shared_cases": len(ids)})


def _general_regression(task: str, res_new: Mapping[str, Any], res_old: Mapping[str, Any], margin: float,
                        policy: Policy, confidence: float) -> Check:
    fld = "regression.general_max_drop"
    metric, m_new = _general_metric(task, res_new, policy, fld)
    _, m_old = _general_metric(task, res_old, policy, fld + " (baseline)")
    drop, unit, bounded = _orient(metric, m_new, m_old.get("after"), m_new.get("after"))
    if drop is None:
        raise GateError(f"{fld}: general task {task!r} lacks an 'after' value of {metric!r} in one report")
    test = stats.unpaired_test(m_old["after"], m_new["after"], n=(res_old.get("n"), res_new.get("n")),
                               ci=(m_old.get("ci_after"), m_new.get("ci_after")), proportion=bounded,
                               log_scale=metric in _UNBOUNDED, confidence=confidence)
    return _drop(f"{task} vs baseline", fld, drop, margin, test, policy, unit=unit, group="regression",
                 rule=f"{metric} after editing, baseline vs new: fails when worse by > margin",
                 detail={"metric": metric, "baseline": m_old.get("after"), "new": m_new.get("after")})


def _regression_checks(report: Mapping[str, Any], baseline: Mapping[str, Any], policy: Policy) -> list[Check]:
    rg = policy.require_regression()
    checks = [_edit_regression(report, baseline, name, policy)
              for name in ("efficacy", "generalization", "specificity")]
    fld = "regression.general_max_drop"
    if rg.general_max_drop is None:
        return checks + [_off("general vs baseline", fld, group="regression")]
    tasks_new, tasks_old = _general_tasks(report), _general_tasks(baseline)
    checks += [_general_regression(task, tasks_new[task], tasks_old[task], rg.general_max_drop, policy,
                                   report_confidence(report)) for task in tasks_new if task in tasks_old]
    missing = [t for t in tasks_old if t not in tasks_new]
    if missing:
        raise GateError(f"{fld}: the new report lacks the general task(s) {', '.join(missing)} that the baseline has; "
                        "evaluate them too, or set regression.general_max_drop: null")
    return checks


# ----------------------------------------------------------------------------- the decision


def decide(report: Mapping[str, Any], policy: Policy | Mapping[str, Any] | str | os.PathLike, *,
           baseline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Judge an evaluation report (and, with ``baseline``, its regression) against ``policy``.

    Pure: runs nothing. Returns ``{"passed", "exit_code", "failed", "criteria": [...], "data": ...}``;
    raises :class:`GateError` / :class:`~evals.policy.PolicyError` when the report lacks what the policy checks.
    """
    policy = resolve_policy(policy)
    cr = policy.criteria
    checks: list[Check] = []
    if cr.min_cases is not None:
        n = n_cases(report)
        checks.append(Check("cases evaluated", "criteria.min_cases", "min_cases",
                            "pass" if n >= cr.min_cases else "fail", value=float(n), threshold=float(cr.min_cases),
                            unit="cases", rule="number of evaluated cases >= minimum"))
    checks.append(_minimum_check(report, "efficacy", cr.efficacy_min, policy))
    checks.append(_minimum_check(report, "generalization", cr.generalization_min, policy))
    checks.append(_drop_check(report, "specificity", cr.specificity_max_drop, policy))
    checks.extend(_general_checks(report, policy))
    if baseline is not None:
        _comparable(report, baseline)
        checks.extend(_regression_checks(report, baseline, policy))
    failed = [c.name for c in checks if c.status == "fail"]
    return {"passed": not failed, "exit_code": EXIT_FAIL if failed else EXIT_PASS, "failed": failed,
            "confidence": policy.confidence, "alpha": policy.alpha,
            "criteria": [c.to_dict() for c in checks], "data": _plot_data(report, baseline)}


def _plot_data(report: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the plots need, kept in gate.json so they can be redrawn from it."""

    def edit(rep_: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for name in ("efficacy", "generalization", "specificity"):
            m = (rep_.get("metrics") or {}).get(name)
            if m and not m.get("skipped"):
                out[name] = {ph: {"mean": (m.get(ph) or {}).get("mean"), "ci": (m.get(ph) or {}).get("ci")}
                             for ph in ("pre", "post")} | {"unit": m.get("unit", "%")}
        return out

    def general(rep_: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for task, res in _general_tasks(rep_).items():
            firing = res.get("firing") or {}
            out[task] = {k: res.get(k) for k in ("metric", "before", "after", "ci_before", "ci_after", "n")} | {
                "firing_rate": firing.get("rate"), "examples_fired": firing.get("fraction_examples_fired")}
        return out

    groups = {g: {"fire_rate": v.get("fire_rate"), "prompt_fire_rate": (v.get("prompt_fire") or {}).get("mean")}
              for g, v in (rep.firing_section(report).get("groups") or {}).items()}
    data = {"edit": edit(report), "general": general(report), "firing_groups": groups}
    if baseline is not None:
        data["baseline"] = {"edit": edit(baseline), "general": general(baseline)}
    return data
