"""Two saved evaluation reports side by side (``neuraldb compare A B``): nothing is re-run.

Example::

    from evals import compare, report
    cmp = compare.compare_reports(report.load_report("reports/a"), report.load_report("reports/b"))
    print(compare.render_comparison(cmp))

:func:`compare_reports` gives, for B relative to A, each metric's pre and post means with
whether their intervals overlap, the firing rates per prompt group, the general tasks, the
configuration keys that differ (flattened with :func:`flatten`: ``store.gamma``, ...) and how
many cases the two share.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from evals.report import aligned_table, firing_section, format_percent, format_value

__all__ = ["compare_reports", "flatten", "render_comparison"]


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
           aligned_table(["metric", "phase", label_a, label_b, f"{label_b} - {label_a}"], rows)]
    if cmp["firing"]:
        grows = []
        for group, g in cmp["firing"].items():
            grows.append([group] + [f"{format_percent(g[k]['a'], 2)} -> {format_percent(g[k]['b'], 2)}"
                                    for k in ("prompt_fire_rate", "own_prompt_rate", "fire_rate")])
        out += ["gate firing:", aligned_table(["prompts", "fired", "own fact", "fires/positions"], grows)]
    if cmp.get("general"):
        trows = [[task, str(g["metric"])] + [f"{format_value(g[k]['a'], 4)} -> {format_value(g[k]['b'], 4)}"
                                            for k in ("before", "after", "identical_fraction")]
                 for task, g in cmp["general"].items()]
        out += ["general abilities:", aligned_table(["task", "metric", "before", "after", "identical"], trows)]
    if cmp["config"]:
        out.append("differences in configuration:")
        for key, v in cmp["config"].items():
            out.append(f"  {key}: {v['a']!r} -> {v['b']!r}")
    else:
        out.append("no differences in configuration")
    return "\n".join(out)
