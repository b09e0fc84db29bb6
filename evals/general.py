"""General abilities before and after editing: six lm-eval tasks, same process, paired statistics.

Example (CPU, a few examples per task)::

    model, tok = neuraldb.load_model("smollm2-135m")
    db = neuraldb.NeuralDB.load("facts.safetensors", model=model)
    report = run_general_tasks(model, tok, db, limit=20)      # data: $NEURALDB_DATA_DIR (or data_dir=)
    report["tasks"]["sciq"]          # {'metric': 'acc', 'shots': 0, 'before': .., 'after': .., ...}

Example (``tox -e gpu-evals``: the full six tasks after 10K CounterFact edits on one GPU; device and
dtype are the model's, nothing here names a device)::

    model, tok = neuraldb.load_model("meta-llama/Meta-Llama-3-8B-Instruct", device="cuda", dtype="bfloat16")
    cases = evals.datasets.load_counterfact(limit=10_000)
    db = neuraldb.edit(model, tok, [c.fact for c in cases], checkpoint="cf10k.safetensors")
    report = run_general_tasks(model, tok, db, batch_size=32, data_dir=os.environ.get("NEURALDB_DATA_DIR"))
    json.dump(report, open("general_cf10k.json", "w"), indent=1)
    # every task: report["tasks"][t]["firing"]["rate"] should be ~0 (METHOD.md section 5)

What is measured, per task (an MMLU group pools its 57 subjects' examples):

- ``metric``: the first metric of the task's own metric list (mmlu acc, sciq acc, commonsense_qa
  acc, arc_challenge acc, lambada_openai perplexity, wsc273 acc); ``metrics`` holds every metric
  the task reports, each with the same fields. ``shots``: the number of few-shot examples used.
- ``before``/``after``/``difference``: lm-eval's aggregate on the unedited and the edited model
  (the same :class:`~evals.harness.NeuralDBLM` instance, store off then on: same batch size,
  dtype and device). ``ci_before``/``ci_after``: ``confidence`` intervals computed here (Wilson
  for 0/1 metrics; a t-interval on the mean otherwise, on the mean log-likelihood for perplexity,
  mapped through ``exp(-x)``). ``stderr`` from lm-eval is not used: ``bootstrap_iters=0``.
- ``test``: a paired test on the per-example scores: McNemar's exact test (``binomtest`` on the
  discordant pairs) for 0/1 metrics; Wilcoxon signed-rank on the per-example values otherwise
  (log-likelihoods for perplexity). ``p_value`` is 1.0 when nothing changed.
- ``identical_predictions`` / ``identical_fraction``: whether the answer the metric scores is the
  same per example (multiple choice: the chosen option under acc or acc_norm; lambada: whether the
  greedy continuation is the target; generation: the text). ``identical_outputs``: every
  log-likelihood (or generated text) is bit-identical; ``changed_examples`` lists the examples
  where one is not (it must be a subset of ``firing["fired_examples"]``).
- ``firing``: the gate on that task's inputs during the edited run: ``fires`` of ``positions``
  gated positions (``rate``), and ``examples_fired`` of ``examples`` had any fire (their ids in
  ``fired_examples``). Where it never fired, before and after must be identical.

Offline (``data_dir`` or ``$NEURALDB_DATA_DIR``), the built-in tasks read the local files through
:func:`evals.tasks.offline_include_path`; without one they read the Hugging Face hub.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from evals import stats
from evals.tasks import SIX_TASKS
from neuraldb.hook import detached
from neuraldb.io import default_data_dir

__all__ = ["SIX_TASKS", "run_general_tasks"]

log = logging.getLogger(__name__)


@contextmanager
def _quiet(name: str, level: int = logging.ERROR) -> Iterator[None]:
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def run_general_tasks(
    model: Any,
    tokenizer: Any,
    db: Any,
    *,
    tasks: Sequence[str] = SIX_TASKS,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    bootstrap_iters: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Run ``tasks`` on ``model`` without and with the store ``db``; a JSON-serialisable report.

    ``limit`` is per task as in lm-eval (per subject for MMLU). ``num_fewshot=None`` keeps each
    task's default (0 for all six). ``bootstrap_iters`` is lm-eval's (its default, 100000, is very
    slow on a CPU); the intervals reported are computed here either way. The model is left as it
    was: a store attached to it is detached for the run and re-attached at the end.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evals.harness import NeuralDBLM
    from evals.tasks import offline_include_path

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must lie in (0, 1)")
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    data_dir = default_data_dir(data_dir)
    include = str(offline_include_path(data_dir)) if data_dir else None
    with _quiet("lm_eval.tasks._index"):  # "task X overrides existing task" for every offline task
        manager = TaskManager(include_path=include)
    loaded = manager.load(tasks)
    objects = [loaded["groups"].get(name) or loaded["tasks"][name] for name in tasks]

    with detached(model):  # the harness attaches the store itself for the "after" run
        lm = NeuralDBLM(pretrained=model, tokenizer=tokenizer, db=db, batch_size=batch_size)
        runs = {}
        for name, edited in (("before", False), ("after", True)):
            lm.edited = edited
            lm.reset_firing()
            runs[name] = lm_eval.simple_evaluate(
                model=lm, tasks=objects, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                bootstrap_iters=bootstrap_iters, log_samples=True,
            )
        firing = list(lm.firing)

    leaves = _leaves(runs["before"].get("group_subtasks") or {})
    report_tasks = {
        name: _task_report(name, leaves.get(name, [name]), runs["before"], runs["after"], loaded["tasks"], firing,
                           confidence=confidence)
        for name in tasks
    }
    param = next(model.parameters())
    return {
        "config": {
            "tasks": tasks, "limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot,
            "data_dir": None if data_dir is None else os.fspath(data_dir), "include_path": include,
            "bootstrap_iters": bootstrap_iters, "confidence": confidence,
            "model": str(getattr(model.config, "name_or_path", "") or type(model).__name__),
            "device": str(param.device), "dtype": str(param.dtype).removeprefix("torch."),
            "store": None if db is None else {"facts": len(db), "layer": db.layer, "gamma": db.gamma},
            "lm_eval": lm_eval.__version__,
        },
        "tasks": report_tasks,
    }


# ----------------------------------------------------------------------------- per task


def _leaves(group_subtasks: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Group name -> its leaf tasks (recursively); tasks that are not groups are absent."""

    def walk(name: str) -> list[str]:
        if name not in group_subtasks:
            return [name]
        return [leaf for child in group_subtasks[name] for leaf in walk(child)]

    return {g: walk(g) for g in group_subtasks}


def _prediction(sample: Mapping[str, Any], task: Any, metric: str) -> Any:
    """The answer that ``metric`` scores for one logged sample."""
    resps = sample["filtered_resps"]
    output_type = task.get_config("output_type") if task is not None else None
    if output_type == "multiple_choice":
        lls = np.array([float(r[0]) for r in resps])
        if metric == "acc_norm":
            lengths = np.array([float(len(c)) for c in task.doc_to_choice(sample["doc"])])
            return int(np.argmax(lls / lengths))
        if metric == "acc_bytes":
            lengths = np.array([float(len(c.encode("utf-8"))) for c in task.doc_to_choice(sample["doc"])])
            return int(np.argmax(lls / lengths))
        return int(np.argmax(lls))
    if output_type == "loglikelihood":
        return bool(resps[0][1])  # is the target the greedy continuation
    if output_type == "generate_until":
        return resps[0] if isinstance(resps, list) else resps
    return _outputs(sample)


def _outputs(sample: Mapping[str, Any]) -> Any:
    resps = sample["filtered_resps"]
    return tuple(r[0] if isinstance(r, (tuple, list)) else r for r in resps) if isinstance(resps, list) else resps


def _task_report(
    name: str, leaves: list[str], before: Mapping[str, Any], after: Mapping[str, Any],
    task_objects: Mapping[str, Any], firing: Sequence[Any], *, confidence: float,
) -> dict[str, Any]:
    grouped = len(leaves) > 1 or leaves != [name]
    pairs = []  # (example id, leaf, sample before, sample after)
    for leaf in leaves:
        after_by_doc = {s["doc_id"]: s for s in after["samples"].get(leaf, [])}
        for s in before["samples"].get(leaf, []):
            pairs.append((f"{leaf}/{s['doc_id']}" if grouped else s["doc_id"], leaf, s, after_by_doc[s["doc_id"]]))
    metric_names = [k.split(",")[0] for k in before["results"][name]
                    if "," in k and not k.split(",")[0].endswith("_stderr")]
    metrics = {}
    for metric in metric_names:
        key = f"{metric},none"
        b = [p[2].get(metric) for p in pairs]
        a = [p[3].get(metric) for p in pairs]
        higher = (before.get("higher_is_better", {}).get(leaves[0]) or {}).get(metric)
        metrics[metric] = _metric_report(metric, before["results"][name].get(key), after["results"][name].get(key),
                                         b, a, higher_is_better=higher, confidence=confidence)
    primary = metric_names[0] if metric_names else None
    same_pred = [_prediction(sb, task_objects.get(leaf), primary or "") == _prediction(sa, task_objects.get(leaf), primary or "")
                 for _, leaf, sb, sa in pairs]
    changed = [ex for ex, _, sb, sa in pairs if _outputs(sb) != _outputs(sa)]
    shots = sorted({int(before.get("n-shot", {}).get(leaf, 0)) for leaf in leaves})
    report = {
        "task": name,
        "subtasks": len(leaves) if grouped else None,
        "metric": primary,
        "shots": shots[0] if len(shots) == 1 else shots,
        "n": len(pairs),
        **({k: v for k, v in metrics[primary].items() if k != "metric"} if primary else {}),
        "identical_predictions": all(same_pred),
        "identical_fraction": float(np.mean(same_pred)) if same_pred else None,
        "identical_outputs": not changed,
        "changed_examples": changed,
        "firing": _firing_report(name, leaves, grouped, firing, n_examples=len(pairs)),
        "metrics": metrics,
    }
    return report


def _firing_report(name: str, leaves: list[str], grouped: bool, firing: Sequence[Any], *, n_examples: int) -> dict[str, Any]:
    fires = positions = unmatched = 0
    fired: set[Any] = set()
    wanted = set(leaves)
    for f in firing:
        if f.task not in wanted:
            continue
        if f.fires is None:
            unmatched += 1
            continue
        fires += f.fires
        positions += f.positions
        if f.fires:
            fired.add(f"{f.task}/{f.doc_id}" if grouped else f.doc_id)
    return {
        "fires": fires, "positions": positions, "rate": fires / positions if positions else 0.0,
        "examples": n_examples, "examples_fired": len(fired),
        "fraction_examples_fired": len(fired) / n_examples if n_examples else 0.0,
        "fired_examples": sorted(fired, key=str), "unmatched_requests": unmatched,
    }


def _metric_report(metric: str, before: Any, after: Any, b: list[Any], a: list[Any], *,
                   higher_is_better: bool | None, confidence: float) -> dict[str, Any]:
    scalar = all(isinstance(v, (int, float, bool, np.number)) and v is not None for v in b + a)
    before_f = _float(before)
    after_f = _float(after)
    out: dict[str, Any] = {
        "metric": metric, "higher_is_better": higher_is_better,
        "before": before_f, "after": after_f,
        "difference": None if before_f is None or after_f is None else after_f - before_f,
        "ci_before": None, "ci_after": None, "test": None,
    }
    if not scalar or not b:
        return out
    binary = metric != "perplexity" and all(float(v) in (0.0, 1.0) for v in b + a)
    out["ci_before"], out["ci_after"] = (_interval(x, metric, binary, confidence) for x in (b, a))
    out["test"] = stats.paired_test(b, a, test="mcnemar_exact" if binary else "wilcoxon")
    return out


def _interval(values: Sequence[Any], metric: str, binary: bool, confidence: float) -> list[float] | None:
    """Wilson for 0/1 scores; perplexity from per-example log-likelihoods; else the t interval of the mean."""
    vals = [float(v) for v in values]
    if binary:
        return stats.proportion_ci(int(sum(vals)), len(vals), confidence=confidence)["ci"]
    if metric == "perplexity":
        return stats.perplexity_ci(vals, confidence=confidence)
    return stats.mean_ci(vals, confidence=confidence)["ci"]


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
