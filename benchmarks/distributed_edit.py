"""Distributed editing: one process of one thread vs ``torchrun`` with N processes of one thread each.

Usage::

    python benchmarks/distributed_edit.py --n 64 --batch-size 16 [--nproc 2] [--output result.json]

Both runs are the command line (``python -m neuraldb edit`` and ``torchrun --nproc-per-node N -m
neuraldb edit``) on the same CounterFact facts (the first ``--n`` editable ones of the data dir,
or ``--facts FILE``), with ``OMP_NUM_THREADS=1`` in every process, one after the other. Prints
each command's wall time (model loading and the self-check included) and the time its edit
took (the slowest rank's), the ratios (target: <= 0.6 with 2 processes), and the comparison of
the two stores: same ids and order, equal records, max |difference| of keys and residuals.
``--n`` must give at least ``--nproc`` batches of ``--batch-size`` (each rank edits whole batches).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _facts(args: argparse.Namespace, folder: Path) -> Path:
    if args.facts:
        return Path(args.facts)
    import neuraldb
    from evals.datasets import editable_cases, load_counterfact

    _, tok = neuraldb.load_model(args.model)
    cases, _ = editable_cases(load_counterfact(data_dir=args.data_dir, limit=2 * args.n + 20), tok,
                              neuraldb.EditConfig(layer=args.layer))
    facts = [c.fact.to_dict() for c in cases][: args.n]
    if len(facts) < args.n:
        sys.exit(f"only {len(facts)} editable CounterFact facts in the first {2 * args.n + 20}; lower --n")
    path = folder / "facts.json"
    path.write_text(json.dumps(facts))
    return path


def _run(args: argparse.Namespace, facts: Path, out: Path, nproc: int) -> tuple[float, float]:
    """(wall seconds, the slowest rank's edit seconds) of one ``neuraldb edit`` command."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "neuraldb", "-v", "edit", "--model", args.model, "--facts", str(facts),
           "--out", str(out), "--batch-size", str(args.batch_size)]
    cmd += ["--layer", str(args.layer)] if args.layer is not None else []
    cmd += ["--residual-dtype", args.residual_dtype] if args.residual_dtype else []
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"the command failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    edits = [float(s) for s in re.findall(r"edited \d+ facts in ([\d.]+) s", done.stderr)]
    return wall, max(edits, default=float("nan"))


def _compare(a_path: Path, b_path: Path) -> dict:
    from neuraldb import NeuralDB

    a, b = NeuralDB.load(a_path), NeuralDB.load(b_path)
    same_ids = a.ids == b.ids
    return {
        "same_ids_and_order": same_ids,
        "same_records": a.facts == b.facts,
        "same_config": a.config == b.config,
        "max_abs_diff_keys": (a.keys - b.keys).abs().max().item() if same_ids else None,
        "max_abs_diff_residuals": (a.residuals - b.residuals).abs().max().item() if same_ids else None,
        "bitwise_equal": same_ids and torch.equal(a.keys, b.keys) and torch.equal(a.residuals, b.residuals),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=64, help="facts to edit")
    ap.add_argument("--batch-size", type=int, default=16, help="facts per batch, the unit of work of a rank")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--residual-dtype", default=None)
    ap.add_argument("--facts", default=None, help="a JSON list of facts (default: CounterFact from the data dir)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        facts = _facts(args, folder)
        n = len(json.loads(facts.read_text()))
        one = _run(args, facts, folder / "one.safetensors", 1)
        many = _run(args, facts, folder / "many.safetensors", args.nproc)
        figures = {"model": args.model, "facts": n, "batch_size": args.batch_size, "nproc": args.nproc,
                   "threads_per_process": 1, "wall_s": {"1": one[0], str(args.nproc): many[0]},
                   "edit_s": {"1": one[1], str(args.nproc): many[1]},
                   "wall_ratio": many[0] / one[0], "edit_ratio": many[1] / one[1],
                   "store": _compare(folder / "one.safetensors", folder / "many.safetensors")}
    print(f"\n{n} facts, batches of {args.batch_size}, {args.model}, 1 thread per process")
    print(f"| processes | wall (s) | edit, slowest rank (s) |\n|---:|---:|---:|")
    print(f"| 1 | {one[0]:.1f} | {one[1]:.1f} |\n| {args.nproc} | {many[0]:.1f} | {many[1]:.1f} |")
    print(f"ratio {args.nproc} vs 1: wall {figures['wall_ratio']:.2f}x, edit {figures['edit_ratio']:.2f}x "
          f"(target <= 0.6x with 2)")
    print("store:", json.dumps(figures["store"]))
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
