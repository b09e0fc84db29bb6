"""Generation overhead of the gated store: greedy decoding with a KV cache, and the prefill forward.

Usage::

    python benchmarks/decode_overhead.py                   # 10K and 100K facts, batch 1 and 8: ~10 min idle (estimate)
    python benchmarks/decode_overhead.py --facts 2000 --batch 1 --new 8 --repeats 2 --real 500   # smoke run

``model.generate`` (greedy, ``--new`` tokens, forced with ``min_new_tokens``, KV cache) on
``--batch`` CounterFact prompts (``"{subject}'s mother tongue is"``-like, left-padded), timed
unedited and with each store attached; the median of ``--repeats`` runs after a warm-up,
tokens/s and the ratio to the unedited median (timed before and after the stores). The
prefill row is one forward of ``--prefill-batch`` LAMBADA passages of ``--prefill-tokens``
tokens (the shape of ``retrieval_overhead.py``). Every residual is zero, so every text is
the same and only the gate's cost differs. Stores, per size in ``--facts``:

``paper``   keys as in ``retrieval_overhead.py`` (the model's layer inputs on random tokens),
            no word check (the paper's gate): ``screened`` (the default low-rank screen) and
            ``naive`` (``screen_rank=0``).
``words``   the same keys, each with the word forms of a CounterFact subject (cycled), so the
            gate is word-checked as ``neuraldb.edit`` stores facts: ``indexed`` (the default:
            the token-id prefilter, ``neuraldb.wordindex``) and ``screened`` (``word_prefilter=False``,
            every position through the screen).
``cf-N``    ``--real`` CounterFact facts with their real keys (the ``neuraldb fire-rate`` key
            cache; computed without residual optimisation when not cached) and word forms,
            ``indexed`` and ``screened``. The prompts mention stored subjects, so it fires.

Before timing, each store sees other text once (the screen's basis is built from the first
batch). Each (store, mode) is checked against brute force once, at the largest batch: the
fires and fired keys of every call of one generation (prefill and each step) equal the
top-1 cosine over every key, its threshold and (word-checked stores) the word check of
that key at the tokens ending there, from the queries that generation saw.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import neuraldb
from _common import add_model_arguments, device_name, load, synchronizer
from neuraldb import NeuralDB
from neuraldb.retrieval import top1, unit_rows
from neuraldb.words import UNKNOWN, subject_words, token_windows, word_match, word_start_tokens
from retrieval_overhead import synthetic_keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--facts", default="10000,100000", help="store sizes of the synthetic stores")
    ap.add_argument("--batch", default="1,8", help="generation batch sizes")
    ap.add_argument("--new", type=int, default=32, help="new tokens per generation")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--real", type=int, default=2000, help="CounterFact facts of the real store (0: none)")
    ap.add_argument("--word-subjects", type=int, default=5000,
                    help="distinct CounterFact subjects whose forms the 'words' stores cycle through")
    ap.add_argument("--prefill-batch", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=16)
    ap.add_argument("--stores", default="paper,words,real", help="which stores to time")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--data-dir", default=os.environ.get("NEURALDB_DATA_DIR"))
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    from evals.firing.fire_rate import build_store
    from evals.firing.measure import load_facts

    model, tok = load(args)
    arch = neuraldb.resolve_arch(model)
    layer = args.layer if args.layer is not None else arch.default_layer
    device = model.device
    sync = synchronizer(args.device)
    batches = [int(b) for b in args.batch.split(",")]
    sizes = [int(n) for n in args.facts.split(",") if int(n)]
    kinds = args.stores.split(",")
    d_model = model.get_input_embeddings().weight.shape[1]
    data = Path(args.data_dir)

    facts = load_facts("counterfact", data_dir=data)
    lam = [json.loads(x)["text"] for x in (data / "lambada_openai" / "lambada_test.jsonl").read_text().splitlines()]
    side, tok.padding_side = tok.padding_side, "left"
    prompts = {b: tok([f.text for f in facts[:b]], return_tensors="pt", padding=True).to(device) for b in batches}
    tok.padding_side = side
    prefill = tok(lam[: args.prefill_batch], return_tensors="pt", truncation=True, max_length=args.prefill_tokens,
                  padding=True).to(device)
    first_seen = tok(lam[args.prefill_batch : 2 * args.prefill_batch], return_tensors="pt", truncation=True,
                     max_length=args.prefill_tokens, padding=True).to(device)

    def generate(b: int, new: int) -> torch.Tensor:
        return model.generate(**prompts[b], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=tok.pad_token_id)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def measure() -> dict[str, list[float]]:
        for b in batches:  # warm-up
            generate(b, min(8, args.new))
        model(**prefill)
        out = {f"gen{b}": [timed(lambda: generate(b, args.new)) for _ in range(args.repeats)] for b in batches}
        out["prefill"] = [timed(lambda: model(**prefill)) for _ in range(args.repeats)]
        return out

    t_setup = time.perf_counter()
    stores: list[tuple[str, NeuralDB, list[tuple[str, dict]]]] = []
    keys = synthetic_keys(model, max(sizes), layer=layer) if sizes and {"paper", "words"} & set(kinds) else None
    subjects = list(dict.fromkeys(f.subject for f in facts))[: args.word_subjects]
    forms = subject_words(tok, subjects) if "words" in kinds and sizes else None  # (S, F, width)
    starts = word_start_tokens(tok)

    def synthetic(n: int, words: torch.Tensor | None) -> NeuralDB:
        db = NeuralDB(layer=layer, d_key=keys.shape[1], d_model=d_model, gamma=0.65, module_template=arch.mlp_out,
                      residual_template=arch.residual_out)
        db.add([str(i) for i in range(n)], keys[:n], torch.zeros(n, d_model), words=words)
        db.word_starts = starts
        return db

    for n in sizes:
        if "paper" in kinds:
            stores.append((f"paper {n}", synthetic(n, None), [("screened", {}), ("naive", {"screen_rank": 0})]))
        if "words" in kinds:
            words = forms[torch.arange(n) % forms.shape[0]]
            stores.append((f"words {n}", synthetic(n, words),
                           [("indexed", {}), ("screened", {"word_prefilter": False})]))
    if "real" in kinds and args.real:
        db, kept, _ = build_store(model, tok, facts[: args.real], layer=layer, gamma=0.65, bare_weight=0.5,
                                  cache_dir=None, progress=False)
        stores.append((f"cf {len(kept)}", db, [("indexed", {}), ("screened", {"word_prefilter": False})]))
    setup_s = time.perf_counter() - t_setup

    base = measure()
    rows = []
    for name, db, modes in stores:
        default_rank = db.screen_rank
        for mode, settings in modes:
            db.screen_rank = settings.get("screen_rank", default_rank)
            db.word_prefilter = settings.get("word_prefilter", True)
            db._changed(keep_stats=True)  # a new screen for a new rank
            with db.attached(model):
                model(**first_seen)  # the screen's basis comes from other text
                times = measure()
                exact, fires = check(model, db, arch.mlp_out_at(layer), lambda: generate(max(batches), args.new),
                                     prompts[max(batches)].attention_mask)
            rows.append((name, mode, times, exact, fires))
        db.screen_rank = default_rank
    after = measure()
    base = {k: base[k] + after[k] for k in base}
    report(args, base, rows, batches, setup_s, device_name(args.device), tuple(prefill.input_ids.shape))


def check(model, db: NeuralDB, key_module: str, run, prompt_mask: torch.Tensor) -> tuple[bool, int]:
    """(decisions == brute force, fires) for every call of one ``run()`` (a generation of the
    prompts whose attention mask is ``prompt_mask`` (batch, prompt))."""
    queries, decided = [], []
    h1 = model.get_submodule(key_module).register_forward_hook(lambda m, inp, out: queries.append(inp[0].detach()))
    h2 = model.register_forward_hook(lambda *_: decided.append(db.last_fire_index.clone()))
    try:
        seq = run()  # (batch, prompt + new): the prefill and one call per new token but the last
    finally:
        h1.remove(), h2.remove()
    new = seq.shape[1] - prompt_mask.shape[1]
    mask = torch.cat([prompt_mask.bool(), torch.ones(seq.shape[0], new, dtype=torch.bool, device=seq.device)], 1)
    ids = torch.where(mask, seq, torch.full_like(seq, UNKNOWN))
    windows = token_windows(ids, width=db.words.shape[2])  # (batch, total, width)
    first = mask.long().argmax(dim=1, keepdim=True)
    valid = mask & (torch.arange(seq.shape[1], device=seq.device).unsqueeze(0) > first)  # no sink, no padding
    keys, thresholds = unit_rows(db.keys).to(seq.device), db.gate_thresholds().to(seq.device)
    words, starts = db.words.to(seq.device), db.word_starts.to(seq.device)
    ok, fires, col = True, 0, 0
    for q, got in zip(queries, decided):  # q (batch, s, d_key), got (batch, s)
        s = q.shape[1]
        at = slice(col, col + s)
        score, index = top1(unit_rows(q.reshape(-1, q.shape[-1])), keys)
        w = windows[:, at].reshape(-1, windows.shape[-1])
        fire = (score > thresholds[index]) & word_match(words[index], w, starts) & valid[:, at].reshape(-1)
        want = torch.where(fire, index, -1).reshape(got.shape)
        ok &= torch.equal(want.cpu(), got.cpu())
        fires += int(fire.sum())
        col += s
    return ok and col == seq.shape[1] - 1, fires


def report(args, base, rows, batches, setup_s, device, prefill_shape) -> None:
    med = {k: statistics.median(v) for k, v in base.items()}
    print(f"device: {device}; model {args.model}; {args.new} new tokens (greedy, KV cache); medians of "
          f"{args.repeats} runs (unedited: {2 * args.repeats}, before and after); prefill {prefill_shape} "
          f"(batch, tokens); setup {setup_s:.0f} s")
    cols = " | ".join(f"batch {b}: ms, tok/s, x" for b in batches)
    print(f"{'store':>14} | {'gate':>8} | {cols} | prefill ms, x | == brute force | fires")
    cells = " | ".join(f"{1000 * med[f'gen{b}']:7.0f} {b * args.new / med[f'gen{b}']:6.1f}  1.00" for b in batches)
    print(f"{'none':>14} | {'-':>8} | {cells} | {1000 * med['prefill']:7.1f}  1.00 |")
    out = {"device": device, "new": args.new, "unedited": base, "rows": []}
    for name, mode, times, exact, fires in rows:
        m = {k: statistics.median(v) for k, v in times.items()}
        cells = " | ".join(f"{1000 * m[f'gen{b}']:7.0f} {b * args.new / m[f'gen{b}']:6.1f} "
                           f"{m[f'gen{b}'] / med[f'gen{b}']:5.2f}" for b in batches)
        print(f"{name:>14} | {mode:>8} | {cells} | {1000 * m['prefill']:7.1f} {m['prefill'] / med['prefill']:5.2f} | "
              f"{str(exact):>14} | {fires}")
        out["rows"].append({"store": name, "gate": mode, "times": times, "exact": exact, "fires": fires,
                            "ratios": {k: m[k] / med[k] for k in m}})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
