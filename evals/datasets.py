"""Evaluation datasets: CounterFact and zsRE as validated :class:`EvalCase` lists.

Example::

    cases = load_counterfact(limit=100)           # $NEURALDB_DATA_DIR, else ROME's public file
    cases.report.summary()                        # '.../counterfact.json (rome): 100 of 100 records loaded'
    cases = load_zsre("zsre_mend_eval.json", skip_invalid=True)
    [c.fact for c in cases]                       # neuraldb.Fact objects, ready to edit
    cases = load_counterfact(dataset_dict, split="test")   # a datasets.Dataset / DatasetDict
    cases = load_counterfact("azhx/counterfact", split="test")  # a hub dataset id, when online
    cases.to_dataset()                            # a datasets.Dataset, one row per case

Where the data comes from (first that applies):
  0. ``source``: a ``datasets.Dataset`` / ``DatasetDict`` (its ``split``), or a hub dataset id
     (``org/name`` that is not an existing path) read with ``datasets.load_dataset(id, split=split)``;
     offline (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``, or no answer from the hub) that is an
     error naming the id and the fix. ``datasets`` is imported only then (:mod:`evals.hf_datasets`).
  1. ``source``: a local path, a ``file://`` URL, or an ``http(s)://`` URL (downloaded once
     into the cache dir; pass ``sha256=`` to pin it).
  2. ``data_dir=`` or ``$NEURALDB_DATA_DIR``: a folder laid out like ``DATA_DIR_LAYOUT``
     (the first existing candidate for the ``split`` wins; none is an error, never a download).
  3. The public file in ``PUBLIC_FILES`` (ROME's ``counterfact.json`` / ``zsre_mend_eval.json``),
     downloaded atomically into ``cache_dir`` / ``$NEURALDB_CACHE_DIR`` /
     ``~/.cache/neuraldb/datasets``. Checksums: no published sha256 of either file could be
     found, so the table pins the size where it is known (counterfact.json: 45,108,470 bytes,
     from the data notes) and verifies ``sha256=`` when you pass it; otherwise the sha256 seen at
     the first download is recorded beside the file (``<file>.sha256``) and checked on every
     later load (trust on first use). A mismatch while downloading is a :class:`DatasetError`
     and nothing is kept; a cached file that no longer matches is an error that says to delete it.

Record formats: CounterFact in ROME's schema (``requested_rewrite``...) or the MEND/EasyEdit
schema (``prompt`` with the subject filled in, ``ground_truth``, ``rephrase_prompt``...),
detected from the first record; zsRE in the MEND schema (``src, subject, alt, answers,
rephrase, loc, loc_ans``); and for both, the rows of :meth:`EvalCases.to_dataset` (``evalcase``: case_id,
kind, subject, prompt with ``{}``, target_new, target_true, paraphrases, neighborhood, ...), so that
the cases round-trip through a Dataset or its JSON export. A Dataset row's ``None`` (Arrow's fill
for a field the record lacks) reads as a missing field. A malformed record is a :class:`DatasetError` naming the file,
the record, the field and the fix; with ``skip_invalid=True`` it is skipped, logged, and
listed in ``cases.report.skipped``. ``offset``/``limit`` slice the raw records before
validation, so ``case_id``/record indices stay those of the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from neuraldb import Fact, FactError
from neuraldb.io import atomic_write, default_data_dir, sha256_file, write_text

__all__ = [
    "DATA_DIR_LAYOUT", "PUBLIC_FILES", "DatasetError", "EvalCase", "EvalCases", "LoadReport", "editable_cases",
    "RemoteFile", "SkippedRecord", "detect_kind", "download", "load_any", "load_counterfact", "load_zsre",
    "parse_counterfact", "parse_zsre", "resolve_source",
]

log = logging.getLogger(__name__)
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


def editable_cases(cases: Sequence[EvalCase], tokenizer: Any, config: Any = None) -> tuple[EvalCases, list[str]]:
    """The cases whose subject can be keyed, and a note per case left out.

    Example::

        cases, notes = editable_cases(load_counterfact(limit=200), tok, neuraldb.EditConfig())

    A subject is keyable when ``neuraldb.locate_subject`` finds its last token in the
    prompt and in the config's KL prompt (zsRE's "What's Your Hurry??" is not: with
    most tokenizers the subject's last token runs into the "?"). ``neuraldb.edit``
    rejects such facts with a FactError; evaluation runs leave them out and say so.
    """
    from neuraldb import EditConfig, FactError, locate_subject

    config = config or EditConfig()
    keep, notes = [], []
    for c in cases:
        try:
            locate_subject(tokenizer, c.fact.prompt, c.fact.subject)
            locate_subject(tokenizer, config.kl_prompt, c.fact.subject)
        except FactError as exc:
            notes.append(f"{c.fact.id}: {exc}")
            continue
        keep.append(c)
    report = getattr(cases, "report", None) or LoadReport(source="", format="", records=len(cases), loaded=len(cases))
    return EvalCases(keep, report), notes


@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str
    records: int
    size: int | None = None  # bytes, when known
    sha256: str | None = None  # None: no published value found (see module docstring)


PUBLIC_FILES: dict[str, RemoteFile] = {
    "counterfact": RemoteFile("https://rome.baulab.info/data/dsets/counterfact.json", "counterfact.json",
                              records=21919, size=45_108_470),
    # 8,091,864 characters per the data notes; the byte size is not recorded, so not pinned.
    "zsre": RemoteFile("https://rome.baulab.info/data/dsets/zsre_mend_eval.json", "zsre_mend_eval.json",
                       records=19086),
}

# (kind, split) -> candidate paths under the data dir, preferred first.
DATA_DIR_LAYOUT: dict[tuple[str, str], tuple[str, ...]] = {
    ("counterfact", "eval"): ("counterfact_rome/counterfact_rome_test2191.json",  # unbiased 10% split
                              "counterfact/counterfact.json",  # ROME's full file, if you add it
                              "counterfact/counterfact-edit.json"),  # MEND/EasyEdit format
    ("counterfact", "train"): ("counterfact/counterfact-train.json",),
    ("zsre", "eval"): ("zsre/zsre_mend_eval.json", "zsre_eval_subset/zsre_mend_eval_subset19.json"),
    ("zsre", "train"): ("zsre/zsre_mend_train.json", "zsre/zsre_mend_train-1k.json"),
}


# ----------------------------------------------------------------------------- sources


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically (temp file in the same folder, then rename).

    ``size`` and ``sha256`` are checked before the rename; a mismatch deletes the temp file
    and raises :class:`DatasetError`. Without ``sha256`` the observed digest is written to
    ``<dest>.sha256`` so later loads can detect a changed file.
    """
    dest = Path(dest)
    h, n = hashlib.sha256(), 0
    try:
        with atomic_write(dest) as tmp:  # the temporary file is removed on any error
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
            digest = h.hexdigest()
            if size is not None and n != size:
                raise DatasetError(f"download of {url} is {n} bytes, expected {size}; nothing was kept "
                                   "(retry, or pass the file itself as source=)")
            if sha256 is not None and digest != sha256.lower():
                raise DatasetError(f"download of {url} has sha256 {digest}, expected {sha256}; nothing was kept "
                                   "(the file changed upstream or the transfer was corrupted)")
    except OSError as exc:  # URLError, HTTPError, timeouts, disk errors
        raise DatasetError(f"could not download {url} ({exc}); pass source= a local file, or set "
                           "data_dir= / NEURALDB_DATA_DIR to a folder that has it") from exc
    if sha256 is None:
        write_text(str(dest) + ".sha256", digest + "\n")
        log.warning("downloaded %s without a pinned sha256; recorded %s for later checks", url, digest)
    return dest


def _verify_cached(path: Path, *, sha256: str | None, size: int | None) -> None:
    side = Path(str(path) + ".sha256")
    expected = sha256 or (side.read_text().strip() if side.exists() else None)
    fix = f"delete {path} to download it again, or pass the right sha256="
    if size is not None and path.stat().st_size != size:
        raise DatasetError(f"cached {path} is {path.stat().st_size} bytes, expected {size}; {fix}")
    if expected is not None and sha256_file(path) != expected.lower():
        raise DatasetError(f"cached {path} does not match sha256 {expected}; {fix}")


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("NEURALDB_CACHE_DIR"):
        return Path(os.environ["NEURALDB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neuraldb" / "datasets"


def _fetch(url: str, dest: Path, *, sha256: str | None, size: int | None) -> Path:
    if dest.exists():
        _verify_cached(dest, sha256=sha256, size=size)
        return dest
    log.info("downloading %s to %s", url, dest)
    return download(url, dest, sha256=sha256, size=size)


def resolve_source(kind: Kind, source: str | os.PathLike | None = None, *,
                   data_dir: str | os.PathLike | None = None, split: str = "eval",
                   sha256: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local file a loader reads (downloading it if needed); see the module docstring."""
    if source is not None:
        text = str(source)
        scheme = urllib.parse.urlparse(text).scheme
        if scheme in ("http", "https"):
            name = Path(urllib.parse.urlparse(text).path).name or "data.json"
            tag = hashlib.sha1(text.encode()).hexdigest()[:10]
            return _fetch(text, _cache_dir(cache_dir) / f"{tag}-{name}", sha256=sha256, size=None)
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(text).path)) if scheme == "file" else Path(text)
        if not path.is_file():
            raise DatasetError(f"{kind} source {text!r} is not a file; give a path to a JSON file or a URL")
        if sha256 is not None and sha256_file(path) != sha256.lower():
            raise DatasetError(f"{path} does not match sha256 {sha256}")
        return path
    if (kind, split) not in DATA_DIR_LAYOUT:
        splits = sorted(s for k, s in DATA_DIR_LAYOUT if k == kind)
        raise DatasetError(f"unknown {kind} split {split!r}; choose one of {splits}")
    root = default_data_dir(data_dir)
    if root is not None:
        candidates = [Path(root) / rel for rel in DATA_DIR_LAYOUT[(kind, split)]]
        for path in candidates:
            if path.is_file():
                if sha256 is not None and sha256_file(path) != sha256.lower():
                    raise DatasetError(f"{path} does not match sha256 {sha256}")
                return path
        raise DatasetError(f"no {kind} {split} file in data dir {root} (looked for "
                           f"{[str(c) for c in candidates]}); add one or pass source=")
    if split != "eval":
        raise DatasetError(f"there is no public {kind} {split} file to download; pass source= or data_dir=")
    remote = PUBLIC_FILES[kind]
    return _fetch(remote.url, _cache_dir(cache_dir) / remote.filename,
                  sha256=sha256 or remote.sha256, size=remote.size)


def _read_records(path: Path) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in fh if line.strip()]
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); is it the right file?") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


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


def _window(records: list[Any], offset: int, limit: int | None) -> list[Any]:
    if offset < 0 or (limit is not None and limit < 0):
        raise DatasetError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
    return records[offset: None if limit is None else offset + limit]


Source = Any  # str | os.PathLike | datasets.Dataset | datasets.DatasetDict | None


def _records(kind: Kind, source: Source, *, data_dir: str | os.PathLike | None, split: str, offset: int,
             limit: int | None, sha256: str | None, cache_dir: str | os.PathLike | None) -> tuple[list[Any], str]:
    """The raw records (``offset``/``limit`` applied) and the name of where they came from."""
    from evals import hf_datasets  # imports no ``datasets`` until a Dataset or hub id needs it

    if hf_datasets.is_dataset(source) or hf_datasets.is_hub_id(source):
        if sha256 is not None:
            raise DatasetError("sha256= checks a file; a datasets.Dataset or hub dataset id has none to check")
        return hf_datasets.records_from(source, split=split, offset=offset, limit=limit)
    path = resolve_source(kind, source, data_dir=data_dir, split=split, sha256=sha256, cache_dir=cache_dir)
    return _window(_read_records(path), offset, limit), str(path)


def load_counterfact(source: Source = None, *, data_dir: str | os.PathLike | None = None,
                     split: str = "eval", limit: int | None = None, offset: int = 0, skip_invalid: bool = False,
                     format: str = "auto", sha256: str | None = None,
                     cache_dir: str | os.PathLike | None = None) -> EvalCases:
    """Load CounterFact (ROME or MEND/EasyEdit schema) as :class:`EvalCases`; see the module docstring.

    ``source``: a file, URL, ``datasets.Dataset`` / ``DatasetDict`` (``split`` picks its split) or hub
    dataset id; None reads the data dir, else the public file. ``split`` names the data dir's file,
    the DatasetDict's split or the hub split.
    """
    records, name = _records("counterfact", source, data_dir=data_dir, split=split, offset=offset, limit=limit,
                             sha256=sha256, cache_dir=cache_dir)
    return parse_counterfact(records, source=name, format=format, skip_invalid=skip_invalid, index_offset=offset)


def load_zsre(source: Source = None, *, data_dir: str | os.PathLike | None = None,
              split: str = "eval", limit: int | None = None, offset: int = 0, skip_invalid: bool = False,
              target: str = "answers", loc_suffix: str = "?", sha256: str | None = None,
              cache_dir: str | os.PathLike | None = None) -> EvalCases:
    """Load zsRE (MEND schema) as :class:`EvalCases`; ``case_id`` is the record index in the file.

    ``source`` and ``split`` as in :func:`load_counterfact`. ``target``: ``"answers"`` (default: edit
    to ``answers[0]``, the ROME/MEMIT/AlphaEdit protocol) or ``"alt"`` (EasyEdit's); see :func:`parse_zsre`.
    """
    records, name = _records("zsre", source, data_dir=data_dir, split=split, offset=offset, limit=limit,
                             sha256=sha256, cache_dir=cache_dir)
    return parse_zsre(records, source=name, skip_invalid=skip_invalid, target=target,
                      loc_suffix=loc_suffix, index_offset=offset)


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


def load_any(source: Source, *, limit: int | None = None, offset: int = 0, skip_invalid: bool = False,
             target: str = "answers", sha256: str | None = None, split: str = "eval") -> EvalCases:
    """Load a CounterFact or zsRE file, Dataset or hub id, whichever it is (see :func:`detect_kind`).

    zsRE uses ``target``; ``split`` picks a DatasetDict's or the hub's split.
    """
    records, name = _records("counterfact", source, data_dir=None, split=split, offset=offset, limit=limit,
                             sha256=sha256, cache_dir=None)
    if detect_kind(records, name) == "zsre":
        return parse_zsre(records, source=name, skip_invalid=skip_invalid, target=target, index_offset=offset)
    return parse_counterfact(records, source=name, skip_invalid=skip_invalid, index_offset=offset)
