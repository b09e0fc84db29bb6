"""The measurement behind the gate's design: false fires vs paraphrase recall for candidate fixes.

Run (fast on a GPU; hours on a 2-core CPU)::

    neuraldb gate-variants --facts counterfact --n 10000 --device cuda --out study.json
    python -m evals.firing.gate_variants --n 2000 --variants base whitened   # the same without the command

Held-out protocol: per-key thresholds and the centre are fitted on CALIBRATION text
(SciQ support passages and MMLU questions, first half); the margin is chosen on the second
half of the calibration text; the figures are measured on EVALUATION text (LAMBADA), which
no fit ever sees. Keys come from the facts alone. Every variant is computed from the same
activations, so the rows are comparable.

Variants:
  keys     bare weight for facts whose bare prompt starts with the subject (``wf``) and for
           the others (``wo``): 0.5/0.5 is MEMIT's average, 0/0 prefixed contexts only.
  centre   subtract the mean calibration activation from keys and queries.
  whiten   cosine after ``(x - mean) @ C^-1/2``, C the calibration activations' covariance
           (a Mahalanobis cosine: directions common to all text weigh less).
  gate     global gamma; per-key thresholds max(gamma, calib_max_i + margin); a top-1 vs
           top-2 margin; skipping queries whose norm is outside the calibration range; a
           previous-token check (``prev>p``): the position before the query must also be
           like the position before the subject's last token (cosine > p; not asked of
           one-token subjects nor right after the sink).

``--variants`` picks key variants by name (default: all): base, centred, whitened, and
the bare-weight ones (first0-other0.5, first0-other0.25, prefixed, prefixed-centred,
bare0.25).
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

from neuraldb import Fact, resolve_arch
from neuraldb.keys import pad_batch, pad_id
from neuraldb.nethook import layer_input

from .measure import GroupKeys, load_facts, load_passages, subject_last_positions

log = logging.getLogger(__name__)


@torch.no_grad()
def queries(model, tok, texts: Sequence[str], *, layer: int, subjects: Sequence[str | None] | None = None,
            max_len: int = 128, batch_size: int = 64, device: str = "cpu", prev: bool = True) -> dict[str, torch.Tensor]:
    """Activations at every gated position (not position 0, not padding) of each text.

    Returns acts (P, d) float32, with ``prev`` also prev (P, d) (the position before each),
    ids (P,), pos (P,), row (P,), and with ``subjects`` a bool
    ``subj`` (P,) marking the subject's last token.
    """
    arch = resolve_arch(model)
    enc, spos = [], []
    for i, t in enumerate(texts):
        if subjects is not None and subjects[i] is not None:
            ids, p = subject_last_positions(tok, t, subjects[i])
        else:
            ids, p = tok(t)["input_ids"], None
        enc.append(list(ids)[:max_len]), spos.append(-1 if p is None or p >= max_len else p)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    acts, prev_, ids_, pos_, row_, subj_ = [], [], [], [], [], []
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        ids, mask = pad_batch([enc[r] for r in rows], pad_id(tok), torch.device(device))
        x = layer_input(model, arch.mlp_out_at(layer), input_ids=ids, attention_mask=mask)
        for j, r in enumerate(rows):
            n = len(enc[r])
            if n < 2:
                continue
            acts.append(x[j, 1:n].float())
            if prev:
                prev_.append(x[j, 0 : n - 1].float())  # the position before each gated one
            ids_.append(ids[j, 1:n])
            pos = torch.arange(1, n, device=device)
            pos_.append(pos), row_.append(torch.full((n - 1,), r, device=device))
            subj_.append(pos == spos[r])
    out = {"acts": torch.cat(acts), "ids": torch.cat(ids_).cpu(), "pos": torch.cat(pos_).cpu(),
           "row": torch.cat(row_).cpu(), "subj": torch.cat(subj_).cpu()}
    if prev:
        out["prev"] = torch.cat(prev_)
    return out


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def top2(q: torch.Tensor, k: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-1 score/index and top-2 score of unit queries q (P, d) against unit keys k (N, d)."""
    s1 = torch.full((q.shape[0],), -2.0, device=q.device)
    s2 = s1.clone()
    i1 = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    for qs in range(0, q.shape[0], chunk):
        qq = q[qs: qs + chunk]
        b1 = torch.full((qq.shape[0],), -2.0, device=q.device)
        b2, bi = b1.clone(), torch.zeros(qq.shape[0], dtype=torch.long, device=q.device)
        for ks in range(0, k.shape[0], chunk):
            s = qq @ k[ks: ks + chunk].T
            v, a = s.topk(min(2, s.shape[1]), dim=1)
            c1, c2 = v[:, 0], (v[:, 1] if v.shape[1] > 1 else torch.full_like(v[:, 0], -2.0))
            new1 = torch.maximum(b1, c1)
            new2 = torch.maximum(torch.minimum(b1, c1), torch.maximum(b2, c2))
            bi = torch.where(c1 > b1, a[:, 0] + ks, bi)
            b1, b2 = new1, new2
        s1[qs: qs + chunk], s2[qs: qs + chunk], i1[qs: qs + chunk] = b1, b2, bi
    return s1, i1, s2


@torch.no_grad()
def key_max(k: torch.Tensor, q: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """For each unit key, the largest cosine with any unit query: (N,)."""
    m = torch.full((k.shape[0],), -2.0, device=k.device)
    for ks in range(0, k.shape[0], chunk):
        kk = k[ks: ks + chunk]
        best = torch.full((kk.shape[0],), -2.0, device=k.device)
        for qs in range(0, q.shape[0], chunk):
            best = torch.maximum(best, (kk @ q[qs: qs + chunk].T).max(dim=1).values)
        m[ks: ks + chunk] = best
    return m


def evaluate(name: str, K: torch.Tensor, transform: tuple[torch.Tensor, torch.Tensor | None] | None,
             sets: dict[str, dict], *, gammas: Sequence[float], margins: Sequence[float], cal_fit: torch.Tensor,
             cal_check: dict[str, torch.Tensor], norm_range: tuple[float, float] | None, tok=None, worst: int = 0,
             prev_keys: torch.Tensor | None = None, multi: torch.Tensor | None = None,
             prev_ps: Sequence[float] = ()) -> list[dict[str, Any]]:
    """Rows of figures for one key variant under every gate rule.

    ``transform`` is (mean, W or None): cosines are taken between ``(x - mean) @ W``.
    ``prev_keys`` (N, d) and ``multi`` (N,) bool (subject of two or more tokens) enable
    the previous-token rules, one per threshold in ``prev_ps``.
    """
    mean, W = transform if transform is not None else (torch.zeros(K.shape[1], device=K.device), None)

    def tf(x: torch.Tensor) -> torch.Tensor:  # (P, d) -> unit rows in the variant's space
        y = x - mean
        return unit(y @ W if W is not None else y)

    k = tf(K)
    pk = tf(prev_keys) if prev_keys is not None and prev_ps else None
    res = {}
    for sname, s in list(sets.items()) + [("_check", cal_check)]:
        s1, i1, s2 = top2(tf(s["acts"]), k)
        pc = (tf(s["prev"]) * pk[i1]).sum(1) if pk is not None else None  # (P,) previous-token cosine
        res[sname] = (s1, i1, s2, pc)
    m_fit = key_max(k, tf(cal_fit))
    m_small = {n: key_max(k, tf(cal_fit[:n])) for n in (5000, 20000) if n < cal_fit.shape[0]}
    rows = []

    def figures(rule: str, gate_of) -> dict[str, Any]:
        row: dict[str, Any] = {"keys": name, "rule": rule}
        for sname, s in sets.items():
            s1, i1, s2, pc = res[sname]
            fire = gate_of(s1, i1, s2, s, pc)
            owner = s.get("owner")
            if owner is None:
                row[f"{sname}_fires"] = int(fire.sum())
                row[f"{sname}_positions"] = int(fire.numel())
            else:
                own = fire & (i1 == owner)
                if sname.startswith("neigh"):
                    row[f"{sname}_fires"] = int(fire.sum())
                    row[f"{sname}_own_fires"] = int(own.sum())
                    row[f"{sname}_positions"] = int(fire.numel())
                    continue
                rowid = s["row"]
                n_rows = int(s["n_rows"])
                any_hit = torch.zeros(n_rows, dtype=torch.bool, device=fire.device).index_put_(
                    (rowid.to(fire.device),), own, accumulate=True)
                subj = s["subj"].to(fire.device)
                subj_hit = torch.zeros(n_rows, dtype=torch.bool, device=fire.device).index_put_(
                    (rowid.to(fire.device)[subj],), own[subj], accumulate=True)
                has_subj = torch.zeros(n_rows, dtype=torch.bool, device=fire.device).index_put_(
                    (rowid.to(fire.device)[subj],), torch.ones_like(own[subj]), accumulate=True)
                row[f"{sname}_recall_any"] = round(float(any_hit.float().mean()), 4)
                row[f"{sname}_recall_subject"] = round(float(subj_hit[has_subj].float().mean()), 4)
                row[f"{sname}_wrong_fires"] = int((fire & (i1 != owner)).sum())
        row["calib_check_fires"] = int(gate_of(*res["_check"][:3], cal_check, res["_check"][3]).sum())
        return row

    for g in gammas:
        rows.append(figures(f"gamma={g}", lambda s1, i1, s2, s, pc, g=g: s1 > g))
        for mg in margins:
            thr = torch.clamp(m_fit + mg, min=g)
            rows.append(figures(f"gamma={g} perkey+{mg}", lambda s1, i1, s2, s, pc, thr=thr: s1 > thr[i1]))
            for p in prev_ps if pk is not None else ():
                def prev_rule(s1, i1, s2, s, pc, thr=thr, p=p):
                    exempt = ~multi.to(i1.device)[i1] | (s["pos"].to(i1.device) < 2)  # one-token subject / after the sink
                    return (s1 > thr[i1]) & ((pc > p) | exempt)
                rows.append(figures(f"gamma={g} perkey+{mg} prev>{p}", prev_rule))
        for n, m in m_small.items():
            for mg in (0.02, 0.05):
                thr = torch.clamp(m + mg, min=g)
                rows.append(figures(f"gamma={g} perkey[cal={n}]+{mg}", lambda s1, i1, s2, s, pc, thr=thr: s1 > thr[i1]))
        for d in (0.02, 0.05):
            rows.append(figures(f"gamma={g} top2gap>{d}", lambda s1, i1, s2, s, pc, g=g, d=d: (s1 > g) & (s1 - s2 > d)))
        if norm_range is not None:
            lo, hi = norm_range

            def normed(s1, i1, s2, s, pc, g=g):
                n = s["norm"]
                return (s1 > g) & (n >= lo) & (n <= hi)
            rows.append(figures(f"gamma={g} norm-in-range", normed))
    if worst and tok is not None:
        s = sets["eval"]
        s1, i1, _, _ = res["eval"]
        top = s1.topk(min(worst, s1.numel()))
        rows[0]["worst"] = [
            {"score": round(float(v), 4), "key": int(i1[j]), "token": tok.decode([int(s["ids"][j])]),
             "pos": int(s["pos"][j])} for v, j in zip(top.values.tolist(), top.indices.tolist())]
    return rows


# key variants: (bare weight when the bare prompt starts with the subject, otherwise, space)
VARIANTS: dict[str, tuple[float, float, str]] = {
    "base": (0.5, 0.5, ""), "centred": (0.5, 0.5, "centred"), "whitened": (0.5, 0.5, "whitened"),
    "first0-other0.5": (0.0, 0.5, ""), "first0-other0.25": (0.0, 0.25, ""), "prefixed": (0.0, 0.0, ""),
    "prefixed-centred": (0.0, 0.0, "centred"), "bare0.25": (0.25, 0.25, ""),
}


def add_gate_variants_arguments(ap: argparse.ArgumentParser) -> None:
    """The study's options (``neuraldb gate-variants`` and ``python -m evals.firing.gate_variants``)."""
    ap.add_argument("--facts", default="counterfact")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--generated", type=int, default=0, help="also measure this many generated facts (keys only)")
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m", help="alias, or DIR:GGUF for a (truncated) GGUF")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--templates", default=None, help="JSON file with the context templates")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--eval-passages", type=int, default=None)
    ap.add_argument("--calib", type=int, default=2000, help="calibration passages (SciQ + MMLU)")
    ap.add_argument("--calib-text", default=None,
                    help="calibration text file (one passage a line, or JSONL with 'text') instead of SciQ + MMLU")
    ap.add_argument("--out", default="study.json")
    ap.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS), help="key variants (default: all)")
    ap.add_argument("--prev", type=float, nargs="*", default=[0.3, 0.4, 0.5],
                    help="previous-token cosine thresholds to measure (none: skip the previous-token keys)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.firing.gate_variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gate_variants_arguments(ap)
    logging.basicConfig(level=logging.INFO)
    return run_gate_variants(ap.parse_args(argv))


def run_gate_variants(a: argparse.Namespace) -> int:
    """Measure every variant and write ``--out`` (rewritten after each size); the exit code (``neuraldb gate-variants``)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    t00 = time.time()
    if ":" in a.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d, f = a.model.split(":", 1)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval().to(a.device)
        tok = AutoTokenizer.from_pretrained(a.tokenizer) if a.tokenizer else AutoTokenizer.from_pretrained(d, gguf_file=f)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    else:
        import neuraldb

        model, tok = neuraldb.load_model(a.model, device=a.device)
    if a.templates:
        templates = json.load(open(a.templates))
    else:
        import neuraldb

        templates = neuraldb.context_templates(model, tok, prefixes=("The", "Therefore", "Because", "I", "You"),
                                               length=10, seed=0)
    data = Path(a.data_dir) if a.data_dir else None
    from .measure import default_data_dir, keyable

    data = data or default_data_dir()
    report: dict[str, Any] = {"templates": templates, "timings": {}}

    # calibration text: SciQ supports + MMLU questions, split in two halves (fit / check)
    if a.calib_text:
        calib = load_passages(a.calib_text)
    else:
        sciq = [json.loads(x)["support"] for x in open(data / "sciq" / "sciq_test.jsonl")]
        mmlu = [json.loads(x)["question"] for x in open(data / "mmlu" / "mmlu_test.jsonl")]
        calib = [t for t in sciq if t.strip()] + mmlu[::5]
    calib = calib[: a.calib] if a.calib else calib
    t0 = time.time()
    cal = queries(model, tok, calib, layer=a.layer, device=a.device, prev=bool(a.prev))
    half = cal["row"] % 2 == 0
    h = half.to(cal["acts"].device)
    cal_fit = cal["acts"][h]
    cal_check = {"acts": cal["acts"][~h], "pos": cal["pos"][~half]}
    if "prev" in cal:
        cal_check["prev"] = cal["prev"][~h]
    cal_check["norm"] = cal_check["acts"].norm(dim=1)
    evalq = queries(model, tok, load_passages(data_dir=data, limit=a.eval_passages), layer=a.layer, device=a.device,
                    prev=bool(a.prev))
    report["timings"]["text_activations_s"] = round(time.time() - t0, 1)
    center = cal_fit.mean(0)
    xc = cal_fit - center
    lam, vec = torch.linalg.eigh((xc.T @ xc).double() / max(xc.shape[0] - 1, 1))  # covariance (d, d)
    del xc
    lam = lam.clamp_min(float(lam.max()) * 1e-6)
    whiten = (vec @ torch.diag(lam.rsqrt()) @ vec.T).float()  # C^-1/2
    transforms = {"": None, "centred": (center, None), "whitened": (center, whiten)}
    norms = cal_fit.norm(dim=1)
    norm_range = (float(norms.quantile(0.001)), float(norms.quantile(0.999))) if norms.numel() < 2**24 else None
    evalq["norm"] = evalq["acts"].norm(dim=1)
    report["positions"] = {"calib_fit": int(cal_fit.shape[0]), "calib_check": int(cal_check["acts"].shape[0]),
                           "eval": int(evalq["acts"].shape[0])}

    def fact_sets(facts: list[Fact]) -> dict[str, dict]:
        sets = {"eval": evalq}
        texts, subj, owner = [], [], []
        for i, f in enumerate(facts):
            for p in f.paraphrases:
                texts.append(p), subj.append(f.subject), owner.append(i)
        if texts:
            q = queries(model, tok, texts, layer=a.layer, subjects=subj, device=a.device, prev=bool(a.prev))
            q["owner"] = torch.tensor(owner, device=q["acts"].device)[q["row"].to(q["acts"].device)]
            q["n_rows"] = len(texts)
            q["row"] = q["row"].to(q["acts"].device)
            q["norm"] = q["acts"].norm(dim=1)
            sets["para"] = q
        q = queries(model, tok, [f.text for f in facts], layer=a.layer, subjects=[f.subject for f in facts],
                    device=a.device, prev=bool(a.prev))
        q["owner"] = q["row"].to(q["acts"].device)
        q["n_rows"] = len(facts)
        q["norm"] = q["acts"].norm(dim=1)
        sets["edit"] = q
        texts, owner = [], []
        for i, f in enumerate(facts):
            for p in f.neighborhood[:2]:
                texts.append(p), owner.append(i)
        if texts:
            q = queries(model, tok, texts, layer=a.layer, device=a.device, prev=bool(a.prev))
            q["owner"] = torch.tensor(owner, device=q["acts"].device)[q["row"].to(q["acts"].device)]
            q["norm"] = q["acts"].norm(dim=1)
            sets["neigh"] = q
        return sets

    def run(label: str, facts: list[Fact], sizes: Sequence[int], variants: Sequence[str]):
        from .measure import _group_means_at

        t0 = time.time()
        facts, skipped = (facts, []) if label == "gen" else keyable(tok, facts, templates)
        # the subject's last token and, for the previous-token rules, the position before it (same passes)
        offsets = (0, 1) if a.prev else (0,)
        parts = [_group_means_at(model, tok, facts[s: s + 4096], a.layer, templates, 512, offsets)
                 for s in range(0, len(facts), 4096)]
        g, prev = [GroupKeys([f.id for f in facts], torch.cat([p[j][0] for p in parts]),
                             torch.cat([p[j][1] for p in parts]), torch.cat([p[j][2] for p in parts]))
                   for j in range(len(offsets))] + [None] * (2 - len(offsets))
        multi = torch.tensor([len(tok(" " + f.subject.strip(), add_special_tokens=False)["input_ids"]) > 1
                              for f in facts])
        report["timings"][f"{label}_keys_s"] = round(time.time() - t0, 1)
        first = torch.tensor([f.prompt.startswith("{}") for f in facts])
        report[f"{label}_facts"] = {"n": len(facts), "skipped": len(skipped), "subject_first": int(first.sum())}
        for n in sizes:
            sub = facts[:n]
            t0 = time.time()
            sets = fact_sets(sub)
            for vname in variants:
                wf, wo, mode = VARIANTS[vname]
                has = g.has_bare[:n].float()
                w = (torch.where(first[:n], torch.tensor(wf), torch.tensor(wo)) * has).unsqueeze(1)
                K = (w * g.bare[:n] + (1 - w) * g.prefixed[:n]).to(a.device)
                PK = (w * prev.bare[:n] + (1 - w) * prev.prefixed[:n]).to(a.device) if prev is not None else None
                name = f"{label} n={n} {vname}: bare(first={wf},other={wo}){' ' + mode if mode else ''}"
                rows = evaluate(name, K, transforms[mode], sets, gammas=(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8),
                                margins=(0.0, 0.02, 0.05, 0.1), cal_fit=cal_fit, cal_check=cal_check,
                                norm_range=norm_range, tok=tok, worst=20, prev_keys=PK, multi=multi[:n],
                                prev_ps=a.prev)
                report.setdefault("rows", []).extend(rows)
                log.info("%s: %s", name, json.dumps(rows[0])[:600])
            report["timings"][f"{label}_n{n}_eval_s"] = round(time.time() - t0, 1)
            json.dump(report, open(a.out, "w"), indent=1)

    facts = load_facts(a.facts, n=a.n, data_dir=data)
    sizes = sorted({s for s in (2000, 10000) if s < len(facts)} | {len(facts)})
    chosen = a.variants or list(VARIANTS)
    run("cf", facts, sizes, chosen)
    if a.generated:
        run("gen", load_facts("generated", n=a.generated), [a.generated],
            [v for v in chosen if v in ("base", "first0-other0.5", "prefixed")] or ["base"])
    report["timings"]["total_s"] = round(time.time() - t00, 1)
    json.dump(report, open(a.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
