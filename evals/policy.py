"""Release gate policies: the schema (frozen dataclasses, one documented field each) and the YAML/TOML parser.

Example::

    from evals.policy import load_policy, resolve_policy
    policy = load_policy("evals/policies/default.yaml")      # or a .toml file, or a mapping
    policy = resolve_policy("strict")                         # a packaged policy by name
    policy.criteria.efficacy_min, policy.alpha                 # 80.0, 0.05

Every field, its default and its meaning is in the README's policy table, which
:func:`policy_table_markdown` generates from the ``doc`` metadata of the dataclass fields below
(a test keeps the two equal). ``null`` (TOML: ``"off"`` or ``false``) switches a criterion off; a
missing or malformed field is a :class:`PolicyError` (a ``ValueError``) naming the field and the fix.
YAML is read strictly: aliases (``*name``) and duplicate keys are refused with their line, and a
YAML 1.1 boolean word (``no``, ``off``, ``yes``, ``on``, ``true``, ``false``) where a number is
expected is refused rather than read as "off"; values in messages are shortened (no expansion).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
import reprlib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "Criteria", "Evaluation", "MINIMUM_RULES", "PAIRED_TESTS", "Policy", "PolicyError", "Regression",
    "load_policy", "policy_table_markdown", "resolve_policy",
]

SCHEMA_VERSION = 1
MINIMUM_RULES = ("mean", "ci_low", "ci_high")
PAIRED_TESTS = ("report", "t", "wilcoxon")
DEFAULT_METRICS = ("efficacy", "generalization", "specificity")
_OFF = object()


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the field and the fix."""


def _doc(doc: str, example: str, **default: Any) -> Any:
    """A dataclass field documented once: ``doc`` for the README table, ``example`` for error messages."""
    return field(metadata={"doc": doc, "example": example}, **default)


@dataclass(frozen=True)
class Evaluation:
    """How ``neuraldb gate`` runs ``neuraldb.evaluate`` when it is not given a report."""

    dataset: str = _doc("`store` (the facts saved in the store, CounterFact style), `counterfact`, `zsre` or a "
                        "CounterFact/zsRE file (its cases whose fact id is in the store)", "store")
    n: int | None = _doc("evaluate at most this many cases (null: all)", "20")
    general_tasks: tuple[str, ...] = _doc("lm-eval tasks (a list, `all`, or [] for none)", "[sciq]")
    general_limit: int | None = _doc("examples per general task (per subject for mmlu; null: all)", "20")
    split: str = _doc("the dataset split", "eval", default="eval")
    metrics: tuple[str, ...] = _doc("the edit metrics to evaluate", "[efficacy, generalization, specificity]",
                                    default=DEFAULT_METRICS)
    batch_size: int = _doc("prompts per forward pass", "16", default=16)
    seed: int = _doc("the evaluation's random seed", "0", default=0)


@dataclass(frozen=True)
class Criteria:
    """What a report must show. Edit metrics in percent, drops in points, firing rates as fractions."""

    efficacy_min: float | None = _doc("post-edit efficacy (%) at least this (see `minimum_rule`)", "80")
    generalization_min: float | None = _doc("post-edit generalization (%) at least this (see `minimum_rule`)",
                                            "40")
    specificity_max_drop: float | None = _doc(
        "pre - post specificity (points): fails when larger AND significant (the paired test of `paired_test` "
        "has p < 1 - confidence)", "10")
    general_max_drop: float | None = _doc(
        "per general task, before - after of its metric: points of a 0-1 metric x 100 (acc), or percent "
        "relative change of an unbounded one (perplexity); fails when larger AND significant (McNemar exact "
        "on 0/1 per-example scores, Wilcoxon signed-rank otherwise)", "5")
    general_max_firing_rate: float | None = _doc(
        "per general task: gate fires / gated positions on its inputs at most this (no test)", "0.05")
    minimum_rule: str = _doc(
        "how a minimum is judged: `mean` (the estimate), `ci_low` (the interval's lower end must reach it), "
        "`ci_high` (fails only when significantly below)", "mean", default="mean")
    paired_test: str = _doc(
        "the paired test of per-case values for specificity and regressions: `report` (the report's own: "
        "McNemar exact for one yes/no outcome per case, else paired t), `t`, `wilcoxon`", "report",
        default="report")
    general_max_drop_per_task: Mapping[str, float | None] = _doc(
        "mapping task -> margin, overriding `general_max_drop` (null: no drop criterion for that task)",
        "{sciq: 5}", default_factory=dict)
    general_metric: Mapping[str, str] = _doc("mapping task -> metric (default: the task's first metric)",
                                             "{lambada_openai: acc}", default_factory=dict)
    min_cases: int | None = _doc("fewer evaluated cases than this is a failure", "10", default=None)


@dataclass(frozen=True)
class Regression:
    """New report vs a baseline report (``--baseline``): post-edit values, same rule as the drops above."""

    efficacy_max_drop: float | None = _doc("baseline - new post-edit efficacy (points), paired on shared cases",
                                           "5")
    generalization_max_drop: float | None = _doc("baseline - new post-edit generalization (points)", "5")
    specificity_max_drop: float | None = _doc("baseline - new post-edit specificity (points)", "5")
    general_max_drop: float | None = _doc(
        "per general task, baseline vs new after editing (unpaired: Fisher exact, or a z-test from the "
        "reported intervals)", "5")


@dataclass(frozen=True)
class Policy:
    confidence: float = _doc("in (0, 1): the level of every test and interval; a drop is significant when its "
                             "test has p < 1 - confidence", "0.95")
    criteria: Criteria = _doc("the release criteria (below); every one must be present", "{efficacy_min: 80, ...}")
    evaluation: Evaluation | None = _doc(
        "how the release gate runs the evaluation when no report is given", "{dataset: store, ...}", default=None)
    regression: Regression | None = _doc("needed with a baseline report", "{efficacy_max_drop: 5, ...}",
                                         default=None)
    source: str = field(default="<dict>", metadata={"file": False})
    sha256: str | None = field(default=None, metadata={"file": False})
    version: int = _doc("the schema version: 1", "1", default=SCHEMA_VERSION)

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("evaluation", "criteria", "regression"):
            if out[key] is not None:
                out[key] = {k: (list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v))
                            for k, v in out[key].items()}
        return out

    def require_evaluation(self) -> Evaluation:
        return self._require("evaluation", "no report was given, so the release gate must run the evaluation; add e.g. "
                             "evaluation: {dataset: store, n: 20, general_tasks: [sciq], general_limit: 20}, or pass "
                             "--report report.json")

    def require_regression(self) -> Regression:
        return self._require("regression", "a baseline report was given; add regression: {efficacy_max_drop: 5, "
                             "generalization_max_drop: 5, specificity_max_drop: 5, general_max_drop: 5} (null "
                             "switches one off)")

    def _require(self, section: str, why_and_fix: str) -> Any:
        if getattr(self, section) is None:
            raise PolicyError(f"{self.source}: field '{section}' is missing but {why_and_fix}")
        return getattr(self, section)


# ----------------------------------------------------------------------------- the README table

_SECTIONS = {"evaluation": Evaluation, "criteria": Criteria, "regression": Regression}
_REQUIRED_TOP = ("version", "confidence", "criteria")


def _default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:
        return "`null`"
    if isinstance(value, tuple):
        return f"`[{', '.join(value)}]`"
    return "`{}`" if value == {} else f"`{value}`"


def policy_table_markdown() -> str:
    """The README's policy table, generated from the fields' ``doc`` metadata (one row per field)."""
    rows = ["| policy field | default | meaning |", "|---|---|---|"]
    order = ("version", "confidence", "evaluation", "criteria", "regression")
    top = {f.name: f for f in dataclasses.fields(Policy)}
    for name in order:
        f = top[name]
        required = "required" if name in _REQUIRED_TOP else "optional section"
        rows.append(f"| `{name}` | {required} | {f.metadata['doc']} |")
        for sub in dataclasses.fields(_SECTIONS[name]) if name in _SECTIONS else ():
            rows.append(f"| `{name}.{sub.name}` | {_default(sub)} | {sub.metadata['doc']} |")
    return "\n".join(rows) + "\n"


def _example(cls: type, name: str) -> str:
    return next(f.metadata["example"] for f in dataclasses.fields(cls) if f.name == name)


# ----------------------------------------------------------------------------- reading


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
            data = _load_yaml(raw.decode("utf-8"), source=str(p))
        else:
            raise PolicyError(f"{p}: unknown policy format {suffix!r}; name the file .yaml, .yml or .toml")
    except PolicyError:
        raise
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError
        raise PolicyError(f"{p} is not valid {suffix.lstrip('.').upper()} ({exc}); fix the syntax") from None
    return _parse(data, source=str(p), sha256=hashlib.sha256(raw).hexdigest())


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother = 60, 60


def _short(value: Any) -> str:
    """``repr(value)`` cut to a line: an error message never expands a large (or aliased) value."""
    return _REPR.repr(value)


class _YamlBool(str):
    """A YAML 1.1 boolean word (``no``, ``yes``, ``on``, ``off``, ``true``, ``false``) as written.

    Where a number is expected it is an error (``efficacy_min: no`` must not switch a criterion
    off); elsewhere it reads as the boolean it spells (``value``)."""

    value: bool

    def __new__(cls, word: str, value: bool) -> "_YamlBool":
        obj = super().__new__(cls, word)
        obj.value = value
        return obj


def _load_yaml(text: str, *, source: str) -> Any:
    """A YAML policy, read strictly: no aliases (an alias bomb fails at its first ``*``), no
    duplicate keys, and boolean words kept as :class:`_YamlBool`; a :class:`PolicyError` names the line."""
    import yaml

    class PolicyLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise PolicyError(f"{source}: line {event.start_mark.line + 1}: the alias *{event.anchor} is not "
                                  "allowed in a policy (nor anchors to repeat values); write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                key, line = getattr(key_node, "value", None), key_node.start_mark.line + 1
                if isinstance(key, str) and key in first:
                    raise PolicyError(f"{source}: line {line}: the key {key[:80]!r} is given twice in one mapping "
                                      f"(first at line {first[key]}); keep one")
                first.setdefault(key, line)
            return super().construct_mapping(node, deep=deep)

    def boolean(loader: Any, node: Any) -> _YamlBool:
        return _YamlBool(node.value, loader.construct_yaml_bool(node))

    PolicyLoader.add_constructor("tag:yaml.org,2002:bool", boolean)
    return yaml.load(text, Loader=PolicyLoader)  # noqa: S506 (a SafeLoader subclass)


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


# ----------------------------------------------------------------------------- validation


class _Reader:
    """One mapping of the policy (the top level or a section), read field by field."""

    def __init__(self, data: Any, where: str, source: str, cls: type | None = None) -> None:
        if not isinstance(data, Mapping):
            raise PolicyError(f"{source}: {where or 'the policy'} must be a mapping of fields, got "
                              f"{type(data).__name__}")
        self.data, self.where, self.source, self.cls = data, where, source, cls or Policy
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str, fix: str) -> PolicyError:
        return PolicyError(f"{self.source}: field '{self.name(key)}' {problem}; {fix}")

    def get(self, key: str, *, required: bool, default: Any = None, number: bool = False) -> Any:
        """The field's value, ``_OFF`` when switched off; a YAML boolean word is kept as written
        where a ``number`` is expected (to be refused), else read as the boolean it spells."""
        self.used.add(key)
        if key not in self.data:
            if required:
                raise self.fail(key, "is missing", f"add it, e.g. {key}: {_example(self.cls, key)}")
            return default
        value = self.data[key]
        if isinstance(value, _YamlBool):
            if number:
                return value
            value = value.value
        if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
            return _OFF
        return value

    def number(self, key: str, *, required: bool = True, low: float | None = None, high: float | None = None,
               allow_off: bool = True) -> float | None:
        value, example = self.get(key, required=required, number=True), _example(self.cls, key)
        if isinstance(value, _YamlBool):
            raise self.fail(key, f"is {value!s}, which YAML reads as a boolean, not a number",
                            f"give a number, e.g. {key}: {example}, or null to switch it off")
        if value is _OFF:
            if not allow_off:
                raise self.fail(key, "cannot be switched off", f"give a number, e.g. {key}: {example}")
            return None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"must be a number, got {_short(value)}", f"e.g. {key}: {example} (null switches it off)")
        if (low is not None and value < low) or (high is not None and value > high):
            rng = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise self.fail(key, f"is {value}, outside {rng}", f"use a value in {rng}, e.g. {key}: {example}")
        return float(value)

    def integer(self, key: str, *, required: bool, low: int = 0, default: Any = None) -> int | None:
        value = self.get(key, required=required, default=default, number=True)
        if isinstance(value, _YamlBool):
            raise self.fail(key, f"is {value!s}, which YAML reads as a boolean, not an integer",
                            f"give an integer, e.g. {key}: {_example(self.cls, key)}, or null")
        if value is _OFF or value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(key, f"must be an integer >= {low}, got {_short(value)}",
                            f"e.g. {key}: {_example(self.cls, key)}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, required=False, default=default)
        if value not in options:
            raise self.fail(key, f"is {_short(value)}", f"use one of {', '.join(options)}")
        return value

    def strings(self, key: str, *, required: bool, default: Any = ()) -> tuple[str, ...]:
        value = self.get(key, required=required, default=default)
        if value is _OFF or value is None:
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of names, got {_short(value)}", f"e.g. {key}: {_example(self.cls, key)}")
        return tuple(value)

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.get(key, required=False, default={})
        if value is _OFF or value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a mapping task -> value, got {_short(value)}", f"e.g. {key}: {{sciq: 5}}")
        return value

    def section(self, key: str, cls: type, *, required: bool) -> "_Reader | None":
        data = self.get(key, required=required)
        if data is _OFF and required:
            raise self.fail(key, "cannot be switched off", f"give it, e.g. {key}: {_example(self.cls, key)}")
        return None if data is None or data is _OFF else _Reader(data, key, self.source, cls)

    def finish(self) -> None:
        unknown = [k for k in self.data if k not in self.used]
        if unknown:
            key = _short(unknown[0]) if not isinstance(unknown[0], str) else unknown[0][:80]
            close = difflib.get_close_matches(key, sorted(self.used), n=1)
            hint = (f"did you mean '{self.name(close[0])}'?" if close
                    else f"known fields: {', '.join(sorted(self.used))}")
            raise self.fail(key, "is not a policy field", hint)


def _parse(data: Any, *, source: str, sha256: str | None) -> Policy:
    top = _Reader(data, "", source)
    version = top.get("version", required=True)
    if version != SCHEMA_VERSION:
        raise top.fail("version", f"is {_short(version)}", f"this neuraldb reads policy version {SCHEMA_VERSION}: version: 1")
    confidence = top.number("confidence", allow_off=False)
    if not 0.0 < confidence < 1.0:
        raise top.fail("confidence", f"is {confidence}", "use a level in (0, 1), e.g. confidence: 0.95")
    ev = top.section("evaluation", Evaluation, required=False)
    evaluation = None if ev is None else _parse_evaluation(ev)
    criteria = _parse_criteria(top.section("criteria", Criteria, required=True))
    rg = top.section("regression", Regression, required=False)
    regression = None if rg is None else _parse_regression(rg)
    top.finish()
    return Policy(confidence=confidence, criteria=criteria, evaluation=evaluation, regression=regression,
                  source=source, sha256=sha256)


def _parse_evaluation(ev: _Reader) -> Evaluation:
    dataset = ev.get("dataset", required=True)
    if not isinstance(dataset, str) or not dataset.strip():
        raise ev.fail("dataset", f"must be a name or a path, got {_short(dataset)}",
                      "use store, counterfact, zsre or a file path")
    general_tasks = ev.get("general_tasks", required=True)
    ev.used.discard("general_tasks")
    tasks = () if general_tasks is _OFF else ev.strings("general_tasks", required=True)
    metrics = ev.strings("metrics", required=False, default=list(DEFAULT_METRICS))
    evaluation = Evaluation(
        dataset=dataset.strip(),
        n=ev.integer("n", required=True, low=1),
        general_tasks=tasks,
        general_limit=ev.integer("general_limit", required=True, low=1),
        split=str(ev.get("split", required=False, default="eval")),
        metrics=metrics or DEFAULT_METRICS,
        batch_size=ev.integer("batch_size", required=False, low=1, default=16) or 16,
        seed=ev.integer("seed", required=False, default=0) or 0,
    )
    ev.finish()
    return evaluation


def _parse_criteria(cr: _Reader) -> Criteria:
    pct = dict(low=0.0, high=100.0)
    per_task = {}
    for task, margin in cr.mapping("general_max_drop_per_task").items():
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0):
            raise cr.fail("general_max_drop_per_task", f"has {_short(task)}: {_short(margin)}",
                          "give each task a margin >= 0 (null: no drop criterion for that task)")
        per_task[str(task)] = None if margin is None else float(margin)
    general_metric = {}
    for task, metric in cr.mapping("general_metric").items():
        if not isinstance(metric, str):
            raise cr.fail("general_metric", f"has {_short(task)}: {_short(metric)}",
                          "map a task to a metric name, e.g. lambada_openai: acc")
        general_metric[str(task)] = metric
    criteria = Criteria(
        efficacy_min=cr.number("efficacy_min", **pct),
        generalization_min=cr.number("generalization_min", **pct),
        specificity_max_drop=cr.number("specificity_max_drop", **pct),
        general_max_drop=cr.number("general_max_drop", low=0.0),
        general_max_firing_rate=cr.number("general_max_firing_rate", low=0.0, high=1.0),
        minimum_rule=cr.choice("minimum_rule", MINIMUM_RULES, "mean"),
        paired_test=cr.choice("paired_test", PAIRED_TESTS, "report"),
        general_max_drop_per_task=per_task,
        general_metric=general_metric,
        min_cases=cr.integer("min_cases", required=False, low=1),
    )
    cr.finish()
    return criteria


def _parse_regression(rg: _Reader) -> Regression:
    pct = dict(low=0.0, high=100.0)
    regression = Regression(
        efficacy_max_drop=rg.number("efficacy_max_drop", **pct),
        generalization_max_drop=rg.number("generalization_max_drop", **pct),
        specificity_max_drop=rg.number("specificity_max_drop", **pct),
        general_max_drop=rg.number("general_max_drop", low=0.0),
    )
    rg.finish()
    return regression
