"""What the evaluation loaders return: :class:`EvalCase` lists with a :class:`LoadReport`.

Example::

    cases = load_counterfact(limit=100)           # an EvalCases (a list of EvalCase)
    cases.report.summary()                        # '.../counterfact.json (rome): 100 of 100 records loaded'
    cases[0].fact                                 # a neuraldb.Fact, ready to edit

A dataset that cannot be loaded is a :class:`DatasetError` (the loaders' one error type).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from neuraldb import Fact

__all__ = ["DatasetError", "EvalCase", "EvalCases", "Kind", "LoadReport", "SkippedRecord"]

Kind = Literal["counterfact", "zsre"]


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names the file, record, field and fix."""


@dataclass(frozen=True)
class EvalCase:
    """One evaluation case: the fact to edit plus the prompts its metrics need.

    ``fact.text`` is the edit prompt, ``fact.paraphrases`` the generalization prompts and
    ``fact.neighborhood`` CounterFact's neighbourhood prompts (scored against
    ``fact.target_true``). zsRE specificity uses ``loc_prompt`` with its gold ``loc_answer``.
    """

    case_id: int
    kind: Kind
    fact: Fact
    generation_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    loc_prompt: str | None = None
    loc_answer: str | None = None
    relation_id: str | None = None  # CounterFact (ROME schema): for the consistency metric
    target_new_id: str | None = None  # Wikidata id of target_new (ROME schema)


@dataclass(frozen=True)
class SkippedRecord:
    index: int
    case_id: Any
    field: str
    reason: str


@dataclass(frozen=True)
class LoadReport:
    """What a loader read: ``records`` considered, ``loaded`` cases, and what it skipped."""

    source: str
    format: str
    records: int
    loaded: int
    skipped: tuple[SkippedRecord, ...] = ()

    def summary(self) -> str:
        text = f"{self.source} ({self.format}): {self.loaded} of {self.records} records loaded"
        if self.skipped:
            why = Counter(f"{s.field}: {s.reason}" for s in self.skipped)
            text += f"; skipped {len(self.skipped)} (" + "; ".join(f"{n}x {w}" for w, n in why.items()) + ")"
        return text


class EvalCases(list):
    """A ``list`` of :class:`EvalCase` with the :class:`LoadReport` as ``.report``."""

    def __init__(self, cases: Sequence[EvalCase], report: LoadReport):
        super().__init__(cases)
        self.report = report

    def to_dataset(self) -> Any:
        """A ``datasets.Dataset``, one row per case (columns: ``evals.hf_datasets.FEATURE_TYPES``).

        The loaders read it back to the same cases: ``load_counterfact(cases.to_dataset()) == cases``.
        """
        from evals.hf_datasets import to_dataset

        return to_dataset(self, description=self.report.summary())
