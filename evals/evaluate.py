"""``neuraldb.evaluate``: the model without and with a store, on CounterFact or zsRE, in one call.

Example::

    import neuraldb
    from evals.datasets import load_counterfact

    model, tok = neuraldb.load_model("smollm2-135m")
    cases = load_counterfact(limit=100)                      # $NEURALDB_DATA_DIR
    db = neuraldb.edit(model, tok, [c.fact for c in cases])
    report = neuraldb.evaluate(model, db, tokenizer=tok, dataset=cases, output_dir="reports/cf100")
    report["metrics"]["efficacy"]["post"]["mean"]            # percent, with report[...]["post"]["ci"]

The options (``limit``, ``metrics``, ``batch_size``, ...) are the fields of
:class:`evals.config.EvalConfig`, given as ``config=`` and/or as keywords. Protocol
(docs/method.md): the cases (:mod:`evals.selection`) are processed in chunks of ``chunk_size``
cases (default ``batch_size``); each chunk is scored by :func:`evals.scoring.score_chunk`: the
store DETACHED, the metrics of the unedited model ("pre"); then the store ATTACHED, the same
metrics ("post") and the gate's firing on each prompt group (``report["firing"]``; ``"gate"``
in reports written before the rename). The metrics are those of :mod:`evals.metrics.specs`,
summarised with the intervals and paired tests of :mod:`evals.stats` (:mod:`evals.summary`).
Then the general tasks (``evals.general``), and the report (:mod:`evals.report`).

Resuming (``output_dir``, :class:`evals.runs.RunFolder`): ``run.json`` holds the run's identity,
``cases.jsonl`` one line per finished case, appended chunk by chunk; a rerun with the same
identity skips the cases already there, a different identity is a ``ValueError`` that names
what differs. The general-ability results are kept in ``general.json``. ``report.json`` and
``report.md`` are written at the end. The attachment state of the store is restored on exit,
also on errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from tqdm.auto import tqdm

from evals import report as rep
from evals.cases import EvalCase, EvalCases
from evals.config import EvalConfig, general_module, resolve_config
from evals.metrics import chat as chat_metric
from evals.metrics.specs import select_metrics
from evals.runs import SCHEMA, RunFolder, cases_digest, earlier_pre, store_digest
from evals.scoring import ScoringPlan, consistency_reference, score_chunk
from evals.selection import case_kind, check_targets, default_only_stored, load_cases, select_cases
from evals.summary import edit_summary, model_info, summarize_firing, summarize_metrics, versions
from neuraldb.hook import detached

__all__ = ["SCHEMA", "evaluate", "resolve_tokenizer"]


def resolve_tokenizer(model: Any) -> Any:
    """The tokenizer of ``model``, found locally from ``model.config.name_or_path`` (never the hub).

    Built-in aliases (``neuraldb.load_model``) read the cached conversion; a directory is read
    with ``AutoTokenizer``. The pad token falls back to EOS as in ``load_model``.
    """
    from transformers import AutoTokenizer

    from neuraldb import models
    from neuraldb.store import model_name

    name = model_name(model)
    try:
        if name.strip().lower() in models.ALIASES:
            folder = models._cached_conversion(name.strip().lower(), models._cache_root(None))
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not find the tokenizer of model {name!r} locally ({exc}); pass tokenizer=") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def evaluate(
    model: Any,
    db: Any,
    *,
    tokenizer: Any = None,
    dataset: Any = "counterfact",
    config: EvalConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` without and with the store ``db``; return a JSON-serialisable report.

    Args:
        tokenizer: default: found locally from ``model.config.name_or_path``.
        dataset: "counterfact", "zsre" (read from ``data_dir`` / ``$NEURALDB_DATA_DIR``, the
            config's ``split``), a path to a CounterFact/zsRE file, a hub dataset id, a
            ``datasets.Dataset`` or a list of ``EvalCase``.
        config: the options (:class:`evals.config.EvalConfig`); default ``EvalConfig()``.
        output_dir: makes the run resumable and receives report.json / report.md.
        progress: a progress bar over the cases.
        **options: fields of ``EvalConfig`` (``limit=100``, ``metrics=["efficacy"]``, ...) that
            replace those of ``config``; any other name is a ``TypeError``.

    The store's attachment state (and any store attached to ``model``) is restored on exit.
    """
    t_start = time.perf_counter()
    cfg = resolve_config(config, **options)  # every option checked (general tasks too): fail now, not after hours
    tok = tokenizer if tokenizer is not None else resolve_tokenizer(model)
    db.check_compatible(model)
    run = _prepare(model, db, dataset, cfg, output_dir=output_dir, data_dir=data_dir)
    general = None
    with detached(model, db):  # stores on the model (and db anywhere) are off, and back as they were at the end
        _run_cases(model, tok, db, run, cfg, progress=progress)
        if run.tasks:
            general = _run_general(model, tok, db, run, cfg, data_dir=data_dir)
    result = _assemble(tok, db, run, cfg, general=general, output_dir=output_dir, data_dir=data_dir)
    result["timings"]["total_this_call"] = time.perf_counter() - t_start
    result["timings"]["cases_seconds_all_calls"] = sum(r.get("seconds", 0.0) for r in result["cases"])
    result = rep.clean_json(result)
    if output_dir is not None:
        rep.write_report(result, output_dir)
    return result


@dataclass
class _Run:
    """What the steps of one :func:`evaluate` call share."""

    loaded: EvalCases
    cases: list[EvalCase]
    only_stored: bool
    metrics: list[str]
    plan: ScoringPlan
    reference: Any  # ROME's TF-IDF reference, when consistency is computed
    reference_paths: dict[str, str] | None
    tasks: list[str] | None
    dataset_info: dict[str, Any]
    store_info: dict[str, Any]
    model_info: dict[str, Any]
    fluency: dict[str, Any] | None  # the generation settings, when fluency (or consistency) is computed
    warnings: list[str]
    timings: dict[str, float]
    folder: RunFolder = dataclasses.field(init=False)


# ----------------------------------------------------------------------------- the steps


def _prepare(model: Any, db: Any, dataset: Any, cfg: EvalConfig, *, output_dir: Any, data_dir: Any) -> _Run:
    """Load and select the cases, choose the metrics, describe the run and open its folder."""
    t0 = time.perf_counter()
    loaded = load_cases(dataset, data_dir=data_dir, split=cfg.split)
    only_stored = cfg.only_stored if cfg.only_stored is not None else default_only_stored(dataset)
    cases, warnings = select_cases(loaded, db, only_stored=only_stored, limit=cfg.limit)
    if not cases:
        raise ValueError("no case to evaluate (limit=0 or an empty dataset)")
    if cfg.limit is not None and len(cases) < cfg.limit:
        where = (f"the store's {len(db)} facts among the {loaded.report.loaded} cases of {loaded.report.source}"
                 if only_stored else f"{loaded.report.source}: {loaded.report.loaded} cases loaded")
        warnings.append(f"only {len(cases)} cases to evaluate for limit={cfg.limit} ({where})")
    check_targets(cases, db)
    kind = case_kind(cases)
    metrics = select_metrics(kind, cfg.metrics)
    reference, reference_paths = (consistency_reference(cfg.consistency_files)
                                  if "consistency" in metrics else (None, None))
    timings = {"load_data": time.perf_counter() - t0}
    plan = ScoringPlan(kind, tuple(metrics), cfg.batch_size, cfg.seed, cfg.generation_prompts, cfg.generation_tokens)
    fluency = {"top_k": 5, "max_length": 100 if cfg.generation_tokens is None else None,
               "max_new_tokens": cfg.generation_tokens, "prompts_per_case": cfg.generation_prompts, "seed": cfg.seed}
    store_info = {"facts": len(db), "layer": db.layer, "gamma": db.gamma, "module": db.module_name(model),
                  "model_name": db.model_name, "fingerprint": db.fingerprint, "digest": store_digest(db),
                  "config": db.config, "edit": edit_summary(db, cases)}
    dataset_info = {"name": str(dataset) if isinstance(dataset, (str, os.PathLike)) else kind,
                    "kind": kind, "split": cfg.split, "source": loaded.report.source, "format": loaded.report.format,
                    "n_cases": len(cases), "limit": cfg.limit, "only_stored": only_stored,
                    "cases_digest": cases_digest(cases)}
    run = _Run(loaded=loaded, cases=cases, only_stored=only_stored, metrics=metrics, plan=plan, reference=reference,
               reference_paths=reference_paths, tasks=list(cfg.general_tasks) if cfg.general_tasks else None,
               dataset_info=dataset_info, store_info=store_info, model_info=model_info(model),
               fluency=fluency if plan.fluency else None, warnings=warnings, timings=timings)
    run.folder = RunFolder(output_dir, _identity(run, cfg))
    return run


def _identity(run: _Run, cfg: EvalConfig) -> dict[str, Any]:
    """What a resumed run must share with the first: data, metrics, generation, store, model, general tasks."""
    return {"schema": SCHEMA,
            "dataset": {k: run.dataset_info[k] for k in ("kind", "n_cases", "cases_digest")},
            "metrics": run.metrics, "fluency": run.fluency, "consistency": run.reference_paths is not None,
            "store": {k: run.store_info[k] for k in ("digest", "layer", "gamma", "facts")},
            "model": {k: run.model_info[k] for k in ("name", "dtype", "device")},
            "general": {"tasks": run.tasks, "limit": cfg.general_limit} if run.tasks else None}


def _run_cases(model: Any, tok: Any, db: Any, run: _Run, cfg: EvalConfig, *, progress: bool) -> None:
    """Score the cases not yet in the run folder, chunk by chunk, appending each chunk as it finishes.

    The chunks are fixed slices of the cases, so a resumed run batches as the first one did.
    """
    done = run.folder.done
    row_of = {fid: i for i, fid in enumerate(db.ids)}
    todo = [c for c in run.cases if c.fact.id not in done]
    known = earlier_pre(cfg.pre_from, run.folder.identity) if cfg.pre_from is not None and todo else {}
    bar = tqdm(total=len(run.cases), initial=len(run.cases) - len(todo), desc="evaluate", unit="case",
               disable=not progress)
    try:
        for start in range(0, len(run.cases), cfg.chunk):
            batch = [c for c in run.cases[start:start + cfg.chunk] if c.fact.id not in done]
            if batch:
                run.folder.append(score_chunk(model, tok, db, batch, run.plan, run.reference, row_of, run.timings,
                                              known_pre=known))
                bar.update(len(batch))
    finally:
        bar.close()


def _run_general(model: Any, tok: Any, db: Any, run: _Run, cfg: EvalConfig, *, data_dir: Any) -> dict[str, Any]:
    """The general tasks without and with the store (``evals.general``), or their saved ``general.json``."""
    path = run.folder.dir / "general.json" if run.folder.dir is not None else None
    if path is not None and path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    module = general_module()
    if data_dir is None and os.environ.get("NEURALDB_DATA_DIR"):
        data_dir = os.environ["NEURALDB_DATA_DIR"]
    result = rep.clean_json(module.run_general_tasks(model, tok, db, tasks=run.tasks, limit=cfg.general_limit,
                                                     batch_size=cfg.batch_size, data_dir=data_dir,
                                                     confidence=cfg.confidence))
    run.timings["general"] = time.perf_counter() - t0
    if path is not None:
        rep.write_json(result, path)
    return result


def _assemble(tok: Any, db: Any, run: _Run, cfg: EvalConfig, *, general: dict[str, Any] | None, output_dir: Any,
              data_dir: Any) -> dict[str, Any]:
    """The report: the records of all the cases (this call's and earlier calls'), their summaries, the run."""
    records = [run.folder.done[c.fact.id] for c in run.cases]
    if run.reference is not None and any(r["post"].get("consistency") is None for r in records):
        run.warnings.append("some cases have no consistency score (no snippets for their target)")
    config = {"dataset": run.dataset_info["name"], "split": cfg.split, "limit": cfg.limit, "metrics": run.metrics,
              "batch_size": cfg.batch_size, "chunk_size": cfg.chunk, "seed": cfg.seed,
              "confidence": cfg.confidence, "only_stored": run.only_stored, "fluency": run.fluency,
              "consistency_files": run.reference_paths, "general_tasks": run.tasks,
              "general_limit": cfg.general_limit,
              "pre_from": str(cfg.pre_from) if cfg.pre_from is not None else None,
              "pre_reused": sum(bool(r.get("pre_reused")) for r in records),
              "output_dir": str(output_dir) if output_dir is not None else None,
              "data_dir": str(data_dir) if data_dir is not None else os.environ.get("NEURALDB_DATA_DIR")}
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": run.dataset_info | {"load_report": dataclasses.asdict(run.loaded.report)},
        "model": run.model_info,
        "store": run.store_info,
        "config": {"evaluate": config},
        "metrics": summarize_metrics(run.plan.kind, run.metrics, run.cases, records, cfg.confidence,
                                     run.reference_paths, chat_skip=chat_metric.missing_chat_template(tok)),
        "firing": summarize_firing(db, records, cfg.confidence),
        "general": general,
        "cases": records,
        "versions": versions(),
        "timings": run.timings,
        "warnings": run.warnings,
    }
