"""Sequential editing: T rounds of k facts into one store, every earlier fact re-evaluated after each round.

Example::

    neuraldb study --model smollm2-135m --sequential 10x50 --output-dir reports/sequential

    import neuraldb
    from evals.sequential import SequentialPlan, run_sequential

    model, tok = neuraldb.load_model("smollm2-135m")
    result = run_sequential(model, tok, plan=SequentialPlan(rounds=10, per_round=50), output_dir="reports/seq")
    result["rounds"][-1]["first_round"]["efficacy"]["post"]      # ES of the oldest edits after round 10

The protocol of GRACE, WISE, AlphaEdit and EasyEdit's sequential setting: the first ``rounds x
per_round`` editable CounterFact cases are cut into rounds; round ``r`` edits its ``per_round`` facts
into the SAME store (``neuraldb.edit(..., db=db)``), then ``neuraldb.evaluate`` scores ES / PS / NS
(pre and post, with intervals) on every fact edited so far (the pre scores of facts an earlier
round scored are that round's: ``EvalConfig.pre_from``, since the unedited model does not
depend on the store). Each round records the means over
all of them, over the first round's facts (do the oldest edits survive?) and over this round's.
Then the all-at-once baseline: one edit of all the facts into a fresh store, one evaluation.

NeuralDB computes every key and residual on the unedited model (the store is detached while
editing), so the sequential store should equal the all-at-once store up to float rounding
(another batch composition pads the optimisation differently) and where a later fact shares a
subject with a stored one (both are re-fitted together, in another batch than in the all-at-once
edit). ``result["comparison"]`` makes that visible: the largest key and residual differences
between the two stores (facts that share a subject and the others apart, and the largest
relative one), and the cases whose gate firing or post-edit scores differ between the last
round and the baseline.
A MEMIT-style weight edit has no such identity: each round edits the weights the earlier rounds
left.

Resuming: ``output_dir`` holds the sequential store (``sequential_store.safetensors``, written by
the edit after each batch, so also at the end of each round), ``rounds/round-NN.json`` per
finished round and each evaluation's own resumable run folder (``rounds/round-NN/``,
``all-at-once-N/``, with ``all_at_once_N_store.safetensors`` for N facts). A rerun skips the finished rounds
(no edit, no evaluation) and continues where the last one stopped; more rounds of the same
``per_round`` extend a finished run. Pre-edit scores are recomputed in every round's evaluation
(``neuraldb.evaluate`` always scores both). Results: ``sequential.json``, ``sequential.md`` and
``sequential.png`` in ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from neuraldb.io import write_text

log = logging.getLogger(__name__)

__all__ = ["SequentialPlan", "compare_stores", "render_markdown", "run_sequential"]

_KEYS = ("efficacy", "generalization", "specificity")
_SHORT = {"efficacy": "ES", "generalization": "PS", "specificity": "NS"}
_STORE = "sequential_store.safetensors"
_PLAN = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True)
class SequentialPlan:
    """``rounds`` rounds of ``per_round`` facts each (``SequentialPlan.parse("10x50")``)."""

    rounds: int
    per_round: int

    def __post_init__(self) -> None:
        for name in ("rounds", "per_round"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def facts(self) -> int:
        return self.rounds * self.per_round

    @classmethod
    def parse(cls, text: str) -> "SequentialPlan":
        """``"10x50"``: 10 rounds of 50 facts; anything else is a ``ValueError`` that shows the format."""
        found = _PLAN.match(str(text))
        if found is None or min(int(found[1]), int(found[2])) < 1:
            raise ValueError(f"expected ROUNDSxK with two positive integers, e.g. 10x50 (10 rounds of 50 facts), "
                             f"got {text!r}")
        return cls(rounds=int(found[1]), per_round=int(found[2]))

    def __str__(self) -> str:
        return f"{self.rounds}x{self.per_round}"


def run_sequential(
    model: Any,
    tokenizer: Any,
    *,
    plan: SequentialPlan,
    output_dir: str | os.PathLike,
    cases: Sequence[Any] | None = None,
    data_dir: str | os.PathLike | None = None,
    config: Any = None,
    batch_size: int = 16,
    confidence: float = 0.95,
    progress: bool = True,
) -> dict[str, Any]:
    """Edit ``plan.rounds`` rounds of ``plan.per_round`` facts into one store, re-evaluating after each;
    then edit them all at once and compare. ``cases``: default the first editable CounterFact cases."""
    import neuraldb
    from neuraldb.residuals import settle_residual_dtype

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config or resume_config(out)
    cases, skipped = _cases(tokenizer, config, plan, cases, data_dir)
    config = settle_residual_dtype(model, config, _saved_config(out))  # "auto": the run's own, else this machine's
    _check_identity(out, _identity(model, plan, config, confidence))
    eval_options = {"batch_size": batch_size, "confidence": confidence, "progress": progress}
    path = out / _STORE
    db = neuraldb.NeuralDB.load(path, model=model) if path.is_file() else None
    rounds = []
    for r in range(plan.rounds):
        record, db = _round(model, tokenizer, db, cases, r, plan, config, out, eval_options)
        rounds.append(record)
    last = _round_dir(out, plan.rounds)
    batch, batch_db = _all_at_once(model, tokenizer, cases, config, out,
                                   eval_options | {"pre_from": last if last.is_dir() else None})
    if db is None:  # every round was read back: the final store is the checkpoint
        db = neuraldb.NeuralDB.load(path, model=model)
    comparison = compare_stores(db, batch_db, cases=cases)
    comparison |= _compare_reports(_round_dir(out, plan.rounds), _batch_dir(out, plan.facts))
    result = {"model": db.model_name, "layer": db.layer, "gamma": db.gamma, "plan": str(plan),
              "rounds_planned": plan.rounds, "per_round": plan.per_round, "facts": plan.facts,
              "edit_config": config.to_dict(), "confidence": confidence, "left_out": skipped,
              "rounds": rounds, "all_at_once": batch, "comparison": comparison}
    write_text(out / "sequential.json", json.dumps(result, indent=2))
    write_text(out / "sequential.md", render_markdown(result))
    from evals.plots import plot_sequential

    plot_sequential(result, out / "sequential.png")
    return result


# ----------------------------------------------------------------------------- the steps


def _cases(tokenizer: Any, config: Any, plan: SequentialPlan, cases: Sequence[Any] | None,
           data_dir: str | os.PathLike | None) -> tuple[list[Any], list[str]]:
    """The first ``plan.facts`` cases (given, or the editable CounterFact cases) and notes on those left out."""
    if cases is None:
        from evals.study import _editable_cases

        return _editable_cases(tokenizer, config, plan.facts, data_dir)
    if len(cases) < plan.facts:
        raise ValueError(f"{plan} needs {plan.facts} cases, got {len(cases)}")
    return list(cases[: plan.facts]), []


def _identity(model: Any, plan: SequentialPlan, config: Any, confidence: float) -> dict[str, Any]:
    from neuraldb.store import model_name

    return {"model": model_name(model), "per_round": plan.per_round, "edit_config": config.to_dict(),
            "confidence": confidence}


def resume_config(output_dir: str | os.PathLike, **given: Any) -> Any:
    """The EditConfig to (re)run the sequential study in ``output_dir`` with: the ``given`` fields,
    the rest from the run already there (so a folder started under older defaults continues as it
    was made), else :class:`neuraldb.EditConfig`'s defaults.

    >>> resume_config("reports/sequential", early_stop="loss").early_stop
    'loss'

    A ``given`` field that differs from the folder's run is refused by :func:`run_sequential`, naming it.
    """
    import neuraldb

    saved = _saved_config(Path(output_dir))
    return neuraldb.EditConfig.from_dict(saved | given) if saved else neuraldb.EditConfig(**given)


def _saved_config(out: Path) -> dict[str, Any] | None:
    """The EditConfig (as a dict) of the run in ``out``, if one was started there."""
    path = out / "sequential_run.json"
    saved = json.loads(path.read_text(encoding="utf-8")).get("edit_config") if path.is_file() else None
    if not isinstance(saved, dict):
        return None
    from neuraldb.config import LEGACY

    return LEGACY | saved  # written before a field existed: the value it ran with


def _check_identity(out: Path, identity: Mapping[str, Any]) -> None:
    """``sequential_run.json``: a rerun in ``out`` must share the model, ``per_round``, EditConfig and confidence."""
    path = out / "sequential_run.json"
    identity = json.loads(json.dumps(identity))  # tuples as lists, as read back
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(saved.get("edit_config"), dict):
            saved["edit_config"] = _saved_config(out)  # with the LEGACY fill
        differ = _differences(saved, identity)
        if differ:
            raise ValueError(f"{out} holds a sequential run with other {', '.join(differ)} ({path}): "
                             f"{'; '.join(differ.values())}; use another --output-dir or the same settings")
    else:
        write_text(path, json.dumps(identity, indent=2))


def _setting(identity: Mapping[str, Any], key: str) -> Any:
    """``identity[key]``; of ``edit_config``, the fields that change results (not ``GROUPING_ONLY``)."""
    value = identity.get(key)
    if key == "edit_config" and isinstance(value, dict):
        from neuraldb.config import GROUPING_ONLY

        return {k: v for k, v in value.items() if k not in GROUPING_ONLY}
    return value


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, str]:
    """``{"edit_config": "edit_config.steps: the folder's run 25, this run 5", ...}``: for each
    setting that differs (a nested one's fields joined), what differs."""
    parts: dict[str, str] = {}
    for k in sorted(set(saved) | set(now)):
        a, b = _setting(saved, k), _setting(now, k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts[k] = "; ".join(f"{k}.{f}: the folder's run {a.get(f)!r}, this run {b.get(f)!r}"
                                 for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f))
        else:
            parts[k] = f"{k}: the folder's run {a!r}, this run {b!r}"
    return parts


def _batch_dir(out: Path, n: int) -> Path:
    return out / f"all-at-once-{n}"


def _round_dir(out: Path, r: int) -> Path:
    return out / "rounds" / f"round-{r:02d}"


def _round(model: Any, tokenizer: Any, db: Any, cases: list[Any], r: int, plan: SequentialPlan, config: Any,
           out: Path, eval_options: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """Round ``r + 1``: read back if finished, else edit its facts into ``db`` and evaluate all so far."""
    import neuraldb

    k = plan.per_round
    new = cases[r * k:(r + 1) * k]
    path = _round_dir(out, r + 1).with_suffix(".json")
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("fact_ids") != [c.fact.id for c in new]:
            raise ValueError(f"{path} holds other facts than round {r + 1} of these cases; use another --output-dir")
        log.info("round %d: read back from %s", r + 1, path)
        return record, db
    if any(db is None or c.fact.id not in db for c in cases[:r * k]):
        raise ValueError(f"{out / _STORE} lacks facts of the rounds before round {r + 1}; use another --output-dir")
    kept = _round_dir(out, r + 1).with_name(f"round-{r + 1:02d}-edit.json")
    db, edit = _kept_edit(model, tokenizer, db, [c.fact for c in new], config, out / _STORE, kept,
                          eval_options["progress"])
    so_far = cases[:(r + 1) * k]
    eval_resumed = (_round_dir(out, r + 1) / "cases.jsonl").is_file()  # an evaluation interrupted before
    t0 = time.perf_counter()
    before = _round_dir(out, r)  # the unedited scores of the earlier facts do not depend on the store: reused
    report = neuraldb.evaluate(model, db, tokenizer=tokenizer, dataset=list(so_far), metrics=list(_KEYS),
                               output_dir=_round_dir(out, r + 1), pre_from=before if r and before.is_dir() else None,
                               **eval_options)
    record = {"round": r + 1, "facts_stored": len(db), "fact_ids": [c.fact.id for c in new],
              **edit, "eval_seconds": time.perf_counter() - t0, "eval_resumed": eval_resumed,
              "all": _means(report["metrics"]),
              "first_round": _subset(report, so_far[:k], eval_options["confidence"]),
              "newest": _subset(report, new, eval_options["confidence"])}
    write_text(path, json.dumps(record, indent=2))
    log.info("round %d (%d facts): all %s; round 1 %s", r + 1, len(db), _brief(record["all"]),
             _brief(record["first_round"]))
    return record, db


def _kept_edit(model: Any, tokenizer: Any, db: Any, facts: list[Any], config: Any, checkpoint: Path, kept: Path,
               progress: bool) -> tuple[Any, dict[str, Any]]:
    """Edit ``facts`` into ``db`` (checkpointed at ``checkpoint``) and keep what the edit did in
    ``kept``: ``{"edit_seconds", "edit_resumed", "refit_earlier"}``. When ``db`` (read back from the
    checkpoint) holds them all already, nothing is edited and that record is read back, so a run
    stopped after an edit still reports its time and re-fits (None where nothing was kept). An
    edit that itself was interrupted reports the time of the part this process ran (``edit_resumed``)."""
    import neuraldb

    if db is not None and all(f.id in db for f in facts):
        return db, (json.loads(kept.read_text(encoding="utf-8")) if kept.is_file() else
                    {"edit_seconds": None, "edit_resumed": True, "refit_earlier": None})
    t0 = time.perf_counter()
    db = neuraldb.edit(model, tokenizer, facts, config=config, db=db, checkpoint=checkpoint, progress=progress)
    report = db.last_edit
    record = {"edit_seconds": time.perf_counter() - t0,
              "edit_resumed": bool(report is not None and report.unchanged),
              "refit_earlier": list(report.refit) if report is not None else []}
    write_text(kept, json.dumps(record, indent=2))
    return db, record


def _all_at_once(model: Any, tokenizer: Any, cases: list[Any], config: Any, out: Path,
                 eval_options: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The baseline: every fact edited in one call into a fresh store (resumed from its checkpoint), evaluated once."""
    import neuraldb

    path = out / f"all_at_once_{len(cases)}_store.safetensors"  # more rounds later: a new baseline, never an added round
    db = neuraldb.NeuralDB.load(path, model=model) if path.is_file() else None
    kept = path.with_name(f"all_at_once_{len(cases)}_edit.json")  # the edit's time, kept for reruns
    db, edit = _kept_edit(model, tokenizer, db, [c.fact for c in cases], config, path, kept, eval_options["progress"])
    edit_s = edit["edit_seconds"]
    if set(db.ids) != {c.fact.id for c in cases}:
        raise ValueError(f"{path} holds other facts than the {len(cases)} of this run; use another --output-dir")
    t0 = time.perf_counter()
    report = neuraldb.evaluate(model, db, tokenizer=tokenizer, dataset=list(cases), metrics=list(_KEYS),
                               output_dir=_batch_dir(out, len(cases)), **eval_options)
    return {"facts_stored": len(db), "edit_seconds": edit_s, "eval_seconds": time.perf_counter() - t0,
            "all": _means(report["metrics"]),
            "first_round": None}, db


def _means(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """ES / PS / NS of an evaluation's ``report["metrics"]``: pre and post means (percent), post interval."""
    return {k: {"pre": metrics[k]["pre"]["mean"], "post": metrics[k]["post"]["mean"],
                "post_ci": metrics[k]["post"].get("ci"), "n": metrics[k]["post"].get("n")} for k in _KEYS}


def _subset(report: Mapping[str, Any], cases: Sequence[Any], confidence: float) -> dict[str, Any]:
    """ES / PS / NS over ``cases`` only, summarised from the report's per-case records as the report does."""
    from evals.summary import summarize_metrics

    by_id = {rec["fact_id"]: rec for rec in report["cases"]}
    records = [by_id[c.fact.id] for c in cases]
    return _means(summarize_metrics("counterfact", list(_KEYS), list(cases), records, confidence, None))


def _brief(scores: Mapping[str, Any]) -> str:
    return " ".join(f"{_SHORT[k]} {scores[k]['post']:.1f}" for k in _KEYS)


# ----------------------------------------------------------------------------- the comparison


def compare_stores(sequential: Any, batch: Any, *, cases: Sequence[Any]) -> dict[str, Any]:
    """How the sequential store differs from the all-at-once store: ids, keys, residuals, thresholds.

    Residual differences are reported over all facts, over the facts whose subject is shared with
    another fact of ``cases`` (re-fitted together when the later one is edited) and over the rest.
    """
    import torch

    if sorted(sequential.ids) != sorted(batch.ids):
        only = sorted(set(sequential.ids) ^ set(batch.ids))
        return {"same_ids": False, "ids_in_one_store_only": only}
    rows = [batch.ids.index(i) for i in sequential.ids]
    dkey = (sequential.keys - batch.keys[rows]).abs().amax(dim=1)
    delta = sequential.residuals - batch.residuals[rows]
    dres = delta.abs().amax(dim=1)
    relative = delta.norm(dim=1) / batch.residuals[rows].norm(dim=1).clamp_min(1e-12)
    subjects = [c.fact.subject for c in cases]
    shared = {c.fact.id for c in cases if subjects.count(c.fact.subject) > 1}
    mask = torch.tensor([i in shared for i in sequential.ids], dtype=torch.bool)

    def peak(values: Any) -> float:
        return float(values.max()) if values.numel() else 0.0

    return {"same_ids": True, "same_order": sequential.ids == batch.ids,
            "max_key_diff": peak(dkey), "max_residual_diff": peak(dres), "max_relative_residual_diff": peak(relative),
            "max_residual_diff_shared_subject": peak(dres[mask]),
            "max_residual_diff_other": peak(dres[~mask]),
            "facts_sharing_a_subject": len(shared),
            "facts_with_residual_diff": int((dres > 0).sum()),
            "same_thresholds": bool(torch.equal(sequential.thresholds, batch.thresholds[rows]))}


def _compare_reports(last_round: Path, batch: Path) -> dict[str, Any]:
    """Cases of the last round's evaluation and the baseline's whose gate firing or post-edit scores differ."""
    a = {r["fact_id"]: r for r in json.loads((last_round / "report.json").read_text(encoding="utf-8"))["cases"]}
    b = {r["fact_id"]: r for r in json.loads((batch / "report.json").read_text(encoding="utf-8"))["cases"]}
    common = [i for i in a if i in b]
    firing = [i for i in common if a[i].get("firing") != b[i].get("firing")]
    scores = [i for i in common if any(a[i]["post"].get(k) != b[i]["post"].get(k) for k in _KEYS)]
    return {"cases_compared": len(common), "cases_with_other_firing": len(firing),
            "cases_with_other_scores": len(scores), "firing_differs": firing[:20], "scores_differ": scores[:20]}


# ----------------------------------------------------------------------------- the table


def _cell(m: Mapping[str, Any] | None) -> str:
    if not m:
        return "-"
    ci = m.get("post_ci")
    return f"{m['post']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{m['post']:.1f}"


def render_markdown(result: Mapping[str, Any]) -> str:
    """``sequential.md``: a row per round, the all-at-once row, and the store comparison."""
    head = " | ".join(f"{_SHORT[k]} all" for k in _KEYS) + " | " + " | ".join(f"{_SHORT[k]} round 1" for k in _KEYS)
    lines = [
        f"# Sequential editing: {result['plan']} ({result['model']}, layer {result['layer']}, gamma {result['gamma']})",
        "",
        f"{result['rounds_planned']} rounds of {result['per_round']} CounterFact facts into one store; after each "
        "round every fact edited so far is evaluated. Post-edit scores in percent with "
        f"{100 * result['confidence']:.0f}% intervals: over all facts edited so far, and over the first "
        "round's facts. Last rows: the same facts edited in one call, and the unedited model.",
        "",
        f"| round | facts stored | {head} |",
        "|---:|---:|" + "---:|" * 6,
    ]
    for r in result["rounds"]:
        cells = " | ".join(_cell(r["all"][k]) for k in _KEYS) + " | " + " | ".join(
            _cell(r["first_round"][k]) for k in _KEYS)
        lines.append(f"| {r['round']} | {r['facts_stored']} | {cells} |")
    batch = result["all_at_once"]
    lines.append(f"| all at once | {batch['facts_stored']} | " + " | ".join(_cell(batch["all"][k]) for k in _KEYS)
                 + " | - | - | - |")
    pre = " | ".join(f"{batch['all'][k]['pre']:.1f}" for k in _KEYS)
    first_pre = " | ".join(f"{result['rounds'][0]['first_round'][k]['pre']:.1f}" for k in _KEYS)
    lines.append(f"| unedited | 0 | {pre} | {first_pre} |")
    lines += ["", _timing_text(result), "", _comparison_text(result["comparison"]), "",
              "![sequential](sequential.png)", ""]
    return "\n".join(lines)


def _timing_text(result: Mapping[str, Any]) -> str:
    def timed(r: Mapping[str, Any]) -> bool:
        return bool(r.get("edit_seconds")) and not r.get("edit_resumed")

    rounds = sum(r["edit_seconds"] for r in result["rounds"] if timed(r))
    others = [str(r["round"]) for r in result["rounds"] if not timed(r)]
    batch = result["all_at_once"]["edit_seconds"]
    return (f"Edit time: {rounds:.0f} s over the rounds" +
            (f" (not counting round(s) {', '.join(others)}, edited partly or wholly by an interrupted process)"
             if others else "") + ", " +
            (f"{batch:.0f} s all at once." if batch is not None else "all at once not recorded."))


def _comparison_text(c: Mapping[str, Any]) -> str:
    if not c.get("same_ids"):
        return f"The two stores hold different facts: {c.get('ids_in_one_store_only')}."
    return (
        f"Sequential store vs all-at-once store: max |key difference| {c['max_key_diff']:.3g}, max |residual "
        f"difference| {c['max_residual_diff']:.3g} (facts sharing a subject: {c['facts_sharing_a_subject']}, max "
        f"{c['max_residual_diff_shared_subject']:.3g}; the others {c['max_residual_diff_other']:.3g}), largest "
        f"||difference|| / ||residual|| {c['max_relative_residual_diff']:.2g}; {c['facts_with_residual_diff']} facts "
        "with any residual difference. "
        f"Gate firing differs on {c['cases_with_other_firing']} of {c['cases_compared']} cases and post-edit "
        f"ES/PS/NS on {c['cases_with_other_scores']} (last round vs all at once)."
    )
