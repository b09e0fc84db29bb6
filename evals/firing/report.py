"""The false-fire report as text (``neuraldb fire-rate`` prints it) and as JSON (``--json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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


def gate_row(g: Any, positions: int, subj_of: dict[str, str], worst: int) -> dict[str, Any]:
    """One gate's entry of ``report["gates"]``: its false fires, worst offenders and recall."""
    g.worst.sort(reverse=True)
    return {
        "gate": g.name, "gamma": g.gamma, "calibrated": g.calibrated, "margin": g.margin, "word_check": g.word_check,
        "false_fires": g.fires, "rate": g.fires / positions if positions else 0.0,
        "fires_on_mentions": g.mentions, "fires_on_subject_words": g.words, "facts_firing": len(g.per_fact),
        "worst": [{"score": round(sc, 4), "fact": fid, "subject": subj_of[fid], "token": tk, "passage": pr,
                   "pos": ps} for sc, fid, tk, pr, ps in g.worst[:worst]],
        **g.recall}


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1))
