"""Edit latency: wall time and peak RSS of ``neuraldb.edit`` on 1, 4, 16, 128 facts, beside the naive loop.

Usage::

    python benchmarks/edit_latency.py                       # sizes 1,4,16,128, 3 repeats, naive loop on 4 facts
    python benchmarks/edit_latency.py --profile             # + where the time goes, per size (neuraldb.timing)
    python benchmarks/edit_latency.py --quick               # sizes 1,4; 1 repeat; naive loop on 1 fact (a smoke run)
    python benchmarks/edit_latency.py --residual-dtype bfloat16 --sizes 128

Each size runs in its own child process (so peak RSS is that size's alone): the child loads the
model, times the first edit of the size's CounterFact facts ("first call": context templates
generated, shortcuts checked), then ``--repeats`` more edits of the same facts into new stores
("warm": what an interactive user meets after their first edit) and reports their median,
its phase breakdown (``--profile``), the mean Adam steps taken (early stop), and the child's
peak RSS (``resource.getrusage``), with the RSS right after loading the model beside it. The
naive loop (ROME's ``compute_z``, one fact at a time through the whole model; see
edit_throughput.py) runs in a child too, on ``--naive-n`` facts: its median s/fact times n is
its time for n facts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from neuraldb.cli import add_early_stop_argument, add_residual_dtype_argument, early_stop_of, residual_dtype_of

HERE = Path(__file__).resolve().parent
PHASES = ("context_templates", "optimisation_model", "keys", "layout", "prefix_pass", "unedited_pass",
          "shortcut_check", "adam_loop", "adam_forward", "cache_copy", "adam_backward", "store_add", "self_check")
PARTS = {"adam_forward": "adam_loop", "adam_backward": "adam_loop", "cache_copy": "adam_forward"}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def child(args: argparse.Namespace) -> dict:
    import dataclasses

    import neuraldb
    from _common import load, synchronizer
    from evals.datasets import load_counterfact
    from neuraldb import EditConfig
    from neuraldb.timing import collect_phases

    model, tok = load(args)
    loaded = peak_rss_gb()
    facts = [c.fact for c in load_counterfact(data_dir=args.data_dir, limit=args.n)]
    sync = synchronizer(args.device)
    cfg = EditConfig(layer=args.layer, batch_size=args.batch_size, **residual_dtype_of(args), **early_stop_of(args))
    if args.naive:
        from edit_throughput import naive_residual
        from neuraldb.keys import context_templates

        arch = neuraldb.resolve_arch(model)
        cfg = neuraldb.resolve_settings(model, config=cfg).config  # layer / lr / steps as neuraldb.edit uses them
        layer = cfg.layer
        templates = context_templates(model, tok, prefixes=cfg.context_prefixes,
                                                    length=cfg.context_length, seed=cfg.context_seed)
        naive_cfg = dataclasses.replace(cfg, residual_dtype=None)
        per_fact = []
        for f in facts:
            t0 = time.perf_counter()
            naive_residual(model, tok, f, layer=layer, templates=templates, cfg=naive_cfg, arch=arch)
            sync()
            per_fact.append(time.perf_counter() - t0)
        return {"naive_s_per_fact": statistics.median(per_fact), "rss_gb": peak_rss_gb(), "loaded_gb": loaded}
    times, phases, steps = [], [], []
    for r in range(1 + args.repeats):
        with collect_phases() as ph:
            t0 = time.perf_counter()
            db = neuraldb.edit(model, tok, facts, config=cfg, progress=False)
            sync()
            times.append(time.perf_counter() - t0)
        phases.append(ph)
        steps = [db.facts[i]["edit"]["steps"] for i in db.ids]
    warm = times[1:] or times
    median_run = sorted(range(len(warm)), key=warm.__getitem__)[len(warm) // 2] + (1 if times[1:] else 0)
    return {"first_s": times[0], "warm_s": statistics.median(warm), "warm_all": warm, "phases": phases[median_run],
            "first_phases": phases[0], "steps_mean": sum(steps) / len(steps), "rss_gb": peak_rss_gb(),
            "loaded_gb": loaded}


def run_child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], check=True, capture_output=True,
                         text=True, env=os.environ | {"PYTHONPATH": os.pathsep.join(
                             [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from _common import add_model_arguments, device_name

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--sizes", default="1,4,16,128", help="comma list of fact counts")
    ap.add_argument("--repeats", type=int, default=3, help="warm edits per size (their median is reported)")
    ap.add_argument("--naive-n", type=int, default=4, help="facts timed in the naive loop (0 = skip it)")
    ap.add_argument("--quick", action="store_true", help="sizes 1,4; 1 repeat; naive loop on 1 fact")
    ap.add_argument("--profile", action="store_true", help="print each size's phase breakdown (seconds)")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    add_residual_dtype_argument(ap)
    add_early_stop_argument(ap)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        args.n = args.child
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.sizes, args.repeats, args.naive_n = "1,4", 1, min(args.naive_n, 1)
    common = ["--model", args.model, "--device", args.device, "--repeats", str(args.repeats),
              "--batch-size", str(args.batch_size)]
    for flag, value in (("--dtype", args.dtype), ("--random-init", args.random_init), ("--layer", args.layer),
                        ("--residual-dtype", args.residual_dtype), ("--early-stop", args.early_stop),
                        ("--data-dir", args.data_dir)):
        if value is not None:
            common += [flag, str(value)]
    sizes = [int(s) for s in args.sizes.split(",")]
    naive = run_child([*common, "--child", str(args.naive_n), "--naive"]) if args.naive_n else None
    print(f"device: {device_name(args.device)}; model {args.model}, residual_dtype {args.residual_dtype or 'auto (default)'}, "
          f"early_stop {args.early_stop or 'nll (default)'}, "
          f"batch {args.batch_size}, {args.repeats} warm repeats per size (median)")
    if naive:
        print(f"naive loop: median {naive['naive_s_per_fact']:.2f} s/fact over {args.naive_n} facts; "
              f"peak RSS {naive['rss_gb']:.2f} GB (after load {naive['loaded_gb']:.2f})")
    print("| facts | first call s | warm s (median) | s/fact | naive loop s (est.) | x naive | Adam steps (mean) "
          "| peak RSS GB (after load) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    for n in sizes:
        r = results[n] = run_child([*common, "--child", str(n)])
        est = naive["naive_s_per_fact"] * n if naive else float("nan")
        print(f"| {n} | {r['first_s']:.2f} | {r['warm_s']:.2f} | {r['warm_s'] / n:.2f} | {est:.1f} | "
              f"{est / r['warm_s']:.1f}x | {r['steps_mean']:.1f} | {r['rss_gb']:.2f} ({r['loaded_gb']:.2f}) |",
              flush=True)
    if args.profile:
        print("\nwhere the time goes (s; warm median run, first call in brackets; indented = part of the line above)")
        print("| phase | " + " | ".join(f"{n} facts" for n in sizes) + " |")
        print("|---|" + "---:|" * len(sizes))
        for name in PHASES:
            if not any(name in results[n]["phases"] or name in results[n]["first_phases"] for n in sizes):
                continue
            label = ("  " * (1 + (PARTS.get(PARTS.get(name, "")) is not None)) if name in PARTS else "") + name
            cells = [f"{results[n]['phases'].get(name, 0.0):.2f} ({results[n]['first_phases'].get(name, 0.0):.2f})"
                     for n in sizes]
            print(f"| {label} | " + " | ".join(cells) + " |")
        print("| total | " + " | ".join(f"{results[n]['warm_s']:.2f} ({results[n]['first_s']:.2f})" for n in sizes)
              + " |")


if __name__ == "__main__":
    main()
