"""Mentions: the edit under natural ways of writing the subject (issue 14, deliverable 4).

Example::

    from evals.metrics.mentions import mention_variants, mention_scores, mention_gate, summarize_mentions
    mention_variants(fact=case.fact)                   # [MentionVariant(kind="quoted", text=...), ...]
    pre = mention_scores(model=model, tokenizer=tok, cases=cases)          # store detached
    with db.attached(model):
        post = mention_scores(model=model, tokenizer=tok, cases=cases)
        fired = mention_gate(model=model, tokenizer=tok, db=db, cases=cases)
    summarize_mentions(pre=pre, post=post, gate=fired)  # per kind: ES pre/post, gate recall, intervals

Card
----
Measures: whether an edit holds, and the store's gate opens, when text mentions the subject
otherwise than the edit prompt (case, position, punctuation, article); ES/PS do not see this.

Sources: the edit prompt ``fact.prompt`` with ``fact.subject``, and every paraphrase that
contains ``fact.subject`` verbatim (its first occurrence). Each source is split into
``prefix + subject + suffix``; a variant rewrites that triple. Kinds (``KINDS``):

* ``exact``: the source itself (the reference the others are compared with);
* ``lower_article``: a subject starting with "The", "A" or "An" + space gets that word
  lower-cased ("the Eiffel Tower"); otherwise not applicable;
* ``mid_sentence``: ``MID_PREFIX`` ("As everyone knows, ") is put before the subject when
  the subject starts its sentence (the text, or after ``.``/``!``/``?`` + space, or a newline),
  so the subject follows a word and a space; not applicable when it is already mid-sentence;
* ``possessive``: the subject's sentence ``The <noun> of|used by|played by|spoken by <subject>
  <rest>`` becomes ``<subject>'s <noun> <rest>`` ("The mother tongue of X is" -> "X's mother
  tongue is"); a source already reading ``<subject>'s ...`` is its own possessive variant;
  any other source: not applicable (no guessing at a rephrasing);
* ``quoted``: ``"<subject>"`` in double quotes;
* ``article_dropped``: the leading article removed ("Eiffel Tower"), when two words or more
  remain (what ``neuraldb.words.name_variants`` counts as a mention);
* ``article_dropped_one_word``: the same when one word remains ("Honeymooners" for "The
  Honeymooners"): by design the word check does not count it (a lone word is too often an
  ordinary one: "to Nanny"; ``Fact(aliases=[...])`` adds it), so this kind measures what that
  rule costs, apart from the kinds it supports;
* ``question``: ``"Question: " + text + "? Answer:"`` (the completion stays at the end).

Scores, per kind and case, over that case's variants of that kind:

* ES: the fraction with ``NLL(target_new) < NLL(target_true)``, teacher forced as in
  :mod:`evals.metrics.counterfact` (``score_targets``); pre (store detached) and post.
* gate recall (post only): the fraction of variants where, in one forward pass over the
  variant alone (right padded, store attached), the gate fired at the subject's last token
  (the last token overlapping the mention's characters) and retrieved the case's own fact
  (``NeuralDB.last_fire_mask`` / ``last_fire_index``); ``fired_any``: any fact fired there.
  A subject whose last token is position 0 (no BOS) can never fire: counted as a miss.

Intervals: ``INTERVALS``. ``summarize_mentions`` adds an "all variants" ES (every kind but
``exact``, per-case fraction) as the metric's own pre/post. Values are percent.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from neuraldb.keys import pad_batch

from .tokens import call_model, eval_mode, longest_first, model_device, pad_id, score_targets

__all__ = ["INTERVALS", "KINDS", "MID_PREFIX", "MentionVariant", "mention_gate", "mention_scores", "mention_variants",
           "subject_last_token", "summarize_mentions"]

log = logging.getLogger(__name__)
KINDS = ("exact", "lower_article", "mid_sentence", "possessive", "quoted", "article_dropped", "article_dropped_one_word",
         "question")
MID_PREFIX = "As everyone knows, "
ARTICLES = ("The", "A", "An")
INTERVALS = ("ES: Wilson when every applicable case has one variant of the kind, else Student t of per-case "
             "fractions; gate recall: Wilson over variants")
_SENTENCE_END = re.compile(r"(?:[.!?][\"')\]]*[ \t]+|\n)")
_POSSESSIVE = re.compile(r"^(?:The|the) (?P<noun>[\w ]+?) (?:of|used by|played by|spoken by) $")


@dataclass(frozen=True)
class MentionVariant:
    kind: str
    source: int  # 0: the edit prompt; i >= 1: paraphrase i - 1
    prefix: str
    mention: str  # the subject as written in this variant
    suffix: str

    @property
    def text(self) -> str:
        return self.prefix + self.mention + self.suffix

    @property
    def span(self) -> tuple[int, int]:
        """Character span of the mention in ``text``."""
        return len(self.prefix), len(self.prefix) + len(self.mention)


def _sources(fact: Any) -> list[tuple[int, str, str]]:
    """(source index, prefix, suffix) around ``fact.subject`` in the edit prompt and paraphrases."""
    before, after = fact.prompt.split("{}")
    out = [(0, before, after)]
    for i, p in enumerate(fact.paraphrases, 1):
        at = p.find(fact.subject)
        if at >= 0:
            out.append((i, p[:at], p[at + len(fact.subject):]))
    return out


def _sentence_start(prefix: str) -> int:
    """Index in ``prefix`` where the sentence holding the text after it starts."""
    ends = [m.end() for m in _SENTENCE_END.finditer(prefix)]
    return ends[-1] if ends else 0


def _article(subject: str) -> str | None:
    first, _, rest = subject.partition(" ")
    return first if first in ARTICLES and rest.strip() else None


def _variant(kind: str, source: int, prefix: str, subject: str, suffix: str) -> MentionVariant | None:
    """One kind of variant of ``prefix + subject + suffix``; None where the kind does not apply."""
    start = _sentence_start(prefix)
    starts_sentence = not prefix[start:].strip()
    article = _article(subject)
    if kind == "exact":
        return MentionVariant(kind, source, prefix, subject, suffix)
    if kind == "lower_article":
        return MentionVariant(kind, source, prefix, subject[0].lower() + subject[1:], suffix) if article else None
    if kind in ("article_dropped", "article_dropped_one_word"):
        rest = subject[len(article) + 1:] if article else ""
        one_word = len(rest.split()) == 1
        return MentionVariant(kind, source, prefix, rest, suffix) if rest and one_word == kind.endswith("word") else None
    if kind == "mid_sentence":
        return MentionVariant(kind, source, prefix[:start] + MID_PREFIX, subject, suffix) if starts_sentence else None
    if kind == "quoted":
        return MentionVariant(kind, source, prefix + '"', subject, '"' + suffix)
    if kind == "question":
        return MentionVariant(kind, source, "Question: " + prefix, subject, suffix.rstrip() + "? Answer:")
    if kind == "possessive":
        if starts_sentence and suffix.startswith("'s "):
            return MentionVariant(kind, source, prefix, subject, suffix)
        m = _POSSESSIVE.match(prefix[start:])
        return MentionVariant(kind, source, prefix[:start], subject, f"'s {m['noun']}{suffix}") if m else None
    raise ValueError(f"unknown mention kind {kind!r}; choose from {KINDS}")


def mention_variants(*, fact: Any, kinds: Sequence[str] = KINDS) -> list[MentionVariant]:
    """The variants of ``fact``'s edit prompt and paraphrases, in (source, kind) order.

    Example::

        mention_variants(fact=Fact(prompt="The mother tongue of {} is", subject="The Beatles",
                                   target_new="French"), kinds=["possessive"])[0].text
        # "The Beatles's mother tongue is"
    """
    out = []
    for source, prefix, suffix in _sources(fact):
        for kind in kinds:
            v = _variant(kind, source, prefix, fact.subject, suffix)
            if v is not None:
                out.append(v)
    return out


def _applicable(fact: Any, kinds: Sequence[str]) -> dict[str, tuple[list[MentionVariant], int]]:
    """kind -> (its variants, number of sources where it does not apply)."""
    variants, sources = mention_variants(fact=fact, kinds=kinds), len(_sources(fact))
    per = {k: [v for v in variants if v.kind == k] for k in kinds}
    return {k: (vs, sources - len(vs)) for k, vs in per.items()}


def mention_scores(*, model: Any, tokenizer: Any, cases: Sequence[Any], batch_size: int = 16,
                   kinds: Sequence[str] = KINDS) -> list[dict[str, dict[str, Any]]]:
    """Per case, per kind: ``{"prompts", "not_applicable", "wins"}`` (``wins``: 0/1 per variant,
    P(new) > P(true) teacher forced), for the model as it is now (attach the store for "post")."""
    pairs: list[tuple[str, str]] = []
    plan = []
    for case in cases:
        fact = case.fact
        if fact.target_true is None:
            raise ValueError(f"case {case.case_id!r}: the mentions metric needs fact.target_true")
        per = _applicable(fact, kinds)
        plan.append(per)
        for vs, _ in per.values():
            for v in vs:
                pairs += [(v.text, fact.target_new), (v.text, fact.target_true)]
    scores = score_targets(model=model, tokenizer=tokenizer, pairs=pairs, batch_size=batch_size)
    out, at = [], 0
    for per in plan:
        row = {}
        for kind, (vs, missing) in per.items():
            wins = [int(scores[at + 2 * j].mean_nll < scores[at + 2 * j + 1].mean_nll) for j in range(len(vs))]
            at += 2 * len(vs)
            row[kind] = {"prompts": len(vs), "not_applicable": missing, "wins": wins}
        out.append(row)
    return out


def subject_last_token(tokenizer: Any, variant: MentionVariant) -> tuple[list[int], int | None]:
    """Token ids of ``variant.text`` (special tokens added) and the index of the last token that
    overlaps the mention's characters (None if no token does)."""
    start, end = variant.span
    enc = tokenizer(variant.text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc.get("offset_mapping")
    if offsets is None:  # a slow tokenizer: the prefix up to the mention's end
        prefix = tokenizer(variant.text[:end], add_special_tokens=True)["input_ids"]
        return ids, (len(prefix) - 1 if ids[: len(prefix)] == list(prefix) else None)
    last = None
    for i, (a, b) in enumerate(offsets):
        if b > a and a < end and b > start:
            last = i
    return ids, last


@torch.no_grad()
def mention_gate(*, model: Any, tokenizer: Any, db: Any, cases: Sequence[Any], batch_size: int = 16,
                 kinds: Sequence[str] = KINDS) -> list[dict[str, dict[str, list[int]]]]:
    """Per case, per kind: ``{"fired_own", "fired_any"}`` (0/1 per variant) at the subject's last
    token, one forward pass per variant with ``db`` attached to ``model``."""
    if not db.is_attached:
        raise ValueError("mention_gate needs the store attached to the model (db.attach(model))")
    row_of = {fid: i for i, fid in enumerate(db.ids)}
    items = []  # (case index, kind, variant index, ids, subject's last token index, own row)
    out: list[dict[str, dict[str, list[int]]]] = []
    for k, case in enumerate(cases):
        out.append({})
        for kind, (vs, _) in _applicable(case.fact, kinds).items():
            out[k][kind] = {"fired_own": [0] * len(vs), "fired_any": [0] * len(vs)}
            for j, v in enumerate(vs):
                ids, last = subject_last_token(tokenizer, v)
                if last is None:
                    log.warning("case %s: no token covers the mention in %r; counted as not fired", case.case_id,
                                v.text)
                    continue
                items.append((k, kind, j, ids, last, row_of.get(case.fact.id, -2)))
    device, pad = model_device(model), pad_id(tokenizer)
    with eval_mode(model):
        for idx in longest_first([len(item[3]) for item in items], batch_size):
            ids, mask = pad_batch([items[i][3] for i in idx], pad, torch.device("cpu"))  # (B, T) right padded
            db.last_fire_mask = db.last_fire_index = None
            call_model(model, ids.to(device), mask.to(device), use_cache=False)
            if db.last_fire_mask is None:  # an empty store routes nothing
                continue
            rows = torch.arange(len(idx))
            cols = torch.tensor([items[i][4] for i in idx])
            fired = db.last_fire_mask.cpu()[rows, cols].tolist()  # (B,)
            index = db.last_fire_index.cpu()[rows, cols].tolist()  # (B,)
            for b, i in enumerate(idx):
                k, kind, j, _, _, own = items[i]
                out[k][kind]["fired_any"][j] = int(bool(fired[b]))
                out[k][kind]["fired_own"][j] = int(bool(fired[b]) and index[b] == own)
    return out


def _helpers() -> tuple[Any, Any]:
    """``summarize_metric`` (what ``evaluate`` uses for every metric) and the Wilson ``proportion_ci``."""
    from evals.stats import proportion_ci, summarize_metric

    return summarize_metric, proportion_ci


def _percent(summary: Mapping[str, Any]) -> dict[str, Any]:
    ci = summary.get("ci")
    return dict(summary) | {"mean": 100 * summary["mean"], "ci": [100 * c for c in ci] if ci else None}


def _fraction(wins: Sequence[int] | None) -> float | None:
    return sum(wins) / len(wins) if wins else None


def summarize_mentions(*, pre: Sequence[Mapping[str, Any] | None], post: Sequence[Mapping[str, Any] | None],
                       gate: Sequence[Mapping[str, Any] | None] | None = None, confidence: float = 0.95,
                       kinds: Sequence[str] = KINDS) -> dict[str, Any]:
    """Report section: per kind, ES pre/post (percent, intervals, paired test) and post gate recall.

    ``pre``/``post``: per-case outputs of :func:`mention_scores`; ``gate``: of :func:`mention_gate`
    (or None: the gate fields are read from ``post`` when it holds them, as ``evaluate`` stores them).
    The top-level ``pre``/``post`` are the "all variants" ES (every kind but ``exact``).
    """
    summarize_metric, proportion_ci = _helpers()
    gate = gate if gate is not None else post
    out: dict[str, Any] = {"kinds": {}}
    for kind in kinds:
        a = [(p or {}).get(kind) for p in pre]
        b = [(p or {}).get(kind) for p in post]
        g = [(p or {}).get(kind) for p in gate]
        n_prompts = [len(x["wins"]) for x in b if x and x["wins"]]
        if not n_prompts:
            out["kinds"][kind] = {"cases": 0, "prompts": 0, "not_applicable": sum(x["not_applicable"] for x in b if x)}
            continue
        mkind = "proportion" if all(n == 1 for n in n_prompts) else "mean"
        es = summarize_metric([_fraction(x and x["wins"]) for x in a], [_fraction(x and x["wins"]) for x in b],
                              kind=mkind, confidence=confidence, scale=100)
        own = [v for x in g if x and "fired_own" in x for v in x["fired_own"]]
        anyf = [v for x in g if x and "fired_any" in x for v in x["fired_any"]]
        out["kinds"][kind] = {
            "cases": len(n_prompts), "prompts": sum(n_prompts),
            "not_applicable": sum(x["not_applicable"] for x in b if x), "es": es,
            "gate_recall": _percent(proportion_ci(sum(own), len(own), confidence=confidence)) if own else None,
            "fired_any": _percent(proportion_ci(sum(anyf), len(anyf), confidence=confidence)) if anyf else None,
        }

    def pooled(rows: Sequence[Mapping[str, Any] | None]) -> list[float | None]:
        return [_fraction([w for k in kinds if k != "exact" and r and r.get(k) for w in r[k]["wins"]]) for r in rows]

    out |= summarize_metric(pooled(pre), pooled(post), kind="mean", confidence=confidence, scale=100)
    out["kinds_rule"] = {"mid_prefix": MID_PREFIX, "articles": list(ARTICLES),
                         "possessive": _POSSESSIVE.pattern + " -> <subject>'s <noun> <rest>",
                         "question": "Question: <text>? Answer:"}
    return out
