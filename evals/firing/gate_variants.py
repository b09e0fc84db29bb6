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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from neuraldb import Fact, resolve_arch
from neuraldb.keys import pad_batch, pad_id
from neuraldb.nethook import layer_input

from .measure import GroupKeys, load_facts, load_passages, subject_last_positions
from .scoring import evaluate, key_max, top2, unit

__all__ = ["run_gate_variants", "add_gate_variants_arguments", "main", "queries", "evaluate", "VARIANTS",
           "top2", "key_max", "unit"]

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
    from .measure import default_data_dir

    torch.backends.cuda.matmul.allow_tf32 = False
    t00 = time.time()
    model, tok = load_model(a)
    templates = context_templates(a, model, tok)
    data = (Path(a.data_dir) if a.data_dir else None) or default_data_dir()
    report: dict[str, Any] = {"templates": templates, "timings": {}}
    study = text_activations(a, model, tok, data, report)
    study.templates = templates
    facts = load_facts(a.facts, n=a.n, data_dir=data)
    sizes = sorted({s for s in (2000, 10000) if s < len(facts)} | {len(facts)})
    chosen = a.variants or list(VARIANTS)
    measure_facts(study, report, "cf", facts, sizes, chosen)
    if a.generated:
        measure_facts(study, report, "gen", load_facts("generated", n=a.generated), [a.generated],
                      [v for v in chosen if v in ("base", "first0-other0.5", "prefixed")] or ["base"])
    report["timings"]["total_s"] = round(time.time() - t00, 1)
    json.dump(report, open(a.out, "w"), indent=1)
    return 0


def load_model(a: argparse.Namespace) -> tuple[Any, Any]:
    """``--model``: an alias, or DIR:GGUF for a (truncated) GGUF (``--tokenizer`` overrides its tokenizer)."""
    if ":" not in a.model:
        import neuraldb

        return neuraldb.load_model(a.model, device=a.device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = a.model.split(":", 1)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval().to(a.device)
    tok = AutoTokenizer.from_pretrained(a.tokenizer) if a.tokenizer else AutoTokenizer.from_pretrained(d, gguf_file=f)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def context_templates(a: argparse.Namespace, model, tok) -> list[str]:
    if a.templates:
        return json.load(open(a.templates))
    import neuraldb

    return neuraldb.context_templates(model, tok, prefixes=("The", "Therefore", "Because", "I", "You"),
                                      length=10, seed=0)


@dataclass
class Study:
    """What every size and variant is measured with: the model, the options, and the text activations."""
    a: argparse.Namespace
    model: Any
    tok: Any
    cal_fit: torch.Tensor  # calibration activations that thresholds and the centre are fitted on
    cal_check: dict[str, torch.Tensor]  # the other half of the calibration text
    evalq: dict[str, torch.Tensor]  # the evaluation text (LAMBADA)
    transforms: dict[str, tuple[torch.Tensor, torch.Tensor | None] | None]
    norm_range: tuple[float, float] | None
    templates: list[str] | None = None


def calibration_text(a: argparse.Namespace, data: Path) -> list[str]:
    """``--calib-text``, or SciQ supports + MMLU questions (every 5th); the first ``--calib``."""
    if a.calib_text:
        calib = load_passages(a.calib_text)
    else:
        sciq = [json.loads(x)["support"] for x in open(data / "sciq" / "sciq_test.jsonl")]
        mmlu = [json.loads(x)["question"] for x in open(data / "mmlu" / "mmlu_test.jsonl")]
        calib = [t for t in sciq if t.strip()] + mmlu[::5]
    return calib[: a.calib] if a.calib else calib


def text_activations(a: argparse.Namespace, model, tok, data: Path, report: dict[str, Any]) -> Study:
    """Calibration activations split in two halves by passage (fit / check), the evaluation text's,
    and the transforms fitted on the fit half (centre, whitening, norm range)."""
    t0 = time.time()
    cal = queries(model, tok, calibration_text(a, data), layer=a.layer, device=a.device, prev=bool(a.prev))
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
    transforms = fitted_transforms(cal_fit)
    norms = cal_fit.norm(dim=1)
    norm_range = (float(norms.quantile(0.001)), float(norms.quantile(0.999))) if norms.numel() < 2**24 else None
    evalq["norm"] = evalq["acts"].norm(dim=1)
    report["positions"] = {"calib_fit": int(cal_fit.shape[0]), "calib_check": int(cal_check["acts"].shape[0]),
                           "eval": int(evalq["acts"].shape[0])}
    return Study(a, model, tok, cal_fit, cal_check, evalq, transforms, norm_range)


def fitted_transforms(cal_fit: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """The key spaces: plain, centred on the mean calibration activation, whitened (C^-1/2)."""
    center = cal_fit.mean(0)
    xc = cal_fit - center
    lam, vec = torch.linalg.eigh((xc.T @ xc).double() / max(xc.shape[0] - 1, 1))  # covariance (d, d)
    del xc
    lam = lam.clamp_min(float(lam.max()) * 1e-6)
    whiten = (vec @ torch.diag(lam.rsqrt()) @ vec.T).float()  # C^-1/2
    return {"": None, "centred": (center, None), "whitened": (center, whiten)}


def fact_sets(st: Study, facts: list[Fact]) -> dict[str, dict]:
    """The evaluation text and the facts' prompt sets: paraphrases, edit prompts, neighbourhood prompts."""
    a, model, tok = st.a, st.model, st.tok
    sets = {"eval": st.evalq}
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


def fact_keys(st: Study, label: str, facts: list[Fact]) -> tuple[list[Fact], list, GroupKeys, GroupKeys | None]:
    """Keyable facts, those left out, and the group means at the subject's last token and, for the
    previous-token rules, at the position before it (same passes)."""
    from .measure import _group_means_at, keyable

    facts, skipped = (facts, []) if label == "gen" else keyable(st.tok, facts, st.templates)
    offsets = (0, 1) if st.a.prev else (0,)
    parts = [_group_means_at(st.model, st.tok, facts[s: s + 4096], st.a.layer, st.templates, 512, offsets)
             for s in range(0, len(facts), 4096)]
    g, prev = [GroupKeys([f.id for f in facts], torch.cat([p[j][0] for p in parts]),
                         torch.cat([p[j][1] for p in parts]), torch.cat([p[j][2] for p in parts]))
               for j in range(len(offsets))] + [None] * (2 - len(offsets))
    return facts, skipped, g, prev


def measure_facts(st: Study, report: dict[str, Any], label: str, facts: list[Fact], sizes: Sequence[int],
                  variants: Sequence[str]) -> None:
    """Every variant at every size (a prefix of ``facts``): rows into ``report``, written after each size."""
    t0 = time.time()
    facts, skipped, g, prev = fact_keys(st, label, facts)
    multi = torch.tensor([len(st.tok(" " + f.subject.strip(), add_special_tokens=False)["input_ids"]) > 1
                          for f in facts])
    report["timings"][f"{label}_keys_s"] = round(time.time() - t0, 1)
    first = torch.tensor([f.prompt.startswith("{}") for f in facts])
    report[f"{label}_facts"] = {"n": len(facts), "skipped": len(skipped), "subject_first": int(first.sum())}
    for n in sizes:
        t0 = time.time()
        sets = fact_sets(st, facts[:n])
        for vname in variants:
            wf, wo, mode = VARIANTS[vname]
            K, PK = variant_keys(g, prev, first[:n], wf, wo, st.a.device)
            name = f"{label} n={n} {vname}: bare(first={wf},other={wo}){' ' + mode if mode else ''}"
            rows = evaluate(name, K, st.transforms[mode], sets, gammas=(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8),
                            margins=(0.0, 0.02, 0.05, 0.1), cal_fit=st.cal_fit, cal_check=st.cal_check,
                            norm_range=st.norm_range, tok=st.tok, worst=20, prev_keys=PK, multi=multi[:n],
                            prev_ps=st.a.prev)
            report.setdefault("rows", []).extend(rows)
            log.info("%s: %s", name, json.dumps(rows[0])[:600])
        report["timings"][f"{label}_n{n}_eval_s"] = round(time.time() - t0, 1)
        json.dump(report, open(st.a.out, "w"), indent=1)


def variant_keys(g: GroupKeys, prev: GroupKeys | None, first: torch.Tensor, wf: float, wo: float,
                 device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keys (and previous-token keys) of the first ``len(first)`` facts with bare weight ``wf`` where
    the bare prompt starts with the subject, ``wo`` elsewhere."""
    n = len(first)
    has = g.has_bare[:n].float()
    w = (torch.where(first, torch.tensor(wf), torch.tensor(wo)) * has).unsqueeze(1)
    K = (w * g.bare[:n] + (1 - w) * g.prefixed[:n]).to(device)
    PK = (w * prev.bare[:n] + (1 - w) * prev.prefixed[:n]).to(device) if prev is not None else None
    return K, PK


if __name__ == "__main__":
    sys.exit(main())
