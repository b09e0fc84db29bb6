"""Fact identity in a store: one fact per ``(subject, prompt)``; what an edit replaces.

Example::

    db = neuraldb.edit(model, tok, [Fact(prompt="{} plays the sport of", subject="LeBron James",
                                         target_new="football")])
    db = neuraldb.edit(model, tok, [Fact(prompt="{} plays the sport of", subject="LeBron James",
                                         target_new="tennis")], db=db)        # replaces football
    db.last_edit.replaced[0].old_target                                       # 'football'
    stored_identities(db)          # {('LeBron James', '{} plays the sport of'): ['fact-...']}

Identities are read from the stored fact records (``db.facts``, saved with the store), so
no separate index is saved and stores written before identities existed load unchanged;
fact ids still hash the target (``Fact.id``), so a replacement gets a new id unless the
caller gave one. Rows without a record (raw ``db.add``) have no identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .facts import Fact, FactError

__all__ = ["EditReport", "Replacement", "UpsertPlan", "plan_upsert", "stored_identities"]


@dataclass(frozen=True)
class Replacement:
    """A stored fact replaced by a new fact of the same identity (another target)."""

    subject: str
    prompt: str
    old_id: str
    old_target: str
    new_id: str
    new_target: str

    def describe(self) -> str:
        """One line naming the fact and both targets (what the editor logs)."""
        return (f"replaced {self.old_id} ({self.subject!r}, {self.prompt!r}): target {self.old_target!r} -> "
                f"{self.new_target!r} (now {self.new_id})")


@dataclass(frozen=True)
class EditReport:
    """What the last ``neuraldb.edit`` or ``neuraldb.forget`` did to a store (``db.last_edit``;
    kept in memory only, not saved).

    added: ids of the facts stored by the call (replacements included), in order.
    replaced: the stored facts an edit replaced (:class:`Replacement`, old and new target).
    unchanged: ids of input facts left as they were: the same fact (identity and target) is
        already stored, or its id is (a resumed run).
    removed: ids removed from the store (facts forgotten, and the old ids of replacements).
    refit: ids of stored facts whose shared residual was optimised again because a fact
        about their subject was added, replaced or removed.
    """

    added: tuple[str, ...] = ()
    replaced: tuple[Replacement, ...] = ()
    unchanged: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    refit: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpsertPlan:
    """An edit's facts against a store: what to compute, what it replaces, what is already there."""

    todo: tuple[Fact, ...]
    replaced: tuple[Replacement, ...]
    unchanged: tuple[str, ...]

    @property
    def old_ids(self) -> dict[str, tuple[str, ...]]:
        """new fact id -> the stored ids it replaces."""
        out: dict[str, tuple[str, ...]] = {}
        for r in self.replaced:
            out[r.new_id] = out.get(r.new_id, ()) + (r.old_id,)
        return out


def _identity(record: Mapping[str, Any] | None) -> tuple[str, str] | None:
    if not record or not isinstance(record.get("subject"), str) or not isinstance(record.get("prompt"), str):
        return None
    return (record["subject"], record["prompt"])


def stored_identities(db: Any) -> dict[tuple[str, str], list[str]]:
    """``{(subject, prompt): [fact ids]}`` of the facts of ``db`` with a record, in store order
    (one id per identity, unless the store was written before identities were enforced)."""
    out: dict[tuple[str, str], list[str]] = {}
    for fid in db.ids:
        key = _identity(db.facts.get(fid))
        if key is not None:
            out.setdefault(key, []).append(fid)
    return out


def _same_target(record: Mapping[str, Any], fact: Fact) -> bool:
    return str(record.get("target_new", "")).strip() == fact.target_new.strip()


def _check_id_free(db: Any, fact: Fact, olds: Sequence[str]) -> None:
    """The new fact's id must not name a stored fact about something else."""
    if fact.id in db and fact.id not in olds:
        other = _identity(db.facts.get(fact.id))
        raise FactError(
            f"fact {fact.id!r} ({fact.subject!r}, {fact.prompt!r}) has the id of a stored fact about "
            f"{other}; give it another id (or none: ids are derived from the content)"
        )


def plan_upsert(db: Any, facts: Iterable[Fact]) -> UpsertPlan:
    """Match ``facts`` (already free of conflicts: :func:`neuraldb.facts.check_conflicts`) with ``db``.

    A fact whose identity is stored with the same target, or whose id is stored without a
    record, is unchanged (a no-op: nothing is recomputed); one whose identity is stored
    with another target replaces it; any other is new. A new fact whose id names a stored
    fact of another identity is a :class:`~neuraldb.facts.FactError`.
    """
    index = stored_identities(db)
    todo: list[Fact] = []
    replaced: list[Replacement] = []
    unchanged: list[str] = []
    for f in facts:
        olds = index.get(f.identity, [])
        if len(olds) == 1 and _same_target(db.facts[olds[0]], f):
            unchanged.append(f.id)
            continue
        if not olds and f.id in db and _identity(db.facts.get(f.id)) is None:
            unchanged.append(f.id)  # a row without a record: the id alone says it is done (as before identities)
            continue
        _check_id_free(db, f, olds)
        replaced += [Replacement(subject=f.subject, prompt=f.prompt, old_id=o, old_target=db.facts[o]["target_new"],
                                 new_id=f.id, new_target=f.target_new) for o in olds]
        todo.append(f)
    return UpsertPlan(todo=tuple(todo), replaced=tuple(replaced), unchanged=tuple(unchanged))
