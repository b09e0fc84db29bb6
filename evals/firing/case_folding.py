"""Would whole-subject case folding keep the word check's 0 false fires? (issue 14, deliverable 2)

Run::

    python -m evals.firing.case_folding --n 10000            # LAMBADA 0:2576 and GLUE, SmolLM2 layer 10

The word check counts a mention only when the text spells the subject as stored, its leading
article in either case, or without it (``neuraldb.words.name_variants``). Folding the case of
the whole subject would also count "eiffel tower" and "EIFFEL TOWER". This measures what
that costs on unrelated text: the store of ``neuraldb fire-rate`` (cached keys, the same
10,000 CounterFact facts) is checked twice on the same activations, once with the stored forms
and once with the lower-case, upper-case and title-case spellings added as forms
(``subject_words(aliases=...)``), and every position where only the folded check fires is
printed with its text, so a reader can tell a real mention ("the eiffel tower") from an
ordinary word ("apple", "windows"). Only passages that contain some subject in another case
are run through the model (the others cannot fire differently).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from neuraldb import resolve_arch
from neuraldb.words import subject_words, token_windows, word_match

from .fire_rate import build_store
from .gates import gated_queries
from .measure import default_data_dir, load_facts
from .texts import _slice, unrelated_texts

_WORD = re.compile(r"\w+")


def case_variants(subject: str) -> list[str]:
    """The spellings whole-subject case folding adds: lower, UPPER and Title case, when they differ."""
    return [v for v in dict.fromkeys((subject.lower(), subject.upper(), subject.title())) if v != subject]


def candidate_texts(texts: Sequence[str], subjects: Sequence[str]) -> list[int]:
    """Indices of texts that contain some subject case-insensitively but not only as written:
    the only texts where a folded check can fire where the stored one cannot."""
    by_first: dict[str, list[str]] = {}
    for s in subjects:
        words = _WORD.findall(s.lower())
        if words:
            by_first.setdefault(words[0], []).append(s)
    out = []
    for i, t in enumerate(texts):
        low = t.lower()
        for w in set(_WORD.findall(low)) & by_first.keys():
            if any(s.lower() in low and low.count(s.lower()) > t.count(s) for s in by_first[w]):
                out.append(i)
                break
    return out


@torch.no_grad()
def folded_fires(model, tok, db, folded: torch.Tensor, texts: Sequence[str], *, layer: int, gamma: float,
                 max_len: int, batch_size: int) -> dict[str, Any]:
    """Fires of the stored-form check and of the folded one on ``texts``; the positions only the folded fires."""
    starts = db.word_starts
    exact_n = folded_n = 0
    extra: list[dict[str, Any]] = []
    for rows, a, valid, ids, _ in gated_queries(model, tok, texts, layer=layer, max_len=max_len,
                                                batch_size=batch_size):
        top_s, top_i = db.retrieve(a.reshape(-1, a.shape[-1]))  # (b*t,) each: the exact top-1
        windows = token_windows(ids, width=db.words.shape[2]).reshape(-1, db.words.shape[2])  # (b*t, width)
        open_ = (top_s >= gamma) & valid.reshape(-1)
        exact = open_ & word_match(db.words[top_i], windows, starts)
        fold = open_ & word_match(folded[top_i], windows, starts)
        exact_n += int(exact.sum())
        folded_n += int(fold.sum())
        seq = ids.shape[1]
        for flat in (fold & ~exact).nonzero().squeeze(1).tolist():
            b, t = divmod(flat, seq)
            extra.append({"text": int(rows[b]), "fact": db.ids[int(top_i[flat])], "cosine": round(float(top_s[flat]), 3),
                          "at": tok.decode(ids[b, max(0, t - 10): t + 1].tolist())})
    return {"fires_stored_forms": exact_n, "fires_folded": folded_n, "only_folded": extra}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import neuraldb

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    model, tok = neuraldb.load_model(args.model, device=args.device)
    layer = args.layer if args.layer is not None else resolve_arch(model).default_layer
    db, facts, info = build_store(model, tok, load_facts("counterfact", n=args.n, data_dir=data_dir), layer=layer,
                                  gamma=args.gamma, bare_weight=0.5, cache_dir=args.cache_dir, progress=not args.quiet)
    subjects = [f.subject for f in facts]
    folded = subject_words(tok, subjects, aliases=[case_variants(s) for s in subjects])  # (N, F', width)
    subject_of = {f.id: f.subject for f in facts}
    report: dict[str, Any] = {"facts": len(db), "gamma": args.gamma, "layer": layer, "texts": {}}
    for spec in args.text:
        name, _, part = spec.partition("@")
        lo, hi = _slice(part or None)
        texts = unrelated_texts(None if name == "lambada" else name, data_dir)[lo:hi]
        picked = candidate_texts(texts, subjects)
        out = folded_fires(model, tok, db, folded, [texts[i] for i in picked], layer=layer, gamma=args.gamma,
                           max_len=args.max_len, batch_size=args.batch_size)
        for e in out["only_folded"]:
            e["text"] = lo + picked[e["text"]]
            e["subject"] = subject_of[e["fact"]]
        report["texts"][spec] = {"texts": len(texts), "with_a_subject_in_another_case": len(picked), **out}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['facts']} facts, gamma {report['gamma']}, layer {report['layer']}"]
    for spec, r in report["texts"].items():
        lines.append(f"{spec}: {r['texts']} texts, {r['with_a_subject_in_another_case']} with a subject in another "
                     f"case; fires there: stored forms {r['fires_stored_forms']}, folded {r['fires_folded']}; "
                     f"only with folding: {len(r['only_folded'])}")
        lines += [f"  {e['subject']!r} (cosine {e['cosine']}) at ...{e['at']!r}" for e in r["only_folded"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="CounterFact facts stored")
    ap.add_argument("--text", nargs="+", default=["lambada@0:2576", "glue"],
                    help="NAME[@START:END]: lambada or glue (the data dir's files)")
    ap.add_argument("--gamma", type=float, default=0.65)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache-dir", default=None, help="key cache of neuraldb fire-rate")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    report = run(args)
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
