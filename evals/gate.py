"""``neuraldb gate``, the release gate: decide from an evaluation whether a store may be released.

Example::

    neuraldb gate --release releases/cf-v3 --policy evals/policies/default.yaml     # evaluates, then decides
    neuraldb gate --report reports/gpu/report.json --policy ci.yaml                 # decides from a saved report
    neuraldb gate --baseline old/report.json --report new/report.json --policy ci.yaml   # regression, no re-run

    import neuraldb
    result = neuraldb.gate("evals/policies/default.yaml", release="releases/cf-v3", output_dir="gate")
    result["passed"], result["exit_code"], result["failed"]

Exit codes (``run_gate``; ``neuraldb.gate`` returns the result and raises on errors): 0 every
criterion passed; 1 a criterion failed; 2 a usage or input error (invalid policy field, unreadable
store or report, wrong base model, corrupt release, a report that lacks what the policy checks),
or an evaluation that crashed - exit 1 always means a decision was made and it was "no".

The pieces: the policy (:mod:`evals.policy`; every field is in the README's policy table), the
decision rules (:mod:`evals.decision`), the tests (:mod:`evals.stats`), loading and checking
what is judged (:mod:`evals.gate_inputs`), the outputs (:mod:`evals.gate_report`). This module
runs them in order (:func:`gate`, evaluating when no report is given) and holds the command line.

Outputs (``output_dir``): ``gate.json`` (the result, with the resolved policy), ``gate.md`` (the
table, the rules, links to the plots), ``gate_metrics.png``, ``gate_general.png``,
``gate_firing.png`` (:mod:`evals.plots`); when the release gate ran the evaluation, also ``report.json`` /
``report.md`` and the resumable run under ``runs/<key>/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from evals import gate_inputs as inputs
from evals import report as rep
from evals.decision import EXIT_ERROR, GateError, decide, n_cases, report_confidence
from evals.gate_report import render_text, write_gate_report
from evals.policy import Evaluation, Policy, PolicyError, load_policy, resolve_policy  # noqa: F401 (public names)
from neuraldb.io import default_data_dir

# decide, load_policy and the errors live in evals.decision / evals.policy; they stay callable here too
__all__ = ["GateError", "PolicyError", "add_gate_arguments", "decide", "gate", "load_policy", "run_gate"]

log = logging.getLogger(__name__)
GATE_SCHEMA = "neuraldb.gate/1"


# ============================================================================= orchestration


def _run_key(db: Any, model: Any, ev: Evaluation, confidence: float) -> str:
    from evals.runs import store_digest
    from neuraldb.store import model_name

    ident = {"store": store_digest(db), "model": model_name(model), "evaluation": asdict(ev), "confidence": confidence}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=list).encode()).hexdigest()[:12]


def gate(
    policy: str | os.PathLike | Mapping[str, Any] | Policy = "default",
    *,
    report: Mapping[str, Any] | str | os.PathLike | None = None,
    baseline: Mapping[str, Any] | str | os.PathLike | None = None,
    release: str | os.PathLike | None = None,
    db: Any = None,
    model: Any = None,
    tokenizer: Any = None,
    gamma: float | None = None,
    output_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    device: Any = None,
    dtype: Any = None,
    progress: bool = False,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate (or read an evaluation of) a store and judge it against ``policy``; the result dict.

    Sources, one of: ``report`` (a report.json or its dict: nothing is run; with ``release`` or
    ``db`` it must be a report of that store), ``release`` (a folder from
    :func:`neuraldb.save_release`: verified, loaded and evaluated), ``db`` (a NeuralDB or a store
    file) with ``model`` (a model, or a name for :func:`neuraldb.load_model`; default the store's
    model name). ``baseline``: an older report; adds the regression criteria (new vs baseline).
    ``gamma`` overrides the store's / release's global gate threshold (per-key thresholds from
    ``NeuralDB.calibrate`` still apply). ``policy``: a YAML/TOML file, a packaged policy name
    (``default``, ``strict``), a mapping or a :class:`~evals.policy.Policy`.

    The evaluation uses the policy's ``evaluation`` settings (via :func:`neuraldb.evaluate`, with
    ``data_dir`` or ``$NEURALDB_DATA_DIR`` for data and the general tasks; without either lm-eval
    reads the hub). ``output_dir`` receives gate.json, gate.md and the plots (and report.json /
    report.md of an evaluation run here).

    Returns ``result`` with ``passed``, ``exit_code`` (0 pass, 1 fail), ``failed`` (criterion
    names) and ``criteria`` (one row per criterion). Input errors raise :class:`GateError`,
    :class:`~evals.policy.PolicyError`, :class:`neuraldb.StoreError` (and its ReleaseError) - all
    ``ValueError``.
    """
    pol = resolve_policy(policy)
    if gamma is not None:
        inputs.check_gamma(gamma)
    sources, manifest = inputs.judged_sources(release, db, gamma)
    baseline_data = None
    if baseline is not None:  # read before any long run, so a bad baseline fails fast
        pol.require_regression()
        baseline_data, sources["baseline"] = inputs.read_report(baseline, "baseline report")
    if report is not None:
        mode = "report"
        report_data, sources["report"] = inputs.read_report(report, "report")
        store_summary = inputs.store_of_report(report_data, sources["report"], release=release, db=db,
                                               model=model, gamma=gamma, manifest=manifest)
    else:
        mode = "evaluate"
        store, model_obj, tokenizer = inputs.load_judged(pol, release=release, db=db, model=model,
                                                         tokenizer=tokenizer, gamma=gamma, device=device, dtype=dtype)
        store_summary = inputs.store_summary(store)
        report_data = _evaluate(model_obj, tokenizer, store, pol, sources, output_dir=output_dir, data_dir=data_dir,
                                progress=progress)
    mode = "compare" if baseline_data is not None else mode
    result = _result(decide(report_data, pol, baseline=baseline_data), pol, mode, sources, report_data, store_summary)
    if output_dir is not None:
        write_gate_report(result, output_dir, plots=plots)
    return result


def _result(decision: dict[str, Any], pol: Policy, mode: str, sources: dict[str, Any], report: Mapping[str, Any],
            store_summary: dict[str, Any] | None) -> dict[str, Any]:
    result = {
        "schema": GATE_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "passed": decision["passed"],
        "exit_code": decision["exit_code"],
        "failed": decision["failed"],
        "mode": mode,
        "policy": {"path": pol.source, "sha256": pol.sha256, "resolved": pol.to_dict()},
        "sources": sources,
        "evaluated": _evaluated_summary(report),
        "store": store_summary or report.get("store"),
        **{k: v for k, v in decision.items() if k not in ("passed", "exit_code", "failed")},
    }
    return rep.clean_json(result)


def _evaluated_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    ds, model = report.get("dataset") or {}, report.get("model") or {}
    general = (report.get("general") or {}).get("config") or {}
    return {"dataset": ds.get("name"), "kind": ds.get("kind"), "n_cases": n_cases(report), "model": model.get("name"),
            "general_tasks": general.get("tasks"), "general_limit": general.get("limit"),
            "report_created": report.get("created"), "report_confidence": report_confidence(report)}


def _evaluate(model: Any, tok: Any, db: Any, pol: Policy, sources: dict[str, Any], *, output_dir: Any,
              data_dir: Any, progress: bool) -> dict[str, Any]:
    """Run the policy's evaluation of ``db`` on ``model`` (recorded in ``sources``); the report."""
    from evals import evaluate as evaluation
    from neuraldb.store import model_name

    ev = pol.require_evaluation()
    sources["model"] = model_name(model)
    sources["data_dir"] = data_dir = default_data_dir(data_dir)
    dataset: Any = inputs.store_cases(db) if ev.dataset.lower() == "store" else ev.dataset
    run_dir = Path(output_dir) / "runs" / _run_key(db, model, ev, pol.confidence) if output_dir is not None else None
    report = evaluation.evaluate(
        model, db, tokenizer=tok, dataset=dataset, limit=ev.n, metrics=list(ev.metrics), batch_size=ev.batch_size,
        output_dir=run_dir, data_dir=data_dir, general_tasks=list(ev.general_tasks) or None,
        general_limit=ev.general_limit, seed=ev.seed, confidence=pol.confidence, progress=progress, split=ev.split)
    if output_dir is not None:
        rep.write_report(rep.clean_json(report), output_dir)
    return report


# ============================================================================= command line


def add_gate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("The release gate: decide whether a store may be released: evaluate it (or read a report) "
                     "and judge it against a policy. Exit 0 pass, 1 a failed criterion, 2 a usage or input error.")
    p.add_argument("--policy", default="default",
                   help="release gate policy file (.yaml/.toml) or a packaged policy name: default, strict "
                        "(default: default)")
    src = p.add_argument_group("what to judge (one of --report, --release, --store)")
    src.add_argument("--report", help="a saved report.json (or its folder): decide from it, run nothing")
    src.add_argument("--baseline", help="an older report.json: also check the regression of --report (or of the "
                                        "fresh evaluation) against it")
    src.add_argument("--release", help="a release folder (neuraldb.save_release): verified, then evaluated")
    src.add_argument("--store", help="a store file (.safetensors) to evaluate")
    src.add_argument("--model", default=None, help="base model (alias or folder); default: the release's / store's")
    src.add_argument("--gamma", type=float, default=None, help="override the store's gate threshold")
    p.add_argument("--output-dir", default=None,
                   help="where gate.json, gate.md and the plots go "
                        "(default: the --report's folder, else ./gate-report)")
    p.add_argument("--data-dir", default=None, help="data folder for the general tasks (default $NEURALDB_DATA_DIR)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, ...")
    p.add_argument("--save-release", metavar="DIR", default=None,
                   help="when the release gate passes, write the store (--store / --release) as a release into DIR with "
                        "gate.json and the evaluation report (never over a non-empty DIR)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


_INPUT_ERRORS = (ValueError, KeyError, OSError, ModuleNotFoundError)  # OSError: missing or unreadable files


def run_gate(args: argparse.Namespace) -> int:
    """``neuraldb gate``: 0 pass, 1 a failed criterion, 2 a usage or input error (message on stderr)."""
    if args.report is None and args.release is None and args.store is None:
        print("neuraldb gate: error: nothing to judge: give --report REPORT, --release DIR or --store FILE",
              file=sys.stderr)
        return EXIT_ERROR
    output_dir = args.output_dir
    if output_dir is None:
        output_dir = (Path(args.report) if Path(args.report).is_dir() else Path(args.report).parent) \
            if args.report else Path("gate-report")
    try:
        result = gate(args.policy, report=args.report, baseline=args.baseline, release=args.release, db=args.store,
                      model=args.model, gamma=args.gamma, output_dir=output_dir, data_dir=args.data_dir,
                      device=args.device, dtype=args.dtype, progress=not args.quiet, plots=not args.no_plots)
    except _INPUT_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"neuraldb gate: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # the evaluation crashed: undecided, never "failed" (exit 1 = a failed criterion)
        log.info("neuraldb gate crashed", exc_info=True)
        print(f"neuraldb gate: error: the release gate could not decide: {type(exc).__name__}: {exc} "
              "(run with -v for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    else:
        print(render_text(result))
        print(f"release gate report: {Path(output_dir) / 'gate.json'} and {Path(output_dir) / 'gate.md'}")
    if args.save_release and result["passed"]:
        try:
            print(f"release written to {_save_passed_release(args, result, Path(output_dir))}")
        except _INPUT_ERRORS as exc:
            print(f"neuraldb gate: error: the release gate passed but the release was not written: {exc}",
                  file=sys.stderr)
            return EXIT_ERROR
    elif args.save_release:
        print(f"no release written to {args.save_release}: the release gate failed")
    return int(result["exit_code"])


def _save_passed_release(args: argparse.Namespace, result: Mapping[str, Any], output_dir: Path) -> Path:
    """``--save-release``: the judged store, its base model name, gate.json and the evaluation report."""
    from evals.release import load_store, save_release, verify_release
    from neuraldb.store import NeuralDB

    if args.release:
        manifest = verify_release(args.release)
        db = load_store(args.release, gamma=args.gamma, manifest=manifest)
        base = args.model or manifest["base_model"]
    elif args.store:
        db = NeuralDB.load(args.store)
        if args.gamma is not None:
            db.gamma = float(args.gamma)
        base = args.model or db.model_name
    else:
        raise GateError("--save-release needs the store itself: add --store FILE (or --release DIR)")
    if result.get("store", {}).get("digest") not in (None, inputs.store_summary(db)["digest"]):
        raise GateError("the store on disk changed while the release gate ran; run it again")
    evaluation = Path(args.report) if args.report else output_dir / "report.json"
    return save_release(args.save_release, base, db, report=dict(result),
                        evaluation=evaluation if evaluation.exists() else None)
