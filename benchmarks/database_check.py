"""The store as a database (issue 15): forget facts that share a residual, upsert new targets.

Usage::

    python benchmarks/database_check.py                       # 50 facts, 10 same-subject pairs, 20 upserts
    python benchmarks/database_check.py --n 12 --pairs 3 --upserts 4   # a quick run (minutes on a CPU)

Builds a store of ``--n`` CounterFact facts of which ``--pairs`` pairs share a subject (CounterFact
cases whose subjects repeat with another prompt; if too few, a subject gets a second fact made
from another case's prompt and targets), edits it, then removes one fact of each pair three ways:
``db.remove(..., stale_ok=True)`` (the rows alone: the sibling's residual keeps the target),
``neuraldb.forget`` (default: re-fit, holding the forgotten prompt to the unedited answer) and
``neuraldb.forget(restore=False)`` (exactly a fresh edit of the sibling). For each it prints the
share of removed prompts whose next token is the unedited model's again, the share where the
removed target still beats the true one, and the siblings' efficacy (ES: new target likelier
than the true one on the prompt) before and after. Then it gives ``--upserts`` stored facts a
new target (another case's target of the same relation) through ``neuraldb.edit(..., db=db)``:
ES on the new targets and the share whose old target fell below the true one, against two
baselines: the unedited model (``unedited.old_below_true_pct``) and the new targets edited alone
into a fresh store (``fresh_edit_of_new_targets``: the store "as if the old fact had never been
edited", which the upserted store should match).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections import defaultdict
from typing import Any, Sequence

import torch

import neuraldb
from _common import add_model_arguments, device_name, load
from neuraldb import EditConfig, Fact

log = logging.getLogger("database_check")


def same_subject_pairs(cases: Sequence[Any], n_pairs: int) -> list[tuple[Any, Fact]]:
    """``n_pairs`` (case, second fact about its subject): repeated subjects with another prompt
    first, then a second fact made from another case's prompt and targets."""
    by_subject: dict[str, list[Any]] = defaultdict(list)
    for c in cases:
        by_subject[c.fact.subject].append(c)
    pairs = []
    for group in by_subject.values():
        other = [c for c in group[1:] if c.fact.prompt != group[0].fact.prompt]
        if other and len(pairs) < n_pairs:
            pairs.append((group[0], other[0].fact))
    singles = [c for c in cases if len(by_subject[c.fact.subject]) == 1]
    donors = iter(singles[::-1])
    for c in singles:
        if len(pairs) >= n_pairs:
            break
        d = next(donors)
        if d.fact.prompt != c.fact.prompt and d.relation_id != c.relation_id:
            pairs.append((c, Fact(prompt=d.fact.prompt, subject=c.fact.subject, target_new=d.fact.target_new,
                                  target_true=d.fact.target_true)))
    if len(pairs) < n_pairs:
        raise ValueError(f"only {len(pairs)} same-subject pairs could be built")
    return pairs


def new_targets(cases: Sequence[Any], facts: Sequence[Fact]) -> list[Fact]:
    """Each fact with another target: another case's ``target_new`` of the same relation
    (else any other case's), never its old or true target."""
    by_relation: dict[Any, list[str]] = defaultdict(list)
    for c in cases:
        by_relation[c.relation_id].append(c.fact.target_new)
    relation = {c.fact.id: c.relation_id for c in cases}
    every = [c.fact.target_new for c in cases]
    out = []
    for i, f in enumerate(facts):
        pool = by_relation.get(relation.get(f.id), []) + every
        target = next(t for t in pool[i % 7:] + pool if t not in (f.target_new, f.target_true))
        out.append(Fact(prompt=f.prompt, subject=f.subject, target_new=target, target_true=f.target_true))
    return out


def nlls(model: Any, tok: Any, pairs: Sequence[tuple[str, str]]) -> list[float]:
    from evals.metrics.tokens import score_targets

    return [s.mean_nll for s in score_targets(model=model, tokenizer=tok, pairs=pairs)]


def next_tokens(model: Any, tok: Any, texts: Sequence[str]) -> list[int]:
    out = []
    for text in texts:
        with torch.no_grad():
            out.append(int(model(**tok(text, return_tensors="pt").to(model.device)).logits[0, -1].argmax()))
    return out


def efficacy(model: Any, tok: Any, db: Any, facts: Sequence[Fact]) -> float:
    """% of facts whose target_new is likelier than target_true on their prompt, store attached."""
    with db.attached(model):
        s = nlls(model, tok, [(f.text, t) for f in facts for t in (f.target_new, f.target_true)])
    return 100.0 * sum(s[2 * i] < s[2 * i + 1] for i in range(len(facts))) / max(len(facts), 1)


def removal_figures(model: Any, tok: Any, db: Any, removed: Sequence[Fact], siblings: Sequence[Fact],
                    unedited: Sequence[int]) -> dict[str, float]:
    with db.attached(model):
        now = next_tokens(model, tok, [f.text for f in removed])
        s = nlls(model, tok, [(f.text, t) for f in removed for t in (f.target_new, f.target_true)])
    n = max(len(removed), 1)
    return {"removed_back_to_unedited_pct": 100.0 * sum(a == b for a, b in zip(now, unedited)) / n,
            "removed_target_still_wins_pct": 100.0 * sum(s[2 * i] < s[2 * i + 1] for i in range(len(removed))) / n,
            "siblings_es": efficacy(model, tok, db, siblings)}


def upsert_figures(model: Any, tok: Any, db: Any, old: Sequence[Fact], new: Sequence[Fact],
                   old_below: Sequence[bool]) -> dict[str, float]:
    """ES on the new targets, the share whose old target is below the true one, and, of the facts
    where the unedited model put it below (``old_below``), the share where it is below again."""
    with db.attached(model):
        s = nlls(model, tok, [(f.text, t) for f, g in zip(new, old) for t in (f.target_new, g.target_new, f.target_true)])
    n = max(len(new), 1)
    below = [s[3 * i + 1] > s[3 * i + 2] for i in range(len(new))]
    return {"es_new_target": 100.0 * sum(s[3 * i] < s[3 * i + 2] for i in range(len(new))) / n,
            "old_below_true_pct": 100.0 * sum(below) / n,
            "old_back_below_true_pct": 100.0 * sum(b for b, u in zip(below, old_below) if u) / max(sum(old_below), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--n", type=int, default=50, help="facts in the store (pairs included)")
    ap.add_argument("--pairs", type=int, default=10, help="same-subject pairs; one of each is removed")
    ap.add_argument("--upserts", type=int, default=20, help="stored facts given a new target")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--output", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--unedited-only", action="store_true",
                    help="print only the unedited model's baselines of the same facts (no edit: seconds)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from evals.datasets import editable_cases, load_counterfact

    model, tok = load(args)
    cfg = EditConfig(layer=args.layer)
    cases, _ = editable_cases(load_counterfact(data_dir=args.data_dir), tok, cfg)
    pairs = same_subject_pairs(cases, args.pairs)
    in_pairs = {c.fact.subject for c, _ in pairs}
    fill = [c.fact for c in cases if c.fact.subject not in in_pairs][: args.n - 2 * args.pairs]
    firsts, seconds = [c.fact for c, _ in pairs], [f for _, f in pairs]
    facts = firsts + seconds + fill
    figures: dict[str, Any] = {"device": device_name(args.device), "model": args.model, "facts": len(facts),
                               "pairs": len(pairs), "upserts": args.upserts}

    unedited = next_tokens(model, tok, [f.text for f in seconds])
    s = nlls(model, tok, [(f.text, t) for f in seconds for t in (f.target_new, f.target_true)])
    figures["unedited"] = {"removed_target_wins_pct": 100.0 * sum(s[2 * i] < s[2 * i + 1] for i in range(len(seconds)))
                           / max(len(seconds), 1)}  # the baseline for removed_target_still_wins_pct
    old = (fill + firsts)[: args.upserts]
    new = new_targets(cases, old)
    s = nlls(model, tok, [(f.text, t) for f in old for t in (f.target_new, f.target_true)])
    old_below = [s[2 * i] > s[2 * i + 1] for i in range(len(old))]  # unedited: the old target below the true one
    figures["unedited"]["old_below_true_pct"] = 100.0 * sum(old_below) / max(len(old), 1)  # upsert's baseline
    if args.unedited_only:
        print(json.dumps(figures, indent=2))
        return
    t0 = time.perf_counter()
    db = neuraldb.edit(model, tok, facts, config=cfg, progress=False, check=False)
    figures["edit_s"] = time.perf_counter() - t0
    figures["before"] = {"removed_es": efficacy(model, tok, db, seconds), "siblings_es": efficacy(model, tok, db, firsts)}

    stale = copy.deepcopy(db)
    stale.remove([f.id for f in seconds], stale_ok=True)
    figures["remove_rows_only"] = removal_figures(model, tok, stale, seconds, firsts, unedited)
    forgotten = {}
    for name, restore in (("forget", True), ("forget_restore_false", False)):
        forgotten[name] = d = copy.deepcopy(db)
        t0 = time.perf_counter()
        neuraldb.forget(model, tok, d, [f.id for f in seconds], restore=restore)
        secs = time.perf_counter() - t0
        figures[name] = removal_figures(model, tok, d, seconds, firsts, unedited) | {"seconds": secs}
    db = forgotten["forget"]

    t0 = time.perf_counter()
    db = neuraldb.edit(model, tok, new, config=cfg, db=db, progress=False, check=False)
    secs = time.perf_counter() - t0
    figures["upsert"] = upsert_figures(model, tok, db, old, new, old_below) | {
        "seconds": secs, "replaced": len(db.last_edit.replaced), "refit": len(db.last_edit.refit),
        "rows": len(db)}
    # "as if the old fact had never been edited": the new targets edited alone into a fresh store
    fresh = neuraldb.edit(model, tok, new, config=cfg, progress=False, check=False)
    figures["fresh_edit_of_new_targets"] = upsert_figures(model, tok, fresh, old, new, old_below)
    print(json.dumps(figures, indent=2))
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
