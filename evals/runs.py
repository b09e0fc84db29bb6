"""The resumable run folder of an evaluation, and the digests that identify its store and cases.

Example::

    from evals.runs import RunFolder, cases_digest, store_digest
    run = RunFolder("reports/cf100", {"store": store_digest(db), "cases": cases_digest(cases)})
    todo = [c for c in cases if c.fact.id not in run.done]     # finished cases, as read back
    run.append(records)                                         # one write per chunk, fsynced

``run.json`` holds the run's identity (for :func:`evals.evaluate.evaluate`: data, store digest,
model, metrics, generation settings, seed); ``cases.jsonl`` gets one JSON line per finished
case, appended with one ``write`` per chunk, flushed and fsynced. Opening a folder with the same
identity reads the cases already there (nothing is recomputed); a different identity is a
``ValueError`` that names what differs. A torn last line (a kill mid-write) is dropped. Without
a folder (``output_dir=None``) the records are kept in memory only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from evals.cases import EvalCase
from evals.compare import flatten
from evals.report import write_json

__all__ = ["SCHEMA", "RunFolder", "cases_digest", "earlier_pre", "store_digest"]

log = logging.getLogger(__name__)
SCHEMA = "neuraldb.evaluate/1"  # of report.json and run.json


def store_digest(db: Any) -> str:
    """sha256 (16 hex digits) of the store's ids, keys, residuals, gamma and layer."""
    h = hashlib.sha256(json.dumps([db.ids, db.gamma, db.layer]).encode())
    for t in (db.keys, db.residuals):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _case_payload(c: EvalCase) -> dict[str, Any]:
    d = dataclasses.asdict(c)
    d["fact"] = c.fact.to_dict()
    d["fact"].pop("meta", None)
    return d


def cases_digest(cases: Sequence[EvalCase]) -> str:
    """sha256 (16 hex digits) of the cases, their facts without ``meta``."""
    h = hashlib.sha256()
    for c in cases:
        h.update(json.dumps(_case_payload(c), sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:16]


class RunFolder:
    """``run.json`` + ``cases.jsonl`` in ``output_dir`` (or nothing, in memory, without one)."""

    def __init__(self, output_dir: str | os.PathLike | None, identity: Mapping[str, Any]) -> None:
        self.dir = Path(output_dir) if output_dir is not None else None
        self.identity = json.loads(json.dumps(identity))
        self.done: dict[str, dict[str, Any]] = {}
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        run = self.dir / "run.json"
        if run.exists():
            saved = json.loads(run.read_text(encoding="utf-8")).get("identity")
            if saved != self.identity:
                was, now = flatten(saved), flatten(self.identity)
                diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
                raise ValueError(
                    f"{self.dir} holds a run with a different configuration (differs in: {', '.join(diff[:8])}"
                    f"{'...' if len(diff) > 8 else ''}); use another output_dir, or delete {run} and "
                    f"{self.dir / 'cases.jsonl'} to start over")
        else:
            write_json({"schema": SCHEMA, "identity": self.identity,
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, run)
        self.done = self._read_cases()

    @property
    def cases_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "cases.jsonl"

    def _read_cases(self) -> dict[str, dict[str, Any]]:
        return read_cases(self.cases_path, repair=True)

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Record finished cases: one write, flushed and fsynced (cases.jsonl grows by whole lines)."""
        lines = [json.dumps(r, ensure_ascii=False, allow_nan=False) for r in records]
        for r, line in zip(records, lines):
            self.done[r["fact_id"]] = json.loads(line)  # what a resumed run would read back
        if self.dir is None or not lines:
            return
        with open(self.cases_path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def read_cases(path: Path, *, repair: bool) -> dict[str, dict[str, Any]]:
    """fact id -> record of the run folder's ``cases.jsonl`` at ``path`` ({} if absent). A torn last
    line (a kill mid-write) is dropped; with ``repair`` it is also cut from the file, as a resumed run does."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # a torn last line from a kill mid-write: drop it
        keep = raw.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes)", path, len(raw) - keep)
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(keep)
        raw = raw[:keep]
    done = {}
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {n} is not valid JSON ({exc}); delete the folder to start over") from None
            done[rec["fact_id"]] = rec
    return done


def earlier_pre(folder: str | os.PathLike, identity: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """fact id -> record of the cases scored in the run folder ``folder``, whose pre (unedited) scores
    a run of ``identity`` may reuse: a ValueError naming ``pre_from`` unless that run evaluated the same
    model (name, dtype, device), metrics, generation settings and consistency reference.

    Example::

        known = earlier_pre("reports/round-01", identity)   # {'fact-1a2b': {'pre': {...}, ...}, ...}
    """
    path = Path(folder)
    run = path / "run.json"
    if not run.is_file():
        raise ValueError(f"pre_from={str(path)!r} holds no run.json: give the output_dir of an earlier evaluation")
    saved = json.loads(run.read_text(encoding="utf-8")).get("identity") or {}
    for key in ("model", "metrics", "fluency", "consistency"):
        if saved.get(key) != identity.get(key):
            raise ValueError(f"pre_from={str(path)!r} was evaluated with another {key} ({saved.get(key)!r}, this run: "
                             f"{identity.get(key)!r}); its unedited scores cannot be reused: drop pre_from")
    return read_cases(path / "cases.jsonl", repair=False)  # an earlier run's folder is read, never changed

