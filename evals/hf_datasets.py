"""Hugging Face ``datasets`` at the loaders' edges: Dataset inputs, hub ids, Dataset output.

Example::

    from datasets import Dataset
    cases = load_counterfact(Dataset.from_list(records))           # ROME or MEND/EasyEdit rows
    cases = load_counterfact(dataset_dict, split="test")           # a DatasetDict: its split
    cases = load_counterfact("azhx/counterfact", split="test")     # a hub id, when online
    ds = cases.to_dataset()                                        # one row per case (FEATURES)
    load_counterfact(ds) == cases                                  # True: the round trip

``datasets`` is the ``eval`` extra's dependency; it is imported only by the functions that
need it, never when :mod:`evals.datasets` is imported. A hub id is a string ``org/name`` that
is not an existing path; with ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` set, or when the hub
endpoint does not answer within a few seconds, it is an error that names the id and the
offline alternatives (a local file, a data dir, or a Dataset you loaded yourself).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["FEATURE_TYPES", "is_dataset", "is_hub_id", "records_from", "to_dataset"]

#: The columns of :func:`to_dataset` (also read back by the loaders): name -> type.
FEATURE_TYPES: dict[str, str] = {
    "case_id": "int64", "kind": "string", "id": "string", "subject": "string", "prompt": "string",
    "target_new": "string", "target_true": "string", "paraphrases": "list", "neighborhood": "list",
    "aliases": "list", "generation_prompts": "list", "attribute_prompts": "list", "loc_prompt": "string",
    "loc_answer": "string", "relation_id": "string", "target_new_id": "string", "meta": "string",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt", ".gz", ".zip")
_TRUE = {"1", "on", "yes", "true"}
PROBE_TIMEOUT = 5.0  # seconds to wait for the hub endpoint before calling it unreachable


def _error(message: str) -> Exception:
    from evals.cases import DatasetError  # the loaders' one error type

    return DatasetError(message)


def _require() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise _error(f"this needs the Hugging Face datasets package ({exc}); "
                     "pip install 'neuraldb[eval]' or pip install datasets") from None
    return datasets


def is_dataset(obj: Any) -> bool:
    """A ``datasets`` Dataset, DatasetDict or their iterable forms (without importing ``datasets``)."""
    mod = sys.modules.get("datasets")
    if mod is None or not hasattr(mod, "Dataset"):
        return False
    types = tuple(getattr(mod, n) for n in ("Dataset", "DatasetDict", "IterableDataset", "IterableDatasetDict")
                  if hasattr(mod, n))
    return isinstance(obj, types)


def is_hub_id(source: Any) -> bool:
    """A string ``org/name`` that is not an existing path nor a data file's name."""
    if not isinstance(source, str) or not _HUB_ID.fullmatch(source) or ".." in source:
        return False
    return not source.lower().endswith(_FILE_SUFFIXES) and not Path(source).exists()


def _offline() -> str | None:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def _fix(hub_id: str) -> str:
    return (f"pass a local file (source=path.json), a data dir (data_dir= or NEURALDB_DATA_DIR), or a "
            f"datasets.Dataset you loaded yourself (no file or folder named {hub_id!r} exists here either)")


def _load_hub(hub_id: str, split: str) -> Any:
    """``datasets.load_dataset(hub_id, split=split)``, failing fast with the fix when offline."""
    flag = _offline()
    if flag:
        raise _error(f"hub dataset {hub_id!r} cannot be loaded: {flag} is set, so the hub is not contacted; "
                     + _fix(hub_id))
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:  # a short probe, so that no network is an error now rather than after the hub client's retries
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, a bad endpoint
        raise _error(f"hub dataset {hub_id!r} cannot be loaded: {endpoint} did not answer within "
                     f"{PROBE_TIMEOUT:g}s ({exc}); " + _fix(hub_id)) from None
    datasets = _require()
    try:
        return datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # the hub client's errors have no common base
        raise _error(f"could not load hub dataset {hub_id!r} split {split!r} ({type(exc).__name__}: {exc}); "
                     "check the id and split=, or " + _fix(hub_id)) from exc


def _pick_split(obj: Any, split: str, name: str) -> tuple[Any, str]:
    if isinstance(obj, Mapping):  # DatasetDict / IterableDatasetDict
        if split not in obj:
            raise _error(f"{name} has no split {split!r}; available splits: {sorted(obj)}; pass split= one of them")
        return obj[split], f"{name}[{split!r}]"
    return obj, name


def _strip_none(value: Any) -> Any:
    """Arrow fills a field a record lacks with None: read it as missing, as in a JSON record."""
    if isinstance(value, Mapping):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    return value


def records_from(source: Any, *, split: str, offset: int, limit: int | None) -> tuple[list[Any], str]:
    """The records of a Dataset / DatasetDict / hub id (``offset``/``limit`` applied) and their name."""
    if offset < 0 or (limit is not None and limit < 0):
        raise _error(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
    if isinstance(source, str):
        obj, name = _load_hub(source, split), f"{source}[{split!r}]"
    else:
        obj, name = source, f"datasets.{type(source).__name__}"
        dataset_name = getattr(getattr(source, "info", None), "dataset_name", None)
        if dataset_name:
            name += f" {dataset_name!r}"
    data, name = _pick_split(obj, split, name)
    end = None if limit is None else offset + limit
    if hasattr(data, "select") and hasattr(data, "__len__"):  # a map-style Dataset: read only the window
        n = len(data)
        rows = data.select(range(min(offset, n), n if end is None else min(end, n))).to_list()
    else:  # an IterableDataset
        rows = list(itertools.islice(iter(data), offset, end))
    return [_strip_none(r) for r in rows], name


def _row(case: Any) -> dict[str, Any]:
    f = case.fact
    return {"case_id": case.case_id, "kind": case.kind, "id": f.id, "subject": f.subject, "prompt": f.prompt,
            "target_new": f.target_new, "target_true": f.target_true, "paraphrases": list(f.paraphrases),
            "neighborhood": list(f.neighborhood), "aliases": list(f.aliases),
            "generation_prompts": list(case.generation_prompts), "attribute_prompts": list(case.attribute_prompts),
            "loc_prompt": case.loc_prompt, "loc_answer": case.loc_answer, "relation_id": case.relation_id,
            "target_new_id": case.target_new_id, "meta": json.dumps(dict(f.meta), default=str, sort_keys=True)}


def to_dataset(cases: Sequence[Any], description: str = "") -> Any:
    """A ``datasets.Dataset`` with one row per :class:`~evals.cases.EvalCase` (columns: FEATURE_TYPES).

    ``prompt`` is the template with ``{}`` for the subject; ``meta`` is the fact's meta as JSON.
    The loaders read such a Dataset (or its JSON export) back to the same cases.
    """
    datasets = _require()
    list_of = getattr(datasets, "List", None) or datasets.Sequence  # List since datasets 4
    features = datasets.Features({
        k: list_of(datasets.Value("string")) if t == "list" else datasets.Value(t)
        for k, t in FEATURE_TYPES.items()})
    info = datasets.DatasetInfo(description=description, features=features)
    rows = [_row(c) for c in cases]
    columns = {k: [r[k] for r in rows] for k in FEATURE_TYPES}  # from_dict: an empty selection works too
    return datasets.Dataset.from_dict(columns, features=features, info=info)
