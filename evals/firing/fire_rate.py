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
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from neuraldb import Fact, NeuralDB, resolve_arch
from neuraldb.keys import pad_batch, pad_id
from neuraldb.nethook import layer_input
from neuraldb.words import NO_WORD, subject_words, token_windows, word_match, word_start_tokens

from .measure import (default_data_dir, generated_facts, group_keys, keyable, load_facts, load_passages,
                      subject_last_positions)

log = logging.getLogger("evals.firing.fire_rate")


def calibration_texts(data_dir: Path, path: str | None = None, limit: int | None = None) -> list[str]:
    """Generic text for per-key thresholds: a file (one passage a line / JSONL), or the general
    tasks' inputs in the data dir: SciQ support passages, MMLU questions (every 5th), then
    ARC-Challenge and CommonsenseQA questions and WSC sentences (whichever are there)."""
    if path:
        return load_passages(path, limit=limit)
    out: list[str] = []

    def field(rel: str, key: str, step: int = 1) -> list[str]:
        f = data_dir / rel
        if not f.is_file():
            return []
        rows = [json.loads(x) for x in open(f, encoding="utf-8") if x.strip()][::step]
        return [t for t in (r.get(key, "") for r in rows) if isinstance(t, str) and t.strip()]

    out += field("sciq/sciq_test.jsonl", "support")
    out += field("mmlu/mmlu_test.jsonl", "question", 5)
    if not out:
        raise FileNotFoundError(f"no calibration text in {data_dir} (sciq/, mmlu/); pass --calib-text FILE")
    out += field("arc_challenge/arc_challenge_test.jsonl", "question")
    out += field("commonsense_qa/commonsense_qa_validation.jsonl", "question")
    out += field("wsc273/wsc273_test.jsonl", "text")
    return out[:limit] if limit else out


@torch.no_grad()
def gated_queries(model, tok, texts: Sequence[str], *, layer: int, max_len: int, batch_size: int,
                  subjects: Sequence[str | None] | None = None, progress: bool = False, desc: str = "text"):
    """Yield (rows, acts (b, t, d), valid (b, t), ids (b, t), subj_pos (b,)) per batch.

    ``valid`` is what the store's hook gates: real tokens except the first of each text.
    """
    from tqdm.auto import tqdm

    arch = resolve_arch(model)
    device = next(model.parameters()).device
    enc, spos = [], []
    for i, t in enumerate(texts):
        if subjects is not None and subjects[i]:
            ids, p = subject_last_positions(tok, t, subjects[i])
        else:
            ids, p = tok(t)["input_ids"], None
        enc.append(list(ids)[:max_len]), spos.append(-1 if p is None or p >= max_len else p)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, mininterval=5):
        rows = order[start: start + batch_size]
        ids, mask = pad_batch([enc[r] for r in rows], pad_id(tok), device)
        x = layer_input(model, arch.mlp_out_at(layer), input_ids=ids, attention_mask=mask)
        valid = mask.bool().clone()
        valid[:, 0] = False
        yield rows, x, valid, ids, torch.tensor([spos[r] for r in rows], device=device)


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


def _slice(spec: str | None) -> tuple[int, int | None]:
    if not spec:
        return 0, None
    lo, _, hi = spec.partition(":")
    return int(lo or 0), (int(hi) if hi else None)


def load_text_spec(spec: str, data_dir: Path, evaluated: tuple[str | None, str | None] = (None, None)) -> list[str]:
    """``default``, ``lambada[@START:END]``, or ``FILE[@START:END]``.

    ``default`` is the general tasks' inputs (:func:`calibration_texts`) plus the LAMBADA
    passages that are not evaluated: ``evaluated`` is the run's (``--text``, ``--passages``);
    with ``--text`` another file all of LAMBADA is used, with LAMBADA only the passages
    outside the evaluated slice.
    """
    name, _, sl = spec.partition("@")
    lo, hi = _slice(sl)
    if name == "default":
        texts = calibration_texts(data_dir)[lo:hi]
        lambada = data_dir / "lambada_openai" / "lambada_test.jsonl"
        text, passages = evaluated
        if lambada.is_file() and not sl:
            all_l = load_passages(lambada)
            if text is None:  # the evaluated text is LAMBADA: only the other passages
                elo, ehi = _slice(passages)
                ehi = len(all_l) if ehi is None else ehi
                all_l = all_l[:elo] + all_l[ehi:]
            texts += all_l
        return texts
    return unrelated_texts(None if name == "lambada" else name, data_dir)[lo:hi]


GLUE_SENTENCES = {"sst2": ("sentence",), "rte": ("sentence1", "sentence2"), "mrpc": ("sentence1", "sentence2"),
                  "cola": ("sentence",)}


def unrelated_texts(text: str | None, data_dir: Path) -> list[str]:
    """``--text``: None (LAMBADA), ``glue`` (the GLUE validation sentences in the data dir:
    SST-2, RTE, MRPC, CoLA, one text per sentence), or a file (one passage a line / JSONL)."""
    if text != "glue":
        return load_passages(text, data_dir=data_dir)
    out = []
    for task, fields in GLUE_SENTENCES.items():
        f = data_dir / "glue" / f"{task}_validation.jsonl"
        if not f.is_file():
            raise FileNotFoundError(f"--text glue: {f} is missing (GLUE validation files in the data dir)")
        for line in open(f, encoding="utf-8"):
            if line.strip():
                rec = json.loads(line)
                out += [rec[k].replace("\n", " ").strip() for k in fields if str(rec.get(k, "")).strip()]
    return out


_TRAILING_WORD = re.compile(r"[\w'’.-]*$")
_FUNCTION_WORDS = frozenset("a an the of and or in on at to for by with from de del della di da du des la le les el "
                            "los las von van der den ter y et".split())


def fired_on_subject_word(tok: Any, ids: torch.Tensor | Sequence[int], subject: str) -> bool:
    """Whether the token that fired ends (or begins, 4+ letters) a word of ``subject``.

    ``ids`` are the text's tokens up to and including the fired one. A text about "Mr.
    Henderson" that fires the key of "Erin Henderson" at "Henderson" is not unrelated to
    that fact; a fire at "Steinberg" on the key of "Brad Silverberg" is a false fire, and
    so is a fire anywhere else in a text that happens to contain "Brad" or "of".
    """
    text = tok.decode([int(i) for i in ids], skip_special_tokens=True)
    m = _TRAILING_WORD.search(text)
    word = (m.group(0) if m else "").lower().strip(".-'’")
    for suffix in ("'s", "’s"):
        word = word.removesuffix(suffix)
    if not word:
        return False
    words = [w.strip(".,;:!?()\"'’").lower() for w in subject.split()]
    words = [w for w in words if w and w not in _FUNCTION_WORDS]  # "of" in "University of X" names no one
    return any(word == w or (len(word) >= 4 and w.startswith(word)) for w in words)


class Gate:
    """One gate configuration measured on the same activations: a gamma, with or without thresholds."""

    def __init__(self, db: NeuralDB, gamma: float, calibrated: bool, shift: float = 0.0, margin: float | None = None,
                 word_check: bool = False):
        self.db = NeuralDB(layer=db.layer, d_key=db.d_key, d_model=1, gamma=gamma)
        self.db.keys, self.db.ids, self.db._index = db.keys, db.ids, db._index
        self.db.residuals = torch.zeros(len(db), 1)
        self.db.thresholds = db.thresholds + shift if calibrated else torch.full((len(db),), float("-inf"))
        self.db.words = db.words if word_check else torch.full_like(db.words, NO_WORD)
        self.db.word_starts = db.word_starts
        self.name = f"gamma={gamma}" + (f" +per-key thresholds (margin {margin})" if calibrated else " (global gamma only)")
        self.name += " +word check" if word_check else ""
        self.margin = margin
        self.gamma, self.calibrated, self.word_check = gamma, calibrated, word_check
        self.fires = self.mentions = self.words = 0
        self.worst: list[tuple[float, str, str, int, int]] = []
        self.per_fact: dict[str, int] = {}
        self.recall: dict[str, dict[str, Any]] = {}
        self._thr: torch.Tensor | None = None
        self._words: torch.Tensor | None = None

    def fire(self, scores: torch.Tensor, index: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(M,) this gate's decision for the shared top-1 ``(scores, index)`` (M,) at token ``windows`` (M, width)."""
        if self._thr is None or self._thr.device != scores.device:  # no normalised key copy per gate
            self._thr, self._words = self.db.gate_thresholds().to(scores.device), self.db.words.to(scores.device)
            self._starts = self.db.word_starts.to(scores.device)
        fire = scores > self._thr[index]
        return fire & word_match(self._words[index], windows, self._starts) if self.word_check else fire


def run(args: argparse.Namespace) -> dict[str, Any]:
    import neuraldb

    torch.set_grad_enabled(False)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    t_start = time.perf_counter()
    if args.model_gguf:  # DIR:FILE of a (possibly truncated) GGUF, for machines without the model cache
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d, f = args.model_gguf.split(":", 1)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval().to(args.device)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        tok.pad_token = tok.pad_token or tok.eos_token
    else:
        model, tok = neuraldb.load_model(args.model, device=args.device)
    layer = args.layer if args.layer is not None else resolve_arch(model).default_layer

    facts = load_facts(args.facts, n=args.n, data_dir=data_dir)
    if args.fill and args.n and len(facts) < args.n:
        facts = facts + generated_facts(args.n - len(facts), seed=args.seed)
    real = {f.id for f in facts if not f.id.startswith("gen-")}
    templates = json.loads(Path(args.templates).read_text()) if args.templates else None
    gammas = args.gamma
    db, facts, info = build_store(model, tok, facts, layer=layer, gamma=min(gammas), bare_weight=args.bare_weight,
                                  cache_dir=args.cache_dir, progress=not args.quiet, templates=templates)
    report: dict[str, Any] = {"model": args.model_gguf or args.model, "layer": layer, "gammas": gammas,
                              "bare_weight": args.bare_weight, "facts_source": args.facts,
                              "stored": len(db), "real_facts": len(real & set(db.ids)), **info}

    lo, hi = _slice(args.passages)
    passages = unrelated_texts(args.text, data_dir)[lo:hi]  # the evaluated text
    checks = {"no": [False], "yes": [False, True], "only": [True]}[args.word_check]
    gates = [] if args.calibrate == "only" else [Gate(db, g, False, word_check=w) for w in checks for g in gammas]
    if args.calibrate in ("yes", "only"):
        t0 = time.perf_counter()
        texts = [t for spec in args.calib_text for t in load_text_spec(spec, data_dir, (args.text, args.passages))]
        evaluated = set(passages)
        kept = list(dict.fromkeys(t for t in texts if t not in evaluated))  # held out by construction, no repeats
        report_dropped = len(set(texts)) - len(kept)
        texts = kept
        acts = []
        for _, a, valid, _, _ in gated_queries(model, tok, texts, layer=layer, max_len=args.max_len,
                                               batch_size=args.batch_size, progress=not args.quiet, desc="calib"):
            acts.append(a[valid].float())
        q = torch.cat(acts)
        first = args.margin[0]
        db.calibrate(q, margin=first)  # thresholds = max calibration cosine + margin: other margins are shifts
        report["calibration"] = {"text": args.calib_text, "texts": len(texts), "dropped_evaluated": report_dropped,
                                 "positions": int(q.shape[0]),
                                 "margins": args.margin, "seconds": round(time.perf_counter() - t0, 1),
                                 "raised": {f"{g}/{m}": int((db.thresholds - first + m > g).sum())
                                            for g in gammas for m in args.margin}}
        del q, acts
        gates += [Gate(db, g, True, shift=m - first, margin=m, word_check=w)
                  for w in checks for m in args.margin for g in gammas]

    # ---- unrelated text
    t0 = time.perf_counter()
    subj_of = {f.id: f.subject for f in facts}
    positions = 0
    for rows, a, valid, ids, _ in gated_queries(model, tok, passages, layer=layer, max_len=args.max_len,
                                                batch_size=args.batch_size, progress=not args.quiet, desc="text"):
        positions += int(valid.sum())
        flat = a.reshape(-1, a.shape[-1])
        top_s, top_i = db.retrieve(flat)  # one exact top-1 for every gate: they differ in thresholds only
        windows = token_windows(ids).reshape(-1, db.words.shape[2])
        index, scores = top_i.reshape(valid.shape).cpu(), top_s.reshape(valid.shape).cpu()
        for g in gates:
            fire = (g.fire(top_s, top_i, windows).reshape(valid.shape) & valid).cpu()
            for b, t in fire.nonzero().tolist():
                fid = db.ids[int(index[b, t])]
                text = passages[rows[b]]
                if subj_of[fid].lower() in text.lower():
                    g.mentions += 1
                elif fired_on_subject_word(tok, ids[b, : t + 1], subj_of[fid]):  # "Mr. Henderson" for "Erin Henderson"
                    g.words += 1
                else:
                    g.fires += 1
                    g.per_fact[fid] = g.per_fact.get(fid, 0) + 1
                    g.worst.append((float(scores[b, t]), fid, tok.decode([int(ids[b, t])]), lo + rows[b], t))
    report["unrelated"] = {"text": args.text or "LAMBADA (lambada_openai/lambada_test.jsonl)",
                           "passages": f"{lo}:{lo + len(passages)}", "positions": positions,
                           "seconds": round(time.perf_counter() - t0, 1)}

    # ---- paraphrase and edit-prompt recall (real facts only: generated fill-ups are not measured)
    measured = [f for f in facts if f.id in real]
    row_of = {f.id: i for i, f in enumerate(facts)}  # facts are in the store's row order
    # facts about one subject share one residual (EditConfig.share_subject_residuals), so
    # retrieving any of them adds the right residual: recall counts them as the fact's own
    subject_id: dict[str, int] = {}
    same = torch.tensor([subject_id.setdefault(f.subject, len(subject_id)) for f in facts])  # (rows,)
    for name, items in (("paraphrase", [(f, p) for f in measured for p in f.paraphrases]),
                        ("edit_prompt", [(f, f.text) for f in measured])):
        if not items:
            continue
        texts = [p for _, p in items]
        owner = torch.tensor([row_of[f.id] for f, _ in items])
        acc = {g.name: {"any": torch.zeros(len(items), dtype=torch.bool),
                        "subj": torch.zeros(len(items), dtype=torch.bool),
                        "strict": torch.zeros(len(items), dtype=torch.bool), "wrong": 0,
                        "miss_below": 0, "miss_other": 0} for g in gates}
        has_subj = torch.zeros(len(items), dtype=torch.bool)
        for rows, a, valid, qids, spos in gated_queries(model, tok, texts, layer=layer, max_len=args.max_len,
                                                     batch_size=args.batch_size, subjects=[f.subject for f, _ in items],
                                                     progress=not args.quiet, desc=name):
            r = torch.tensor(rows)
            sp = spos.cpu()
            ok = sp >= 0
            has_subj[r] = ok
            flat = a.reshape(-1, a.shape[-1])
            top_s, top_i = db.retrieve(flat)
            windows = token_windows(qids).reshape(-1, db.words.shape[2])
            index = top_i.reshape(valid.shape).cpu()
            for g in gates:
                fire = (g.fire(top_s, top_i, windows).reshape(valid.shape) & valid).cpu()
                shares = same[index.clamp_min(0)] == same[owner[r]].unsqueeze(1)  # (b, t) same residual
                own = fire & shares
                at = sp.clamp_min(0).unsqueeze(1)
                acc[g.name]["wrong"] += int((fire & ~own).sum())
                acc[g.name]["any"][r] = own.any(dim=1)
                acc[g.name]["subj"][r] = ok & own.gather(1, at).squeeze(1)
                acc[g.name]["strict"][r] = ok & (fire & (index == owner[r].unsqueeze(1))).gather(1, at).squeeze(1)
                # why the subject token missed: its top-1 shares its residual but is below the gate, or not
                top_own = shares.gather(1, at).squeeze(1)
                missed = ok & ~acc[g.name]["subj"][r]
                acc[g.name]["miss_below"] += int((missed & top_own).sum())
                acc[g.name]["miss_other"] += int((missed & ~top_own).sum())
        for g in gates:
            x = acc[g.name]
            g.recall[name] = {"prompts": len(items), "recall_any": round(float(x["any"].float().mean()), 4),
                              "recall_subject": round(float(x["subj"][has_subj].float().mean()), 4)
                              if has_subj.any() else None,
                              "recall_subject_own_id": round(float(x["strict"][has_subj].float().mean()), 4)
                              if has_subj.any() else None,
                              "subject_located": int(has_subj.sum()), "fires_on_other_facts": x["wrong"],
                              "subject_misses": {"own_key_below_gate": x["miss_below"],
                                                 "other_key_nearer": x["miss_other"]}}
    report["gates"] = []
    for g in gates:
        g.worst.sort(reverse=True)
        report["gates"].append({
            "gate": g.name, "gamma": g.gamma, "calibrated": g.calibrated, "margin": g.margin, "word_check": g.word_check,
            "false_fires": g.fires, "rate": g.fires / positions if positions else 0.0,
            "fires_on_mentions": g.mentions, "fires_on_subject_words": g.words, "facts_firing": len(g.per_fact),
            "worst": [{"score": round(sc, 4), "fact": fid, "subject": subj_of[fid], "token": tk, "passage": pr,
                       "pos": ps} for sc, fid, tk, pr, ps in g.worst[: args.worst]],
            **g.recall})
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    return report


def render(report: dict[str, Any]) -> str:
    u = report["unrelated"]
    lines = [
        f"model {report['model']}  layer {report['layer']}  bare_weight {report['bare_weight']}",
        f"stored facts: {report['stored']} ({report['real_facts']} from {report['facts_source']}, "
        f"{report['stored'] - report['real_facts']} generated; {report['skipped']} skipped); keys {report['keys_s']} s",
    ]
    if "calibration" in report:
        c = report["calibration"]
        lines.append(f"per-key thresholds: calibrated on {c['positions']} positions of {c['texts']} texts "
                     f"({', '.join(c['text'])}), margins {c['margins']}; keys raised above gamma/margin: {c['raised']} "
                     f"({c['seconds']} s)")
    lines.append(f"unrelated text: {u['text']}, passages {u['passages']}, {u['positions']} gated positions")
    for g in report["gates"]:
        lines.append(f"[{g['gate']}]")
        lines.append(f"  FALSE FIRES: {g['false_fires']}  rate {g['rate']:.6f}  ({g['facts_firing']} facts fired)")
        lines.append(f"  not counted as false: {g['fires_on_mentions']} fires on passages that mention the fired "
                     f"fact's subject, {g['fires_on_subject_words']} at a word of the subject")
        for w in g["worst"]:
            lines.append(f"    {w['score']:.4f}  {w['fact']:>20}  subject {w['subject']!r:32} token {w['token']!r} "
                         f"(passage {w['passage']}, pos {w['pos']})")
        for name in ("paraphrase", "edit_prompt"):
            if name in g:
                r = g[name]
                subj = f"{r['recall_subject']:.4f}" if r["recall_subject"] is not None else "n/a"
                strict = r.get("recall_subject_own_id")
                strict = f"; own entry only {strict:.4f}" if strict is not None else ""
                lines.append(f"  {name} recall: any position {r['recall_any']:.4f}, subject token {subj}{strict} "
                             f"({r['prompts']} prompts; {r['fires_on_other_facts']} fires on other subjects' facts)")
                m = r.get("subject_misses")
                if m:
                    lines.append(f"    subject-token misses: top-1 shares its residual but is below the gate "
                                 f"{m['own_key_below_gate']}, another subject's key nearer {m['other_key_nearer']}")
    lines.append(f"total {report['total_s']} s")
    return "\n".join(lines)


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
        Path(args.json).write_text(json.dumps(report, indent=1))
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
