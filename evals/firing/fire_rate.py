"""False-fire report: how often the gate fires on unrelated text, and paraphrase recall.

Run::

    neuraldb fire-rate                                   # 2,000 CounterFact facts, LAMBADA, both gates
    neuraldb fire-rate --n 10000 --gamma 0.6 0.65 --passages 0:2576   # calibrated on the rest
    neuraldb fire-rate --n 100000 --fill generated --device cuda
    neuraldb fire-rate --facts my_facts.json --text my_text.txt --calibrate no
    python -m evals.firing.fire_rate --n 10000           # the same report without the neuraldb command

Firing depends on keys only, so no residual is optimised: the store holds each fact's key
(computed as ``neuraldb.edit`` computes it, same context templates and ``bare_weight``)
with a zero residual. Keys are computed in shards with a progress bar and cached in
safetensors files (``--cache-dir``, default ``$NEURALDB_CACHE/keys`` or
``~/.cache/neuraldb/keys``), so a second run costs only the text's forward passes.

What it prints:
  * false fires on the unrelated text (default: LAMBADA from the data dir,
    ``$NEURALDB_DATA_DIR`` or ``--data-dir``): gated positions (every real token but the
    first of each passage), fires, rate, and the worst offenders (fact, token, score).
    Fires on a passage that mentions the fired fact's subject, or at a word of the subject
    (a text about "Mr. Henderson" firing the fact about "Erin Henderson" at "Henderson"),
    are counted apart: that text is not unrelated to the fact;
  * paraphrase recall, when the facts have paraphrases: a paraphrase counts as
    recalled when ANY of its positions fires its own fact (``recall_any``) and, more
    strictly, when the subject's last token does (``recall_subject``). A fact about
    the same subject counts as its own: ``neuraldb.edit`` gives such facts one shared
    residual (``EditConfig.share_subject_residuals``), since keys read at the subject
    cannot tell them apart; ``recall_subject_own_id`` asks for the fact's own entry;
  * edit-prompt recall (the fact's own prompt, any position).

Gates measured on the same activations: the paper's (global ``--gamma`` only), the calibrated
one (per-key thresholds, ``NeuralDB.calibrate(margin=--margin)``), and each of them with the
word check (``EditConfig.word_check``, ``--word-check``: the tokens at the fired position must
spell the fact's subject; ``neuraldb.edit`` stores it by default). Held-out
protocol: thresholds are fitted on calibration text (``--calib-text``; default: the general
tasks' inputs in the data dir - SciQ support passages, MMLU, ARC and CommonsenseQA
questions, WSC sentences - and the LAMBADA passages that are not evaluated), never on the
evaluated passages: a calibration text equal to an evaluated one is dropped. Without the word
check, the fires left after calibration are on text the calibration had nothing like; with
it, none are left at 10,000 or 100,000 facts (README, "False fires and recall at 10,000 and
100,000 facts").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from neuraldb import Fact, NeuralDB, resolve_arch
from neuraldb.words import subject_words, token_windows, word_start_tokens

from .gates import Gate, fired_on_subject_word, gated_queries
from .measure import default_data_dir, generated_facts, group_keys, keyable, load_facts
from .recall import measure_recall
from .report import gate_row, render, write_json
from .texts import GLUE_SENTENCES, _slice, calibration_texts, load_text_spec, unrelated_texts

__all__ = ["run", "render", "run_fire_rate", "add_fire_rate_arguments", "main", "build_store", "Gate",
           "gated_queries", "fired_on_subject_word", "calibration_texts", "load_text_spec", "unrelated_texts",
           "GLUE_SENTENCES"]

log = logging.getLogger("evals.firing.fire_rate")


def build_store(model, tok, facts: list[Fact], *, layer: int, gamma: float, bare_weight: float,
                cache_dir: str | None, progress: bool, templates: list[str] | None = None,
                ) -> tuple[NeuralDB, list[Fact], dict[str, Any]]:
    import neuraldb
    from neuraldb import EditConfig

    cfg = EditConfig(layer=layer, gamma=gamma, bare_weight=bare_weight)
    if templates is None:  # what neuraldb.edit generates for the default config
        templates = neuraldb.context_templates(model, tok, prefixes=cfg.context_prefixes,
                                               length=cfg.context_length, seed=cfg.context_seed)
    t0 = time.perf_counter()
    gen = [f for f in facts if f.id.startswith("gen-")]  # generated facts are keyable by construction
    kept, skipped = keyable(tok, [f for f in facts if not f.id.startswith("gen-")], templates)
    kept += gen
    groups = group_keys(model, tok, kept, layer=layer, templates=templates, cache_dir=cache_dir, progress=progress)
    keys = groups.combine(bare_weight)
    arch = resolve_arch(model)
    d_model = model.get_input_embeddings().weight.shape[1]
    db = NeuralDB(layer=layer, d_key=keys.shape[1], d_model=d_model, gamma=gamma, module_template=arch.mlp_out,
                  residual_template=arch.residual_out, config=cfg.to_dict() | {"context_templates": templates})
    db.add([f.id for f in kept], keys, torch.zeros(len(kept), d_model),
           words=subject_words(tok, [f.subject for f in kept]))  # as neuraldb.edit stores them
    db.word_starts = word_start_tokens(tok)
    info = {"facts": len(kept), "skipped": len(skipped), "keys_s": round(time.perf_counter() - t0, 1),
            "templates": templates}
    return db, kept, info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the store, count false fires per gate on the unrelated text, measure recall; the report."""
    torch.set_grad_enabled(False)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    t_start = time.perf_counter()
    model, tok = load_model(args)
    layer = args.layer if args.layer is not None else resolve_arch(model).default_layer
    facts = stored_facts(args, data_dir)
    real = {f.id for f in facts if not f.id.startswith("gen-")}
    templates = json.loads(Path(args.templates).read_text()) if args.templates else None
    db, facts, info = build_store(model, tok, facts, layer=layer, gamma=min(args.gamma), bare_weight=args.bare_weight,
                                  cache_dir=args.cache_dir, progress=not args.quiet, templates=templates)
    report: dict[str, Any] = {"model": args.model_gguf or args.model, "layer": layer, "gammas": args.gamma,
                              "bare_weight": args.bare_weight, "facts_source": args.facts,
                              "stored": len(db), "real_facts": len(real & set(db.ids)), **info}
    lo, hi = _slice(args.passages)
    passages = unrelated_texts(args.text, data_dir)[lo:hi]  # the evaluated text
    checks = {"no": [False], "yes": [False, True], "only": [True]}[args.word_check]
    gates = [] if args.calibrate == "only" else [Gate(db, g, False, word_check=w) for w in checks for g in args.gamma]
    if args.calibrate in ("yes", "only"):
        report["calibration"] = calibrate(model, tok, db, passages, args, data_dir=data_dir, layer=layer)
        first = args.margin[0]
        gates += [Gate(db, g, True, shift=m - first, margin=m, word_check=w)
                  for w in checks for m in args.margin for g in args.gamma]
    subj_of = {f.id: f.subject for f in facts}
    t0 = time.perf_counter()
    positions = count_false_fires(model, tok, db, gates, passages, subj_of, first=lo, layer=layer,
                                  max_len=args.max_len, batch_size=args.batch_size, progress=not args.quiet)
    report["unrelated"] = {"text": args.text or "LAMBADA (lambada_openai/lambada_test.jsonl)",
                           "passages": f"{lo}:{lo + len(passages)}", "positions": positions,
                           "seconds": round(time.perf_counter() - t0, 1)}
    measure_recall(model, tok, db, gates, facts, real, layer=layer, max_len=args.max_len,
                   batch_size=args.batch_size, progress=not args.quiet)
    report["gates"] = [gate_row(g, positions, subj_of, args.worst) for g in gates]
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    return report


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """``--model``, or ``--model-gguf DIR:FILE`` (a possibly truncated GGUF, for machines without the model cache)."""
    if not args.model_gguf:
        import neuraldb

        return neuraldb.load_model(args.model, device=args.device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = args.model_gguf.split(":", 1)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval().to(args.device)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, tok


def stored_facts(args: argparse.Namespace, data_dir: Path) -> list[Fact]:
    """``--facts`` (first ``--n``), topped up with generated facts under ``--fill generated``."""
    facts = load_facts(args.facts, n=args.n, data_dir=data_dir)
    if args.fill and args.n and len(facts) < args.n:
        facts = facts + generated_facts(args.n - len(facts), seed=args.seed)
    return facts


def calibrate(model, tok, db: NeuralDB, passages: list[str], args: argparse.Namespace, *, data_dir: Path,
              layer: int) -> dict[str, Any]:
    """Per-key thresholds at the first margin from the calibration text minus the evaluated
    passages (other margins are shifts of them); the report's ``calibration`` entry."""
    t0 = time.perf_counter()
    texts = [t for spec in args.calib_text for t in load_text_spec(spec, data_dir, (args.text, args.passages))]
    evaluated = set(passages)
    kept = list(dict.fromkeys(t for t in texts if t not in evaluated))  # held out by construction, no repeats
    acts = [a[valid].float() for _, a, valid, _, _ in
            gated_queries(model, tok, kept, layer=layer, max_len=args.max_len, batch_size=args.batch_size,
                          progress=not args.quiet, desc="calib")]
    q = torch.cat(acts)
    first = args.margin[0]
    db.calibrate(q, margin=first)  # thresholds = max calibration cosine + margin: other margins are shifts
    return {"text": args.calib_text, "texts": len(kept), "dropped_evaluated": len(set(texts)) - len(kept),
            "positions": int(q.shape[0]), "margins": args.margin, "seconds": round(time.perf_counter() - t0, 1),
            "raised": {f"{g}/{m}": int((db.thresholds - first + m > g).sum())
                       for g in args.gamma for m in args.margin}}


def count_false_fires(model, tok, db: NeuralDB, gates: list[Gate], passages: list[str], subj_of: dict[str, str], *,
                      first: int, layer: int, max_len: int, batch_size: int, progress: bool) -> int:
    """One pass over the unrelated text: each gate's fires, sorted into mentions, subject words and
    false fires (``first`` numbers the passages); the number of gated positions."""
    positions = 0
    for rows, a, valid, ids, _ in gated_queries(model, tok, passages, layer=layer, max_len=max_len,
                                                batch_size=batch_size, progress=progress, desc="text"):
        positions += int(valid.sum())
        top_s, top_i = db.retrieve(a.reshape(-1, a.shape[-1]))  # one exact top-1 for every gate: thresholds differ
        windows = token_windows(ids).reshape(-1, db.words.shape[2])
        index, scores = top_i.reshape(valid.shape).cpu(), top_s.reshape(valid.shape).cpu()
        for g in gates:
            fire = (g.fire(top_s, top_i, windows).reshape(valid.shape) & valid).cpu()
            for b, t in fire.nonzero().tolist():
                fid = db.ids[int(index[b, t])]
                count_fire(g, tok, fid, subj_of[fid], passages[rows[b]], ids[b, : t + 1], float(scores[b, t]),
                           passage=first + rows[b], pos=t)
    return positions


def count_fire(g: Gate, tok, fid: str, subject: str, text: str, ids: torch.Tensor, score: float, *,
               passage: int, pos: int) -> None:
    """File one fire of gate ``g`` at the last of ``ids``: on a passage that mentions the fact's
    subject, at a word of the subject ("Mr. Henderson" for "Erin Henderson"), or a false fire."""
    if subject.lower() in text.lower():
        g.mentions += 1
    elif fired_on_subject_word(tok, ids, subject):
        g.words += 1
    else:
        g.fires += 1
        g.per_fact[fid] = g.per_fact.get(fid, 0) + 1
        g.worst.append((score, fid, tok.decode([int(ids[-1])]), passage, pos))


def add_fire_rate_arguments(ap: argparse.ArgumentParser) -> None:
    """The report's options (``neuraldb fire-rate`` and ``python -m evals.firing.fire_rate``)."""
    ap.add_argument("--facts", default="counterfact",
                    help="facts file (CounterFact ROME/MEND, zsRE MEND, JSON list of facts) or a name: "
                         "counterfact, counterfact-train, counterfact-rome, zsre, generated[:seed]")
    ap.add_argument("--n", type=int, default=2000, help="facts to store (up to 100,000)")
    ap.add_argument("--fill", choices=["generated"], default=None,
                    help="top up with generated facts when the file has fewer than --n")
    ap.add_argument("--text", default=None,
                    help="unrelated text: a file (one passage a line, or JSONL with 'text'), or 'glue' for the GLUE "
                         "validation sentences of the data dir (default: LAMBADA)")
    ap.add_argument("--passages", default=None, help="START:END slice of the passages (default: all)")
    ap.add_argument("--data-dir", default=None, help="data directory (default $NEURALDB_DATA_DIR; layout: docs/method.md, 'Data directory')")
    ap.add_argument("--gamma", type=float, nargs="+", default=[0.65], help="one or more gammas to measure")
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--bare-weight", type=float, default=0.5)
    ap.add_argument("--calibrate", choices=["no", "yes", "only"], default="yes",
                    help="per-key thresholds from calibration text: no / yes (measure both gates) / only")
    ap.add_argument("--word-check", choices=["no", "yes", "only"], default="yes",
                    help="the word check, the subject's tokens must end at the fired position (EditConfig.word_check): "
                         "no / yes (measure gates with and without it) / only")
    ap.add_argument("--calib-text", nargs="+", default=["default"],
                    help="calibration text specs: default (the general tasks' inputs in the data dir - SciQ, "
                         "MMLU, ARC, CommonsenseQA, WSC - and the LAMBADA passages not evaluated), "
                         "lambada@START:END, or FILE[@START:END]; a text that is also evaluated is dropped")
    ap.add_argument("--margin", type=float, nargs="+", default=[0.05],
                    help="calibration margin(s) above the max cosine; several are measured on the same activations")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-gguf", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--templates", default=None,
                    help="JSON list of context templates (default: generated as neuraldb.edit does)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of generated facts")
    ap.add_argument("--worst", type=int, default=15)
    ap.add_argument("--json", default=None, help="also write the report as JSON here")
    ap.add_argument("--quiet", action="store_true")


def _check_arguments(args: argparse.Namespace) -> None:
    if args.n is not None and not 1 <= args.n <= 1_000_000:
        raise ValueError("--n must be between 1 and 1,000,000")


def run_fire_rate(args: argparse.Namespace) -> int:
    """Measure, write ``--json`` and print the report; the exit code (``neuraldb fire-rate``)."""
    _check_arguments(args)
    report = run(args)
    if args.json:  # first: a long run's figures survive whatever happens to the printing
        write_json(report, args.json)
    print(render(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.firing.fire_rate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fire_rate_arguments(ap)
    args = ap.parse_args(argv)
    try:
        _check_arguments(args)
    except ValueError as exc:
        ap.error(str(exc))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_fire_rate(args)


if __name__ == "__main__":
    sys.exit(main())
