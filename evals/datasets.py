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
  1. ``source``: a local path or a ``file://`` / ``http(s)://`` URL; 2. ``data_dir=`` or
     ``$NEURALDB_DATA_DIR``; 3. the public file, downloaded once and checksummed
     (:mod:`evals.sources`).

The records are read by :mod:`evals.formats` (CounterFact in the ROME or MEND/EasyEdit schema,
zsRE in the MEND schema, and the rows of :meth:`EvalCases.to_dataset`); the cases are
:mod:`evals.cases`. A malformed record is a :class:`DatasetError` naming the file, the record,
the field and the fix; with ``skip_invalid=True`` it is skipped, logged, and listed in
``cases.report.skipped``. ``offset``/``limit`` slice the raw records before validation, so
``case_id``/record indices stay those of the file.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from evals.cases import DatasetError, EvalCase, EvalCases, Kind, LoadReport
from evals.formats import detect_kind, parse_counterfact, parse_zsre
from evals.sources import read_records, resolve_source

log = logging.getLogger(__name__)

__all__ = ["editable_cases", "load_any", "load_counterfact", "load_zsre"]


def editable_cases(cases: Sequence[EvalCase], tokenizer: Any, config: Any = None) -> tuple[EvalCases, list[str]]:
    """The cases whose subject can be keyed, and a note per case left out.

    Example::

        cases, notes = editable_cases(load_counterfact(limit=200), tok, neuraldb.EditConfig())

    A subject is keyable when ``neuraldb.locate_subject`` finds its last token in the
    prompt and in the config's KL prompt (zsRE's "What's Your Hurry??" is not: with
    most tokenizers the subject's last token runs into the "?"). ``neuraldb.edit``
    rejects such facts with a FactError; evaluation runs leave them out and say so.
    A case with the subject and prompt of an earlier case (CounterFact's twin cities:
    7 of its 2,191 test cases) is left out too: one edit holds one fact per
    ``(subject, prompt)`` (``neuraldb.FactConflictError``).
    """
    from neuraldb import EditConfig, FactError, locate_subject

    config = config or EditConfig()
    keep, notes = [], []
    first: dict[tuple[str, str], str] = {}
    for c in cases:
        try:
            locate_subject(tokenizer, c.fact.prompt, c.fact.subject)
            locate_subject(tokenizer, config.kl_prompt, c.fact.subject)
        except FactError as exc:
            notes.append(f"{c.fact.id}: {exc}")
            continue
        if c.fact.identity in first:
            notes.append(f"{c.fact.id}: same subject and prompt as {first[c.fact.identity]} (one fact per "
                         "subject and prompt in a store)")
            continue
        first[c.fact.identity] = c.fact.id
        keep.append(c)
    report = getattr(cases, "report", None) or LoadReport(source="", format="", records=len(cases), loaded=len(cases))
    return EvalCases(keep, report), notes


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
    wanted = None if limit is None else offset + limit  # in the data dir: the first file that holds them
    path = resolve_source(kind, source, data_dir=data_dir, split=split, sha256=sha256, cache_dir=cache_dir,
                          min_records=wanted)
    records = read_records(path)
    if wanted is not None and len(records) < wanted:
        log.warning("%s holds %d records: %d of the %d asked for (offset %d, limit %d) are loaded; "
                    "evals.sources.choose_source lists the data dir's files", path, len(records),
                    max(0, len(records) - offset), limit, offset, limit)
    return _window(records, offset, limit), str(path)


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
