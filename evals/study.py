"""Scaling study: the gated reader vs the linear reader on the same store, at several sizes.

Example::

    neuraldb study --model smollm2-135m --sizes 100,500,1000,2000 --output-dir reports/study
    python -m evals.study --sizes 100,500 --eval-cases 50 --general-limit 20

``--sequential ROUNDSxK`` runs the sequential-editing protocol instead (:mod:`evals.sequential`)::

    neuraldb study --model smollm2-135m --sequential 10x50 --output-dir reports/sequential

Residuals are computed on the unedited model, so facts are independent: the
largest size is edited once (checkpointed in ``output_dir/store.safetensors``, so an
interrupted run resumes) and each smaller size is a prefix of that store (facts about
one subject share one residual, fitted on all of the largest size's facts about it;
30 of the first 2,000 CounterFact facts share a subject with another). For each
size and reader the first ``eval_cases`` edited cases are evaluated with
``neuraldb.evaluate`` (ES / PS / NS, and the general tasks with a small limit),
pre and post, with every fact of that size in the store. The linear reader writes
the same keys and residuals into the layer's weight in closed form (MEMIT,
docs/method.md, 'Linear reader') with ``C0`` estimated on generic text (the last LAMBADA passages
by default); ``lam`` and the number of ``C0`` passages are chosen per size on held-out facts, never
on the reported ones (:mod:`evals.linear_sweep`, ``--linear-lams``, ``--linear-c0-passages``;
the held-out store is checkpointed in ``output_dir/heldout.safetensors``). The calibrated reader is
the gated store with per-key thresholds (``NeuralDB.calibrate``, margin 0.05) fitted
on the last ``calib_texts`` LAMBADA passages, which the general tasks never sample. Results:
``study.json``, ``study.md`` and ``study.png`` in ``output_dir``; each (size, reader)
evaluation is its own resumable run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from neuraldb.cli import add_early_stop_argument, add_residual_dtype_argument, early_stop_of, residual_dtype_of
from neuraldb.io import atomic_write, write_text

from .linear_sweep import (DEFAULT_LAMS, LinearSweep, choose, generic_texts, heldout_cases, parse_counts, parse_lams,
                           render_sweep_markdown, sweep_linear)

log = logging.getLogger(__name__)

__all__ = ["run_study", "add_study_arguments", "run_study_cli"]

_KEYS = ("efficacy", "generalization", "specificity")
# gated: the paper's gate (global gamma); calibrated: plus per-key thresholds fitted on held-out
# generic text (the last LAMBADA passages, never the general-task sample); linear: MEMIT's closed form
READERS = ("gated", "calibrated", "linear")


def run_study(
    model: Any,
    tokenizer: Any,
    *,
    sizes: Sequence[int] = (100, 500, 1000, 2000),
    readers: Sequence[str] = READERS,
    eval_cases: int = 100,
    general_tasks: Sequence[str] | str | None = None,
    general_limit: int | None = 20,
    output_dir: str | os.PathLike = "reports/study",
    data_dir: str | os.PathLike | None = None,
    config: Any = None,
    linear: LinearSweep | None = None,
    calib_texts: int = 1000,
    calib_margin: float = 0.05,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Edit ``max(sizes)`` CounterFact facts once, evaluate every reader at every size.

    ``linear``: the linear reader's candidates (default ``LinearSweep()``: six ``lam`` from 1 to
    1e5, ``C0`` from 200 passages, chosen per size on 50 held-out facts).
    """
    import neuraldb

    unknown = sorted(set(readers) - set(READERS))
    if unknown:  # before any work: the edit can take an hour
        raise ValueError(f"readers {unknown} unknown: use some of {list(READERS)}")
    linear = linear or LinearSweep()
    sweeping = "linear" in readers and linear.sweeps
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in sizes)
    config = config or neuraldb.EditConfig()
    available, skipped = _editable_pool(tokenizer, config, sizes[-1], data_dir)
    cases = available[: sizes[-1]]
    held = heldout_cases(available[sizes[-1]:], cases, linear.heldout) if sweeping else []  # before the edit
    generic = _generic_texts(readers, linear, calib_texts, data_dir, general_tasks, general_limit)
    db, edit_s, resumed = _edit_once(model, tokenizer, cases, config, out / "store.safetensors", progress)
    c0s, calib = _generic_statistics(model, tokenizer, db, readers, generic, linear, calib_texts)
    settings = _linear_settings(model, tokenizer, db, held, c0s, sizes, linear, config, out, batch_size, progress) \
        if "linear" in readers else {}
    rows = []
    for n in sizes:
        for reader_name in readers:
            lam, passages = settings.get(n, (None, None))
            reader = _reader(db.head(n), reader_name, c0=c0s.get(passages), lam=lam, calib=calib,
                             calib_margin=calib_margin)
            folder = f"{reader_name}-{n}" + (f"-lam{lam:g}-c0-{passages}" if reader_name == "linear" else "")
            report = neuraldb.evaluate(
                model, reader, tokenizer=tokenizer, dataset=list(cases[: min(n, eval_cases)]),
                metrics=list(_KEYS), batch_size=batch_size, output_dir=out / folder,
                general_tasks=general_tasks, general_limit=general_limit, data_dir=data_dir, progress=progress,
            )
            rows.append(_row(report, n, reader_name, eval_cases))
            if reader_name == "linear":
                rows[-1].update(lam=lam, c0_passages=passages)
            log.info("size %d %s: %s", n, reader_name, {k: rows[-1][k]["post"] for k in _KEYS})
    result = {"model": db.model_name, "layer": db.layer, "gamma": db.gamma, "sizes": sizes,
              "edit_seconds": edit_s, "facts": len(db), "edited_this_call": len(db) - resumed,
              "left_out": skipped, "rows": rows}
    if "linear" in readers:
        result["linear"] = _linear_report(linear, held, out)
    write_text(out / "study.json", json.dumps(result, indent=2))
    _plot(result, out / "study.png")
    write_text(out / "study.md", render_markdown(result))
    return result


def _editable_cases(tokenizer: Any, config: Any, n: int, data_dir: str | os.PathLike | None) -> tuple[list, list]:
    """The first ``n`` CounterFact cases that can be keyed, and notes on those left out."""
    cases, skipped = _editable_pool(tokenizer, config, n, data_dir)
    return cases[:n], skipped


def _editable_pool(tokenizer: Any, config: Any, n: int, data_dir: str | os.PathLike | None) -> tuple[list, list]:
    """Every CounterFact case that can be keyed (at least ``n``: else a ValueError), and notes on those left out."""
    from .datasets import editable_cases, load_counterfact

    cases, skipped = editable_cases(load_counterfact(data_dir=data_dir), tokenizer, config)
    for note in skipped:
        log.info("left out (cannot be keyed): %s", note)
    if len(cases) < n:
        raise ValueError(f"only {len(cases)} editable CounterFact cases available for size {n}")
    return list(cases), skipped


def _edit_once(model: Any, tokenizer: Any, cases: list, config: Any, ckpt: Path, progress: bool) -> tuple[Any, float, int]:
    """Edit every case once, resuming from the checkpoint ``ckpt``: the store, seconds, facts resumed."""
    import neuraldb

    done = neuraldb.NeuralDB.load(ckpt, model=model) if ckpt.is_file() else None  # loaded once, resumed by edit
    resumed = len(done) if done is not None else 0
    t0 = time.perf_counter()
    db = neuraldb.edit(model, tokenizer, [c.fact for c in cases], config=config, db=done,
                       checkpoint=ckpt, checkpoint_every=4, progress=progress)
    return db, time.perf_counter() - t0, resumed


def _generic_texts(readers: Sequence[str], linear: LinearSweep, calib_texts: int,
                   data_dir: str | os.PathLike | None, general_tasks: Any, general_limit: int | None) -> dict[str, list]:
    """Generic text for C0 (linear reader) and calibration queries (calibrated reader), read before the edit.

    LAMBADA passages are taken from the end of the file; C0 may not reach the general tasks' sample
    (its first ``general_limit`` passages) when lambada_openai is one of them.
    """
    out: dict[str, list] = {}
    if "linear" in readers:
        n = max(linear.c0_passages)
        if linear.c0_source is None and _samples_lambada(general_tasks):
            free = _LAMBADA_PASSAGES - (general_limit if general_limit is not None else _LAMBADA_PASSAGES)
            if n > free:
                raise ValueError(f"--linear-c0-passages {n}: C0 would include the lambada_openai passages the general "
                                 f"tasks evaluate (the first {general_limit}); use at most {free} or --linear-c0-text")
        out["c0"] = generic_texts(n, source=linear.c0_source, data_dir=data_dir)
    if "calibrated" in readers:
        out["calib"] = generic_texts(calib_texts, data_dir=data_dir, at_most=True)
    return out


_LAMBADA_PASSAGES = 5153  # lambada_openai's test split


def _samples_lambada(general_tasks: Any) -> bool:
    if not general_tasks:
        return False
    names = general_tasks.split(",") if isinstance(general_tasks, str) else list(general_tasks)
    return "all" in names or "lambada_openai" in names


def _generic_statistics(model: Any, tokenizer: Any, db: Any, readers: Sequence[str], generic: dict[str, list],
                        linear: LinearSweep, calib_texts: int) -> tuple[dict[int, Any], Any]:
    """``{passages: C0}`` for the linear reader, calibration queries for the calibrated one."""
    from neuraldb.keys import calibration_queries
    from neuraldb.linear import estimate_c0s

    c0s = estimate_c0s(model, tokenizer, generic["c0"], sizes=linear.c0_passages, layer=db.layer,
                       module_template=db.module_template, max_length=linear.c0_max_tokens) \
        if "linear" in readers else {}
    calib = calibration_queries(model, tokenizer, generic["calib"], layer=db.layer) \
        if "calibrated" in readers else None
    return c0s, calib


def _linear_settings(model: Any, tokenizer: Any, db: Any, held: list, c0s: dict[int, Any], sizes: Sequence[int],
                     linear: LinearSweep, config: Any, out: Path, batch_size: int,
                     progress: bool) -> dict[int, tuple[float, int]]:
    """``{size: (lam, C0 passages)}``: the only candidate, or the best on the held-out facts (swept here)."""
    if not linear.sweeps:
        return {n: (linear.lams[0], linear.c0_passages[0]) for n in sizes}
    held_db, _, _ = _edit_once(model, tokenizer, held, config, out / "heldout.safetensors", progress)
    path = out / "linear_sweep.json"
    identity = {"heldout_ids": held_db.ids, "study_ids": db.ids[: max(sizes)], "c0_source": linear.c0_source,
                "c0_max_tokens": linear.c0_max_tokens}
    cached = json.loads(path.read_text()) if path.is_file() else {}
    done = cached.get("rows", {}) if cached.get("identity") == identity else {}

    def save(row: dict[str, Any]) -> None:  # after every row: an interrupted sweep resumes
        done[_sweep_key(row)] = row
        write_text(path, json.dumps({"identity": identity, "rows": done}, indent=1))
        log.info("linear sweep: %s", row)

    rows = sweep_linear(model, tokenizer, study_db=db, heldout_db=held_db, heldout=held, sizes=sizes, c0s=c0s,
                        lams=linear.lams, batch_size=batch_size, done=done, on_row=save)
    chosen = choose(rows)
    write_text(path, json.dumps({"identity": identity, "rows": done, "sweep": rows,
                                 "chosen": {str(n): r for n, r in chosen.items()}}, indent=1))
    return {n: (r["lam"], r["c0_passages"]) for n, r in chosen.items()}


def _sweep_key(row: dict[str, Any]) -> str:
    from .linear_sweep import _key

    return _key(row["size"], row["c0_passages"], row["lam"])


def _linear_report(linear: LinearSweep, held: list, out: Path) -> dict[str, Any]:
    """The linear reader's settings, candidates and (when swept) the sweep, for study.json."""
    report: dict[str, Any] = {"lams": list(linear.lams), "c0_passages": list(linear.c0_passages),
                              "c0_max_tokens": linear.c0_max_tokens, "c0_source": linear.c0_source,
                              "heldout_ids": [c.fact.id for c in held]}
    path = out / "linear_sweep.json"
    if linear.sweeps and path.is_file():
        saved = json.loads(path.read_text())
        report.update(sweep=saved["sweep"], chosen=saved["chosen"])
    return report


def _reader(sub: Any, reader_name: str, *, c0: Any, lam: float, calib: Any, calib_margin: float) -> Any:
    """The reader of a prefix store: MEMIT's closed form, or the store itself (calibrated or not)."""
    from neuraldb.linear import LinearReader

    if reader_name == "linear":
        return LinearReader(sub, c0=c0, lam=lam)  # c0 None: the lam * I variant
    if reader_name == "calibrated":  # per-key thresholds from held-out generic text
        sub.calibrate(calib, margin=calib_margin)
    return sub


def _row(report: dict[str, Any], n: int, reader_name: str, eval_cases: int) -> dict[str, Any]:
    """One (size, reader) row of the study from its evaluation report."""
    row = {"size": n, "reader": reader_name, "eval_cases": min(n, eval_cases)}
    for k in _KEYS:
        m = report["metrics"][k]
        row[k] = {"pre": m["pre"]["mean"], "post": m["post"]["mean"], "post_ci": m["post"].get("ci")}
    if report.get("general"):
        row["general"] = {
            t: {"before": v.get("before"), "after": v.get("after"), "identical": v.get("identical_fraction"),
                "fire_rate": (v.get("firing") or {}).get("rate")}
            for t, v in (report["general"].get("tasks") or {}).items()
        }
    return row


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Scaling study: gated vs linear reader ({result['model']}, layer {result['layer']}, gamma {result['gamma']})",
        "",
        f"{result['facts']} CounterFact facts edited once ({_edit_note(result)}); each size is a prefix of that "
        f"store. Post-edit scores in percent (pre-edit in brackets) on the first edited cases; general tasks "
        f"at a small limit, with the largest share of gated positions where the gate fired.",
        "",
        "| facts | reader | cases | efficacy (ES) | generalization (PS) | specificity (NS) | general tasks (before -> after) | gate fires |",
        "|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        general = "; ".join(
            f"{t} {v['before']:.3f}->{v['after']:.3f}" for t, v in (r.get("general") or {}).items()
            if v.get("before") is not None and v.get("after") is not None
        )
        cells = " | ".join(f"{r[k]['post']:.1f} ({r[k]['pre']:.1f})" for k in _KEYS)
        rates = [v["fire_rate"] for v in (r.get("general") or {}).values() if v.get("fire_rate") is not None]
        fires = f"{100 * max(rates):.2f}%" if rates and r["reader"] != "linear" else "-"
        reader = r["reader"] + (f" (lam {r['lam']:g}, C0 {r['c0_passages']})" if r.get("lam") is not None else "")
        lines.append(f"| {r['size']} | {reader} | {r['eval_cases']} | {cells} | {general or '-'} | {fires} |")
    lines += ["", "![scaling](study.png)", ""]
    if result.get("linear"):
        lines += render_sweep_markdown(result["linear"])
    return "\n".join(lines)


def _edit_note(result: dict[str, Any]) -> str:
    done = result.get("edited_this_call", result["facts"])
    if done == result["facts"]:
        return f"in {result['edit_seconds']:.0f} s"
    return (f"{done} in this call ({result['edit_seconds']:.0f} s), {result['facts'] - done} resumed from "
            f"the checkpoint store.safetensors")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, key in zip(axes, _KEYS):
        for reader, style in (("gated", "o-"), ("calibrated", "^-"), ("linear", "s--")):
            pts = [(r["size"], r[key]["post"]) for r in result["rows"] if r["reader"] == reader]
            if pts:
                ax.plot(*zip(*pts), style, label=reader)
        ax.set_xscale("log")
        ax.set_title(key)
        ax.set_xlabel("facts in the store")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("post-edit score (%)")
    axes[0].legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sizes", default="100,500,1000,2000")
    p.add_argument("--readers", default=",".join(READERS), help="some of " + ", ".join(READERS))
    p.add_argument("--eval-cases", type=int, default=100)
    p.add_argument("--general-tasks", default=None, help="'all' or a comma list (small limit)")
    p.add_argument("--general-limit", type=int, default=20)
    p.add_argument("--output-dir", default=None, help="default reports/study (reports/sequential with --sequential)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--linear-lams", "--lam", type=_cli_type(parse_lams), default=DEFAULT_LAMS, metavar="LAMS",
                   help="the linear reader's C0 weights, a comma list, chosen per size on held-out facts (default "
                        "1,10,100,1000,15000,100000; one value = fixed, nothing held out; MEMIT uses 15000 for "
                        "GPT-J and Llama-3-8B, 20000 for GPT-2 XL)")
    p.add_argument("--linear-c0-passages", type=_cli_type(parse_counts), default=(200,), metavar="N[,N...]",
                   help="generic passages C0 is estimated on, a comma list swept with --linear-lams (default 200; "
                        "MEMIT: 100,000 Wikipedia samples)")
    p.add_argument("--linear-c0-max-tokens", type=int, default=128, help="tokens kept per C0 passage (default 128)")
    p.add_argument("--linear-c0-text", default=None, metavar="PATH",
                   help="generic text for C0: .jsonl with a 'text' per line, or one passage per line (its first "
                        "passages); default: the last LAMBADA passages of the data dir")
    p.add_argument("--linear-heldout", type=int, default=50,
                   help="held-out CounterFact facts (after the study's, other subjects) lam and C0 are chosen on")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    add_residual_dtype_argument(p)
    add_early_stop_argument(p)
    p.add_argument("--sequential", type=_sequential_plan, default=None, metavar="ROUNDSxK",
                   help="instead of the scaling study: sequential editing, e.g. 10x50 (10 rounds of 50 facts into "
                        "one store, every earlier fact re-evaluated after each round, vs all at once; "
                        "evals.sequential); uses --model, --output-dir, --data-dir, --layer, --batch-size, "
                        "--device, --dtype, --residual-dtype, --early-stop. The same command again resumes the "
                        "run in --output-dir; the editing options it leaves unset take that run's values")


def _edit_config(args: argparse.Namespace) -> Any:
    """The EditConfig of ``--layer``, ``--residual-dtype`` and ``--early-stop`` (unset: EditConfig's)."""
    import neuraldb

    return neuraldb.EditConfig(**_edit_options(args))


def _edit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The EditConfig fields ``--layer``, ``--residual-dtype`` and ``--early-stop`` give (unset: absent)."""
    return ({} if args.layer is None else {"layer": args.layer}) | residual_dtype_of(args) | early_stop_of(args)


def _cli_type(parse: Any) -> Any:
    """An argparse type from a parser that raises ValueError: argparse then names the option (exit 2)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def _sequential_plan(text: str) -> Any:
    """``--sequential``'s type: ``"10x50"`` -> ``SequentialPlan(10, 50)``; argparse names the flag on error."""
    from .sequential import SequentialPlan

    try:
        return SequentialPlan.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_study_cli(args: argparse.Namespace) -> int:
    import neuraldb

    if args.sequential is not None:
        return _run_sequential_cli(args)
    linear = _linear_sweep(args)  # before the model loads
    model, tok = neuraldb.load_model(args.model, device=args.device, dtype=args.dtype)
    result = run_study(
        model, tok, sizes=[int(s) for s in args.sizes.split(",")], readers=args.readers.split(","),
        eval_cases=args.eval_cases, general_tasks=args.general_tasks, general_limit=args.general_limit,
        output_dir=args.output_dir or "reports/study", data_dir=args.data_dir,
        config=_edit_config(args),
        linear=linear, batch_size=args.batch_size,
    )
    print(render_markdown(result))
    return 0


def _linear_sweep(args: argparse.Namespace) -> LinearSweep:
    """The linear reader's settings from the CLI; a ValueError naming the option (``neuraldb.cli``: exit 2)."""
    return LinearSweep(lams=args.linear_lams, c0_passages=args.linear_c0_passages,
                       c0_max_tokens=args.linear_c0_max_tokens, c0_source=args.linear_c0_text,
                       heldout=args.linear_heldout)


def _run_sequential_cli(args: argparse.Namespace) -> int:
    """``neuraldb study --sequential ROUNDSxK``: :func:`evals.sequential.run_sequential`."""
    import sys

    import neuraldb

    from . import sequential

    defaults = _defaults()
    unused = [f"--{name.replace('_', '-')}" for name in ("sizes", "readers", "eval_cases", "general_tasks",
                                                         "general_limit", "linear_lams", "linear_c0_passages",
                                                         "linear_c0_max_tokens", "linear_c0_text", "linear_heldout")
              if getattr(args, name) != defaults[name]]
    if unused:
        print(f"note: --sequential does not use {', '.join(unused)}", file=sys.stderr)
    out = args.output_dir or "reports/sequential"
    config = sequential.resume_config(out, **_edit_options(args))  # what the flags leave unset: the folder's run, else defaults
    model, tok = neuraldb.load_model(args.model, device=args.device, dtype=args.dtype)
    result = sequential.run_sequential(
        model, tok, plan=args.sequential, output_dir=out, data_dir=args.data_dir, config=config,
        batch_size=args.batch_size,
    )
    print(sequential.render_markdown(result))
    return 0


def _defaults() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_study_arguments(parser)
    return vars(parser.parse_args([]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description="scaling study: gated vs linear reader")
    add_study_arguments(parser)
    raise SystemExit(run_study_cli(parser.parse_args()))
