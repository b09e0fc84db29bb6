"""Facts: what to edit, validated up front.

Example::

    fact = Fact(prompt="{} is located in the city of", subject="The Eiffel Tower",
                target_new="Rome", target_true="Paris")
    fact.text                      # 'The Eiffel Tower is located in the city of'
    ids, last = locate_subject(tokenizer, "Today. " + fact.prompt, fact.subject)
    fact.identity                  # ('The Eiffel Tower', '{} is located in the city of')

A malformed fact is a ``FactError`` (a ``ValueError``) that names the field and
the fix, raised before any computation starts. A fact's identity is its
``(subject, prompt)``: a store holds one fact per identity, and two facts of one
identity in one edit are a :class:`FactConflictError` (:func:`check_conflicts`).
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

__all__ = [
    "Fact",
    "FactConflictError",
    "FactError",
    "check_conflicts",
    "locate_subject",
    "encode_completion",
    "split_prompt",
    "validate_facts",
]


class FactError(ValueError):
    """A fact that cannot be edited; the message names the fact, the field and the fix."""


class FactConflictError(FactError):
    """Two facts of one edit with the same identity ``(subject, prompt)``; the message names both."""


def _where(fact_id: str | None) -> str:
    return f"fact {fact_id!r}" if fact_id else "fact"


def _strings(value: Any, name: str, where: str) -> tuple[str, ...]:
    """A list field of a fact as a tuple of strings; a FactError naming the field otherwise."""
    if isinstance(value, str):
        raise FactError(f"{where}: field {name!r} must be a list of strings, not one string")
    if value is None or not isinstance(value, Iterable) or isinstance(value, Mapping):
        got = "null" if value is None else type(value).__name__
        raise FactError(f"{where}: field {name!r} must be a list of strings, got {got}; use [] for none")
    value = tuple(value)
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise FactError(f"{where}: field {name!r} must hold strings only, got {type(bad[0]).__name__}")
    return value


def split_prompt(prompt: str, *, where: str = "fact") -> tuple[str, str]:
    """``(text before the subject, text after it)`` of a prompt template, literal braces undoubled.

    The template is a ``str.format`` string with exactly one ``{}`` and no other replacement field
    (literal braces are written ``{{`` and ``}}``); anything else is a :class:`FactError`.
    """
    fix = (f"{where}: field 'prompt' must contain exactly one '{{}}' where the subject goes and no other "
           f"format field, got {prompt[:200]!r}; write a literal brace as '{{{{' or '}}}}', e.g. "
           "prompt='{} is located in'")
    try:
        parts = list(string.Formatter().parse(prompt))
    except ValueError:  # a single '{' or '}'
        raise FactError(fix) from None
    fields = [i for i, (_, name, spec, conversion) in enumerate(parts) if name is not None]
    if len(fields) != 1 or parts[fields[0]][1:] != ("", "", None):
        raise FactError(fix)
    at = fields[0]
    return "".join(p[0] for p in parts[: at + 1]), "".join(p[0] for p in parts[at + 1 :])


@dataclass(frozen=True)
class Fact:
    """One edit: ``prompt.format(subject)`` should be completed by ``target_new``.

    Fields:
        prompt: template with exactly one ``{}`` where the subject goes and no other format field
            (a ``str.format`` string: literal braces are ``{{`` and ``}}``).
        subject: the entity whose last token carries the key.
        target_new: the new completion (a leading space is added when tokenised).
        target_true: optional original completion (CounterFact's ``target_true``).
        paraphrases: full prompts (subject filled in) that should also give target_new.
        neighborhood: full prompts about other subjects that must keep target_true.
        id: stable identifier; derived from the content when not given.
        meta: free-form mapping kept with the fact (e.g. the dataset's case id).
        aliases: other names of the subject that should fire the edit too ("Obama" for
            "Barack Obama"); the word check accepts them like the subject itself.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    id: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = _where(self.id or None)
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise FactError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise FactError(
                f"{where}: field 'target_true' must be a string or None, got {type(self.target_true).__name__}"
            )
        for name in ("paraphrases", "neighborhood", "aliases"):
            object.__setattr__(self, name, _strings(getattr(self, name), name, where))
        if not isinstance(self.meta, Mapping):
            raise FactError(f"{where}: field 'meta' must be a mapping (a JSON object), got "
                            f"{type(self.meta).__name__}; use {{}} for none")
        split_prompt(self.prompt, where=where)
        if not self.subject.strip():
            raise FactError(f"{where}: field 'subject' is empty; give the entity the prompt is about")
        if not self.target_new.strip():
            raise FactError(f"{where}: field 'target_new' is empty; give the new completion")
        if self.target_true is not None and not self.target_true.strip():
            raise FactError(f"{where}: field 'target_true' is empty; give the original completion or None")
        if not isinstance(self.id, str):
            raise FactError(f"{where}: field 'id' must be a string, got {type(self.id).__name__}")
        if not self.id:
            digest = hashlib.sha1(
                json.dumps([self.prompt, self.subject, self.target_new], ensure_ascii=False).encode()
            ).hexdigest()[:12]
            object.__setattr__(self, "id", f"fact-{digest}")

    @property
    def identity(self) -> tuple[str, str]:
        """``(subject, prompt)``: what the fact is about. A store holds one fact per identity;
        editing it again with another ``target_new`` replaces it (``neuraldb.edit``)."""
        return (self.subject, self.prompt)

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["paraphrases"] = list(self.paraphrases)
        d["neighborhood"] = list(self.neighborhood)
        d["aliases"] = list(self.aliases)
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Fact":
        """Build a fact from a plain mapping (e.g. ``json.load``); unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise FactError(f"a fact must be a mapping, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FactError(
                f"{_where(d.get('id'))}: unknown field(s) {unknown}; expected some of {sorted(known)}"
            )
        missing = [k for k in ("prompt", "subject", "target_new") if k not in d]
        if missing:
            raise FactError(f"{_where(d.get('id'))}: missing field(s) {missing}")
        return cls(**d)


def validate_facts(facts: Iterable[Fact | Mapping[str, Any]]) -> list[Fact]:
    """Return a list of :class:`Fact`; duplicate ids are an error that names them."""
    out: list[Fact] = []
    for i, f in enumerate(facts):
        if isinstance(f, Fact):
            out.append(f)
        else:
            try:
                out.append(Fact.from_dict(f))
            except FactError as exc:
                raise FactError(f"facts[{i}]: {exc}") from None
    seen: dict[str, int] = {}
    for i, f in enumerate(out):
        if f.id in seen:
            raise FactError(
                f"facts[{i}] and facts[{seen[f.id]}] share the id {f.id!r}; ids must be unique "
                "(give each fact its own id, or drop the duplicate)"
            )
        seen[f.id] = i
    return out


def check_conflicts(facts: Iterable[Fact]) -> None:
    """Raise :class:`FactConflictError` if two of ``facts`` have one identity ``(subject, prompt)``.

    Example::

        check_conflicts([Fact(prompt="{} plays", subject="LeBron James", target_new="golf"),
                         Fact(prompt="{} plays", subject="LeBron James", target_new="chess")])
        # FactConflictError: facts[1] ('fact-...', target 'chess') and facts[0] (...) ...

    One edit cannot say both, and one fact said twice under two ids would make two rows
    of one identity: both are errors that name the two facts.
    """
    seen: dict[tuple[str, str], tuple[int, Fact]] = {}
    for i, f in enumerate(facts):
        if f.identity not in seen:
            seen[f.identity] = (i, f)
            continue
        j, g = seen[f.identity]
        what = ("give different targets" if f.target_new.strip() != g.target_new.strip()
                else "are the same fact under two ids")
        raise FactConflictError(
            f"facts[{i}] ({f.id!r}, target {f.target_new!r}) and facts[{j}] ({g.id!r}, target {g.target_new!r}) "
            f"are both about subject {f.subject!r} with prompt {f.prompt!r} and {what}; "
            "keep one of them (a store holds one fact per (subject, prompt))"
        )


def _encode(tokenizer: Any, text: str, *, special: bool = True) -> dict:
    return tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)


def locate_subject(tokenizer: Any, template: str, subject: str) -> tuple[list[int], int]:
    """Tokenise ``template.format(subject)``; return (input_ids, index of the subject's last token).

    Uses the tokenizer's character offsets (fast tokenizers); the subject's last
    token must end inside the subject, else the fact cannot be keyed and a
    :class:`FactError` names the field.
    """
    before, after = split_prompt(template)
    start = len(before)
    text = before + subject + after
    end = start + len(subject.rstrip())  # character just past the subject
    enc = _encode(tokenizer, text)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc.get("offset_mapping")
    if offsets is None:  # slow tokenizer: tokenise the prefix instead
        prefix = tokenizer(text[:end], add_special_tokens=True)["input_ids"]
        if ids[: len(prefix)] != list(prefix):
            raise FactError(
                f"field 'subject': {subject!r} does not tokenise to whole tokens in {text!r}; "
                "use a fast tokenizer or change the prompt so the subject ends on a token boundary"
            )
        return ids, len(prefix) - 1
    last = -1
    for i, (a, b) in enumerate(offsets):
        if b > a and a < end and b > start:
            last = i
    if last < 0:
        raise FactError(
            f"field 'subject': {subject!r} cannot be located in the tokenised prompt {text!r} "
            "(no token covers it; check the tokenizer and that the prompt is not truncated)"
        )
    a, b = offsets[last]
    if b > end and text[end:b].strip():
        raise FactError(
            f"field 'subject': the last token of {subject!r} in {text!r} runs past the subject "
            f"into {text[end:b]!r}, so its key would not be the subject's; put a space or punctuation "
            "after '{}' in the prompt"
        )
    return ids, last


def encode_completion(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``target`` as its continuation (with a leading space).

    Example::

        p, t = encode_completion(tok, "The capital of France is", "Paris")
        # model(p + t[:-1]) predicts t[i] at position len(p) - 1 + i
    """
    target = target.strip()
    sep = "" if (not prompt or prompt[-1].isspace()) else " "
    p_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    full = list(tokenizer(prompt + sep + target, add_special_tokens=True)["input_ids"])
    if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
        return p_ids, full[len(p_ids):]
    t_ids = list(tokenizer(sep + target, add_special_tokens=False)["input_ids"])
    if not t_ids:
        raise FactError(f"target {target!r} tokenises to nothing")
    return p_ids, t_ids
