"""``neuraldb gpu-evals``: the paper's scale in one job (what ``tox -e gpu-evals`` runs).

Example::

    neuraldb gpu-evals --model meta-llama/Meta-Llama-3-8B-Instruct           # CUDA, bfloat16, 10,000 facts
    neuraldb gpu-evals --model smollm2-135m --n 10000 --no-word-check --gamma 0.7
    neuraldb gpu-evals --dry-run --device cpu --n 50                          # the plan; nothing is loaded

Three steps, each printed before it runs, stopping at the first that fails:

  1. ``neuraldb evaluate --dataset counterfact --n N`` with the six general tasks, into
     ``OUT/`` (report.json, report.md, store.safetensors). In the data dir the first
     CounterFact file of the split that holds N cases is read (``evals.sources.choose_source``:
     the ROME-format test file holds 2,191, the MEND-format edit and train files 10,000 each);
     when none holds N the step stops with an error naming the files (``--fewer-ok``: a warning).
  2. ``neuraldb evaluate --dataset zsre --split any --n ZN --fewer-ok`` into ``OUT/zsre/``: as
     many ZsRE cases as the data dir holds, up to ZN (default N), said in its report's warnings.
     Edit metrics only: the general tasks are measured once, in step 1.
  3. ``neuraldb gate --report OUT/report.json --policy POLICY`` (the README's CI recipe), whose exit
     code is the job's: 0 pass, 1 a criterion failed, 2 broken inputs.

Edit options (``--layer``, ``--lr``, ``--steps``, ``--gamma``, ``--word-check`` / ``--no-word-check``,
``--residual-dtype``) reach both evaluations; unset, layer / lr / steps are the model's row of
``neuraldb/settings.json``. ``--dry-run`` prints both evaluations' plans (files, cases, metrics,
general tasks, edit settings) and the gate command, and loads nothing.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Callable, Sequence

from neuraldb.cli import add_early_stop_argument, add_residual_dtype_argument

__all__ = ["add_gpu_evals_arguments", "gpu_evals_commands", "run_gpu_evals"]


def add_gpu_evals_arguments(p: argparse.ArgumentParser) -> None:
    from evals.cli import n_cases_arg

    p.description = ("The paper's scale in one job (what tox -e gpu-evals runs), each step printed before it runs: "
                     "1. neuraldb evaluate on --n CounterFact cases with the general tasks (more than the data dir's "
                     "files hold is an error naming them); 2. neuraldb evaluate on ZsRE, as many cases as the data dir "
                     "holds up to --zsre-n; 3. neuraldb gate --report OUT/report.json --policy POLICY, whose exit "
                     "code is the job's. --dry-run prints the plans and loads nothing.")
    p.add_argument("--model", default="smollm2-135m", help="built-in alias, local model folder or hub id")
    p.add_argument("--n", type=n_cases_arg, default=10000,
                   help="CounterFact cases to edit and evaluate (default 10000; 'all': every case of the file); "
                        "more than the data dir's files hold is an error naming them")
    p.add_argument("--split", default="eval", help="CounterFact data-dir split: eval (default), train or any")
    p.add_argument("--fewer-ok", action="store_true",
                   help="CounterFact: evaluate what the data holds when it is less than --n (a warning, not an error)")
    p.add_argument("--zsre-n", type=n_cases_arg, default=None,
                   help="ZsRE cases, at most (default: --n); as many as the data dir holds when fewer")
    p.add_argument("--no-zsre", action="store_true", help="skip the ZsRE evaluation")
    p.add_argument("--layer", type=int, default=None, help="edit layer (default: the model's settings row)")
    p.add_argument("--lr", type=float, default=None, help="residual learning rate (default: the model's settings row)")
    p.add_argument("--steps", type=int, default=None, help="residual steps (default: the model's settings row)")
    add_early_stop_argument(p)
    p.add_argument("--gamma", type=float, default=None, help="gate threshold (default 0.65)")
    p.add_argument("--word-check", dest="word_check", action="store_true", default=True,
                   help="the gate checks the subject's words (the default)")
    p.add_argument("--no-word-check", dest="word_check", action="store_false",
                   help="the paper's gate: no word check")
    add_residual_dtype_argument(p)
    p.add_argument("--edit-batch-size", type=int, default=None, help="facts optimised together (default 128)")
    p.add_argument("--general-tasks", default="all", help="general tasks of the CounterFact run (default: all six)")
    p.add_argument("--general-limit", type=int, default=None, help="examples per general task (default: all)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu, ...")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float32, float16")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size (default 32)")
    p.add_argument("--output-dir", default=str(Path("reports") / "gpu-evals"),
                   help="CounterFact report and store here, ZsRE's in its zsre/ folder (default reports/gpu-evals)")
    p.add_argument("--data-dir", default=None, help="data folder (default $NEURALDB_DATA_DIR)")
    p.add_argument("--policy", default="strict", help="release gate policy (default: the packaged strict policy)")
    p.add_argument("--baseline", default=None, help="an older report.json: the gate also checks the regression")
    p.add_argument("--save-release", metavar="DIR", default=None, help="on a pass, the gate writes the release here")
    p.add_argument("--no-gate", action="store_true", help="stop after the evaluations")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan of each step (files, cases, metrics, tasks, settings); load nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _edit_options(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
           "--batch-size", str(args.batch_size), "--word-check" if args.word_check else "--no-word-check"]
    for flag, value in (("--layer", args.layer), ("--lr", args.lr), ("--steps", args.steps),
                        ("--early-stop", args.early_stop), ("--gamma", args.gamma),
                        ("--residual-dtype", args.residual_dtype), ("--edit-batch-size", args.edit_batch_size),
                        ("--data-dir", args.data_dir)):
        if value is not None:
            out += [flag, str(value)]
    return out + (["--quiet"] if args.quiet else [])


def _n(value: int | None) -> str:
    return "all" if value is None else str(value)


def gpu_evals_commands(args: argparse.Namespace) -> list[list[str]]:
    """The ``neuraldb`` command lines the job runs, in order (each without the leading ``neuraldb``)."""
    out = Path(args.output_dir)
    dry = ["--dry-run"] if args.dry_run else []
    cf = ["evaluate", "--dataset", "counterfact", "--split", args.split, "--n", _n(args.n),
          "--general-tasks", args.general_tasks, *(["--general-limit", str(args.general_limit)]
                                                   if args.general_limit is not None else []),
          *(["--fewer-ok"] if args.fewer_ok else []), "--output-dir", str(out), *_edit_options(args), *dry]
    commands = [cf]
    if not args.no_zsre:
        zsre_n = args.n if args.zsre_n is None else args.zsre_n
        commands.append(["evaluate", "--dataset", "zsre", "--split", "any", "--n", _n(zsre_n), "--fewer-ok",
                         "--output-dir", str(out / "zsre"), *_edit_options(args), *dry])
    if not args.no_gate:
        gate = ["gate", "--report", str(out / "report.json"), "--policy", args.policy, "--output-dir", str(out)]
        if args.baseline:
            gate += ["--baseline", args.baseline]
        if args.save_release:
            gate += ["--store", str(out / "store.safetensors"), "--save-release", args.save_release]
        commands.append(gate + (["--quiet"] if args.quiet else []))
    return commands


def run_gpu_evals(args: argparse.Namespace, *, run: Callable[[Sequence[str]], int] | None = None) -> int:
    """Run the steps (``run``: default ``neuraldb.cli.main``); the exit code of the first that fails, else the gate's."""
    if run is None:
        from neuraldb.cli import main as run
    commands = gpu_evals_commands(args)
    for i, argv in enumerate(commands, start=1):
        line = "neuraldb " + shlex.join(argv)
        if args.dry_run and argv[0] == "gate":
            print(f"\n[{i}/{len(commands)}] would run: {line}\n  (its exit code is the job's: 0 pass, 1 a criterion "
                  "failed, 2 broken inputs)")
            continue
        print(f"\n[{i}/{len(commands)}] $ {line}", flush=True)
        rc = int(run(argv) or 0)
        if rc != 0 or argv[0] == "gate":
            if rc != 0:
                print(f"neuraldb gpu-evals: step {i} ({argv[0]}) exited {rc}; "
                      + ("the release gate decided 'no'" if argv[0] == "gate" and rc == 1 else "stopping"))
            return rc
    return 0
