"""The cases an evaluation runs on: a dataset from any source, the store's cases among them, the first ``limit``.

Example::

    from evals.selection import load_cases, select_cases
    loaded = load_cases("counterfact", data_dir=None, split="eval")    # $NEURALDB_DATA_DIR
    cases, notes = select_cases(loaded, db, only_stored=True, limit=100)

A dataset is "counterfact" or "zsre" (read from the data dir), a path to a CounterFact/zsRE
file, a hub dataset id ("org/name"), a ``datasets.Dataset`` / ``DatasetDict``, or a list of
``EvalCase``. The cases of one evaluation are of one kind, each with its own ``fact.id``, and a
fact of the store must have been edited to the case's ``target_new``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from evals.cases import EvalCase, EvalCases, LoadReport
from evals.datasets import load_any, load_counterfact, load_zsre
from evals.hf_datasets import is_dataset, is_hub_id

__all__ = ["case_kind", "check_targets", "default_only_stored", "load_cases", "select_cases"]


def load_cases(dataset: Any, *, data_dir: Any, split: str) -> EvalCases:
    """The cases of ``dataset`` (any of the sources above), invalid records skipped and reported."""
    if isinstance(dataset, str) and dataset.lower() in ("counterfact", "zsre"):
        loader = load_counterfact if dataset.lower() == "counterfact" else load_zsre
        return loader(data_dir=data_dir, split=split, skip_invalid=True)
    if is_dataset(dataset) or is_hub_id(dataset):  # a datasets.Dataset / DatasetDict, or "org/name" on the hub
        return load_any(dataset, skip_invalid=True, split=split)
    if isinstance(dataset, (str, os.PathLike)):
        if not Path(dataset).exists():
            raise FileNotFoundError(f"dataset {str(dataset)!r} is neither 'counterfact', 'zsre', an existing file "
                                    "nor a hub dataset id ('org/name')")
        return load_any(dataset, skip_invalid=True)
    cases = list(dataset)
    bad = [type(c).__name__ for c in cases if not isinstance(c, EvalCase)]
    if bad:
        raise ValueError(f"dataset must be 'counterfact', 'zsre', a path, a hub id, a datasets.Dataset or a list of "
                         f"EvalCase; got a {bad[0]}")
    report = getattr(dataset, "report", None)
    if not isinstance(report, LoadReport):
        report = LoadReport("<given cases>", "evalcase", len(cases), len(cases))
    return EvalCases(cases, report)


def default_only_stored(dataset: Any) -> bool:
    """``only_stored`` when not given: True for a data source (a name, path, hub id or datasets.Dataset),
    False for a list of cases, which were chosen."""
    return isinstance(dataset, (str, os.PathLike)) or is_dataset(dataset)


def select_cases(cases: Sequence[EvalCase], db: Any, *, only_stored: bool, limit: int | None) -> tuple[list[EvalCase], list[str]]:
    """The cases to evaluate (those in the store when ``only_stored``), the first ``limit``; and notes."""
    notes: list[str] = []
    if only_stored:
        stored = [c for c in cases if c.fact.id in db]
        if not stored:
            raise ValueError(
                f"none of the {len(cases)} dataset cases is in the store ({len(db)} facts): store ids "
                f"{list(db.ids[:5])}{'...' if len(db) > 5 else ''}, dataset ids "
                f"{[c.fact.id for c in cases[:5]]}{'...' if len(cases) > 5 else ''}; edit the cases' facts first, "
                "or pass the cases as a list (or only_stored=False) to evaluate them anyway")
        missing = len(db) - len({c.fact.id for c in stored})
        if missing > 0:
            notes.append(f"{missing} of the store's {len(db)} facts are not cases of this dataset and were not evaluated")
        cases = stored
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        cases = list(cases)[:limit]
    ids = [c.fact.id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("the cases repeat a fact id; each case must have its own fact.id")
    return list(cases), notes


def check_targets(cases: Sequence[EvalCase], db: Any) -> None:
    """A store fact edited to another target than the case's is an error (e.g. zsRE alt vs answers)."""
    for c in cases:
        stored = db.facts.get(c.fact.id) if c.fact.id in db else None
        if stored and stored.get("target_new") not in (None, c.fact.target_new):
            raise ValueError(
                f"fact {c.fact.id!r} was edited to {stored['target_new']!r} but the case's target_new is "
                f"{c.fact.target_new!r}; evaluate the data the store was built from (for zsRE: the same target= "
                "choice, 'answers' by default)")


def case_kind(cases: Sequence[EvalCase]) -> str:
    """The one kind ("counterfact" or "zsre") of ``cases``; mixed kinds are an error."""
    kinds = sorted({c.kind for c in cases})
    if len(kinds) != 1:
        raise ValueError(f"the cases mix kinds {kinds}; evaluate CounterFact and zsRE separately")
    return kinds[0]
