"""Peak RSS of one optimisation batch of k facts, to fit the bytes per fact that
``EditConfig.memory_budget_gb`` divides by.

Usage::

    python benchmarks/edit_memory.py --ks 8,32,64,128          # one child process per k
    python benchmarks/edit_memory.py --ks 8,32 --steps 2       # the peak is reached in the first step

Each k runs in its own child (so peaks are separate): load the model, note its RSS, edit k
CounterFact facts in one batch (no self-check, ``memory_budget_gb=None`` so the batch is not
split), note the peak RSS. Prints the increase per k and a least-squares line
``peak = base + k * bytes_per_fact``; ``neuraldb.editor.batch_bytes_per_fact`` is the estimate
the library uses, printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from neuraldb.cli import add_residual_dtype_argument, residual_dtype_of

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> dict:
    import neuraldb
    from _common import load
    from evals.datasets import load_counterfact
    from neuraldb import EditConfig

    model, tok = load(args)
    facts = [c.fact for c in load_counterfact(data_dir=args.data_dir, limit=args.child)]
    cfg = EditConfig(layer=args.layer, steps=args.steps, batch_size=args.child, memory_budget_gb=None,
                     **residual_dtype_of(args))
    from neuraldb.keys import context_templates

    context_templates(model, tok, prefixes=cfg.context_prefixes, length=cfg.context_length)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    neuraldb.edit(model, tok, facts, config=cfg, progress=False, check=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from neuraldb.editor import batch_bytes_per_fact

    return {"before": before, "peak": peak, "estimate": batch_bytes_per_fact(model, cfg)}


def main() -> None:
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from _common import add_model_arguments

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--ks", default="8,32,64,128")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layer", type=int, default=None)
    add_residual_dtype_argument(ap)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    argv = ["--model", args.model, "--device", args.device, "--steps", str(args.steps)]
    for flag, value in (("--dtype", args.dtype), ("--random-init", args.random_init), ("--layer", args.layer),
                        ("--residual-dtype", args.residual_dtype), ("--data-dir", args.data_dir)):
        if value is not None:
            argv += [flag, str(value)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    rows = []
    print("| k facts | RSS after load GB | peak RSS GB | increase MB | MB per fact |")
    print("|---:|---:|---:|---:|---:|")
    for k in (int(x) for x in args.ks.split(",")):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", str(k)], check=True,
                             capture_output=True, text=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((k, r["peak"]))
        inc = r["peak"] - r["before"]
        print(f"| {k} | {r['before'] / 2**30:.2f} | {r['peak'] / 2**30:.2f} | {inc / 2**20:.0f} | "
              f"{inc / k / 2**20:.1f} |", flush=True)
    if len(rows) >= 2:
        n = len(rows)
        mk = sum(k for k, _ in rows) / n
        mp = sum(p for _, p in rows) / n
        slope = sum((k - mk) * (p - mp) for k, p in rows) / sum((k - mk) ** 2 for k, _ in rows)
        print(f"fit: peak = {(mp - slope * mk) / 2**30:.2f} GB + k x {slope / 2**20:.1f} MB; "
              f"the library's estimate: {r['estimate'] / 2**20:.1f} MB per fact")


if __name__ == "__main__":
    main()
