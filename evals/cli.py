"""The ``neuraldb evaluate`` and ``neuraldb compare`` sub-commands (registered in ``neuraldb.cli.COMMANDS``).

Example::

    neuraldb evaluate --model smollm2-135m --dataset counterfact --n 100 --output-dir reports/cf100
    neuraldb evaluate --model smollm2-135m --dataset zsre --n 200 --split train --store zsre.safetensors
    neuraldb compare reports/cf100/report.json reports/cf100-gamma075/report.json

Each sub-command ``NAME`` is a pair ``add_NAME_arguments(parser)`` / ``run_NAME(args) -> int``
(exit code), named as ``"evals.cli:add_NAME_arguments"`` / ``"evals.cli:run_NAME"`` in
``neuraldb.cli.COMMANDS``; the other sub-commands live in their own modules (``evals.gate``,
``evals.study``, ``evals.harness``, ``evals.firing.*``). Errors that are the user's (bad
input, missing file) are raised as ``ValueError``/``FileNotFoundError`` and turned into exit
code 2 by ``neuraldb.cli.main``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from neuraldb.cli import add_early_stop_argument, add_residual_dtype_argument, early_stop_of, residual_dtype_of

__all__ = ["add_compare_arguments", "add_evaluate_arguments", "data_plan", "n_cases_arg", "run_compare", "run_evaluate"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------- evaluate


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in alias or local model directory")
    p.add_argument("--dataset", default="counterfact", help="counterfact, zsre, or a CounterFact/zsRE file")
    p.add_argument("--split", default="eval",
                   help="data-dir split for a dataset name: eval (default), train, or any (every data-dir file of the "
                        "dataset, eval first; with --n all, the largest); for a hub dataset id, its split")
    p.add_argument("--n", type=n_cases_arg, default=100,
                   help="edit and evaluate the first N cases (default 100); 'all': every case of the file. In the data "
                        "dir the first file of --split that holds N is read; when none does it is an error naming "
                        "the files that hold more (--fewer-ok: a warning, and as many as the largest holds)")
    p.add_argument("--fewer-ok", action="store_true",
                   help="when the data holds fewer than --n cases, evaluate those (a loud warning, said in the report) "
                        "instead of stopping with an error")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (source files, cases, metrics, general tasks, edit settings) without loading "
                        "the model, and exit")
    p.add_argument("--store", help="evaluate this saved store (its facts among the dataset's) instead of editing")
    p.add_argument("--output-dir", help="report.json/report.md, the resumable case log and the edit checkpoint")
    p.add_argument("--data-dir", help="data folder (default $NEURALDB_DATA_DIR)")
    p.add_argument("--layer", type=int, default=None,
                   help="edit layer (default: the model's row in neuraldb/settings.json, else the family's)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the residuals (default: the model's row in neuraldb/settings.json, else 0.5)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimisation steps of the residuals (default: the model's row, else 25)")
    add_early_stop_argument(p)
    p.add_argument("--gamma", type=float, default=None, help="gate threshold (default: the store's / 0.65)")
    p.add_argument("--word-check", dest="word_check", action="store_true", default=True,
                   help="the gate checks the subject's words (EditConfig(word_check=True); the default)")
    p.add_argument("--no-word-check", dest="word_check", action="store_false",
                   help="the paper's gate: no word check (when editing: EditConfig(word_check=False); with "
                        "--store: the saved store's keys and residuals with its word check switched off)")
    p.add_argument("--chat-residuals", action="store_true",
                   help="when editing: also optimise each residual on the prompt asked as a chat turn "
                        "(EditConfig(chat_residuals=True)), so the edit carries into chat use")
    add_residual_dtype_argument(p, when="when editing: ")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (default 16)")
    p.add_argument("--edit-batch-size", type=int, default=128, help="facts optimised together when editing (default 128)")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="metric names, space or comma separated (default: all of the dataset's standard ones); "
                        "opt-in CounterFact metrics: mentions, chat_efficacy, chat_generalization")
    p.add_argument("--general-tasks", default=None, help="'all' or a comma list: mmlu,sciq,commonsense_qa,...")
    p.add_argument("--general-limit", type=int, default=None, help="examples per general task")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    p.add_argument("--seed", type=int, default=0, help="fluency sampling seed")
    p.add_argument("--confidence", type=float, default=0.95, help="of every interval (default 0.95)")
    p.add_argument("--fluency-prompts", type=int, default=None, help="generation prompts per case (default all)")
    p.add_argument("--fluency-tokens", type=int, default=None,
                   help="new tokens per generation (default: ROME's 100-token total length)")
    p.add_argument("--consistency-dir", default=None,
                   help="folder with ROME's attribute_snippets.json, idf.npy, tfidf_vocab.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def n_cases_arg(text: str) -> int | None:
    """``--n``: a number of cases >= 1, or ``all`` (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of cases: give an integer >= 1 or 'all'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--n must be >= 1 (or 'all'), got {n}")
    return n


def _count(n: int | None) -> str:
    return "all" if n is None else f"{n:,}"


def data_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Where ``neuraldb evaluate`` reads its cases and how many, decided before the model is loaded.

    Keys: ``kind``, ``source`` (a path, URL or hub id), ``records`` (in the source; None: counted
    at load), ``cases`` (to read), ``reason``, ``files`` (the data dir's files of the kind),
    ``warnings``. More cases asked for than the data holds is a ValueError (exit 2) naming the
    files that hold more, unless ``--fewer-ok`` (then a warning).
    """
    from evals.hf_datasets import is_hub_id
    from evals.sources import PUBLIC_FILES, choose_source, count_records
    from neuraldb.io import default_data_dir

    name, n = args.dataset.lower(), args.n
    plan: dict[str, Any] = {"kind": name, "split": args.split, "n": n, "files": [], "warnings": []}
    if name in ("counterfact", "zsre") and default_data_dir(args.data_dir) is not None:
        choice = choose_source(name, split=args.split, n=n, data_dir=args.data_dir)
        plan |= {"source": str(choice.path), "records": choice.records, "reason": choice.reason,
                 "files": [{"split": sp, "path": str(p), "records": r} for sp, p, r in choice.files]}
        more = [f"{p} ({sp} split: {r:,})" for sp, p, r in choice.files if r > choice.records]
        where = f"data dir {default_data_dir(args.data_dir)}: {choice.describe_files()}"
    elif name in ("counterfact", "zsre"):
        remote = PUBLIC_FILES[name]
        plan |= {"source": remote.url, "records": remote.records, "reason": "the public file (no data dir set)"}
        more, where = [], f"the public file {remote.url}: {remote.records:,}"
    elif Path(args.dataset).is_file():
        records = count_records(Path(args.dataset))
        plan |= {"kind": "file", "source": args.dataset, "records": records, "reason": "--dataset"}
        more, where = [], f"{args.dataset}: {records:,}"
    elif is_hub_id(args.dataset):
        plan |= {"kind": "hub", "source": args.dataset, "records": None, "reason": "--dataset (a hub dataset id)"}
        more, where = [], ""
    else:
        raise FileNotFoundError(f"--dataset {args.dataset!r} is neither counterfact, zsre, a file nor a hub dataset id "
                                "('org/name')")
    records = plan["records"]
    plan["cases"] = records if n is None or (records is not None and records < n) else n
    if n is not None and records is not None and records < n:
        if not args.fewer_ok:
            split = "--split any" if args.split != "any" else "--split eval or --split train"
            raise ValueError(
                f"--n {n:,}: {plan['source']} holds {records:,} {name} cases, the most a file of split {args.split!r} "
                f"holds. Files and their cases: {where}. "
                + (f"Files that hold more: {'; '.join(more)} (read them with {split} or --dataset PATH); " if more
                   else "")
                + f"pass a smaller --n, --n all, or --fewer-ok to evaluate the {records:,} there are")
        plan["warnings"].append(f"--n {n:,} but {plan['source']} holds {records:,} {name} cases (the most the data "
                                f"holds: {where}): evaluating {records:,} (--fewer-ok)")
    return plan


def _load_cases(args: argparse.Namespace, plan: dict[str, Any]) -> Any:
    from evals.datasets import load_any, load_counterfact, load_zsre

    name = args.dataset.lower()
    if name in ("counterfact", "zsre"):
        loader = load_counterfact if name == "counterfact" else load_zsre
        if plan["files"]:  # the data-dir file chosen by the plan
            return loader(plan["source"], limit=args.n, skip_invalid=True)
        return loader(data_dir=args.data_dir, split=args.split, limit=args.n, skip_invalid=True)
    return load_any(args.dataset, limit=args.n, skip_invalid=True, split=args.split)


def _edit_config(args: argparse.Namespace) -> Any:
    import neuraldb

    kw = ({} if args.gamma is None else {"gamma": args.gamma}) | early_stop_of(args) | residual_dtype_of(args)
    return neuraldb.EditConfig(layer=args.layer, lr=args.lr, steps=args.steps, batch_size=args.edit_batch_size,
                               word_check=args.word_check, chat_residuals=args.chat_residuals, **kw)


def _dtype_line(dtype: str | None, model: Any) -> str:
    """How the residuals will be optimised: ``auto`` says what it means for the loaded model."""
    if dtype == "auto" and model is not None:
        from neuraldb.residuals import fast_residual_dtype

        return f"auto ({fast_residual_dtype(model) or 'as the model'} here)"
    return dtype or "as the model"


def _settings_lines(args: argparse.Namespace, model: Any = None) -> tuple[list[str], dict[str, Any]]:
    """The edit settings as printed (and their sources, for the report); from the model's config
    only (``model`` None: read without loading the weights, or 'resolved at load')."""
    from neuraldb.models import model_config
    from neuraldb.settings import resolve_settings

    if args.store:
        return [f"store {args.store}: its own edit settings (nothing is edited)"
                + ("" if args.gamma is None else f"; gamma {args.gamma}")
                + ("" if args.word_check else "; word check switched off")], {}
    config = _edit_config(args)
    if model is not None:
        hf_config, where = model.config, "the loaded model"
    else:
        hf_config, where = model_config(args.model)
    other = (f"gamma {config.gamma}, word check {'on' if config.word_check else 'off'}, edit batch "
             f"{config.batch_size}, residual dtype {_dtype_line(config.residual_dtype, model)}"
             + (", chat residuals" if config.chat_residuals else ""))
    if hf_config is None:
        return [f"layer, lr, steps: resolved at load ({where})", other], {}
    # loaded: matched by the model's own name_or_path, as neuraldb.edit matches it
    resolved = resolve_settings(hf_config, config=config, name=None if model is not None else args.model)
    head = f"{resolved.model_type}, {resolved.n_layers} layers (config: {where})"
    return [head, *resolved.lines(), other], {"values": {k: getattr(resolved.config, k) for k in resolved.sources},
                                              "sources": dict(resolved.sources), "row": resolved.row}


def _print_plan(args: argparse.Namespace, plan: dict[str, Any]) -> None:
    from evals.config import check_general_tasks
    from evals.metrics.specs import METRICS

    print("neuraldb evaluate --dry-run: the plan (no model loaded, nothing edited or evaluated)")
    print(f"model: {args.model} on {args.device}, {args.dtype}")
    records = "counted at load" if plan["records"] is None else f"{plan['records']:,} records"
    print(f"dataset {plan['kind']} (split {plan['split']}, --n {_count(args.n)}): "
          f"{'?' if plan['cases'] is None else format(plan['cases'], ',')} cases from {plan['source']} ({records}; "
          f"{plan['reason']})")
    for f in plan["files"]:
        print(f"  data dir: {f['path']} ({f['split']}): {f['records']:,}")
    print("  (cases whose subject cannot be keyed, and repeats of a subject and prompt, are left out and listed)")
    for w in plan["warnings"]:
        print(f"WARNING: {w}")
    if args.metrics:
        print(f"metrics: {', '.join(_csv(','.join(args.metrics)))}")
    elif plan["kind"] in METRICS:
        print(f"metrics: {', '.join(METRICS[plan['kind']])} (the dataset's standard ones; a case without "
              "generation prompts, as in the MEND format, has no fluency or consistency)")
    else:
        print("metrics: the standard ones of the file's dataset (CounterFact or ZsRE, detected at load)")
    tasks = check_general_tasks(args.general_tasks)
    limit = "all examples" if args.general_limit is None else f"{args.general_limit} examples per task"
    print(f"general tasks: {', '.join(tasks) + f' ({limit})' if tasks else 'none'}")
    print(f"batch size {args.batch_size}, seed {args.seed}, confidence {args.confidence}")
    lines, _ = _settings_lines(args)
    print("edit settings: " + lines[0])
    for line in lines[1:]:
        print(f"  {line}")
    out = args.output_dir or "(none: nothing written)"
    print(f"output: {out}" + ("" if not args.output_dir else " (report.json, report.md, cases.jsonl"
                              + ("" if args.store else ", the store checkpoint store.safetensors") + ")"))


def run_evaluate(args: argparse.Namespace) -> int:
    from evals.datasets import editable_cases
    import neuraldb
    from evals import report as rep
    from evals.config import check_general_tasks
    from evals.evaluate import evaluate
    from evals.metrics.specs import EXTRA_METRICS, METRICS

    metrics = _csv(",".join(args.metrics)) if args.metrics else None
    kind = args.dataset.lower()
    known = [*METRICS.get(kind, {}), *EXTRA_METRICS.get(kind, {})]
    if metrics and kind in METRICS and set(metrics) - set(known):
        raise ValueError(f"unknown {kind} metric(s) {sorted(set(metrics) - set(known))}; choose from {known}")
    check_general_tasks(args.general_tasks)  # before hours of editing
    if args.store and (args.chat_residuals or args.residual_dtype or args.lr or args.steps or args.early_stop):
        raise ValueError("--chat-residuals, --residual-dtype, --lr, --steps and --early-stop choose how an edit is "
                         "made; with --store nothing is edited: drop them, or drop --store to edit")
    config = None if args.store else _edit_config(args)  # its errors (e.g. --gamma 2) before any loading
    plan = data_plan(args)
    if args.dry_run:
        _print_plan(args, plan)
        return 0
    for w in plan["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr)
    out = Path(args.output_dir) if args.output_dir else None
    t0 = time.perf_counter()
    model, tok = neuraldb.load_model(args.model, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - t0
    edit_s, unkeyable, settings = None, [], {}
    if args.store:
        db = neuraldb.NeuralDB.load(args.store, model=model)
        if args.gamma is not None:
            db.gamma = args.gamma
        if not args.word_check:
            db.clear_words()
        dataset: Any = args.dataset  # read by evaluate() as the plan chose (evals.sources.choose_source)
    else:
        dataset = _load_cases(args, plan)
        if args.n is not None and len(dataset) < args.n:
            print(f"note: only {len(dataset)} cases loaded ({dataset.report.summary()})")
        lines, settings = _settings_lines(args, model)
        print("edit settings: " + "\n  ".join(lines))
        dataset, unkeyable = editable_cases(dataset, tok, config)
        if unkeyable:
            print(f"note: {len(unkeyable)} fact(s) cannot be edited and are left out:\n  " + "\n  ".join(unkeyable))
        if not dataset:
            raise ValueError("none of the facts can be edited (see the notes above)")
        checkpoint = out / "store.safetensors" if out else None
        t1 = time.perf_counter()
        db = neuraldb.edit(model, tok, [c.fact for c in dataset], config=config, checkpoint=checkpoint,
                           progress=not args.quiet)
        edit_s = time.perf_counter() - t1
    report = evaluate(
        model, db, tokenizer=tok, dataset=dataset, limit=args.n, metrics=metrics,
        batch_size=args.batch_size, output_dir=out, data_dir=args.data_dir, general_tasks=args.general_tasks,
        general_limit=args.general_limit, seed=args.seed, confidence=args.confidence, progress=not args.quiet,
        split=args.split, generation_prompts=args.fluency_prompts, generation_tokens=args.fluency_tokens,
        consistency_files=args.consistency_dir,
    )
    report["timings"] = {"load_model": load_s, **({"edit_this_call": edit_s} if edit_s is not None else {}),
                         **report["timings"]}
    report["config"]["cli"] = {k: v for k, v in vars(args).items() if k != "func"}
    report["config"]["data"] = {k: v for k, v in plan.items() if k != "warnings"}
    if settings:
        report["config"]["settings"] = settings
    report["warnings"] = list(plan["warnings"]) + list(report["warnings"])
    if not args.store and unkeyable:
        report["warnings"].append(f"{len(unkeyable)} of the first {_count(args.n)} facts cannot be edited and were "
                                  f"left out: {'; '.join(unkeyable)}")
    if out is not None:
        json_path, md_path = rep.write_report(rep.clean_json(report), out)
    print(rep.render_text(report))
    if out is not None:
        print(f"report: {json_path} and {md_path}")
    return 0


# ----------------------------------------------------------------------------- compare


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="report.json (or the folder holding it): the reference")
    p.add_argument("b", help="report.json (or folder) to compare with A")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


def run_compare(args: argparse.Namespace) -> int:
    from evals import report as rep
    from evals.compare import compare_reports, render_comparison

    a, b = rep.load_report(args.a), rep.load_report(args.b)
    cmp = compare_reports(a, b)
    if args.json:
        print(json.dumps(rep.clean_json(cmp), indent=1, ensure_ascii=False))
    else:
        print(f"A: {args.a}\nB: {args.b}")
        print(render_comparison(cmp))
    return 0

