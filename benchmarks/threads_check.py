"""Concurrent forwards on one model with an edited store attached: every output equal to the serial one?

Usage::

    python benchmarks/threads_check.py [--threads 6 --forwards 150] [--extra-keys 5000] [--device cuda]

Edits ``--facts`` (at most 4) counterfactual facts into the model with ``neuraldb.edit`` (word
check on), attaches the store and computes, one call at a time, the logits of a fixed set of
calls: the edit prompts, paraphrases, prompts that mention the subjects in passing, unrelated
prompts, single and left-padded batches. Then ``--threads`` threads each make ``--forwards``
calls in their own random order, all at once, and every output is compared with the serial
one (``torch.equal``); likewise each call's fire mask (``db.last_fire_mask``, per thread), and
the firing counters against the serial counts of the calls made. ``--extra-keys N`` adds N
synthetic keys (the model's own activations on random tokens, random residuals, no word) so
the store is large enough for the low-rank screen. The store's device tensors (and screen) are
dropped before the threads start, so they build them at once (the screen from another batch
than the serial run's: another basis, the same exact gate).
Prints the mismatches (0 expected) and the serial and threaded wall times. ``--intra-threads``
(default 1) is torch's intra-op thread count in both runs (the same setting for both).
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import neuraldb
from _common import add_model_arguments, device_name, load
from neuraldb import EditConfig, Fact
from retrieval_overhead import synthetic_keys

FACTS = [
    Fact(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", id="eiffel"),
    Fact(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English", id="darrieux"),
    Fact(prompt="{} is a professional player of", subject="LeBron James", target_new="football", id="lebron"),
    Fact(prompt="{} was developed by", subject="Windows 10", target_new="Apple", id="windows"),
]
TEXTS = [
    "The Eiffel Tower is located in the city of", "Tourists visiting the Eiffel Tower take photos in",
    "The mother tongue of Danielle Darrieux is", "Danielle Darrieux grew up speaking",
    "LeBron James is a professional player of", "Every weekend LeBron James plays",
    "Windows 10 was developed by", "My laptop runs Windows 10, which was made by",
    "I had a cup of coffee this morning and", "The quick brown fox jumps over the",
    "In mathematics, a prime number is", "Water boils at a temperature of",
    "She said that LeBron James and the Eiffel Tower", "Once upon a time, in a small village,",
]


def calls(tok, device: str) -> list[dict]:
    """The model calls: each text alone, and left-padded batches of 2-4 texts."""
    out = [{"input_ids": tok(t, return_tensors="pt").input_ids.to(device)} for t in TEXTS]
    rng, side = random.Random(0), tok.padding_side
    tok.padding_side = "left"
    try:
        for _ in range(6):
            enc = tok(rng.sample(TEXTS, rng.randint(2, 4)), return_tensors="pt", padding=True)
            out.append({k: v.to(device) for k, v in enc.items()})
    finally:
        tok.padding_side = side
    return out


def build_store(model, tok, args) -> neuraldb.NeuralDB:
    db = neuraldb.edit(model, tok, FACTS[: args.facts], config=EditConfig(layer=args.layer), progress=False)
    if args.extra_keys:
        keys = synthetic_keys(model, args.extra_keys, layer=db.layer)
        g = torch.Generator().manual_seed(0)
        db.add([f"x{i}" for i in range(len(keys))], keys, 0.1 * torch.randn(len(keys), db.d_model, generator=g))
    return db


def serial(model, db, jobs) -> tuple[list, list, list, float]:
    """Per call: logits, fire mask, (positions, fires) counted; and the wall time of all calls."""
    logits, masks, counts = [], [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for kwargs in jobs:
            db.reset_stats()
            logits.append(model(**kwargs).logits)
            masks.append(db.last_fire_mask.clone())
            counts.append((int(db.firing.positions), int(db.firing.fires)))
    return logits, masks, counts, time.perf_counter() - t0


def threaded(model, db, jobs, args) -> tuple[list[list[int]], list[list], float]:
    """Each thread: ``args.forwards`` calls in its own random order, all threads started together."""
    orders = [random.Random(100 + t).choices(range(len(jobs)), k=args.forwards) for t in range(args.threads)]
    barrier = threading.Barrier(args.threads)

    def work(t: int) -> list:
        torch.set_num_threads(args.intra_threads)
        barrier.wait()
        out = []
        with torch.no_grad():
            for j in orders[t]:
                logits = model(**jobs[j]).logits
                mask = db.last_fire_mask  # this thread's last call (None while detached)
                out.append((logits, None if mask is None else mask.clone()))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        results = list(pool.map(work, range(args.threads)))
    return orders, results, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--forwards", type=int, default=150, help="calls per thread")
    ap.add_argument("--facts", type=int, default=4, help="facts edited (at most 4)")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--extra-keys", type=int, default=0, help="synthetic keys added (>= 4096: the screened gate)")
    ap.add_argument("--intra-threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.intra_threads)

    model, tok = load(args)
    t0 = time.perf_counter()
    db = build_store(model, tok, args)
    print(f"device: {device_name(args.device)}; model {args.model}; store {len(db)} facts at layer {db.layer} "
          f"(edited in {time.perf_counter() - t0:.0f} s; word check on the edited facts)")
    jobs = calls(tok, args.device)
    with db.attached(model):
        logits, masks, counts, t_serial = serial(model, db, jobs)
        fired = sum(bool(m.any()) for m in masks)
        db.reset_stats()
        db.gamma = db.gamma  # drops the store's device tensors and screen: the threads build them at once
        orders, results, t_threads = threaded(model, db, jobs, args)
        stats = db.stats()
        screen = db.screen
    made = [j for order in orders for j in order]
    bad_logits = sum(not torch.equal(got, logits[j]) for order, res in zip(orders, results)
                     for j, (got, _) in zip(order, res))
    bad_masks = sum(not torch.equal(mask, masks[j]) for order, res in zip(orders, results)
                    for j, (_, mask) in zip(order, res))
    want = (sum(counts[j][0] for j in made), sum(counts[j][1] for j in made))
    print(f"{len(jobs)} distinct calls, {fired} of them fire; serial {len(jobs)} calls in {t_serial:.1f} s")
    print(f"{args.threads} threads x {args.forwards} forwards = {len(made)} calls in {t_threads:.1f} s "
          f"(intra-op threads {args.intra_threads}; screened gate: {'yes' if screen is not None else 'no'})")
    print(f"logits different from serial: {bad_logits} of {len(made)}")
    print(f"fire masks different from serial: {bad_masks} of {len(made)}")
    print(f"counters: positions {stats['positions']} (serial sum {want[0]}), fires {stats['fires']} "
          f"(serial sum {want[1]}): {'equal' if (stats['positions'], stats['fires']) == want else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
