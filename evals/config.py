"""The options of one evaluation (:func:`evals.evaluate.evaluate`): a frozen, validated dataclass.

Example::

    from evals.config import EvalConfig
    cfg = EvalConfig(limit=100, metrics=("efficacy", "mentions"), batch_size=8)
    neuraldb.evaluate(model, db, tokenizer=tok, config=cfg)                  # the options of cfg
    neuraldb.evaluate(model, db, tokenizer=tok, config=cfg, batch_size=4)    # one of them overridden
    neuraldb.evaluate(model, db, tokenizer=tok, limit=100, batch_size=8)     # or given as keywords

Every field is checked when the config is made; an error names the field and the fix. Two
fields are normalised: ``metrics="efficacy, mentions"`` becomes ``("efficacy", "mentions")``
and ``general_tasks="all"`` the six tasks of the paper (``evals.tasks.SIX_TASKS``). Metric names
are checked against those of every dataset (:mod:`evals.metrics.specs`); whether they suit the
evaluated dataset is checked once its kind is known. The report records the options as
resolved for the run in ``report["config"]["evaluate"]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import numbers
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from evals.metrics.specs import all_metric_names, did_you_mean, split_names

__all__ = ["EvalConfig", "check_general_tasks", "general_module", "resolve_config"]


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate: which cases, which metrics, batching, general tasks, seeds and intervals.

    Attributes:
        limit: evaluate at most this many cases (the first ones); None: all.
        metrics: names (``METRICS`` and the opt-in ``EXTRA_METRICS`` of :mod:`evals.metrics.specs`);
            None: all of the dataset's ``METRICS``.
        batch_size: prompts per forward pass (also of the general tasks).
        chunk_size: cases per chunk, the unit of work between two appends to the run folder;
            None: ``batch_size``.
        general_tasks: lm-eval tasks ("all" = the six of the paper) run by
            ``evals.general.run_general_tasks``; ``general_limit`` examples per task.
        seed: fluency sampling seed. confidence: of every interval, in (0, 1).
        split: the data-dir split of a dataset name ("eval" or "train"), or a hub dataset's split.
        only_stored: evaluate only the cases whose ``fact.id`` is in the store (an error if none
            is). None: True for a name, path, hub id or datasets.Dataset; False for a list of cases.
        generation_prompts / generation_tokens: fluency on at most this many generation prompts
            per case / exactly this many new tokens (None: all prompts, ROME's 100-token total length).
        consistency_files: a folder with ROME's attribute_snippets.json, idf.npy and
            tfidf_vocab.json, or a mapping with those three keys.
        pre_from: the ``output_dir`` of an earlier evaluation of the same model, metrics and
            batching: the unedited (pre) scores of its cases are reused for the same cases
            instead of computed again (the pre phase runs without any store, so they do not
            depend on the store); cases it lacks are scored. ``evals.sequential`` passes the
            previous round's folder. The report counts the reused cases.
    """

    limit: int | None = None
    metrics: tuple[str, ...] | None = None
    batch_size: int = 16
    chunk_size: int | None = None
    general_tasks: tuple[str, ...] | None = None
    general_limit: int | None = None
    seed: int = 0
    confidence: float = 0.95
    split: str = "eval"
    only_stored: bool | None = None
    generation_prompts: int | None = None
    generation_tokens: int | None = None
    consistency_files: str | os.PathLike[str] | Mapping[str, str] | None = None
    pre_from: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        _check_number("confidence", self.confidence, "a number in (0, 1), e.g. confidence=0.95")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}; e.g. confidence=0.95")
        for name, low, optional in (("batch_size", 1, False), ("chunk_size", 1, True), ("limit", 0, True),
                                    ("general_limit", 0, True), ("generation_prompts", 0, True),
                                    ("generation_tokens", 0, True), ("seed", None, False)):
            _check_int(name, getattr(self, name), low=low, optional=optional)
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"split must be a split name such as 'eval' or 'train', got {self.split!r}")
        if self.only_stored is not None and not isinstance(self.only_stored, bool):
            raise ValueError(f"only_stored must be True, False or None (decided by the dataset), got "
                             f"{self.only_stored!r}")
        if not (self.consistency_files is None or isinstance(self.consistency_files, (str, os.PathLike, Mapping))):
            raise ValueError(f"consistency_files must be a folder or a mapping of ROME's three files, got a "
                             f"{type(self.consistency_files).__name__}")
        if not (self.pre_from is None or isinstance(self.pre_from, (str, os.PathLike))):
            raise ValueError(f"pre_from must be the output_dir of an earlier evaluation (a path) or None, got a "
                             f"{type(self.pre_from).__name__}")
        object.__setattr__(self, "metrics", _check_metrics(self.metrics))
        object.__setattr__(self, "general_tasks", _tuple_or_none(check_general_tasks(self.general_tasks)))

    @property
    def chunk(self) -> int:
        """Cases per chunk: ``chunk_size``, else ``batch_size``."""
        return self.chunk_size or self.batch_size


def resolve_config(config: EvalConfig | None = None, /, **options: Any) -> EvalConfig:
    """``config`` (default ``EvalConfig()``) with the fields named in ``options`` replaced, checked anew.

    An option that is no field of ``EvalConfig`` is a ``TypeError`` naming the closest field.
    """
    if config is not None and not isinstance(config, EvalConfig):
        raise TypeError(f"config must be an EvalConfig, got a {type(config).__name__}; build one with "
                        "evals.config.EvalConfig(...) or pass the options as keywords")
    fields = [f.name for f in dataclasses.fields(EvalConfig)]
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"evaluate() got an unexpected keyword argument {key!r}{hint}; its options are the "
                            f"fields of evals.config.EvalConfig: {', '.join(fields)}")
    if config is None:
        return EvalConfig(**options)
    return dataclasses.replace(config, **options) if options else config


# ----------------------------------------------------------------------------- checks


def _check_number(name: str, value: Any, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {fix}, got {value!r}")


def _check_int(name: str, value: Any, *, low: int | None, optional: bool) -> None:
    if value is None and optional:
        return
    none = " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{none}, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}{none}, got {value}")


def _check_metrics(metrics: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if metrics is None:
        return None
    names = split_names(metrics) if isinstance(metrics, str) else list(metrics)
    if not names:
        raise ValueError("metrics names no metric; name at least one, or pass metrics=None for all of the dataset's")
    known = all_metric_names()
    unknown = [m for m in names if not isinstance(m, str) or m not in known]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}{did_you_mean([str(m) for m in unknown], known)} in metrics; "
                         f"choose from {known}")
    return tuple(names)


def _tuple_or_none(tasks: list[str] | None) -> tuple[str, ...] | None:
    return tuple(tasks) if tasks else None


# ----------------------------------------------------------------------------- general tasks


def _resolve_general_tasks(general_tasks: Any) -> list[str] | None:
    if general_tasks is None or general_tasks == [] or general_tasks == "":
        return None
    if isinstance(general_tasks, str):
        general_tasks = [t.strip() for t in general_tasks.split(",") if t.strip()]
    tasks = list(general_tasks)
    if "all" in tasks:
        from evals.tasks import SIX_TASKS

        tasks = list(dict.fromkeys([*SIX_TASKS, *(t for t in tasks if t != "all")]))
    return tasks


def check_general_tasks(general_tasks: Sequence[str] | str | None) -> list[str] | None:
    """The task names ``general_tasks`` resolves to ("all" = the paper's six); raises now if
    ``evals.general`` cannot be imported (so a long run does not fail at its end)."""
    tasks = _resolve_general_tasks(general_tasks)
    if tasks:
        general_module()
    return tasks


def general_module() -> Any:
    """``evals.general``, or a ``ModuleNotFoundError`` that says how to run without it."""
    try:
        module = importlib.import_module("evals.general")
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"general_tasks needs evals.general.run_general_tasks, which could not be imported ({exc}); "
            "run without general tasks, or install the part that provides it") from exc
    if not callable(getattr(module, "run_general_tasks", None)):
        raise ModuleNotFoundError("evals.general has no run_general_tasks(); run without general tasks")
    return module
