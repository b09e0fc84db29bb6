"""The release gate's outputs: the decision as a terminal table, as gate.md, and the files of a run.

Example::

    from evals.gate_report import render_text, write_gate_report
    print(render_text(result))                      # aligned table and a PASSED / FAILED line
    write_gate_report(result, "gate-report/")       # gate.json, gate.md, gate_*.png

``result`` is what :func:`evals.gate.gate` returns (its ``criteria`` rows come from
:func:`evals.decision.decide`). Files are written atomically with ordinary permissions
(:mod:`neuraldb.io`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from evals import report as rep
from neuraldb.io import write_text

__all__ = ["render_markdown", "render_text", "write_gate_report"]

log = logging.getLogger(__name__)

_HEADER = ["criterion", "value", "threshold", "test", "p", "result"]
_RULES = [
    "- minimum (efficacy, generalization): the post-edit value (policy `criteria.minimum_rule`: the mean, or an "
    "end of its interval) must reach the threshold (percent).",
    "- drop (specificity pre -> post, each general task before -> after, and new vs baseline): fails only when "
    "the drop is larger than the margin AND the two-sided test is significant. Edit metrics: the report's paired "
    "test on per-case values (exact McNemar when each case gives one yes/no outcome, else the paired t-test; "
    "Wilcoxon signed-rank or t when the policy asks, recomputed from the per-case values). General tasks: "
    "McNemar exact on per-example 0/1 scores, Wilcoxon signed-rank on per-example log-likelihoods (perplexity). "
    "Against a baseline: edit metrics paired on the shared cases; general tasks unpaired (Fisher exact, or a "
    "z-test from the reported intervals). Drops are in points (x100 for a 0-1 metric) or, for perplexity, in "
    "percent relative change.",
    "- firing: gate fires / gated positions (padding and each sequence's first token excluded) on each general "
    "task's inputs must not exceed the maximum.",
]
_PLOT_TITLES = {"metrics": "Edit metrics before/after with confidence intervals",
                "general": "General tasks before/after with confidence intervals",
                "firing": "Gate firing rate per task"}


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if unit == "fires/position":
        return f"{100 * x:.2f}%"
    if unit == "cases":
        return f"{x:.0f}"
    return f"{x:.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _rows(result: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for c in result["criteria"]:
        if c["status"] == "off":
            rows.append([c["name"], "-", "off", "-", "-", "OFF"])
            continue
        op = {"minimum": ">=", "max_drop": "<=", "max_rate": "<=", "min_cases": ">="}[c["kind"]]
        unit = {"points": " pts", "% relative": "% rel", "%": "%", "fires/position": "", "cases": ""}.get(c["unit"], "")
        value = _fmt(c["value"], c["unit"]) + unit
        limit = f"{op} {_fmt(c['threshold'], c['unit'])}{unit}"
        if c["kind"] == "max_drop":
            limit += " unless n.s."
        test = "-" if not c.get("test") else c["test"]
        p = "-" if c.get("p_value") is None and not c.get("test") else _p(c.get("p_value")) + (
            " *" if c.get("significant") else "")
        rows.append([c["name"], value, limit, test, p, c["status"].upper()])
    return rows


def render_text(result: Mapping[str, Any]) -> str:
    """The decision as an aligned plain-text table with a verdict line."""
    rows = _rows(result)
    widths = [max(len(str(r[i])) for r in [_HEADER, *rows]) for i in range(len(_HEADER))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    ev = result.get("evaluated") or {}
    lines = [f"neuraldb gate ({result.get('mode')}): policy {(result.get('policy') or {}).get('path')}, "
             f"confidence {result.get('confidence')}; {ev.get('n_cases')} cases of {ev.get('dataset')}, "
             f"model {ev.get('model')}, gamma {(result.get('store') or {}).get('gamma')}",
             fmt.format(*_HEADER), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    lines.append(f"* significant at p < {result.get('alpha', 0.05):.3g}. A drop fails only when it exceeds its "
                 "margin AND is significant.")
    lines.append("PASSED (exit 0)" if result["passed"] else f"FAILED (exit 1): {', '.join(result['failed'])}")
    return "\n".join(lines)


def render_markdown(result: Mapping[str, Any], images: Mapping[str, str] | None = None) -> str:
    """gate.md: verdict, criteria table, rules and tests, sources, plots."""
    verdict = "PASSED" if result["passed"] else "FAILED"
    pol = result.get("policy") or {}
    ev = result.get("evaluated") or {}
    store = result.get("store") or {}
    lines = [f"# NeuralDB release gate: {verdict}", ""]
    if not result["passed"]:
        lines += [f"Failed: {', '.join(result['failed'])}.", ""]
    lines += [
        f"- policy: `{pol.get('path')}` (sha256 {str(pol.get('sha256'))[:16]}), confidence {result.get('confidence')} "
        f"(alpha {result.get('alpha', 0.05):.3g})",
        f"- mode: {result.get('mode')}; evaluated: {ev.get('n_cases')} cases of {ev.get('dataset')} ({ev.get('kind')}) "
        f"on model {ev.get('model')}; general tasks {ev.get('general_tasks')} (limit {ev.get('general_limit')})",
        f"- store: {store.get('facts')} facts, layer {store.get('layer')}, gamma {store.get('gamma')}, "
        f"fingerprint {store.get('fingerprint')}, digest {store.get('digest')}",
    ]
    src = {k: v for k, v in (result.get("sources") or {}).items() if v is not None}
    if src:
        lines.append("- sources: " + ", ".join(f"{k} `{v}`" for k, v in src.items()))
    lines += ["", "## Criteria", "", "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(result)]
    lines += ["", f"`*`: significant at p < {result.get('alpha', 0.05):.3g}. Rules:", "", *_RULES]
    notes = [(c["name"], c["detail"].get("note")) for c in result["criteria"] if (c.get("detail") or {}).get("note")]
    lines += [f"- note on {n}: {t}" for n, t in notes]
    if images:
        lines += ["", "## Plots", ""]
        for key, name in images.items():
            title = _PLOT_TITLES.get(key, key)
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_gate_report(result: dict[str, Any], output_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write gate.json, gate.md and (``plots``) the PNGs into ``output_dir``; return their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    if plots:
        from evals.plots import gate_plots

        try:
            images = gate_plots(result, out)
        except Exception as exc:  # a plot must never hide the decision
            log.warning("could not draw the release gate plots: %s", exc)
            result.setdefault("warnings", []).append(f"plots not drawn: {exc}")
    result["plots"] = images
    paths = {"json": rep.write_json(result, out / "gate.json"),
             "markdown": write_text(out / "gate.md", render_markdown(result, images))}
    paths.update({k: out / v for k, v in images.items()})
    return paths
