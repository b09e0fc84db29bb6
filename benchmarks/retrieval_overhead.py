"""Forward-pass overhead of the gated store: 0, 1K, 10K, 100K stored facts vs the unedited model.

Usage::

    python benchmarks/retrieval_overhead.py [--sizes 0,1000,10000,100000] [--batch 32 --tokens 16] [--device cuda]

Input: ``--batch`` LAMBADA passages (data dir) truncated to ``--tokens`` tokens
(shape stated in the output). Keys: the model's own MLP-projection inputs at
layer ``--layer`` on random token sequences (the right dimension and scale; keys
from real facts behave alike for cost), residuals random. For each size the
store is attached and the forward pass timed (warm-up, then the median of
``--reps``), once with the store's default exact screened gate (a low-rank bound,
then exact top-1 for the positions it cannot rule out; see
``neuraldb.retrieval.LowRankScreen``) and once with the naive exact scan
(``screen_rank=0``); the gate's decisions of both are checked against brute-force
top-1 cosine. The screen's basis is built from the first batch the store sees,
here ``--batch`` other passages, so the timed batch is text it has not seen. Also prints the fraction of positions the screen re-checked, memory
per stored fact and the store's file size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import neuraldb
from _common import add_model_arguments, device_name, load, synchronizer
from neuraldb import NeuralDB
from neuraldb.keys import model_device
from neuraldb.nethook import layer_input
from neuraldb.retrieval import top1, unit_rows


@torch.no_grad()
def synthetic_keys(model, n: int, *, layer: int, seed: int = 0, seq: int = 32, batch: int = 64) -> torch.Tensor:
    arch = neuraldb.resolve_arch(model)
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    out, have = [], 0
    while have < n:
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(model_device(model))
        x = layer_input(model, arch.mlp_out_at(layer), input_ids=ids)  # (batch, seq, d_key)
        k = x[:, 1:].reshape(-1, x.shape[-1]).float().cpu()  # skip position 0
        out.append(k)
        have += k.shape[0]
    return torch.cat(out)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--sizes", default="0,1000,10000,100000")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--data-dir", default=os.environ.get("NEURALDB_DATA_DIR"))
    ap.add_argument("--screen-ranks", default=None,
                    help="comma list of screen ranks to time (default: the store's default, d_key // 3 - 1)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    model, tok = load(args)
    arch = neuraldb.resolve_arch(model)
    layer = args.layer if args.layer is not None else arch.default_layer
    lines = (Path(args.data_dir) / "lambada_openai" / "lambada_test.jsonl").read_text().splitlines()
    texts = [json.loads(x)["text"] for x in lines[: args.batch]]
    enc = tok(texts, return_tensors="pt", truncation=True, max_length=args.tokens, padding=True).to(model.device)
    # the store builds its screen's basis from the first batch it sees: show it other passages
    # first, so that the timed batch is unseen text, as in use
    other = [json.loads(x)["text"] for x in lines[args.batch : 2 * args.batch]]
    first_seen = tok(other, return_tensors="pt", truncation=True, max_length=args.tokens, padding=True).to(model.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    keys = synthetic_keys(model, max(sizes + [1]), layer=layer)
    sync = synchronizer(args.device)

    def timed() -> float:
        ts = []
        for _ in range(args.reps + 1):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                model(**enc)
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts[1:])

    with torch.no_grad():
        x = layer_input(model, arch.mlp_out_at(layer), **enc)  # (batch, tokens, d_key)
    queries = unit_rows(x.reshape(-1, x.shape[-1]))  # every position, for the exactness check
    base = timed()
    dev = device_name(args.device)
    print(f"device: {dev}; model {args.model}, layer {layer}; input {tuple(enc.input_ids.shape)} (batch, tokens)")
    print(f"{'facts':>8} | {'gate':>8} | {'median ms':>9} | {'x unedited':>10} | fires | == brute force | rechecked | bytes/fact | file MB")
    print(f"{'none':>8} | {'-':>8} | {1000 * base:9.1f} | {1.0:10.2f} |")
    results = {"device": dev, "shape": list(enc.input_ids.shape), "unedited_ms": 1000 * base, "sizes": {}}
    d_model = model.get_input_embeddings().weight.shape[1]
    valid = enc.attention_mask.bool().clone()
    valid[:, 0] = False
    for n in sizes:
        db = NeuralDB(layer=layer, d_key=keys.shape[1], d_model=d_model, gamma=0.65, module_template=arch.mlp_out,
                      residual_template=arch.residual_out)
        if n:
            db.add([str(i) for i in range(n)], keys[:n], torch.randn(n, d_model))
        with tempfile.TemporaryDirectory() as tmp:
            size = db.save(Path(tmp) / "s.safetensors").stat().st_size
        per_fact = (db.keys.element_size() * db.d_key + db.residuals.element_size() * db.d_model)
        if n:
            s, i = top1(queries, unit_rows(db.keys).to(queries.device))
            want = (s > db.gamma).cpu() & valid.reshape(-1).cpu()
        results["sizes"][n] = {"file_bytes": size, "bytes_per_fact": per_fact}
        ranks = [int(r) for r in args.screen_ranks.split(",")] if args.screen_ranks else [db.screen_rank]
        for mode, rank in [(f"r={r}" if args.screen_ranks else "screened", r) for r in ranks] + [("naive", 0)]:
            if mode != "naive" and not (n and n >= db.screen_min_keys):
                continue  # small stores always scan
            db.screen_rank = rank
            db._changed()
            with db.attached(model):
                with torch.no_grad():
                    model(**first_seen)
                ms = timed()
                db.reset_stats()
                with torch.no_grad():
                    model(**enc)
                fired = db.last_fire_mask.reshape(-1).cpu() if n else torch.zeros(0, dtype=torch.bool)
                fires = db.stats()["fires"]
            screen = db.screen
            rechecked = f"{screen.rechecked / max(1, screen.screened):9.1%}" if screen is not None else f"{'-':>9}"
            same = torch.equal(fired, want) if n else True
            print(f"{n:>8} | {mode:>8} | {1000 * ms:9.1f} | {ms / base:10.2f} | {fires:5d} | {str(same):>14} | "
                  f"{rechecked} | {per_fact:10d} | {size / 1e6:7.1f}")
            results["sizes"][n][mode] = {"ms": 1000 * ms, "ratio": ms / base, "fires": fires, "exact": same,
                                         "rechecked": None if screen is None else screen.rechecked / max(1, screen.screened)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
