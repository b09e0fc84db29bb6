"""Evaluation reports: JSON files, Markdown and terminal rendering.

Example::

    from evals import report
    report.write_report(rep, "reports/cf")                   # report.json + report.md, atomically
    print(report.render_markdown(rep))
    print(report.render_text(report.load_report("reports/cf")))

The statistics in a report (intervals, paired tests) are computed by :mod:`evals.stats`
(:func:`evals.stats.summarize_metric`); two reports are compared by :mod:`evals.compare`.
Everything written is strict JSON (:func:`clean_json`: NaN/inf become None).

Rendering is a set of small functions, each taking the report dict and returning a Markdown
block (``render_metrics``, ``render_firing``, ``render_general``, ...); ``render_markdown``
joins them. Add a section by writing one more function and listing it in ``SECTIONS``.

The firing statistics (how often the store's gate fired on each prompt group) are
``report["firing"]``; reports written before that name keep them under ``"gate"``, and every
reader goes through :func:`firing_section`, which accepts both.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from evals.stats import display_name
from neuraldb.io import write_text

__all__ = [
    "SECTIONS", "aligned_table", "clean_json", "firing_section", "format_percent", "format_value", "load_report",
    "render_chat", "render_config", "render_data", "render_firing",
    "render_general", "render_header", "render_markdown", "render_mentions", "render_metrics", "render_samples",
    "render_text", "render_timings", "write_json", "write_report",
]


# ----------------------------------------------------------------------------- files


def clean_json(obj: Any) -> Any:
    """A copy of ``obj`` with tuples as lists, NaN/inf as None and numpy scalars as Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return clean_json(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write strict JSON (no NaN) atomically, mode 0666 less the umask (:func:`neuraldb.io.write_text`)."""
    return write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n")


def write_report(report: Mapping[str, Any], output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``output_dir``; returns both paths."""
    out = Path(output_dir)
    json_path = write_json(report, out / "report.json")
    return json_path, write_text(out / "report.md", render_markdown(report))


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a saved report: a ``report.json`` file, or an output folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise FileNotFoundError(f"no report at {str(p)!r}; pass a report.json or the folder that holds it")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "metrics" not in data:
        raise ValueError(f"{p} is not a neuraldb evaluation report (no 'metrics' key)")
    return data


# ----------------------------------------------------------------------------- formatting


def format_value(x: Any, digits: int = 1, *, signed: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return str(x)


def _with_ci(summary: Mapping[str, Any] | None, digits: int = 1, *, signed: bool = False) -> str:
    if not summary or summary.get("mean") is None:
        return "-"
    text = format_value(summary["mean"], digits, signed=signed)
    ci = summary.get("ci")
    if ci:
        text += f" [{format_value(ci[0], digits, signed=signed)}, {format_value(ci[1], digits, signed=signed)}]"
    return text


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_percent(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage: ``0.125 -> '12.5%'``; ``'-'`` for None."""
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _metric_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, m in report.get("metrics", {}).items():
        label = f"{name} ({m.get('unit', '')})".replace(" ()", "")
        if m.get("skipped"):
            rows.append([label, "skipped (see notes)", "-", "-", "-", "-"])
            continue
        test = m.get("test") or {}
        n = (m.get("post") or {}).get("n")
        rows.append([label, _with_ci(m.get("pre")), _with_ci(m.get("post")),
                     _with_ci(m.get("difference"), signed=True), display_name(test.get("name")) or "-",
                     _p(test.get("p_value")) + (f" (n={n})" if n is not None else "")])
    return rows


def firing_section(report: Mapping[str, Any]) -> Mapping[str, Any]:
    """The firing statistics of an evaluation report, or of one of its cases; ``{}`` when absent.

    ``report["firing"]``; reports and case records written before the rename keep the same
    statistics under ``"gate"``, so old ``report.json`` / ``cases.jsonl`` files still read.
    """
    section = report.get("firing")
    if section is None:
        section = report.get("gate")
    return section if isinstance(section, Mapping) else {}


def _firing_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for group, g in firing_section(report).get("groups", {}).items():
        pf = g.get("prompt_fire") or {}
        ci = pf.get("ci")
        any_fire = format_percent(pf.get("mean")) + (f" [{format_percent(ci[0])}, {format_percent(ci[1])}]" if ci else "")
        rows.append([group, str(g.get("prompts", 0)), any_fire, format_percent(g.get("own_prompt_rate")),
                     f"{g.get('fires', 0)}/{g.get('positions', 0)} ({format_percent(g.get('fire_rate'), 2)})"])
    return rows


# ----------------------------------------------------------------------------- Markdown sections


def render_header(report: Mapping[str, Any]) -> str:
    ds, model, store = report.get("dataset", {}), report.get("model", {}), report.get("store", {})
    lines = [f"# NeuralDB evaluation: {ds.get('name', '?')}, {ds.get('n_cases', '?')} cases, "
             f"model {model.get('name', '?')}", ""]
    lines.append(f"Store: {store.get('facts', '?')} facts at layer {store.get('layer', '?')} "
                 f"({store.get('module', '?')}), gamma {store.get('gamma', '?')}. "
                 f"Model dtype {model.get('dtype', '?')} on {model.get('device', '?')}. "
                 f"Created {report.get('created', '?')}.")
    for w in report.get("warnings", []):
        lines.append(f"\n> **Note:** {w}")
    return "\n".join(lines)


def render_metrics(report: Mapping[str, Any]) -> str:
    conf = report.get("config", {}).get("evaluate", {}).get("confidence", 0.95)
    text = "## Metrics\n\n" + _table(["metric", "pre (store detached)", "post (store attached)", "post - pre",
                                       "paired test", "p"], _metric_rows(report))
    text += (f"\n\nMean [{100 * conf:g}% interval]. Proportions (one yes/no outcome per case): Wilson score "
             "interval and the exact McNemar test; other metrics: Student t interval of the mean of per-case values "
             "and the paired t-test. post - pre: t interval of the per-case differences.")
    text += "".join(f"\n\n- {n}: {r}" for n, r in _skipped(report))
    return text


def _skipped(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(n, m.get("reason", "")) for n, m in report.get("metrics", {}).items() if m.get("skipped")]


def render_firing(report: Mapping[str, Any]) -> str:
    if not firing_section(report):
        return ""
    text = "## Gate firing (store attached)\n\n" + _table(
        ["prompts", "n", "fired at any position", "retrieved its own fact", "fires / gated positions"],
        _firing_rows(report))
    text += ("\n\nA forward pass over each prompt alone (generation: the post-edit texts, prompt + continuation). "
             "Gated positions exclude padding and each sequence's first token. 'Own fact': the prompt fired "
             "and some firing position retrieved the case's own fact.")
    return text


def _general_rows(report: Mapping[str, Any]) -> list[list[str]]:
    general = report.get("general") or {}
    tasks = general.get("tasks", {}) if isinstance(general, Mapping) else {}
    rows = []
    for task, t in tasks.items():
        if not isinstance(t, Mapping):
            continue
        fire = t.get("firing") or {}
        ident = t.get("identical_fraction")

        def val(x: Any, ci: Any) -> str:
            text = format_value(x, 4)
            return text + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "")

        rows.append([task, str(t.get("metric", "-")), str(t.get("shots", "-")), str(t.get("n", "-")),
                     val(t.get("before"), t.get("ci_before")), val(t.get("after"), t.get("ci_after")),
                     format_value(t.get("difference"), 4, signed=True), _p((t.get("test") or {}).get("p_value")),
                     "-" if ident is None else f"{100 * ident:.1f}%",
                     f"{fire.get('examples_fired', '-')}/{fire.get('examples', '-')}",
                     f"{fire.get('fires', 0)}/{fire.get('positions', 0)} ({format_percent(fire.get('rate'), 3)})"])
    return rows


def render_general(report: Mapping[str, Any]) -> str:
    rows = _general_rows(report)
    if not rows:
        return ""
    return "## General abilities (lm-evaluation-harness, before / after attaching the store)\n\n" + _table(
        ["task", "metric", "shots", "n", "before", "after", "after - before", "p", "identical predictions",
         "examples with a fire", "fires / positions"], rows)


def render_samples(report: Mapping[str, Any], n: int = 3) -> str:
    samples = [(c.get("fact_id"), c.get("samples")) for c in report.get("cases", []) if c.get("samples")][:n]
    if not samples:
        return ""
    lines = ["## Sample generations (first generation prompt)", ""]
    for fid, s in samples:
        for phase in ("pre", "post"):
            if s.get(phase):
                lines.append(f"- `{fid}` {phase}: {s[phase][:300]!r}")
    return "\n".join(lines)


def render_data(report: Mapping[str, Any]) -> str:
    ds = report.get("dataset", {})
    lr = ds.get("load_report") or {}
    lines = ["## Data", "", f"- dataset: {ds.get('name')} ({ds.get('kind')}), {ds.get('n_cases')} cases evaluated"]
    if lr:
        lines.append(f"- source: `{lr.get('source')}` ({lr.get('format')}): {lr.get('loaded')} of "
                     f"{lr.get('records')} records loaded, {len(lr.get('skipped') or [])} skipped")
    return "\n".join(lines)


def render_config(report: Mapping[str, Any]) -> str:
    cfg = {"evaluate": report.get("config", {}).get("evaluate"), "store": report.get("store", {}).get("config"),
           "versions": report.get("versions")}
    return "## Configuration\n\n```json\n" + json.dumps(cfg, indent=1, ensure_ascii=False) + "\n```"


def render_timings(report: Mapping[str, Any]) -> str:
    t = report.get("timings") or {}
    if not t:
        return ""
    return "## Timings (seconds)\n\n" + _table(["phase", "s"], [[k, format_value(v, 1)] for k, v in t.items()])


def render_mentions(report: Mapping[str, Any]) -> str:
    """Per kind of mention variant (metric ``mentions``): ES pre/post and the gate's recall (post)."""
    m = (report.get("metrics") or {}).get("mentions")
    if not m or m.get("skipped"):
        return ""
    rows = []
    for kind, k in (m.get("kinds") or {}).items():
        es = k.get("es") or {}
        rows.append([kind, str(k.get("cases", 0)), str(k.get("prompts", 0)), str(k.get("not_applicable", 0)),
                     _with_ci(es.get("pre")), _with_ci(es.get("post")), _with_ci(es.get("difference"), signed=True),
                     _p((es.get("test") or {}).get("p_value")), _with_ci(k.get("gate_recall")),
                     _with_ci(k.get("fired_any"))])
    rule = m.get("kinds_rule") or {}
    return ("## Mention variants (teacher-forced ES %, gate recall % with the store attached)\n\n" + _table(
        ["kind", "cases", "variants", "not applicable", "ES pre", "ES post", "post - pre", "p",
         "gate recall (own fact)", "fired (any fact)"], rows)
        + "\n\nVariants of the edit prompt and the paraphrases that contain the subject: lower-cased leading "
        f"article, {rule.get('mid_prefix', '')!r} before a sentence-initial subject, possessive (only from "
        "'The <noun> of <subject>' sentences), quoted, article dropped, 'Question: <text>? Answer:'. Gate "
        "recall: the gate fired at the subject's last token and retrieved the case's own fact. "
        f"Intervals: {m.get('interval', '')}.")


def render_chat(report: Mapping[str, Any]) -> str:
    """Teacher-forced ES/PS next to the chat (generated) figures, with a few answers."""
    metrics = report.get("metrics") or {}
    pairs = [(a, b) for a, b in (("efficacy", "chat_efficacy"), ("generalization", "chat_generalization"))
             if b in metrics]
    if not pairs:
        return ""
    text = "## Teacher-forced vs generated (chat)\n\n"
    skipped = [metrics[b].get("reason", "") for _, b in pairs if metrics[b].get("skipped")]
    if skipped:
        return text + f"Chat metrics skipped: {skipped[0]}"
    rows = []
    for a, b in pairs:
        tf, ch = metrics.get(a) or {}, metrics[b]
        post_v = (ch.get("verdicts") or {}).get("post") or {}
        rows.append([f"{a} / {b}", _with_ci(tf.get("pre")), _with_ci(tf.get("post")), _with_ci(ch.get("pre")),
                     _with_ci(ch.get("post")), ", ".join(f"{k} {v}" for k, v in post_v.items())])
    text += _table(["metric (teacher-forced / chat)", "teacher-forced pre", "teacher-forced post", "chat pre",
                    "chat post", "post answers by verdict"], rows)
    first = metrics[pairs[0][1]]
    text += (f"\n\nChat: user message {first.get('question', '')!r}, the chat template with the generation "
             f"prompt, {first.get('decoding', 'greedy')}, at most {first.get('max_new_tokens', '?')} new tokens; "
             f"success = {first.get('judge', '')} (case-insensitive whole words, punctuation ignored).")
    for ex in first.get("examples") or []:
        shown = [f"{ph}: {r[1]!r} ({r[2]})" for ph, r in (("pre", ex.get("pre")), ("post", ex.get("post"))) if r]
        text += f"\n- `{ex.get('fact_id')}` " + "; ".join(shown)
    return text


SECTIONS: list[Callable[[Mapping[str, Any]], str]] = [
    render_header, render_metrics, render_chat, render_mentions, render_firing, render_general, render_samples,
    render_data, render_timings, render_config,
]


def render_markdown(report: Mapping[str, Any], sections: Sequence[Callable[[Mapping[str, Any]], str]] | None = None) -> str:
    """The report as Markdown: the non-empty ``sections`` (default ``SECTIONS``) in order."""
    blocks = [s(report) for s in (SECTIONS if sections is None else sections)]
    return "\n\n".join(b for b in blocks if b) + "\n"


# ----------------------------------------------------------------------------- terminal


def aligned_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with left-aligned columns, for the terminal."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def render_text(report: Mapping[str, Any]) -> str:
    """A compact plain-text summary for the terminal: metrics and gate firing."""
    ds, store = report.get("dataset", {}), report.get("store", {})
    out = [f"{ds.get('name')}: {ds.get('n_cases')} cases; store {store.get('facts')} facts, layer "
           f"{store.get('layer')}, gamma {store.get('gamma')}"]
    out.append(aligned_table(["metric", "pre", "post", "post - pre", "test", "p"], _metric_rows(report)))
    firing_rows = _firing_rows(report)
    if firing_rows:
        out.append("gate firing (store attached):")
        out.append(aligned_table(["prompts", "n", "fired", "own fact", "fires/positions"], firing_rows))
    general_rows = _general_rows(report)
    if general_rows:
        out.append("general abilities (before / after):")
        out.append(aligned_table(["task", "metric", "shots", "n", "before", "after", "diff", "p", "identical",
                             "fired examples", "fires/positions"], general_rows))
    out += [f"skipped {n}: {r}" for n, r in _skipped(report)]
    out += [f"note: {w}" for w in report.get("warnings", [])]
    return "\n".join(out)

