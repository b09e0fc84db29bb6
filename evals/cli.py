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
import time
from pathlib import Path
from typing import Any

__all__ = ["add_compare_arguments", "add_evaluate_arguments", "run_compare", "run_evaluate"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------- evaluate


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in alias or local model directory")
    p.add_argument("--dataset", default="counterfact", help="counterfact, zsre, or a CounterFact/zsRE file")
    p.add_argument("--split", default="eval", help="data-dir split for a dataset name: eval (default) or train; for a hub dataset id, its split")
    p.add_argument("--n", type=int, default=100, help="edit and evaluate the first N cases (default 100)")
    p.add_argument("--store", help="evaluate this saved store (its facts among the dataset's) instead of editing")
    p.add_argument("--output-dir", help="report.json/report.md, the resumable case log and the edit checkpoint")
    p.add_argument("--data-dir", help="data folder (default $NEURALDB_DATA_DIR)")
    p.add_argument("--layer", type=int, default=None, help="edit layer (default: the family's)")
    p.add_argument("--gamma", type=float, default=None, help="gate threshold (default: the store's / 0.65)")
    p.add_argument("--no-word-check", dest="word_check", action="store_false",
                   help="the paper's gate: no word check (when editing: EditConfig(word_check=False); with "
                        "--store: the saved store's keys and residuals with its word check switched off)")
    p.add_argument("--chat-residuals", action="store_true",
                   help="when editing: also optimise each residual on the prompt asked as a chat turn "
                        "(EditConfig(chat_residuals=True)), so the edit carries into chat use")
    p.add_argument("--residual-dtype", default=None,
                   help="when editing: optimise residuals on a copy of the model in this dtype, e.g. bfloat16 "
                        "(EditConfig.residual_dtype); default: the model's own")
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


def _load_cases(args: argparse.Namespace) -> Any:
    from evals.datasets import load_any, load_counterfact, load_zsre
    from evals.hf_datasets import is_hub_id

    name = args.dataset.lower()
    if name in ("counterfact", "zsre"):
        loader = load_counterfact if name == "counterfact" else load_zsre
        return loader(data_dir=args.data_dir, split=args.split, limit=args.n, skip_invalid=True)
    if not Path(args.dataset).is_file() and not is_hub_id(args.dataset):
        raise FileNotFoundError(f"--dataset {args.dataset!r} is neither counterfact, zsre, a file nor a hub dataset id "
                                "('org/name')")
    return load_any(args.dataset, limit=args.n, skip_invalid=True, split=args.split)


def run_evaluate(args: argparse.Namespace) -> int:
    from evals.datasets import editable_cases
    import neuraldb
    from evals import report as rep
    from evals.config import check_general_tasks
    from evals.evaluate import evaluate
    from evals.metrics.specs import EXTRA_METRICS, METRICS

    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    metrics = _csv(",".join(args.metrics)) if args.metrics else None
    kind = args.dataset.lower()
    known = [*METRICS.get(kind, {}), *EXTRA_METRICS.get(kind, {})]
    if metrics and kind in METRICS and set(metrics) - set(known):
        raise ValueError(f"unknown {kind} metric(s) {sorted(set(metrics) - set(known))}; choose from {known}")
    check_general_tasks(args.general_tasks)  # before hours of editing
    out = Path(args.output_dir) if args.output_dir else None
    t0 = time.perf_counter()
    model, tok = neuraldb.load_model(args.model, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - t0
    edit_s, unkeyable = None, []
    if args.store and (args.chat_residuals or args.residual_dtype):
        raise ValueError("--chat-residuals and --residual-dtype choose how an edit is made; with --store nothing "
                         "is edited: drop them, or drop --store to edit")
    if args.store:
        db = neuraldb.NeuralDB.load(args.store, model=model)
        if args.gamma is not None:
            db.gamma = args.gamma
        if not args.word_check:
            db.clear_words()
        dataset: Any = args.dataset
    else:
        dataset = _load_cases(args)
        if len(dataset) < args.n:
            print(f"note: only {len(dataset)} cases available ({dataset.report.summary()}); "
                  "a larger split may be --split train")
        kw = {} if args.gamma is None else {"gamma": args.gamma}
        config = neuraldb.EditConfig(layer=args.layer, batch_size=args.edit_batch_size, word_check=args.word_check,
                                     chat_residuals=args.chat_residuals, residual_dtype=args.residual_dtype, **kw)
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
    if not args.store and unkeyable:
        report["warnings"].append(f"{len(unkeyable)} of the first {args.n} facts cannot be edited and were left "
                                  f"out: {'; '.join(unkeyable)}")
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

