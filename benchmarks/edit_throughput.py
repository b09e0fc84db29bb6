"""Edit throughput: ``neuraldb.edit`` (batched, cached prefix layers) vs the naive per-fact loop.

Usage::

    python benchmarks/edit_throughput.py --n 128 [--residual-dtypes model,bfloat16] [--device cuda]

The naive loop is ROME's ``compute_z`` as written: one fact at a time, the whole model
forward and backward (weights' gradients included) on every step, 25 Adam steps with
the same loss, clamp and early stop (``EditConfig.early_stop``). Both use the same keys, so the stores differ
only in their residuals; efficacy (ES) and generalization (PS) of both stores are
measured with the CounterFact metric. Prints facts/s, the ratio, ES/PS of both; with
``--residual-dtypes model,bfloat16`` also the edit with its residual optimisation on a
bfloat16 copy of the model (``EditConfig.residual_dtype``), scored on the float32 model.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

import neuraldb
from _common import add_model_arguments, device_name, load, synchronizer
from neuraldb import EditConfig, TraceDict
from neuraldb.cli import add_early_stop_argument, early_stop_of
from neuraldb.keys import compute_keys, context_templates, model_device, pad_batch, pad_id
from neuraldb.residual_batch import _build
from neuraldb.settings import resolve_settings


def naive_residual(model, tok, fact, *, layer, templates, cfg: EditConfig, arch) -> torch.Tensor:
    """One fact, whole model, every step (ROME's compute_z loop)."""
    device = model_device(model)
    seqs = _build(tok, [fact], templates, cfg.kl_prompt)
    ids, mask = pad_batch([s.ids for s in seqs], pad_id(tok), device)
    subj = torch.tensor([s.subject_pos for s in seqs], device=device)
    name = arch.layer(layer)
    with torch.no_grad(), TraceDict(model, [name]) as td:
        logits = model(input_ids=ids, attention_mask=mask).logits
    kl_row = len(seqs) - 1
    p_orig = F.log_softmax(logits[kl_row, seqs[-1].target_pos[0]], -1)
    h_norm = td[name].output[0, subj[0]].norm()
    delta = torch.zeros(td[name].output.shape[-1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    rows = torch.arange(len(seqs), device=device)

    def add(out, x, layer=None):
        out = out.clone()
        out[rows, subj] += delta
        return out

    for _ in range(cfg.steps):
        opt.zero_grad()
        with TraceDict(model, [name], retain_output=False, edit_output=add):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        nll = 0.0
        for r, s in enumerate(seqs[:-1]):
            lp = F.log_softmax(logits[r, s.target_pos], -1)
            nll = nll + -lp[torch.arange(len(s.target_ids)), torch.tensor(s.target_ids)].mean()
        nll = nll / (len(seqs) - 1)
        lp = F.log_softmax(logits[kl_row, seqs[-1].target_pos[0]], -1)
        kl = (p_orig.exp() * (p_orig - lp)).sum()
        loss = nll + cfg.kl_factor * kl + cfg.weight_decay * delta.norm() / h_norm**2
        if (nll if cfg.early_stop == "nll" else loss).item() < cfg.early_stop_loss:  # the rule neuraldb.edit uses
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = cfg.clamp_norm_factor * h_norm
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return delta.detach()


def scores(model, tok, db, cases):
    from evals.metrics.counterfact import counterfact_scores, summarize_counterfact

    with db.attached(model):
        s = summarize_counterfact(counterfact_scores(model=model, tokenizer=tok, cases=cases))
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--naive-n", type=int, default=None, help="facts for the naive loop (default: --n)")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=128, help="facts optimised together (default 128, EditConfig's)")
    ap.add_argument("--memory-budget-gb", type=float, default=EditConfig.memory_budget_gb,
                    help="EditConfig.memory_budget_gb (default EditConfig's; 0 = no bound, batch-size alone)")
    add_early_stop_argument(ap)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--residual-dtypes", default="model",
                    help="comma list of EditConfig.residual_dtype values to time, 'model' = the model's own "
                    "(e.g. model,bfloat16)")
    args = ap.parse_args()
    from evals.datasets import load_counterfact

    model, tok = load(args)
    cases = load_counterfact(data_dir=args.data_dir, limit=args.n)
    facts = [c.fact for c in cases]
    # layer / lr / steps as neuraldb.edit resolves them (neuraldb/settings.json), so the naive loop matches
    cfg = resolve_settings(model, config=EditConfig(layer=args.layer, batch_size=args.batch_size,
                                                    **early_stop_of(args),
                                                    memory_budget_gb=args.memory_budget_gb or None)).config
    arch = neuraldb.resolve_arch(model)
    layer = cfg.layer

    sync = synchronizer(args.device)
    modes = {}  # residual dtype -> (store, seconds)
    for name in args.residual_dtypes.split(","):
        mode_cfg = dataclasses.replace(cfg, residual_dtype=None if name == "model" else name)
        neuraldb.edit(model, tok, facts[:2], config=mode_cfg, progress=False)  # warm-up
        sync()
        t0 = time.perf_counter()
        db = neuraldb.edit(model, tok, facts, config=mode_cfg, progress=False)
        sync()
        modes[name] = (db, time.perf_counter() - t0)
    fast = next(iter(modes.values()))[0]

    templates = fast.config["context_templates"]
    naive_n = args.naive_n or args.n
    per_fact = []
    residuals = []
    for f in facts[:naive_n]:
        t0 = time.perf_counter()
        residuals.append(naive_residual(model, tok, f, layer=layer, templates=templates, cfg=cfg, arch=arch))
        sync()
        per_fact.append(time.perf_counter() - t0)
    naive = fast.head(0)  # same layer, gamma and templates; the naive residuals on the same keys
    naive.add(fast.ids[:naive_n], fast.keys[:naive_n], torch.stack(residuals))

    naive_rate = 1.0 / statistics.median(per_fact)
    s_naive = scores(model, tok, naive, cases[:naive_n])
    dev = device_name(args.device)
    print(f"device: {dev}; model {args.model}, layer {layer}, {len(facts)} CounterFact facts, batch {args.batch_size}, "
          f"memory_budget_gb {cfg.memory_budget_gb}")
    print(f"naive loop : median {statistics.median(per_fact):.2f} s/fact over {naive_n} facts = {naive_rate:.3f} facts/s; "
          f"ES {100 * s_naive['efficacy']:.1f}, PS {100 * s_naive['generalization']:.1f}")
    for name, (db, secs) in modes.items():
        rate = len(facts) / secs
        sub = scores(model, tok, db.head(naive_n), cases[:naive_n])
        every = scores(model, tok, db, cases)
        print(f"edit ({name:>8}): {secs:7.1f} s for {len(facts)} facts = {secs / len(facts):.2f} s/fact, "
              f"{rate / naive_rate:.1f}x the naive loop; on the same {naive_n} facts ES {100 * sub['efficacy']:.1f}, "
              f"PS {100 * sub['generalization']:.1f}; on all {len(facts)}: ES {100 * every['efficacy']:.1f}, "
              f"PS {100 * every['generalization']:.1f}, NS {100 * every['specificity']:.1f}")

if __name__ == "__main__":
    main()
