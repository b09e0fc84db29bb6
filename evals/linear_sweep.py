"""The linear reader as a fair baseline: ``lam`` and ``C0`` chosen on held-out facts.

Example::

    settings = LinearSweep(lams=(1, 10, 100, 1e3, 1.5e4, 1e5), c0_passages=(200, 1000), heldout=50)
    texts = generic_texts(max(settings.c0_passages), data_dir=data_dir)
    c0s = estimate_c0s(model, tok, texts, sizes=settings.c0_passages, layer=db.layer)
    rows = sweep_linear(model, tok, study_db=db, heldout_db=held_db, heldout=held_cases,
                        sizes=[100], c0s=c0s, lams=settings.lams)
    best = choose(rows)                      # {100: the row with the best held-out score}

The linear reader writes the store's keys and residuals into the layer's weight,
``W += R K^T (K K^T + lam C0)^-1`` (:mod:`neuraldb.linear`). MEMIT's ``lam`` (its
``mom2_update_weight``: 15000 for GPT-J and Llama-3-8B, 20000 for GPT-2 XL, with ``C0``
from 100,000 Wikipedia samples) is tuned for an edit spread over 5-6 layers; on one
layer of another model it can leave the edit near the unedited model. So the scaling
study chooses them here, per size, on facts it never reports:

- held-out facts: editable CounterFact cases after the study's, whose subject is not
  one of the study's subjects (:func:`heldout_cases`), edited into their own store;
- the validation store of size ``n`` (:func:`validation_store`) holds the first
  ``min(n, held-out)`` held-out facts and is filled up to ``n`` facts with the study's
  first facts, so ``K K^T`` has the size the reported reader will have, while only
  held-out facts are scored;
- each (``C0`` passages, ``lam``) is scored on those held-out cases (ES / PS / NS,
  :func:`evals.metrics.counterfact.counterfact_scores`) and the best harmonic mean of
  the three (ROME / MEMIT's "score") wins, ties to the larger ``lam``, then the larger ``C0``.

``written`` is the share of each residual the weight edit writes at its own stored key
(:func:`neuraldb.linear.written_share`): near 1 the closed form stores the facts and what is
left is how a weight edit reads them; far below 1, ``lam * C0`` is holding the edit back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["DEFAULT_LAMS", "LinearSweep", "choose", "generic_texts", "heldout_cases", "parse_counts",
           "parse_lams", "render_sweep_markdown", "sweep_linear", "validation_store"]

# 1.5e4: MEMIT's mom2_update_weight for GPT-J (and Llama-3-8B in AlphaEdit's settings); 2e4 is GPT-2 XL's
DEFAULT_LAMS = (1.0, 10.0, 100.0, 1000.0, 15000.0, 100000.0)


@dataclass(frozen=True)
class LinearSweep:
    """The linear reader's candidates in the scaling study (CLI option in brackets).

    ``lams`` (``--linear-lams``): weights of ``C0``; ``c0_passages`` (``--linear-c0-passages``):
    numbers of generic passages ``C0`` is estimated on, each cut at ``c0_max_tokens``
    tokens (``--linear-c0-max-tokens``); ``c0_source`` (``--linear-c0-text``): a ``.jsonl``
    file with a ``"text"`` per line or a text file with one passage per line (its first
    passages), None = the last LAMBADA passages of the data dir; ``heldout``
    (``--linear-heldout``): held-out facts the choice is made on. One ``lam`` and one
    ``C0`` size is a fixed setting: nothing is swept and no fact is held out.
    """

    lams: tuple[float, ...] = DEFAULT_LAMS
    c0_passages: tuple[int, ...] = (200,)
    c0_max_tokens: int = 128
    c0_source: str | None = None
    heldout: int = 50

    def __post_init__(self) -> None:
        lams = tuple(float(x) for x in self.lams)
        if not lams or any(not math.isfinite(x) or x <= 0 for x in lams):
            raise ValueError(f"lams (--linear-lams) must be positive finite numbers, got {list(self.lams)}")
        counts = tuple(int(n) for n in self.c0_passages)
        if not counts or any(n < 1 for n in counts):
            raise ValueError(f"c0_passages (--linear-c0-passages) must be whole numbers >= 1, got {list(self.c0_passages)}")
        if self.c0_max_tokens < 1:
            raise ValueError(f"c0_max_tokens (--linear-c0-max-tokens) must be >= 1, got {self.c0_max_tokens}")
        if self.heldout < 1:
            raise ValueError(f"heldout (--linear-heldout) must be >= 1, got {self.heldout}")
        object.__setattr__(self, "lams", tuple(dict.fromkeys(lams)))  # order kept, repeats dropped
        object.__setattr__(self, "c0_passages", tuple(sorted(set(counts))))

    @property
    def sweeps(self) -> bool:
        """True when there is a choice to make (and so facts to hold out)."""
        return len(self.lams) * len(self.c0_passages) > 1


def parse_lams(text: str) -> tuple[float, ...]:
    """``"1,10,1e3"`` -> ``(1.0, 10.0, 1000.0)``; ValueError saying what is wrong."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a comma list of numbers, e.g. 1,10,100,1000,15000") from None
    LinearSweep(lams=values)  # the same checks as the settings
    return values


def parse_counts(text: str) -> tuple[int, ...]:
    """``"200,1000"`` -> ``(200, 1000)``; ValueError saying what is wrong."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a comma list of whole numbers, e.g. 200,1000") from None
    LinearSweep(c0_passages=values)
    return values


def generic_texts(n: int, *, source: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                  at_most: bool = False) -> list[str]:
    """``n`` passages of generic text: the first of ``source``, else the last LAMBADA passages.

    The last LAMBADA passages are disjoint from the general tasks' sample (their first passages).
    Fewer than ``n`` is an error (a C0 of another size than asked), or, with ``at_most``, all there are.
    """
    from neuraldb.io import default_data_dir

    if source is None:
        path = Path(default_data_dir(data_dir) or "") / "lambada_openai" / "lambada_test.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"the linear and calibrated readers need generic text: {path} not found; "
                                    "set NEURALDB_DATA_DIR or --data-dir, or give --linear-c0-text")
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--linear-c0-text {path}: no such file")
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    texts = [json.loads(x)["text"] for x in lines] if path.suffix == ".jsonl" else lines
    if len(texts) < n and not at_most:
        raise ValueError(f"{path} holds {len(texts)} passages, fewer than the {n} --linear-c0-passages asks for")
    return texts[-n:] if source is None else texts[:n]


def heldout_cases(candidates: Sequence[Any], study: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` of ``candidates`` about a subject none of ``study``'s cases is about."""
    subjects = {c.fact.subject.casefold() for c in study}
    ids = {c.fact.id for c in study}
    picked = [c for c in candidates if c.fact.subject.casefold() not in subjects and c.fact.id not in ids][:n]
    if len(picked) < n:
        raise ValueError(f"only {len(picked)} editable CounterFact cases after the study's {len(study)} are about "
                         f"other subjects; --linear-heldout asks for {n}")
    return picked


def validation_store(study_db: Any, heldout_db: Any, size: int) -> Any:
    """A store of ``size`` facts: the first ``min(size, len(heldout_db))`` held-out facts, filled up with
    the study's first facts (keys and residuals only: all the linear reader reads)."""
    held = min(size, len(heldout_db))
    val = heldout_db.head(held)
    fill = study_db.head(size - held)
    val.add(fill.ids, fill.keys, fill.residuals)
    return val


def sweep_linear(
    model: Any, tokenizer: Any, *, study_db: Any, heldout_db: Any, heldout: Sequence[Any], sizes: Sequence[int],
    c0s: Mapping[int, Any], lams: Sequence[float], batch_size: int = 16,
    done: Mapping[str, dict[str, Any]] | None = None, on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Score every (size, C0 passages, lam) on the held-out cases; rows in ``done`` (by :func:`_key`) are reused.

    ``heldout``: the cases of ``heldout_db``'s facts, in its order. Scores in percent;
    ``lam`` None is the unedited model on the same cases.
    """
    from evals.metrics.counterfact import counterfact_scores, summarize_counterfact
    from neuraldb.linear import LinearReader, written_share

    done = dict(done or {})
    rows: list[dict[str, Any]] = []

    def scored(key: str, reader: Any, cases: Sequence[Any], extra: dict[str, Any]) -> None:
        if key not in done:
            if reader is None:
                results = counterfact_scores(model=model, tokenizer=tokenizer, cases=cases, batch_size=batch_size)
            else:
                with reader.attached(model):
                    results = counterfact_scores(model=model, tokenizer=tokenizer, cases=cases, batch_size=batch_size)
            s = summarize_counterfact(results)
            done[key] = {**extra, "cases": len(cases),
                         **{k: 100 * s[k] for k in ("efficacy", "generalization", "specificity", "score")}}
            if on_row is not None:
                on_row(done[key])
        rows.append(done[key])

    for size in sorted(int(n) for n in sizes):
        val = validation_store(study_db, heldout_db, size)
        cases = list(heldout[: min(size, len(heldout_db))])
        scored(_key(size, None, None), None, cases, {"size": size, "c0_passages": None, "lam": None, "written": None})
        for passages, c0 in sorted(c0s.items()):
            for lam in lams:
                reader = LinearReader(val, c0=c0, lam=lam)
                share = written_share(val.keys, val.residuals, reader.delta())
                scored(_key(size, passages, lam), reader, cases,
                       {"size": size, "c0_passages": passages, "lam": float(lam), "written": share})
    return rows


def _key(size: int, passages: int | None, lam: float | None) -> str:
    return f"{size}/{passages}/{lam!r}" if lam is not None else f"{size}/unedited"


def choose(rows: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """``{size: the row with the best held-out score}``; ties to the larger ``lam``, then the larger ``C0``."""
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["lam"] is None:
            continue
        rank = (r["score"], r["lam"], r["c0_passages"])
        b = best.get(r["size"])
        if b is None or rank > (b["score"], b["lam"], b["c0_passages"]):
            best[r["size"]] = dict(r)
    return best


def render_sweep_markdown(linear: Mapping[str, Any]) -> list[str]:
    """The study report's section on the linear reader's settings (lines)."""
    source = linear.get("c0_source") or "the last LAMBADA passages of the data dir"
    if not linear.get("sweep"):
        n = linear["c0_passages"][0]
        text = f"the first {n} passages of {linear['c0_source']}" if linear.get("c0_source") else \
            f"the last {n} LAMBADA passages of the data dir"
        return [f"Linear reader: fixed lam {linear['lams'][0]:g}, C0 from {text} (at most "
                f"{linear['c0_max_tokens']} tokens each); nothing swept.", ""]
    chosen = {int(k): v for k, v in linear["chosen"].items()}
    lines = [
        f"## Linear reader: lam and C0 chosen on {len(linear['heldout_ids'])} held-out facts",
        "",
        f"C0 from {source} (at most {linear['c0_max_tokens']} tokens each). The store of each size holds the "
        "held-out facts (filled up with the study's first facts); only held-out cases are scored. Chosen: best "
        "harmonic mean of ES, PS and NS (score). 'written': the share of each residual the weight edit writes at "
        "its own stored key (1 = stored exactly).",
        "",
        "| facts | held-out cases | C0 passages | lam | ES | PS | NS | score | written | |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in linear["sweep"]:
        if r["lam"] is None:
            lines.append(f"| {r['size']} | {r['cases']} | - | unedited | {r['efficacy']:.1f} | {r['generalization']:.1f} "
                         f"| {r['specificity']:.1f} | {r['score']:.1f} | - | |")
            continue
        c = chosen.get(r["size"], {})
        mark = "chosen" if (c.get("lam"), c.get("c0_passages")) == (r["lam"], r["c0_passages"]) else ""
        lines.append(f"| {r['size']} | {r['cases']} | {r['c0_passages']} | {r['lam']:g} | {r['efficacy']:.1f} "
                     f"| {r['generalization']:.1f} | {r['specificity']:.1f} | {r['score']:.1f} "
                     f"| {r['written']:.2f} | {mark} |")
    return lines + [""]
