"""Plots of a release gate result (matplotlib, Agg backend): PNG files beside gate.md.

Example::

    from evals.plots import gate_plots
    gate_plots(result, "gate/")      # {'metrics': 'gate_metrics.png', 'general': ..., 'firing': ...}

Each function takes the ``result["data"]`` block that :func:`evals.decision.decide` writes into
gate.json (so a plot can be redrawn from the JSON alone) and returns ``None`` when there is
nothing to draw:

* ``gate_metrics.png``: efficacy / generalization / specificity, pre (store detached) and post
  (attached), with the report's confidence intervals; with a baseline also its post values.
* ``gate_general.png``: each general task's metric before and after editing with intervals;
  0-1 metrics in percent, perplexity on its own log-scale panel.
* ``gate_firing.png``: the gate's firing rate (fires / gated positions) on each general task
  and on the CounterFact prompt groups, with the policy's maximum as a dashed line.

:func:`plot_sequential` draws ``sequential.png`` from ``sequential.json`` (:mod:`evals.sequential`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from neuraldb.io import atomic_write

__all__ = ["gate_plots", "plot_edit_metrics", "plot_firing", "plot_general", "plot_sequential"]

_COLORS = {"pre": "#9e9e9e", "post": "#1f77b4", "baseline": "#ff7f0e", "before": "#9e9e9e", "after": "#1f77b4"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, labels: Sequence[str], series: Sequence[tuple[str, list[float | None], list[Any]]],
          scale: float = 1.0) -> None:
    """Grouped bars: ``series`` = (name, values, intervals [lo, hi] or None) per group member."""
    width = 0.8 / max(len(series), 1)
    for k, (name, values, cis) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        heights = [0.0 if v is None else v * scale for v in values]
        lo = [0.0 if v is None or ci is None else max(v * scale - ci[0] * scale, 0.0) for v, ci in zip(values, cis)]
        hi = [0.0 if v is None or ci is None else max(ci[1] * scale - v * scale, 0.0) for v, ci in zip(values, cis)]
        ax.bar(xs, heights, width, label=name, color=_COLORS.get(name.split()[0], None), yerr=[lo, hi], capsize=3,
               edgecolor="black", linewidth=0.4)
        for x, v in zip(xs, values):
            if v is not None:
                ax.annotate(f"{v * scale:.1f}", (x, v * scale), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        _pyplot().close(fig)
    return path.name


def plot_edit_metrics(data: Mapping[str, Any], path: str | os.PathLike, *,
                      minima: Mapping[str, float | None] | None = None) -> str | None:
    """Edit metrics pre/post (and the baseline's post) with their intervals; ``minima`` as dashed marks."""
    edit = data.get("edit") or {}
    if not edit:
        return None
    plt = _pyplot()
    names = list(edit)
    series = [("pre (detached)", [edit[n]["pre"]["mean"] for n in names], [edit[n]["pre"]["ci"] for n in names]),
              ("post (attached)", [edit[n]["post"]["mean"] for n in names], [edit[n]["post"]["ci"] for n in names])]
    base = ((data.get("baseline") or {}).get("edit")) or {}
    if base:
        series.append(("baseline post", [(base.get(n) or {}).get("post", {}).get("mean") for n in names],
                       [(base.get(n) or {}).get("post", {}).get("ci") for n in names]))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    _bars(ax, names, series)
    for i, name in enumerate(names):
        low = (minima or {}).get(name)
        if low is not None:
            ax.hlines(low, i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1,
                      label="policy minimum" if not ax.get_legend_handles_labels()[1].count("policy minimum") else None)
    ax.set_ylim(0, 125)
    ax.set_ylabel("percent")
    ax.set_title("Edit metrics (mean, confidence interval)")
    ax.legend(fontsize=7, loc="upper center", ncol=4, frameon=False)
    return _save(fig, Path(path))


def _bounded(task: Mapping[str, Any]) -> bool:
    vals = [task.get("before"), task.get("after")]
    return task.get("metric") not in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte") and all(
        v is not None and 0.0 <= v <= 1.0 for v in vals)


def plot_general(data: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """General tasks before/after with intervals: 0-1 metrics in percent; perplexity on a log panel."""
    general = data.get("general") or {}
    if not general:
        return None
    plt = _pyplot()
    bounded = [t for t, v in general.items() if _bounded(v)]
    other = [t for t, v in general.items() if not _bounded(v) and v.get("before") is not None]
    panels = [p for p in (bounded, other) if p]
    ratios = [max(len(p), 1) + 1 for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.0 + 1.3 * sum(ratios), 3.8),
                             gridspec_kw={"width_ratios": ratios}, squeeze=False)
    base = ((data.get("baseline") or {}).get("general")) or {}
    for ax, tasks in zip(axes[0], panels):
        is_bounded = tasks is bounded
        series = [("before", [general[t]["before"] for t in tasks], [general[t].get("ci_before") for t in tasks]),
                  ("after", [general[t]["after"] for t in tasks], [general[t].get("ci_after") for t in tasks])]
        if base:
            series.append(("baseline after", [(base.get(t) or {}).get("after") for t in tasks],
                           [(base.get(t) or {}).get("ci_after") for t in tasks]))
        labels = [f"{t}\n({general[t].get('metric')}, n={general[t].get('n')})" for t in tasks]
        _bars(ax, labels, series, scale=100.0 if is_bounded else 1.0)
        if is_bounded:
            ax.set_ylim(0, 105)
            ax.set_ylabel("percent")
        else:
            ax.set_yscale("log")
            top = max(v for _, vals, cis in series for v in [*vals, *(c[1] for c in cis if c)] if v is not None)
            ax.set_ylim(top=top * 50)
            ax.set_ylabel("perplexity (lower is better)")
        ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
        if is_bounded:
            ax.set_ylim(0, 118)
    fig.suptitle("General tasks before / after editing (confidence intervals)", fontsize=10)
    return _save(fig, Path(path))


def plot_firing(data: Mapping[str, Any], path: str | os.PathLike, *, max_rate: float | None = None) -> str | None:
    """Gate firing rate per general task and per CounterFact prompt group (fires / gated positions)."""
    general = {t: v["firing_rate"] for t, v in (data.get("general") or {}).items()
               if v.get("firing_rate") is not None}
    groups = data.get("firing_groups", data.get("gate_groups")) or {}  # "gate_groups": gate.json before the rename
    groups = {g: v["fire_rate"] for g, v in groups.items() if v.get("fire_rate") is not None}
    if not general and not groups:
        return None
    plt = _pyplot()
    panels = [(title, rows) for title, rows in (("general tasks (should be ~0)", general),
                                                ("edit prompt groups", groups)) if rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        names = list(rows)
        values = [100.0 * rows[n] for n in names]
        ax.bar(range(len(names)), values, color="#d62728" if title.startswith("general") else "#2ca02c",
               edgecolor="black", linewidth=0.4)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.2f}%", (i, v), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
        if max_rate is not None and title.startswith("general"):
            ax.axhline(100.0 * max_rate, color="black", linestyle="--", linewidth=1)
            title = f"{title}; dashed: policy maximum {100 * max_rate:g}%"
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right")
        ax.set_ylim(0, max(max(values) * 1.15, 100.0 * (max_rate or 0) * 1.5, 1.0))
        ax.set_ylabel("fires / gated positions (%)")
        ax.set_title(title, fontsize=9)
    fig.suptitle("Gate firing rate (store attached)", fontsize=10)
    return _save(fig, Path(path))


def gate_plots(result: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, str]:
    """Draw every plot that has data into ``output_dir``; ``{key: file name}``."""
    out = Path(output_dir)
    data = result.get("data") or {}
    criteria = (((result.get("policy") or {}).get("resolved") or {}).get("criteria") or {})
    max_rate = criteria.get("general_max_firing_rate")
    minima = {m: criteria.get(f"{m}_min") for m in ("efficacy", "generalization")}
    drawn = {"metrics": plot_edit_metrics(data, out / "gate_metrics.png", minima=minima),
             "general": plot_general(data, out / "gate_general.png"),
             "firing": plot_firing(data, out / "gate_firing.png", max_rate=max_rate)}
    return {k: v for k, v in drawn.items() if v}


def plot_sequential(result: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """``sequential.png``: ES / PS / NS after each round, over all facts edited so far (with the
    intervals) and over the first round's facts; the all-at-once edit as dashed lines."""
    rounds = result.get("rounds") or []
    if not rounds:
        return None
    plt = _pyplot()
    keys = (("efficacy", "ES"), ("generalization", "PS"), ("specificity", "NS"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    xs = [r["round"] for r in rounds]
    for ax, (key, short) in zip(axes, keys):
        post = [r["all"][key]["post"] for r in rounds]
        cis = [r["all"][key].get("post_ci") or [v, v] for r, v in zip(rounds, post)]
        ax.plot(xs, post, "o-", color=_COLORS["post"], label="all edited so far")
        ax.fill_between(xs, [max(c[0], 0.0) for c in cis], [min(c[1], 100.0) for c in cis],  # percent: t
                        color=_COLORS["post"], alpha=0.15)                                 # intervals clipped
        ax.plot(xs, [r["first_round"][key]["post"] for r in rounds], "^-", color="#2ca02c", label="round-1 facts")
        batch = (result.get("all_at_once") or {}).get("all", {}).get(key)
        if batch is not None:
            ax.axhline(batch["post"], color=_COLORS["baseline"], linestyle="--", label="all at once")
            ax.axhline(batch["pre"], color=_COLORS["pre"], linestyle=":", label="unedited")
        ax.set_title(f"{key} ({short})")
        ax.set_xlabel("round")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-2, 102)
    axes[0].set_ylabel("post-edit score (%)")
    axes[0].legend(fontsize=7)
    return _save(fig, Path(path))
