"""Evaluation reports: the statistics behind them, JSON and Markdown rendering, comparison.

Example::

    from evals import report
    report.summarize_metric(pre, post, kind="proportion")   # pre/post intervals, difference, paired test
    report.write_report(rep, "reports/cf")                   # report.json + report.md, atomically
    print(report.render_markdown(rep))
    print(report.render_comparison(report.compare_reports(a, b)))

Statistics (:mod:`evals.stats`, computed on per-case values):

* a metric where every case contributes ONE yes/no outcome (CounterFact's efficacy: one edit
  prompt per case) is a proportion: Wilson score interval; pre vs post is the exact McNemar
  test (``mcnemar_exact``: a two-sided binomial test on the discordant pairs);
* every other metric (means over several prompts or tokens per case, magnitudes, fluency) is
  a mean of per-case values: Student t interval; pre vs post is the paired t-test (``t``);
* the difference post - pre always gets the t interval of the per-case differences.

Cases without a value (e.g. no paraphrase) are left out; paired statistics use the cases
that have both values. Everything returned is JSON-serialisable (NaN/inf become None).

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

from evals.stats import DEFAULT_TEST, display_name, mean_ci, paired_test, proportion_ci
from neuraldb.io import write_text

__all__ = [
    "SECTIONS", "clean_json", "compare_reports", "firing_section", "format_value", "load_report",
    "render_chat", "render_comparison", "render_config", "render_data", "render_firing",
    "render_general", "render_header", "render_markdown", "render_mentions", "render_metrics", "render_samples",
    "render_text", "render_timings",
    "summarize_metric", "write_json", "write_report",
]

T_METHOD = "Student t interval of the mean of per-case values"
WILSON_METHOD = "Wilson score interval (one yes/no outcome per case)"


# ----------------------------------------------------------------------------- statistics


def _scaled(summary: Mapping[str, Any], scale: float) -> dict[str, Any]:
    out = dict(summary)
    for key in ("mean", "sd"):
        if out.get(key) is not None:
            out[key] = out[key] * scale
    if out.get("ci") is not None:
        out["ci"] = [c * scale for c in out["ci"]]
    return out


def summarize_metric(pre: Sequence[float | None], post: Sequence[float | None], *, kind: str = "mean",
                     confidence: float = 0.95, scale: float = 1.0) -> dict[str, Any]:
    """Pre and post summaries, the paired difference and test, for aligned per-case values.

    ``kind``: "proportion" (values are 0/1: Wilson intervals, McNemar) or "mean"
    (t intervals, paired t). Means and intervals are multiplied by ``scale``.
    """
    if len(pre) != len(post):
        raise ValueError(f"pre has {len(pre)} values, post {len(post)}")
    if kind not in ("proportion", "mean"):
        raise ValueError(f"kind must be 'proportion' or 'mean', got {kind!r}")

    def one(values: Sequence[float | None]) -> dict[str, Any]:
        vals = [float(v) for v in values if v is not None]
        if kind == "proportion":
            return proportion_ci(sum(1 for v in vals if v >= 0.5), len(vals), confidence=confidence)
        return mean_ci(vals, confidence=confidence)

    pairs = [(float(a), float(b)) for a, b in zip(pre, post) if a is not None and b is not None]
    diff = mean_ci([b - a for a, b in pairs], confidence=confidence)
    test = paired_test([a for a, _ in pairs], [b for _, b in pairs], test=DEFAULT_TEST[kind])
    return {
        "kind": kind,
        "pre": _scaled(one(pre), scale),
        "post": _scaled(one(post), scale),
        "difference": _scaled(diff, scale),
        "test": test,
    }


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


# ----------------------------------------------------------------------------- files


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


def _pct(x: float | None, digits: int = 1) -> str:
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
        any_fire = _pct(pf.get("mean")) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")
        rows.append([group, str(g.get("prompts", 0)), any_fire, _pct(g.get("own_prompt_rate")),
                     f"{g.get('fires', 0)}/{g.get('positions', 0)} ({_pct(g.get('fire_rate'), 2)})"])
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
                     f"{fire.get('fires', 0)}/{fire.get('positions', 0)} ({_pct(fire.get('rate'), 3)})"])
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


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def render_text(report: Mapping[str, Any]) -> str:
    """A compact plain-text summary for the terminal: metrics and gate firing."""
    ds, store = report.get("dataset", {}), report.get("store", {})
    out = [f"{ds.get('name')}: {ds.get('n_cases')} cases; store {store.get('facts')} facts, layer "
           f"{store.get('layer')}, gamma {store.get('gamma')}"]
    out.append(_aligned(["metric", "pre", "post", "post - pre", "test", "p"], _metric_rows(report)))
    firing_rows = _firing_rows(report)
    if firing_rows:
        out.append("gate firing (store attached):")
        out.append(_aligned(["prompts", "n", "fired", "own fact", "fires/positions"], firing_rows))
    general_rows = _general_rows(report)
    if general_rows:
        out.append("general abilities (before / after):")
        out.append(_aligned(["task", "metric", "shots", "n", "before", "after", "diff", "p", "identical",
                             "fired examples", "fires/positions"], general_rows))
    out += [f"skipped {n}: {r}" for n, r in _skipped(report)]
    out += [f"note: {w}" for w in report.get("warnings", [])]
    return "\n".join(out)


# ----------------------------------------------------------------------------- comparison


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one dict with dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool | None:
    if not a or not b:
        return None
    return not (a[1] < b[0] or b[1] < a[0])


def compare_reports(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """What differs between two saved reports (B relative to A); nothing is re-run."""
    metrics = {}
    for name in list(dict.fromkeys([*a.get("metrics", {}), *b.get("metrics", {})])):
        ma, mb = a.get("metrics", {}).get(name) or {}, b.get("metrics", {}).get(name) or {}
        row: dict[str, Any] = {"unit": ma.get("unit") or mb.get("unit")}
        for phase in ("pre", "post"):
            pa, pb = ma.get(phase) or {}, mb.get(phase) or {}
            va, vb = pa.get("mean"), pb.get("mean")
            row[phase] = {"a": va, "b": vb, "b_minus_a": None if va is None or vb is None else vb - va,
                          "ci_a": pa.get("ci"), "ci_b": pb.get("ci"), "cis_overlap": _overlap(pa.get("ci"), pb.get("ci"))}
        metrics[name] = row
    firing = {}
    ga, gb = firing_section(a).get("groups", {}), firing_section(b).get("groups", {})
    for group in list(dict.fromkeys([*ga, *gb])):
        x, y = ga.get(group) or {}, gb.get(group) or {}
        firing[group] = {key: {"a": x.get(key), "b": y.get(key)} for key in ("fire_rate", "own_prompt_rate")}
        for key, sub in (("prompt_fire_rate", "prompt_fire"),):
            firing[group][key] = {"a": (x.get(sub) or {}).get("mean"), "b": (y.get(sub) or {}).get("mean")}
    general = {}
    ta, tb = ((a.get("general") or {}).get("tasks") or {}), ((b.get("general") or {}).get("tasks") or {})
    for task in list(dict.fromkeys([*ta, *tb])):
        x, y = ta.get(task) or {}, tb.get(task) or {}
        general[task] = {"metric": x.get("metric") or y.get("metric"),
                         **{k: {"a": x.get(k), "b": y.get(k)} for k in ("before", "after", "identical_fraction")}}
    def setup(r: Mapping[str, Any]) -> dict[str, Any]:  # what was run, flattened (case ids compared below)
        return flatten({"config": r.get("config"), "store": dict(r.get("store") or {}),
                        "dataset": {k: v for k, v in (r.get("dataset") or {}).items() if k != "case_ids"},
                        "model": r.get("model"), "versions": r.get("versions")})

    fa, fb = setup(a), setup(b)
    config = {k: {"a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
    ids_a = {c.get("fact_id") for c in a.get("cases", [])}
    ids_b = {c.get("fact_id") for c in b.get("cases", [])}
    return {"metrics": metrics, "firing": firing, "general": general, "config": config,
            "cases": {"a": len(ids_a), "b": len(ids_b), "shared": len(ids_a & ids_b)}}


def render_comparison(cmp: Mapping[str, Any], *, label_a: str = "A", label_b: str = "B") -> str:
    """Plain-text rendering of :func:`compare_reports` (metrics, gate firing, configuration differences)."""
    rows = []
    for name, m in cmp["metrics"].items():
        for phase in ("pre", "post"):
            p = m[phase]
            flag = {True: "", False: "  *CIs disjoint*", None: ""}[p["cis_overlap"]]
            rows.append([name if phase == "pre" else "", phase, format_value(p["a"]), format_value(p["b"]),
                         format_value(p["b_minus_a"], signed=True) + flag])
    c = cmp["cases"]
    out = [f"cases: {label_a} {c['a']}, {label_b} {c['b']}, shared {c['shared']}",
           _aligned(["metric", "phase", label_a, label_b, f"{label_b} - {label_a}"], rows)]
    if cmp["firing"]:
        grows = []
        for group, g in cmp["firing"].items():
            grows.append([group] + [f"{_pct(g[k]['a'], 2)} -> {_pct(g[k]['b'], 2)}"
                                    for k in ("prompt_fire_rate", "own_prompt_rate", "fire_rate")])
        out += ["gate firing:", _aligned(["prompts", "fired", "own fact", "fires/positions"], grows)]
    if cmp.get("general"):
        trows = [[task, str(g["metric"])] + [f"{format_value(g[k]['a'], 4)} -> {format_value(g[k]['b'], 4)}"
                                            for k in ("before", "after", "identical_fraction")]
                 for task, g in cmp["general"].items()]
        out += ["general abilities:", _aligned(["task", "metric", "before", "after", "identical"], trows)]
    if cmp["config"]:
        out.append("differences in configuration:")
        for key, v in cmp["config"].items():
            out.append(f"  {key}: {v['a']!r} -> {v['b']!r}")
    else:
        out.append("no differences in configuration")
    return "\n".join(out)
