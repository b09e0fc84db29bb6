"""``neuraldb gate``: decide from an evaluation whether a store may be released.

Example::

    neuraldb gate --release releases/cf-v3 --policy evals/policies/default.yaml     # evaluates, then decides
    neuraldb gate --report reports/gpu/report.json --policy ci.yaml                 # decides from a saved report
    neuraldb gate --baseline old/report.json --report new/report.json --policy ci.yaml   # regression, no re-run

    import neuraldb
    result = neuraldb.gate("evals/policies/default.yaml", release="releases/cf-v3", output_dir="gate")
    result["passed"], result["exit_code"], result["failed"]

Exit codes (``run_gate``; ``neuraldb.gate`` returns the result and raises on errors): 0 every
criterion passed; 1 a criterion failed; 2 a usage or input error (invalid policy field, unreadable
store or report, wrong base model, corrupt release, a report that lacks what the policy checks),
or an evaluation that crashed - exit 1 always means a decision was made and it was "no".

The decision (every criterion is one row of ``result["criteria"]``):

* a minimum (efficacy, generalization) compares the post-edit mean - or an end of its interval,
  ``criteria.minimum_rule`` - with the threshold;
* a drop (specificity pre -> post; each general task before -> after; with a baseline, new vs
  baseline) FAILS only when it is larger than the policy's margin AND significant: the two-sided
  paired test has p < 1 - confidence. The tests: the report's own for edit metrics (exact
  McNemar when every case gives one yes/no outcome, else the paired t-test on per-case values;
  ``criteria.paired_test`` may ask for the paired t or Wilcoxon signed-rank test, recomputed from
  the per-case values), McNemar exact (0/1 metrics) or Wilcoxon signed-rank (perplexity) on
  per-example scores for general tasks. Against a baseline, edit metrics are paired on the cases
  both reports share; general tasks are compared with an unpaired test (Fisher exact, or a z-test
  from the reported intervals) because reports keep aggregates only;
* a firing rate (gate fires / gated positions on each general task's inputs) fails above its
  maximum (a descriptive rate, no test).

Outputs (``output_dir``): ``gate.json`` (the result, with the resolved policy), ``gate.md`` (the
table, the rules, links to the plots), ``gate_metrics.png``, ``gate_general.png``,
``gate_firing.png`` (:mod:`evals.plots`); when the gate ran the evaluation, also ``report.json`` /
``report.md`` and the resumable run under ``runs/<key>/``.

Gate policies (YAML or TOML; ``evals/policies/default.yaml``, ``evals/policies/strict.yaml``).
Schema (version 1). Every criterion must be present; ``null`` (TOML: ``"off"`` or ``false``)
switches it off explicitly. Units: edit metrics in percent (the report's units), drops in
percentage points, firing rates as fractions of gated token positions.

========================================  =========================================================
``version``                               1
``confidence``                            in (0, 1): the level of every test and interval; a drop is
                                          significant when its paired test has p < 1 - confidence
``evaluation.dataset``                    ``store`` (the facts saved in the store, CounterFact style),
                                          ``counterfact``, ``zsre`` or a CounterFact/zsRE file (its
                                          cases whose fact id is in the store)
``evaluation.n``                          evaluate at most this many cases (null: all)
``evaluation.general_tasks``              lm-eval tasks (list, ``all``, or [] for none)
``evaluation.general_limit``              examples per general task (per subject for mmlu; null: all)
``evaluation.split/metrics/batch_size/seed``  optional: ``eval``, efficacy+generalization+specificity,
                                          16, 0
``criteria.efficacy_min``                 post-edit efficacy (%) at least this
``criteria.generalization_min``           post-edit generalization (%) at least this
``criteria.specificity_max_drop``         pre - post specificity (points): fails when larger AND
                                          significant (paired test)
``criteria.general_max_drop``             per general task, before - after of its metric: points of
                                          a 0-1 metric x 100 (acc), or percent relative change for an
                                          unbounded one (perplexity); fails when larger AND significant
``criteria.general_max_firing_rate``      per general task: gate fires / gated positions at most this
``criteria.minimum_rule``                 optional, how a minimum is judged: ``mean`` (default: the
                                          estimate), ``ci_low`` (the interval's lower end must reach
                                          it), ``ci_high`` (fails only when significantly below)
``criteria.paired_test``                  optional, the paired test of per-case values for
                                          specificity and regressions: ``report`` (default: the
                                          report's own, exact McNemar / paired t), ``t``, ``wilcoxon``
``criteria.general_max_drop_per_task``    optional mapping task -> margin (overrides general_max_drop)
``criteria.general_metric``               optional mapping task -> metric (default: the task's first)
``criteria.min_cases``                    optional: fewer evaluated cases is a failure
``regression.*``                          needed with a baseline report: ``efficacy_max_drop``,
                                          ``generalization_max_drop``, ``specificity_max_drop``,
                                          ``general_max_drop`` (new vs baseline, same rule as above)
========================================  =========================================================

A malformed policy is a :class:`PolicyError` (a ``ValueError``) naming the field and the fix.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "Criteria", "Evaluation", "GateError", "Policy", "PolicyError", "Regression", "add_gate_arguments", "decide",
    "gate", "load_policy", "render_markdown", "render_text", "run_gate", "store_cases", "write_gate_report",
]

log = logging.getLogger(__name__)
GATE_SCHEMA = "neuraldb.gate/1"
EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


class GateError(ValueError):
    """The inputs of a gate cannot be decided on (missing data, mismatched report); the message says why."""


# ============================================================================= policy

SCHEMA_VERSION = 1
MINIMUM_RULES = ("mean", "ci_low", "ci_high")
PAIRED_TESTS = ("report", "t", "wilcoxon")
DEFAULT_METRICS = ("efficacy", "generalization", "specificity")
_OFF = object()


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class Evaluation:
    """How ``neuraldb gate`` runs ``neuraldb.evaluate`` when it is not given a report."""

    dataset: str
    n: int | None
    general_tasks: tuple[str, ...]
    general_limit: int | None
    split: str = "eval"
    metrics: tuple[str, ...] = DEFAULT_METRICS
    batch_size: int = 16
    seed: int = 0


@dataclass(frozen=True)
class Criteria:
    efficacy_min: float | None
    generalization_min: float | None
    specificity_max_drop: float | None
    general_max_drop: float | None
    general_max_firing_rate: float | None
    minimum_rule: str = "mean"
    paired_test: str = "report"
    general_max_drop_per_task: Mapping[str, float | None] = field(default_factory=dict)
    general_metric: Mapping[str, str] = field(default_factory=dict)
    min_cases: int | None = None


@dataclass(frozen=True)
class Regression:
    efficacy_max_drop: float | None
    generalization_max_drop: float | None
    specificity_max_drop: float | None
    general_max_drop: float | None


@dataclass(frozen=True)
class Policy:
    confidence: float
    criteria: Criteria
    evaluation: Evaluation | None = None
    regression: Regression | None = None
    source: str = "<dict>"
    sha256: str | None = None
    version: int = SCHEMA_VERSION

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "<dict>", sha256: str | None = None) -> "Policy":
        return _parse(data, source=source, sha256=sha256)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("evaluation", "criteria", "regression"):
            if out[key] is not None:
                out[key] = {k: (list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v))
                            for k, v in out[key].items()}
        return out

    def require_evaluation(self) -> Evaluation:
        if self.evaluation is None:
            raise PolicyError(f"{self.source}: field 'evaluation' is missing but no report was given, so the gate "
                              "must run the evaluation; add e.g. evaluation: {dataset: store, n: 20, general_tasks: "
                              "[sciq], general_limit: 20}, or pass --report report.json")
        return self.evaluation

    def require_regression(self) -> Regression:
        if self.regression is None:
            raise PolicyError(f"{self.source}: field 'regression' is missing but a baseline report was given; add "
                              "regression: {efficacy_max_drop: 5, generalization_max_drop: 5, specificity_max_drop: 5, "
                              "general_max_drop: 5} (null switches one off)")
        return self.regression


def load_policy(path: str | Path | Mapping[str, Any] | Policy) -> Policy:
    """Read a policy from a ``.yaml``/``.yml``/``.toml`` file (or take a mapping / Policy as it is)."""
    if isinstance(path, Policy):
        return path
    if isinstance(path, Mapping):
        return _parse(path, source="<dict>", sha256=None)
    p = Path(path)
    if not p.is_file():
        raise PolicyError(f"no policy file at {str(p)!r}; pass a YAML or TOML policy (see evals/policies/default.yaml)")
    raw = p.read_bytes()
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
        elif suffix in (".yaml", ".yml", ".json"):
            import yaml

            data = yaml.safe_load(raw.decode("utf-8"))
        else:
            raise PolicyError(f"{p}: unknown policy format {suffix!r}; name the file .yaml, .yml or .toml")
    except PolicyError:
        raise
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError
        raise PolicyError(f"{p} is not valid {suffix.lstrip('.').upper()} ({exc}); fix the syntax") from None
    return _parse(data, source=str(p), sha256=hashlib.sha256(raw).hexdigest())


# ----------------------------------------------------------------------------- validation


class _Reader:
    def __init__(self, data: Any, where: str, source: str) -> None:
        if not isinstance(data, Mapping):
            raise PolicyError(f"{source}: {where or 'the policy'} must be a mapping of fields, got "
                              f"{type(data).__name__}")
        self.data, self.where, self.source = data, where, source
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str, fix: str) -> PolicyError:
        return PolicyError(f"{self.source}: field '{self.name(key)}' {problem}; {fix}")

    def get(self, key: str, *, required: bool, example: str, default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise self.fail(key, "is missing", f"add it, e.g. {key}: {example}")
            return default
        value = self.data[key]
        if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
            return _OFF
        return value

    def number(self, key: str, *, required: bool, example: str, low: float | None = None, high: float | None = None,
               default: Any = None, allow_off: bool = True) -> float | None:
        value = self.get(key, required=required, example=example, default=default)
        if value is _OFF:
            if not allow_off:
                raise self.fail(key, "cannot be switched off", f"give a number, e.g. {key}: {example}")
            return None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"must be a number, got {value!r}", f"e.g. {key}: {example} (null switches it off)")
        if (low is not None and value < low) or (high is not None and value > high):
            rng = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise self.fail(key, f"is {value}, outside {rng}", f"use a value in {rng}, e.g. {key}: {example}")
        return float(value)

    def integer(self, key: str, *, required: bool, example: str, low: int = 0, default: Any = None) -> int | None:
        value = self.get(key, required=required, example=example, default=default)
        if value is _OFF or value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(key, f"must be an integer >= {low}, got {value!r}", f"e.g. {key}: {example}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, required=False, example=options[0], default=default)
        if value not in options:
            raise self.fail(key, f"is {value!r}", f"use one of {', '.join(options)}")
        return value

    def strings(self, key: str, *, required: bool, example: str, default: Any = ()) -> tuple[str, ...]:
        value = self.get(key, required=required, example=example, default=default)
        if value is _OFF or value is None:
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of names, got {value!r}", f"e.g. {key}: {example}")
        return tuple(value)

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.get(key, required=False, example="{}", default={})
        if value is _OFF or value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a mapping task -> value, got {value!r}", f"e.g. {key}: {{sciq: 5}}")
        return value

    def finish(self) -> None:
        unknown = [k for k in self.data if k not in self.used]
        if unknown:
            key = str(unknown[0])
            close = difflib.get_close_matches(key, sorted(self.used), n=1)
            hint = (f"did you mean '{self.name(close[0])}'?" if close
                    else f"known fields: {', '.join(sorted(self.used))}")
            raise self.fail(key, "is not a policy field", hint)


def _parse(data: Any, *, source: str, sha256: str | None) -> Policy:
    top = _Reader(data, "", source)
    version = top.get("version", required=True, example="1")
    if version != SCHEMA_VERSION:
        raise top.fail("version", f"is {version!r}", f"this neuraldb reads policy version {SCHEMA_VERSION}: version: 1")
    confidence = top.number("confidence", required=True, example="0.95", allow_off=False)
    if not 0.0 < confidence < 1.0:
        raise top.fail("confidence", f"is {confidence}", "use a level in (0, 1), e.g. confidence: 0.95")

    evaluation = None
    ev_data = top.get("evaluation", required=False, example="{...}")
    if ev_data not in (None, _OFF):
        ev = _Reader(ev_data, "evaluation", source)
        dataset = ev.get("dataset", required=True, example="store")
        if not isinstance(dataset, str) or not dataset.strip():
            raise ev.fail("dataset", f"must be a name or a path, got {dataset!r}",
                          "use store, counterfact, zsre or a file path")
        general_tasks = ev.get("general_tasks", required=True, example="[sciq, arc_challenge]")
        ev.used.discard("general_tasks")
        tasks = () if general_tasks is _OFF else ev.strings("general_tasks", required=True, example="[sciq]")
        metrics = ev.strings("metrics", required=False, example="[efficacy, generalization, specificity]",
                             default=list(DEFAULT_METRICS))
        evaluation = Evaluation(
            dataset=dataset.strip(),
            n=ev.integer("n", required=True, example="20", low=1),
            general_tasks=tasks,
            general_limit=ev.integer("general_limit", required=True, example="20", low=1),
            split=str(ev.get("split", required=False, example="eval", default="eval")),
            metrics=metrics or DEFAULT_METRICS,
            batch_size=ev.integer("batch_size", required=False, example="16", low=1, default=16) or 16,
            seed=ev.integer("seed", required=False, example="0", default=0) or 0,
        )
        ev.finish()

    cr = _Reader(top.get("criteria", required=True, example="{efficacy_min: 80, ...}"), "criteria", source)
    pct = dict(low=0.0, high=100.0)
    per_task = {}
    for task, margin in cr.mapping("general_max_drop_per_task").items():
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0):
            raise cr.fail("general_max_drop_per_task", f"has {task}: {margin!r}",
                          "give each task a margin >= 0 (null: no drop criterion for that task)")
        per_task[str(task)] = None if margin is None else float(margin)
    general_metric = {}
    for task, metric in cr.mapping("general_metric").items():
        if not isinstance(metric, str):
            raise cr.fail("general_metric", f"has {task}: {metric!r}",
                          "map a task to a metric name, e.g. lambada_openai: acc")
        general_metric[str(task)] = metric
    criteria = Criteria(
        efficacy_min=cr.number("efficacy_min", required=True, example="80", **pct),
        generalization_min=cr.number("generalization_min", required=True, example="40", **pct),
        specificity_max_drop=cr.number("specificity_max_drop", required=True, example="10", **pct),
        general_max_drop=cr.number("general_max_drop", required=True, example="5", low=0.0),
        general_max_firing_rate=cr.number("general_max_firing_rate", required=True, example="0.05", low=0.0, high=1.0),
        minimum_rule=cr.choice("minimum_rule", MINIMUM_RULES, "mean"),
        paired_test=cr.choice("paired_test", PAIRED_TESTS, "report"),
        general_max_drop_per_task=per_task,
        general_metric=general_metric,
        min_cases=cr.integer("min_cases", required=False, example="10", low=1),
    )
    cr.finish()

    regression = None
    rg_data = top.get("regression", required=False, example="{...}")
    if rg_data not in (None, _OFF):
        rg = _Reader(rg_data, "regression", source)
        regression = Regression(
            efficacy_max_drop=rg.number("efficacy_max_drop", required=True, example="5", **pct),
            generalization_max_drop=rg.number("generalization_max_drop", required=True, example="5", **pct),
            specificity_max_drop=rg.number("specificity_max_drop", required=True, example="5", **pct),
            general_max_drop=rg.number("general_max_drop", required=True, example="5", low=0.0),
        )
        rg.finish()
    top.finish()
    return Policy(confidence=confidence, criteria=criteria, evaluation=evaluation, regression=regression,
                  source=source, sha256=sha256)


def _packaged_policy(name: str) -> Path | None:
    """``default`` -> the packaged ``evals/policies/default.yaml`` (any packaged policy by stem)."""
    folder = Path(str(resources.files("evals").joinpath("policies")))
    for suffix in (".yaml", ".yml", ".toml"):
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return None


def resolve_policy(policy: str | os.PathLike | Mapping[str, Any] | Policy) -> Policy:
    """A Policy from a file, a packaged policy name (``default``, ``strict``), a mapping or a Policy."""
    if isinstance(policy, (str, os.PathLike)) and not Path(policy).exists():
        packaged = _packaged_policy(os.fspath(policy))
        if packaged is not None:
            return load_policy(packaged)
    return load_policy(policy)


# ============================================================================= statistics

_TEST_NAMES = {"mcnemar_exact": "McNemar exact", "wilcoxon": "Wilcoxon signed-rank", "paired t-test": "paired t-test"}
_UNBOUNDED = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
_LOWER_IS_BETTER = _UNBOUNDED


def _test_name(name: str | None) -> str | None:
    if not name:
        return None
    if name.startswith("exact McNemar"):
        return "McNemar exact"
    return _TEST_NAMES.get(name, name)


def _paired(pre: Sequence[float], post: Sequence[float], *, test: str, kind: str) -> dict[str, Any]:
    """Two-sided paired test of post vs pre on per-case values: ``test`` report (by ``kind``), t or wilcoxon."""
    from evals import report as rep

    if test == "wilcoxon":
        from scipy import stats

        diffs = [b - a for a, b in zip(pre, post)]
        nonzero = sum(1 for d in diffs if d != 0)
        if nonzero == 0:
            return {"name": "Wilcoxon signed-rank", "n": len(diffs), "p_value": 1.0, "note": "no case changed"}
        res = stats.wilcoxon(pre, post, zero_method="wilcox")
        return {"name": "Wilcoxon signed-rank", "n": len(diffs), "statistic": float(res.statistic),
                "p_value": float(res.pvalue)}
    out = rep.paired_test(list(pre), list(post), kind="mean" if test == "t" else kind)
    out["name"] = _test_name(out["name"])
    return out


def _significant(p: float | None, alpha: float) -> bool:
    return p is not None and p < alpha


# ============================================================================= reading reports


def _read_report(source: Any, what: str) -> tuple[dict[str, Any], str | None]:
    from evals import report as rep

    if isinstance(source, Mapping):
        data, path = dict(source), None
    else:
        path = str(source)
        try:
            data = rep.load_report(source)
        except FileNotFoundError as exc:
            raise GateError(f"{what}: {exc}") from None
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise GateError(f"{what}: {exc}") from None
    schema = str(data.get("schema", ""))
    if schema and not schema.startswith("neuraldb.evaluate"):
        raise GateError(f"{what} {path or ''} has schema {schema!r}, not an evaluation report (neuraldb.evaluate/1); "
                        "pass the report.json that neuraldb evaluate wrote")
    if not isinstance(data.get("metrics"), Mapping):
        raise GateError(f"{what} {path or ''} has no 'metrics' mapping: it is not a neuraldb evaluation report")
    return data, path


def _report_confidence(report: Mapping[str, Any]) -> float:
    return float(((report.get("config") or {}).get("evaluate") or {}).get("confidence") or 0.95)


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


# ============================================================================= criteria


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
    test: str | None = None
    p_value: float | None = None
    significant: bool | None = None
    rule: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    group: str = "absolute"  # absolute | regression

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _minimum_check(report: Mapping[str, Any], name: str, threshold: float | None, policy: Policy) -> Check:
    fld = f"criteria.{name}_min"
    if threshold is None:
        return Check(name, fld, "minimum", "off", rule="switched off by the policy")
    m = _metric(report, name, fld)
    post = dict(m.get("post") or {})
    rule = policy.criteria.minimum_rule
    note = ""
    if rule != "mean" and abs(_report_confidence(report) - policy.confidence) > 1e-9:
        from evals import report as rep

        vals = list(_case_values(report, name, "post").values())
        if vals:
            post = rep.summarize_metric(vals, vals, kind=m.get("kind", "mean"), confidence=policy.confidence,
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
    passed = value >= threshold
    words = {"mean": "post-edit mean", "ci_low": "lower end of the post-edit interval",
             "ci_high": "upper end of the post-edit interval"}[rule]
    return Check(name, fld, "minimum", "pass" if passed else "fail", value=value, threshold=threshold,
                 unit=m.get("unit", "%"), rule=f"{words} >= threshold",
                 detail={"mean": mean, "ci": ci, "n": post.get("n"), "interval": m.get("interval"), "note": note})


def _drop_check(report: Mapping[str, Any], name: str, margin: float | None, policy: Policy) -> Check:
    fld = f"criteria.{name}_max_drop"
    if margin is None:
        return Check(f"{name} drop", fld, "max_drop", "off", rule="switched off by the policy")
    m = _metric(report, name, fld)
    pre, post = (m.get("pre") or {}).get("mean"), (m.get("post") or {}).get("mean")
    if pre is None or post is None:
        raise GateError(f"policy field {fld}: the report has no pre/post value of {name!r}")
    drop = pre - post
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
    p = test.get("p_value")
    sig = _significant(p, policy.alpha)
    failed = drop > margin and sig
    return Check(f"{name} drop", fld, "max_drop", "fail" if failed else "pass", value=drop, threshold=margin,
                 unit="points", test=_test_name(test.get("name")), p_value=p, significant=sig,
                 rule=f"fails when pre - post > margin and p < {policy.alpha:.3g}",
                 detail={"pre": pre, "post": post, "test_source": source, "n": test.get("n"),
                         "test": {k: v for k, v in test.items() if k != "name"}})


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


def _general_checks(report: Mapping[str, Any], policy: Policy) -> list[Check]:
    cr = policy.criteria
    wanted = cr.general_max_drop is not None or cr.general_max_firing_rate is not None or cr.general_max_drop_per_task
    general = report.get("general") or {}
    tasks = general.get("tasks") if isinstance(general, Mapping) else None
    if not tasks:
        if wanted:
            raise GateError("the policy checks general tasks (criteria.general_max_drop / general_max_firing_rate) "
                            "but the report has no general-task results; evaluate with general tasks "
                            "(evaluation.general_tasks, --general-tasks), or set both criteria to null")
        return [Check("general tasks", "criteria.general_max_drop", "max_drop", "off",
                      rule="switched off by the policy")]
    checks = []
    for task, res in tasks.items():
        fld = (f"criteria.general_max_drop_per_task.{task}" if task in cr.general_max_drop_per_task
               else "criteria.general_max_drop")
        margin = cr.general_max_drop_per_task.get(task, cr.general_max_drop)
        if margin is None:
            checks.append(Check(f"{task} drop", fld, "max_drop", "off", rule="switched off by the policy"))
        else:
            metric, m = _general_metric(task, res, policy, fld)
            drop, unit, bounded = _orient(metric, m, m.get("before"), m.get("after"))
            if drop is None:
                raise GateError(f"policy field {fld}: general task {task!r} has no before/after value of {metric!r}")
            test = m.get("test") or {}
            p = test.get("p_value")
            sig = _significant(p, policy.alpha)
            checks.append(Check(
                f"{task} drop", fld, "max_drop", "fail" if (drop > margin and sig) else "pass", value=drop,
                threshold=margin, unit=unit, test=_test_name(test.get("name")), p_value=p, significant=sig,
                rule=f"{metric}: fails when the drop > margin and p < {policy.alpha:.3g}",
                detail={"metric": metric, "before": m.get("before"), "after": m.get("after"), "n": res.get("n"),
                        "shots": res.get("shots"), "identical_fraction": res.get("identical_fraction"),
                        "test": {k: v for k, v in test.items() if k != "name"}}))
        limit = cr.general_max_firing_rate
        fld = "criteria.general_max_firing_rate"
        if limit is None:
            checks.append(Check(f"{task} firing", fld, "max_rate", "off", rule="switched off by the policy"))
            continue
        firing = res.get("firing")
        if not isinstance(firing, Mapping) or firing.get("rate") is None:
            raise GateError(f"policy field {fld}: general task {task!r} has no gate firing record in the report; "
                            "evaluate with a neuraldb that records it, or set the criterion to null")
        rate = float(firing["rate"])
        checks.append(Check(
            f"{task} firing", fld, "max_rate", "fail" if rate > limit else "pass", value=rate, threshold=limit,
            unit="fires/position", rule="gate fires / gated positions <= maximum",
            detail={"fires": firing.get("fires"), "positions": firing.get("positions"),
                    "examples_fired": firing.get("examples_fired"), "examples": firing.get("examples"),
                    "unmatched_requests": firing.get("unmatched_requests")}))
    return checks


def _n_cases(report: Mapping[str, Any]) -> int:
    n = (report.get("dataset") or {}).get("n_cases")
    return int(n) if n is not None else len(report.get("cases") or [])


def _regression_checks(report: Mapping[str, Any], baseline: Mapping[str, Any], policy: Policy) -> list[Check]:
    rg = policy.require_regression()
    checks = []
    for name in ("efficacy", "generalization", "specificity"):
        margin = getattr(rg, f"{name}_max_drop")
        fld = f"regression.{name}_max_drop"
        if margin is None:
            checks.append(Check(f"{name} vs baseline", fld, "max_drop", "off", rule="switched off by the policy",
                                group="regression"))
            continue
        m_new, m_old = _metric(report, name, fld), _metric(baseline, name, fld + " (baseline)")
        old, new = _case_values(baseline, name, "post"), _case_values(report, name, "post")
        ids = [i for i in new if i in old]
        if not ids:
            raise GateError(f"{fld}: the baseline and the new report share no case with a post-edit {name} value "
                            "(matched by fact id); compare reports of the same facts")
        scale = float(m_new.get("scale", 100))
        a, b = [old[i] for i in ids], [new[i] for i in ids]
        drop = scale * (sum(a) - sum(b)) / len(ids)
        test = _paired(a, b, test=policy.criteria.paired_test, kind=m_new.get("kind", m_old.get("kind", "mean")))
        p = test.get("p_value")
        sig = _significant(p, policy.alpha)
        checks.append(Check(
            f"{name} vs baseline", fld, "max_drop", "fail" if (drop > margin and sig) else "pass", value=drop,
            threshold=margin, unit="points", test=test.get("name"), p_value=p, significant=sig, group="regression",
            rule=f"post-edit, baseline - new on {len(ids)} shared cases: fails when > margin and "
                 f"p < {policy.alpha:.3g}",
            detail={"baseline": scale * sum(a) / len(ids), "new": scale * sum(b) / len(ids), "shared_cases": len(ids),
                    "test": {k: v for k, v in test.items() if k != "name"}}))
    tasks_new = ((report.get("general") or {}).get("tasks") or {})
    tasks_old = ((baseline.get("general") or {}).get("tasks") or {})
    fld = "regression.general_max_drop"
    if rg.general_max_drop is None:
        checks.append(Check("general vs baseline", fld, "max_drop", "off", rule="switched off by the policy",
                            group="regression"))
        return checks
    for task in [t for t in tasks_new if t in tasks_old]:
        metric, m_new = _general_metric(task, tasks_new[task], policy, fld)
        _, m_old = _general_metric(task, tasks_old[task], policy, fld + " (baseline)")
        drop, unit, bounded = _orient(metric, m_new, m_old.get("after"), m_new.get("after"))
        if drop is None:
            raise GateError(f"{fld}: general task {task!r} lacks an 'after' value of {metric!r} in one report")
        test = _unpaired(m_old, m_new, tasks_old[task].get("n"), tasks_new[task].get("n"), metric=metric,
                         bounded=bounded, confidence=_report_confidence(report))
        p = test.get("p_value")
        sig = _significant(p, policy.alpha)
        checks.append(Check(
            f"{task} vs baseline", fld, "max_drop", "fail" if (drop > rg.general_max_drop and sig) else "pass",
            value=drop, threshold=rg.general_max_drop, unit=unit, test=test.get("name"), p_value=p, significant=sig,
            group="regression", rule=f"{metric} after editing, baseline vs new: fails when worse by > margin and "
                                     f"p < {policy.alpha:.3g}",
            detail={"metric": metric, "baseline": m_old.get("after"), "new": m_new.get("after"),
                    "test": {k: v for k, v in test.items() if k != "name"}}))
    missing = [t for t in tasks_old if t not in tasks_new]
    if missing:
        raise GateError(f"{fld}: the new report lacks the general task(s) {', '.join(missing)} that the baseline has; "
                        "evaluate them too, or set regression.general_max_drop: null")
    return checks


def _unpaired(old: Mapping[str, Any], new: Mapping[str, Any], n_old: Any, n_new: Any, *, metric: str, bounded: bool,
              confidence: float) -> dict[str, Any]:
    """Baseline vs new aggregate of one general task, without per-example scores (reports keep none)."""
    from scipy import stats

    a, b = old.get("after"), new.get("after")
    if bounded and isinstance(n_old, int) and isinstance(n_new, int) and n_old and n_new:
        sa, sb = round(a * n_old), round(b * n_new)
        res = stats.fisher_exact([[sa, n_old - sa], [sb, n_new - sb]])
        return {"name": "Fisher exact (unpaired)", "p_value": float(res.pvalue), "n": [n_old, n_new]}
    ca, cb = old.get("ci_after"), new.get("ci_after")
    if not (ca and cb) or None in (*ca, *cb) or min(*ca, *cb) <= 0 and metric in _UNBOUNDED:
        return {"name": "none (no intervals in the reports)", "p_value": None}
    tf = (lambda x: math.log(x)) if metric in _UNBOUNDED else (lambda x: x)  # perplexity: log scale
    z = stats.norm.ppf(0.5 + confidence / 2)
    se_a, se_b = (tf(ca[1]) - tf(ca[0])) / (2 * z), (tf(cb[1]) - tf(cb[0])) / (2 * z)
    se = math.hypot(se_a, se_b)
    if se == 0:
        return {"name": "z-test from the intervals (unpaired)", "p_value": 1.0 if a == b else 0.0}
    stat = (tf(b) - tf(a)) / se
    return {"name": "z-test from the intervals (unpaired)", "statistic": stat,
            "p_value": float(2 * stats.norm.sf(abs(stat)))}


def _comparable(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> None:
    ma, mb = (baseline.get("model") or {}).get("name"), (report.get("model") or {}).get("name")
    if ma and mb and ma != mb:
        raise GateError(f"the baseline was evaluated on model {ma!r} and the new report on {mb!r}: they are not "
                        "comparable; compare reports of the same base model")
    ka, kb = (baseline.get("dataset") or {}).get("kind"), (report.get("dataset") or {}).get("kind")
    if ka and kb and ka != kb:
        raise GateError(f"the baseline is a {ka} report and the new one a {kb} report; compare the same dataset")


def decide(report: Mapping[str, Any], policy: Policy | Mapping[str, Any] | str | os.PathLike, *,
           baseline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Judge an evaluation report (and, with ``baseline``, its regression) against ``policy``.

    Pure: runs nothing. Returns ``{"passed", "exit_code", "failed", "criteria": [...], "data": ...}``;
    raises :class:`GateError` / :class:`PolicyError` when the report lacks what the policy checks.
    """
    policy = resolve_policy(policy)
    cr = policy.criteria
    checks: list[Check] = []
    if cr.min_cases is not None:
        n = _n_cases(report)
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
        for task, res in (((rep_.get("general") or {}).get("tasks")) or {}).items():
            firing = res.get("firing") or {}
            out[task] = {k: res.get(k) for k in ("metric", "before", "after", "ci_before", "ci_after", "n")} | {
                "firing_rate": firing.get("rate"), "examples_fired": firing.get("fraction_examples_fired")}
        return out

    groups = {g: {"fire_rate": v.get("fire_rate"), "prompt_fire_rate": (v.get("prompt_fire") or {}).get("mean")}
              for g, v in (((report.get("gate") or {}).get("groups")) or {}).items()}
    data = {"edit": edit(report), "general": general(report), "gate_groups": groups}
    if baseline is not None:
        data["baseline"] = {"edit": edit(baseline), "general": general(baseline)}
    return data


# ============================================================================= running


def store_cases(db: Any) -> list[Any]:
    """CounterFact-style evaluation cases built from the facts saved in the store (``dataset: store``).

    Each stored fact needs ``target_true`` (efficacy compares it with ``target_new``); its
    paraphrases and neighbourhood prompts give generalization and specificity.
    """
    from neuraldb.facts import Fact

    from evals.datasets import EvalCase

    known = set(Fact.__dataclass_fields__)
    cases = []
    for index, fid in enumerate(db.ids):
        rec = db.facts.get(fid)
        if not rec:
            raise GateError(f"evaluation.dataset: store needs the facts saved in the store, but fact {fid!r} has no "
                            "saved prompt (stores written by neuraldb.edit keep them); set evaluation.dataset to "
                            "the dataset the facts came from (counterfact, zsre or a file)")
        fact = Fact.from_dict({k: v for k, v in rec.items() if k in known} | {"id": fid})
        if not fact.target_true:
            raise GateError(f"evaluation.dataset: store evaluates CounterFact-style facts, but fact {fid!r} has no "
                            "target_true; set evaluation.dataset to the dataset it came from (e.g. zsre)")
        cases.append(EvalCase(case_id=index, kind="counterfact", fact=fact))
    if not cases:
        raise GateError("the store is empty: there is nothing to evaluate")
    return cases


def _load_store(db: Any, model: Any, gamma: float | None) -> Any:
    from neuraldb.store import NeuralDB

    if isinstance(db, (str, os.PathLike)):
        db = NeuralDB.load(db, model=model)
    elif model is not None:
        db.check_compatible(model)
    if gamma is not None:
        _check_gamma(gamma)
        db.gamma = float(gamma)
    return db


def _check_gamma(gamma: Any) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not -1.0 <= gamma <= 1.0:
        raise GateError(f"gamma={gamma!r} is not a cosine threshold; use a value in [-1, 1] (--gamma)")


def _load_base(model: Any, db: Any, device: Any, dtype: Any) -> tuple[Any, Any]:
    """(model, tokenizer or None): ``model`` as given, loaded by name, or the store's own model name."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model, None
    from neuraldb.models import load_model
    from neuraldb.store import NeuralDB

    name = model
    if name is None:
        meta = NeuralDB.load(db) if isinstance(db, (str, os.PathLike)) else db
        name = meta.model_name
        if not name:
            raise GateError("the store does not record its base model; pass the model (--model)")
    try:
        return load_model(name, device=device, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise GateError(f"could not load the base model {str(name)!r}: {exc}") from None


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str | None:
    """``data_dir``, else ``$NEURALDB_DATA_DIR``, else the project's ``../shared/data`` (tox's default) if present."""
    if data_dir is not None:
        return os.fspath(data_dir)
    if os.environ.get("NEURALDB_DATA_DIR"):
        return os.environ["NEURALDB_DATA_DIR"]
    guess = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return str(guess) if guess.is_dir() else None


def _run_key(db: Any, model: Any, ev: Evaluation, confidence: float) -> str:
    from evals.evaluate import store_digest
    from neuraldb.store import model_name

    ident = {"store": store_digest(db), "model": model_name(model), "evaluation": asdict(ev), "confidence": confidence}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=list).encode()).hexdigest()[:12]


def gate(
    policy: str | os.PathLike | Mapping[str, Any] | Policy = "default",
    *,
    report: Mapping[str, Any] | str | os.PathLike | None = None,
    baseline: Mapping[str, Any] | str | os.PathLike | None = None,
    release: str | os.PathLike | None = None,
    db: Any = None,
    model: Any = None,
    tokenizer: Any = None,
    gamma: float | None = None,
    output_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    device: Any = None,
    dtype: Any = None,
    progress: bool = False,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate (or read an evaluation of) a store and judge it against ``policy``; the result dict.

    Sources, one of: ``report`` (a report.json or its dict: nothing is run; with ``release`` or
    ``db`` it must be a report of that store), ``release`` (a folder from
    :func:`neuraldb.save_release`: verified, loaded and evaluated), ``db`` (a NeuralDB or a store
    file) with ``model`` (a model, or a name for :func:`neuraldb.load_model`; default the store's
    model name). ``baseline``: an older report; adds the regression criteria (new vs baseline).
    ``gamma`` overrides the store's / release's global gate threshold (per-key thresholds from
    ``NeuralDB.calibrate`` still apply). ``policy``: a YAML/TOML file, a
    packaged policy name (``default``, ``strict``), a mapping or a :class:`Policy`.

    The evaluation uses the policy's ``evaluation`` settings (via :func:`neuraldb.evaluate`, with
    ``data_dir`` / ``$NEURALDB_DATA_DIR`` / the project's ``../shared/data`` for data and the
    general tasks; without any of them lm-eval reads the hub). ``output_dir`` receives gate.json,
    gate.md and the plots (and report.json / report.md of an evaluation run here).

    Returns ``result`` with ``passed``, ``exit_code`` (0 pass, 1 fail), ``failed`` (criterion
    names) and ``criteria`` (one row per criterion). Input errors raise :class:`GateError`,
    :class:`PolicyError`, :class:`neuraldb.StoreError` (and its ReleaseError) - all ``ValueError``.
    """
    pol = resolve_policy(policy)
    if gamma is not None:
        _check_gamma(gamma)
    if release is not None and db is not None:
        raise GateError("give either a release or a store (db), not both")
    sources: dict[str, Any] = {"report": None, "baseline": None, "release": None, "store": None, "model": None,
                               "gamma_override": gamma}
    store_summary: dict[str, Any] | None = None
    manifest = None
    if release is not None:
        from evals.release import verify_release

        manifest = verify_release(release)  # checksums before anything is loaded
        sources["release"] = os.fspath(release)
        sources["model"] = manifest["base_model"]
    if isinstance(db, (str, os.PathLike)):
        sources["store"] = os.fspath(db)
    baseline_data = None
    if baseline is not None:  # read before any long run, so a bad baseline fails fast
        pol.require_regression()
        baseline_data, sources["baseline"] = _read_report(baseline, "baseline report")

    if report is not None:
        mode = "report"
        report_data, sources["report"] = _read_report(report, "report")
        if release is not None or db is not None:
            model_obj = None if model is None or isinstance(model, (str, os.PathLike)) else model
            if release is not None:
                from evals.release import load_store

                store = load_store(release, model=model_obj, gamma=gamma, manifest=manifest)
            else:
                store = _load_store(db, model_obj, gamma)
            _check_report_is_of(report_data, store, sources["report"])
            store_summary = _store_summary(store)
    else:
        mode = "evaluate"
        ev = pol.require_evaluation()
        if release is not None:
            from evals.release import load_release

            given = None
            if model is not None:
                given, tok0 = _load_base(model, None, device, dtype)
                tokenizer = tokenizer if tokenizer is not None else tok0
            model_obj, tokenizer, store = load_release(release, gamma=gamma, model=given, tokenizer=tokenizer,
                                                       device=device, dtype=dtype, attach=False)
        elif db is not None:
            model_obj, tok0 = _load_base(model, db, device, dtype)
            tokenizer = tokenizer if tokenizer is not None else tok0
            store = _load_store(db, model_obj, gamma)
        else:
            raise GateError("nothing to judge: give a report (--report), a release (--release) or a store (--store)")
        from neuraldb.store import model_name

        sources["model"] = model_name(model_obj)
        sources["data_dir"] = data_dir = default_data_dir(data_dir)
        store_summary = _store_summary(store)
        report_data = _evaluate(model_obj, tokenizer, store, ev, pol, output_dir=output_dir, data_dir=data_dir,
                                progress=progress)
    if baseline_data is not None:
        mode = "compare"
    result = decide(report_data, pol, baseline=baseline_data)
    result = {
        "schema": GATE_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "passed": result["passed"],
        "exit_code": result["exit_code"],
        "failed": result["failed"],
        "mode": mode,
        "policy": {"path": pol.source, "sha256": pol.sha256, "resolved": pol.to_dict()},
        "sources": sources,
        "evaluated": _evaluated_summary(report_data),
        "store": store_summary or report_data.get("store"),
        **{k: v for k, v in result.items() if k not in ("passed", "exit_code", "failed")},
    }
    from evals import report as rep

    result = rep.clean_json(result)
    if output_dir is not None:
        write_gate_report(result, output_dir, plots=plots)
    return result


def _store_summary(db: Any) -> dict[str, Any]:
    from evals.evaluate import store_digest

    return {"facts": len(db), "layer": db.layer, "gamma": db.gamma, "model_name": db.model_name,
            "fingerprint": db.fingerprint, "digest": store_digest(db)}


def _evaluated_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    ds, model = report.get("dataset") or {}, report.get("model") or {}
    general = (report.get("general") or {}).get("config") or {}
    return {"dataset": ds.get("name"), "kind": ds.get("kind"), "n_cases": _n_cases(report), "model": model.get("name"),
            "general_tasks": general.get("tasks"), "general_limit": general.get("limit"),
            "report_created": report.get("created"), "report_confidence": _report_confidence(report)}


def _check_report_is_of(report: Mapping[str, Any], db: Any, path: str | None) -> None:
    from evals.evaluate import store_digest

    rs = report.get("store") or {}
    digest = store_digest(db)
    if rs.get("digest") and rs["digest"] != digest:
        diff = [k for k, v in (("gamma", db.gamma), ("facts", len(db)), ("layer", db.layer)) if rs.get(k) != v]
        raise GateError(f"the report {path or ''} was made with another store (digest {rs['digest']} vs {digest}"
                        f"{'; differs in ' + ', '.join(diff) if diff else ''}); evaluate this store (drop --report) or "
                        "pass the report of this store")


def _evaluate(model: Any, tok: Any, db: Any, ev: Evaluation, pol: Policy, *, output_dir: Any, data_dir: Any,
              progress: bool) -> dict[str, Any]:
    from evals import evaluate as evaluation
    from evals import report as rep

    dataset: Any = store_cases(db) if ev.dataset.lower() == "store" else ev.dataset
    run_dir = Path(output_dir) / "runs" / _run_key(db, model, ev, pol.confidence) if output_dir is not None else None
    report = evaluation.evaluate(
        model, db, tokenizer=tok, dataset=dataset, limit=ev.n, metrics=list(ev.metrics), batch_size=ev.batch_size,
        output_dir=run_dir, data_dir=data_dir, general_tasks=list(ev.general_tasks) or None,
        general_limit=ev.general_limit, seed=ev.seed, confidence=pol.confidence, progress=progress, split=ev.split)
    if output_dir is not None:
        rep.write_report(rep.clean_json(report), output_dir)
    return report


# ============================================================================= rendering


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if unit == "fires/position":
        return f"{100 * x:.2f}%"
    if unit == "cases":
        return f"{x:.0f}"
    return f"{x:.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _rows(result: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for c in result["criteria"]:
        if c["status"] == "off":
            rows.append([c["name"], "-", "off", "-", "-", "OFF"])
            continue
        op = {"minimum": ">=", "max_drop": "<=", "max_rate": "<=", "min_cases": ">="}[c["kind"]]
        unit = {"points": " pts", "% relative": "% rel", "%": "%", "fires/position": "", "cases": ""}.get(c["unit"], "")
        value = _fmt(c["value"], c["unit"]) + unit
        limit = f"{op} {_fmt(c['threshold'], c['unit'])}{unit}"
        if c["kind"] == "max_drop":
            limit += " unless n.s."
        test = "-" if not c.get("test") else c["test"]
        p = "-" if c.get("p_value") is None and not c.get("test") else _p(c.get("p_value")) + (
            " *" if c.get("significant") else "")
        rows.append([c["name"], value, limit, test, p, c["status"].upper()])
    return rows


_HEADER = ["criterion", "value", "threshold", "test", "p", "result"]


def render_text(result: Mapping[str, Any]) -> str:
    """The decision as an aligned plain-text table with a verdict line."""
    rows = _rows(result)
    widths = [max(len(str(r[i])) for r in [_HEADER, *rows]) for i in range(len(_HEADER))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    ev = result.get("evaluated") or {}
    lines = [f"neuraldb gate ({result.get('mode')}): policy {(result.get('policy') or {}).get('path')}, "
             f"confidence {result.get('confidence')}; {ev.get('n_cases')} cases of {ev.get('dataset')}, "
             f"model {ev.get('model')}, gamma {(result.get('store') or {}).get('gamma')}",
             fmt.format(*_HEADER), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    lines.append(f"* significant at p < {result.get('alpha', 0.05):.3g}. A drop fails only when it exceeds its "
                 "margin AND is significant.")
    lines.append("PASSED (exit 0)" if result["passed"] else f"FAILED (exit 1): {', '.join(result['failed'])}")
    return "\n".join(lines)


def render_markdown(result: Mapping[str, Any], images: Mapping[str, str] | None = None) -> str:
    """gate.md: verdict, criteria table, rules and tests, sources, plots."""
    verdict = "PASSED" if result["passed"] else "FAILED"
    pol = result.get("policy") or {}
    ev = result.get("evaluated") or {}
    store = result.get("store") or {}
    lines = [f"# NeuralDB release gate: {verdict}", ""]
    if not result["passed"]:
        lines += [f"Failed: {', '.join(result['failed'])}.", ""]
    lines += [
        f"- policy: `{pol.get('path')}` (sha256 {str(pol.get('sha256'))[:16]}), confidence {result.get('confidence')} "
        f"(alpha {result.get('alpha', 0.05):.3g})",
        f"- mode: {result.get('mode')}; evaluated: {ev.get('n_cases')} cases of {ev.get('dataset')} ({ev.get('kind')}) "
        f"on model {ev.get('model')}; general tasks {ev.get('general_tasks')} (limit {ev.get('general_limit')})",
        f"- store: {store.get('facts')} facts, layer {store.get('layer')}, gamma {store.get('gamma')}, "
        f"fingerprint {store.get('fingerprint')}, digest {store.get('digest')}",
    ]
    src = {k: v for k, v in (result.get("sources") or {}).items() if v is not None}
    if src:
        lines.append("- sources: " + ", ".join(f"{k} `{v}`" for k, v in src.items()))
    lines += ["", "## Criteria", "", "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(result)]
    lines += ["", f"`*`: significant at p < {result.get('alpha', 0.05):.3g}. Rules:", ""]
    lines += [
        "- minimum (efficacy, generalization): the post-edit value (policy `criteria.minimum_rule`: the mean, or an "
        "end of its interval) must reach the threshold (percent).",
        "- drop (specificity pre -> post, each general task before -> after, and new vs baseline): fails only when "
        "the drop is larger than the margin AND the two-sided test is significant. Edit metrics: the report's paired "
        "test on per-case values (exact McNemar when each case gives one yes/no outcome, else the paired t-test; "
        "Wilcoxon signed-rank or t when the policy asks, recomputed from the per-case values). General tasks: "
        "McNemar exact on per-example 0/1 scores, Wilcoxon signed-rank on per-example log-likelihoods (perplexity). "
        "Against a baseline: edit metrics paired on the shared cases; general tasks unpaired (Fisher exact, or a "
        "z-test from the reported intervals). Drops are in points (x100 for a 0-1 metric) or, for perplexity, in "
        "percent relative change.",
        "- firing: gate fires / gated positions (padding and each sequence's first token excluded) on each general "
        "task's inputs must not exceed the maximum.",
    ]
    notes = [(c["name"], c["detail"].get("note")) for c in result["criteria"] if (c.get("detail") or {}).get("note")]
    lines += [f"- note on {n}: {t}" for n, t in notes]
    if images:
        lines += ["", "## Plots", ""]
        titles = {"metrics": "Edit metrics before/after with confidence intervals",
                  "general": "General tasks before/after with confidence intervals",
                  "firing": "Gate firing rate per task"}
        for key, name in images.items():
            lines += [f"### {titles.get(key, key)}", "", f"![{titles.get(key, key)}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_gate_report(result: dict[str, Any], output_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write gate.json, gate.md and (``plots``) the PNGs into ``output_dir``; return their paths."""
    from evals import report as rep

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    if plots:
        from evals.plots import gate_plots

        try:
            images = gate_plots(result, out)
        except Exception as exc:  # a plot must never hide the decision
            log.warning("could not draw the gate plots: %s", exc)
            result.setdefault("warnings", []).append(f"plots not drawn: {exc}")
    result["plots"] = images
    paths = {"json": rep.write_json(result, out / "gate.json"), "markdown": out / "gate.md"}
    _write_text(paths["markdown"], render_markdown(result, images))
    paths.update({k: out / v for k, v in images.items()})
    return paths


# ============================================================================= command line


def add_gate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Decide whether a store may be released: evaluate it (or read a report) and judge it against a "
                     "policy. Exit 0 pass, 1 a failed criterion, 2 a usage or input error.")
    p.add_argument("--policy", default="default",
                   help="gate policy file (.yaml/.toml) or a packaged policy name: default, strict (default: default)")
    src = p.add_argument_group("what to judge (one of --report, --release, --store)")
    src.add_argument("--report", help="a saved report.json (or its folder): decide from it, run nothing")
    src.add_argument("--baseline", help="an older report.json: also check the regression of --report (or of the "
                                        "fresh evaluation) against it")
    src.add_argument("--release", help="a release folder (neuraldb.save_release): verified, then evaluated")
    src.add_argument("--store", help="a store file (.safetensors) to evaluate")
    src.add_argument("--model", default=None, help="base model (alias or folder); default: the release's / store's")
    src.add_argument("--gamma", type=float, default=None, help="override the store's gate threshold")
    p.add_argument("--output-dir", default=None,
                   help="where gate.json, gate.md and the plots go "
                        "(default: the --report's folder, else ./gate-report)")
    p.add_argument("--data-dir", default=None, help="data folder for the general tasks (default $NEURALDB_DATA_DIR)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, ...")
    p.add_argument("--save-release", metavar="DIR", default=None,
                   help="when the gate passes, write the store (--store / --release) as a release into DIR with "
                        "gate.json and the evaluation report (never over a non-empty DIR)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


_INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError, ModuleNotFoundError,
                 UnicodeDecodeError)


def run_gate(args: argparse.Namespace) -> int:
    """``neuraldb gate``: 0 pass, 1 a failed criterion, 2 a usage or input error (message on stderr)."""
    if args.report is None and args.release is None and args.store is None:
        print("neuraldb gate: error: nothing to judge: give --report REPORT, --release DIR or --store FILE",
              file=sys.stderr)
        return EXIT_ERROR
    output_dir = args.output_dir
    if output_dir is None:
        output_dir = (Path(args.report) if Path(args.report).is_dir() else Path(args.report).parent) \
            if args.report else Path("gate-report")
    try:
        result = gate(args.policy, report=args.report, baseline=args.baseline, release=args.release, db=args.store,
                      model=args.model, gamma=args.gamma, output_dir=output_dir, data_dir=args.data_dir,
                      device=args.device, dtype=args.dtype, progress=not args.quiet, plots=not args.no_plots)
    except _INPUT_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"neuraldb gate: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # unreadable files
        print(f"neuraldb gate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # the evaluation crashed: undecided, never "failed" (exit 1 = a failed criterion)
        log.info("neuraldb gate crashed", exc_info=True)
        print(f"neuraldb gate: error: the gate could not decide: {type(exc).__name__}: {exc} "
              "(run with -v for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    else:
        print(render_text(result))
        print(f"gate report: {Path(output_dir) / 'gate.json'} and {Path(output_dir) / 'gate.md'}")
    if args.save_release and result["passed"]:
        try:
            print(f"release written to {_save_passed_release(args, result, Path(output_dir))}")
        except (*_INPUT_ERRORS, OSError) as exc:
            print(f"neuraldb gate: error: the gate passed but the release was not written: {exc}", file=sys.stderr)
            return EXIT_ERROR
    elif args.save_release:
        print(f"no release written to {args.save_release}: the gate failed")
    return int(result["exit_code"])


def _save_passed_release(args: argparse.Namespace, result: Mapping[str, Any], output_dir: Path) -> Path:
    """``--save-release``: the judged store, its base model name, gate.json and the evaluation report."""
    from evals.release import load_store, save_release, verify_release
    from neuraldb.store import NeuralDB

    if args.release:
        manifest = verify_release(args.release)
        db = load_store(args.release, gamma=args.gamma, manifest=manifest)
        base = args.model or manifest["base_model"]
    elif args.store:
        db = NeuralDB.load(args.store)
        if args.gamma is not None:
            db.gamma = float(args.gamma)
        base = args.model or db.model_name
    else:
        raise GateError("--save-release needs the store itself: add --store FILE (or --release DIR)")
    if result.get("store", {}).get("digest") not in (None, _store_summary(db)["digest"]):
        raise GateError("the store on disk changed while the gate ran; run the gate again")
    evaluation = Path(args.report) if args.report else output_dir / "report.json"
    return save_release(args.save_release, base, db, report=dict(result),
                        evaluation=evaluation if evaluation.exists() else None)
