"""Reading dataset records into :class:`~evals.cases.EvalCase` objects, one format at a time.

Example::

    cases = parse_counterfact(json.load(open("counterfact.json")))   # format detected: rome / mend / evalcase
    cases = parse_zsre(records, skip_invalid=True)                   # bad records skipped, listed in the report
    detect_kind(records)                                             # 'counterfact' or 'zsre'

Record formats: CounterFact in ROME's schema (``requested_rewrite``...) or the MEND/EasyEdit
schema (``prompt`` with the subject filled in, ``ground_truth``, ``rephrase_prompt``...),
detected from the first record; zsRE in the MEND schema (``src, subject, alt, answers,
rephrase, loc, loc_ans``); and for both, the rows of :meth:`EvalCases.to_dataset` (``evalcase``: case_id,
kind, subject, prompt with ``{}``, target_new, target_true, paraphrases, neighborhood, ...), so that
the cases round-trip through a Dataset or its JSON export. A Dataset row's ``None`` (Arrow's fill
for a field the record lacks) reads as a missing field. A malformed record is a :class:`DatasetError` naming the file,
the record, the field and the fix; with ``skip_invalid=True`` it is skipped, logged, and
listed in ``cases.report.skipped``. The loaders slice the raw records (``offset``/``limit``) before
validation and pass ``index_offset``, so ``case_id``/record indices stay those of the file.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Sequence

from evals.cases import DatasetError, EvalCase, EvalCases, Kind, LoadReport, SkippedRecord
from neuraldb import Fact, FactError

__all__ = ["detect_kind", "parse_counterfact", "parse_zsre"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- records


class _Bad(Exception):
    def __init__(self, field: str, problem: str, fix: str):
        super().__init__(field, problem, fix)
        self.field, self.problem, self.fix = field, problem, fix


def _get(rec: Mapping[str, Any], key: str, prefix: str = "") -> Any:
    if key not in rec:
        raise _Bad(prefix + key, "is missing", f"add the field {prefix + key!r}")
    return rec[key]


def _str(rec: Mapping[str, Any], key: str, prefix: str = "") -> str:
    value = _get(rec, key, prefix)
    if not isinstance(value, str):
        raise _Bad(prefix + key, f"must be a string, got {type(value).__name__}", "store it as a JSON string")
    if not value.strip():
        raise _Bad(prefix + key, "is empty", "give a non-empty string or drop the record")
    return value


def _map(rec: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
    value = _get(rec, key, prefix)
    if not isinstance(value, Mapping):
        raise _Bad(prefix + key, f"must be an object, got {type(value).__name__}", "store it as a JSON object")
    return value


def _strs(rec: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = _get(rec, key)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _Bad(key, "must be a list of non-empty strings", "store it as a JSON list of strings")
    return tuple(value)


def _template(text: str, subject: str, field: str) -> str:
    """``text`` with the subject's first occurrence replaced by ``{}``."""
    at = text.find(subject)
    if at < 0:
        raise _Bad(field, f"does not contain the subject {subject!r} (case-sensitive)",
                   "fix the subject or the prompt so the subject appears verbatim")
    return _no_braces(text[:at] + "{}" + text[at + len(subject):], field)


def _no_braces(template: str, field: str) -> str:
    rest = template.replace("{}", "", 1)
    if "{" in rest or "}" in rest:
        raise _Bad(field, "contains a literal '{' or '}'", "remove the braces; prompts are format templates")
    return template


def _case_id(rec: Mapping[str, Any]) -> int:
    value = _get(rec, "case_id")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad("case_id", f"must be an integer, got {type(value).__name__}", "store it as a JSON integer")
    return value


def _fact(**kw: Any) -> Fact:
    try:
        return Fact(**kw)
    except FactError as exc:  # Fact's own checks (already names the field)
        raise _Bad("(fact)", str(exc), "fix the record") from None


def _counterfact_rome(rec: Mapping[str, Any], index: int, source: str) -> EvalCase:
    cid = _case_id(rec)
    rr = _map(rec, "requested_rewrite")
    p = "requested_rewrite."
    prompt, subject = _str(rr, "prompt", p), _str(rr, "subject", p)
    if prompt.count("{}") != 1:
        raise _Bad(p + "prompt", "must contain exactly one '{}'", "put '{}' where the subject goes")
    _no_braces(prompt, p + "prompt")
    new, true = _map(rr, "target_new", p), _map(rr, "target_true", p)
    fact = _fact(prompt=prompt, subject=subject, target_new=_str(new, "str", p + "target_new."),
                 target_true=_str(true, "str", p + "target_true."), paraphrases=_strs(rec, "paraphrase_prompts"),
                 neighborhood=_strs(rec, "neighborhood_prompts"), id=f"counterfact-{cid}",
                 meta={"source": source, "index": index, "format": "rome"})
    rel = rr.get("relation_id")
    return EvalCase(case_id=cid, kind="counterfact", fact=fact,
                    generation_prompts=_strs(rec, "generation_prompts") if "generation_prompts" in rec else (),
                    attribute_prompts=_strs(rec, "attribute_prompts") if "attribute_prompts" in rec else (),
                    relation_id=rel if isinstance(rel, str) else None,
                    target_new_id=new.get("id") if isinstance(new.get("id"), str) else None)


def _counterfact_mend(rec: Mapping[str, Any], index: int, source: str) -> EvalCase:
    cid = _case_id(rec)
    subject = _str(rec, "subject")
    fact = _fact(prompt=_template(_str(rec, "prompt"), subject, "prompt"), subject=subject,
                 target_new=_str(rec, "target_new"), target_true=_str(rec, "ground_truth"),
                 paraphrases=(_str(rec, "rephrase_prompt"),), neighborhood=(_str(rec, "locality_prompt"),),
                 id=f"counterfact-{cid}",
                 meta={"source": source, "index": index, "format": "mend",
                       "locality_ground_truth": _str(rec, "locality_ground_truth")})
    return EvalCase(case_id=cid, kind="counterfact", fact=fact)


def _opt_str(rec: Mapping[str, Any], key: str) -> str | None:
    return None if rec.get(key) is None else _str(rec, key)


def _opt_strs(rec: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return () if rec.get(key) is None else _strs(rec, key)


def _evalcase(rec: Mapping[str, Any], index: int, source: str, *, kind: Kind) -> EvalCase:
    """A row of :meth:`EvalCases.to_dataset` (or its JSON export)."""
    cid = _case_id(rec)
    if _str(rec, "kind") != kind:
        raise _Bad("kind", f"is {rec['kind']!r}, not {kind!r}", f"load it with load_{rec['kind']} or load_any")
    prompt = _str(rec, "prompt")
    if prompt.count("{}") != 1:
        raise _Bad("prompt", "must contain exactly one '{}'", "put '{}' where the subject goes")
    meta: Any = {"source": source, "index": index, "format": "evalcase"}
    if rec.get("meta") is not None:
        try:
            meta = json.loads(_str(rec, "meta"))
        except json.JSONDecodeError as exc:
            raise _Bad("meta", f"is not JSON ({exc})", "store the fact's meta as a JSON object string") from None
        if not isinstance(meta, dict):
            raise _Bad("meta", f"must be a JSON object, got {type(meta).__name__}", "store a JSON object string")
    fact = _fact(prompt=_no_braces(prompt, "prompt"), subject=_str(rec, "subject"), target_new=_str(rec, "target_new"),
                 target_true=_opt_str(rec, "target_true"), paraphrases=_opt_strs(rec, "paraphrases"),
                 neighborhood=_opt_strs(rec, "neighborhood"), aliases=_opt_strs(rec, "aliases"),
                 id=_opt_str(rec, "id") or f"{kind}-{cid}", meta=meta)
    return EvalCase(case_id=cid, kind=kind, fact=fact, generation_prompts=_opt_strs(rec, "generation_prompts"),
                    attribute_prompts=_opt_strs(rec, "attribute_prompts"), loc_prompt=_opt_str(rec, "loc_prompt"),
                    loc_answer=_opt_str(rec, "loc_answer"), relation_id=_opt_str(rec, "relation_id"),
                    target_new_id=_opt_str(rec, "target_new_id"))


def _is_evalcase(first: Any) -> bool:
    return isinstance(first, Mapping) and "kind" in first and "paraphrases" in first and "target_new" in first


def _zsre(rec: Mapping[str, Any], index: int, source: str, *, target: str, loc_suffix: str) -> EvalCase:
    subject, src = _str(rec, "subject"), _str(rec, "src")
    answers = _get(rec, "answers")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise _Bad("answers", "must be a list of strings", "store it as a JSON list of strings")
    true = answers[0] if answers and answers[0].strip() else None
    if target == "alt":
        new = _str(rec, "alt")
    elif true is None:
        raise _Bad("answers", "is empty but target='answers' needs answers[0]", "drop the record")
    else:
        new, true = true, None
    loc = _str(rec, "loc")
    fact = _fact(prompt=_template(src, subject, "src"), subject=subject, target_new=new, target_true=true,
                 paraphrases=(_str(rec, "rephrase"),), id=f"zsre-{index}",
                 meta={"source": source, "index": index, "format": "mend", "target": target})
    return EvalCase(case_id=index, kind="zsre", fact=fact, loc_prompt=loc + loc_suffix,
                    loc_answer=_str(rec, "loc_ans"))


def _detect_counterfact(records: Sequence[Any], source: str) -> str:
    first = next((r for r in records if isinstance(r, Mapping)), None)
    if first is None:
        raise DatasetError(f"{source}: no JSON object among the records; is it a CounterFact file?")
    if _is_evalcase(first):
        return "evalcase"
    if "requested_rewrite" in first:
        return "rome"
    if "prompt" in first and ("ground_truth" in first or "rephrase_prompt" in first):
        return "mend"
    raise DatasetError(f"{source}: cannot tell the CounterFact format from the first record's keys "
                       f"{sorted(first)}; expected ROME's (case_id, requested_rewrite, paraphrase_prompts, "
                       "neighborhood_prompts, ...) or MEND's (case_id, prompt, subject, target_new, "
                       "ground_truth, rephrase_prompt, locality_prompt, ...); pass format='rome' or 'mend'")


def _parse(records: Sequence[Any], build: Any, *, source: str, fmt: str, skip_invalid: bool,
           index_offset: int) -> EvalCases:
    cases: list[EvalCase] = []
    skipped: list[SkippedRecord] = []
    seen: dict[int, int] = {}
    for i, rec in enumerate(records):
        index = index_offset + i
        cid = rec.get("case_id") if isinstance(rec, Mapping) else None
        try:
            if not isinstance(rec, Mapping):
                raise _Bad("(record)", f"is a {type(rec).__name__}, not a JSON object", "store each record as an object")
            case = build(rec, index, source)
            if case.case_id in seen:
                raise _Bad("case_id", f"{case.case_id} repeats record {seen[case.case_id]}", "drop the duplicate")
        except _Bad as bad:
            where = f"record {index}" + (f" (case_id {cid!r})" if cid is not None else "")
            if not skip_invalid:
                raise DatasetError(f"{source}: {where}: field {bad.field!r} {bad.problem}; {bad.fix} "
                                   "(or pass skip_invalid=True to skip such records)") from None
            skipped.append(SkippedRecord(index, cid, bad.field, bad.problem))
            continue
        seen[case.case_id] = index
        cases.append(case)
    report = LoadReport(source, fmt, len(records), len(cases), tuple(skipped))
    if skipped:
        log.warning("%s", report.summary())
    return EvalCases(cases, report)


def parse_counterfact(records: Sequence[Any], *, source: str = "<records>", format: str = "auto",
                      skip_invalid: bool = False, index_offset: int = 0) -> EvalCases:
    """CounterFact records (parsed JSON or Dataset rows) to :class:`EvalCases`; ``format``: auto/rome/mend/evalcase."""
    fmt = _detect_counterfact(records, source) if format == "auto" else format
    if fmt not in ("rome", "mend", "evalcase"):
        raise DatasetError(f"unknown CounterFact format {format!r}; choose 'auto', 'rome', 'mend' or 'evalcase'")
    build = {"rome": _counterfact_rome, "mend": _counterfact_mend,
             "evalcase": lambda rec, index, src: _evalcase(rec, index, src, kind="counterfact")}[fmt]
    return _parse(records, build, source=source, fmt=fmt, skip_invalid=skip_invalid, index_offset=index_offset)


def parse_zsre(records: Sequence[Any], *, source: str = "<records>", skip_invalid: bool = False,
               target: str = "answers", loc_suffix: str = "?", index_offset: int = 0,
               format: str = "auto") -> EvalCases:
    """zsRE MEND records (or :meth:`EvalCases.to_dataset` rows, ``format="evalcase"``) to :class:`EvalCases`.

    ``target="answers"`` (the default) edits to ``answers[0]`` as ROME/MEMIT/AlphaEdit's
    ``MENDQADataset`` does: that is the published protocol, and the pre-edit rows the NeuralDB
    paper reports come from it (``target_true`` is then None). ``target="alt"`` edits to ``alt``
    (EasyEdit's convention) with ``target_true=answers[0]``. ``loc_suffix="?"`` follows the same
    code, which appends '?' to the NQ question. ``evalcase`` rows keep their own targets and prompts.
    """
    if target not in ("alt", "answers"):
        raise DatasetError(f"unknown zsRE target {target!r}; choose 'alt' or 'answers'")
    if format == "auto":
        format = "evalcase" if _is_evalcase(next((r for r in records if isinstance(r, Mapping)), None)) else "mend"
    if format not in ("mend", "evalcase"):
        raise DatasetError(f"unknown zsRE format {format!r}; choose 'auto', 'mend' or 'evalcase'")

    def build(rec: Mapping[str, Any], index: int, src: str) -> EvalCase:
        if format == "evalcase":
            return _evalcase(rec, index, src, kind="zsre")
        return _zsre(rec, index, src, target=target, loc_suffix=loc_suffix)

    return _parse(records, build, source=source, fmt=format, skip_invalid=skip_invalid, index_offset=index_offset)


def detect_kind(records: Sequence[Any], source: str = "<records>") -> Kind:
    """'counterfact' or 'zsre', from the first record's keys (an ``evalcase`` row's ``kind``)."""
    first = next((r for r in records if isinstance(r, Mapping)), None) or {}
    if _is_evalcase(first) and first.get("kind") in ("counterfact", "zsre"):
        return first["kind"]
    if "requested_rewrite" in first or ("prompt" in first and ("ground_truth" in first or "rephrase_prompt" in first)):
        return "counterfact"
    if "src" in first and "loc" in first:
        return "zsre"
    keys = sorted(first)
    raise DatasetError(f"{source}: cannot tell whether this is CounterFact or zsRE from the first record's keys "
                       f"{keys}; use load_counterfact or load_zsre")
