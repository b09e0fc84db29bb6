"""``neuraldb.evaluate``: the model without and with a store, on CounterFact or zsRE, in one call.

Example::

    import neuraldb
    from evals.datasets import load_counterfact

    model, tok = neuraldb.load_model("smollm2-135m")
    cases = load_counterfact(limit=100)                      # $NEURALDB_DATA_DIR
    db = neuraldb.edit(model, tok, [c.fact for c in cases])
    report = neuraldb.evaluate(model, db, tokenizer=tok, dataset=cases, output_dir="reports/cf100")
    report["metrics"]["efficacy"]["post"]["mean"]            # percent, with report[...]["post"]["ci"]

Protocol (METHOD.md section 5). The cases are processed in chunks of ``chunk_size`` cases
(default ``batch_size``). For each chunk: the store DETACHED, the metrics of the unedited
model ("pre"); then the store ATTACHED, the same metrics ("post") and the gate's firing on
each prompt group. Metrics (names shared by both datasets, then extras):

* CounterFact: ``efficacy`` (ES), ``generalization`` (PS), ``specificity`` (NS), their
  magnitudes ``*_magnitude`` (mean P(new) - P(true), reversed for NS; ROME's ``*_diff``),
  ``fluency`` (ROME's n-gram entropy of top-5 samples from the generation prompts, x100)
  and ``consistency`` (ROME's TF-IDF reference score, x100; skipped with the reason unless
  ``consistency_files`` gives ROME's three files);
* zsRE: ``efficacy``, ``generalization``, ``specificity`` as teacher-forced top-1 token
  accuracy (specificity: the NQ question against its gold answer).

Opt-in CounterFact metrics (``EXTRA_METRICS``, computed only when named): ``mentions`` (ES and
gate recall per kind of mention variant, :mod:`evals.metrics.mentions`) and ``chat_efficacy`` /
``chat_generalization`` (the prompt as a chat question, greedy answer judged by containment,
:mod:`evals.metrics.chat`; skipped with the reason when the tokenizer has no chat template).

Report values are in the paper's units: percent for rates and magnitudes, x100 for fluency
and consistency; per-case values in ``report["cases"]`` are raw (fractions, entropies).
Intervals and tests are those of :mod:`evals.report` (Wilson / exact McNemar for one yes/no
outcome per case, Student t / paired t otherwise).

Firing (``report["firing"]``; ``"gate"`` in reports written before the rename, which
:func:`evals.report.firing_section` still reads): with the store attached, one forward pass
over each prompt of each group alone - ``edit`` (the edit prompt), ``paraphrase``, ``neighborhood``
(CounterFact's neighbourhood prompts, zsRE's NQ question) and ``generation`` (the post-edit
generated texts, prompt + continuation) - counting gated positions, fires
(``NeuralDB.last_fire_mask``), prompts with any fire, and prompts where a fire retrieved the
case's own fact (``last_fire_index``). The store's counters are reset by this function.

Resuming (``output_dir``): ``run.json`` holds the run's identity (data, store digest, model,
metrics, generation settings, seed); ``cases.jsonl`` gets one JSON line per finished case,
appended with one ``write`` per chunk, flushed and fsynced. A rerun with the same identity
skips the cases already there (nothing recomputed) and reports all of them; a different
identity is a ``ValueError`` that names what differs. A torn last line is dropped. The
general-ability results are kept in ``general.json``. ``report.json`` and ``report.md`` are
written at the end. The attachment state of the store is restored on exit, also on errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from evals import report as rep
from evals.cases import EvalCase, EvalCases, LoadReport
from evals.datasets import load_any, load_counterfact, load_zsre
from evals.hf_datasets import is_dataset, is_hub_id
from evals.metrics import chat as chat_metric
from evals.metrics import mentions as mention_metric
from evals.metrics.consistency import consistency_scores, load_tfidf_reference
from evals.metrics.counterfact import counterfact_scores
from evals.metrics.fluency import fluency_scores, word_tokenizer_name
from evals.metrics.tokens import call_model, eval_mode, model_device, pad_id
from evals.metrics.zsre import zsre_scores
from neuraldb.hook import detached

__all__ = ["EXTRA_METRICS", "METRICS", "MetricSpec", "SCHEMA", "check_general_tasks", "evaluate", "resolve_tokenizer",
           "select_cases", "store_digest"]

log = logging.getLogger(__name__)
SCHEMA = "neuraldb.evaluate/1"
FIRING_GROUPS = ("edit", "paraphrase", "neighborhood", "generation")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    scale: float
    description: str


_RATE = "%"
METRICS: dict[str, dict[str, MetricSpec]] = {
    "counterfact": {m.name: m for m in (
        MetricSpec("efficacy", _RATE, 100, "ES: P(target_new) > P(target_true) on the edit prompt"),
        MetricSpec("generalization", _RATE, 100, "PS: the same on the paraphrase prompts"),
        MetricSpec("specificity", _RATE, 100, "NS: P(target_true) > P(target_new) on the neighbourhood prompts"),
        MetricSpec("efficacy_magnitude", _RATE, 100, "mean P(new) - P(true) on the edit prompt (ROME's ES diff)"),
        MetricSpec("generalization_magnitude", _RATE, 100, "mean P(new) - P(true) on the paraphrases"),
        MetricSpec("specificity_magnitude", _RATE, 100, "mean P(true) - P(new) on the neighbourhood prompts"),
        MetricSpec("fluency", "x100", 100, "n-gram entropy (2/3 H2 + 4/3 H3, ROME) of top-5 samples"),
        MetricSpec("consistency", "x100", 100, "TF-IDF cosine of generations vs snippets about target_new"),
    )},
    "zsre": {m.name: m for m in (
        MetricSpec("efficacy", _RATE, 100, "token accuracy of target_new after the edit question"),
        MetricSpec("generalization", _RATE, 100, "token accuracy of target_new after the rephrased question"),
        MetricSpec("specificity", _RATE, 100, "token accuracy of the NQ gold answer after the NQ question"),
    )},
}
# computed only when asked for by name (not in the default "all of the dataset's")
EXTRA_METRICS: dict[str, dict[str, MetricSpec]] = {
    "counterfact": {m.name: m for m in (
        MetricSpec("mentions", _RATE, 100, "ES (P(new) > P(true)) over mention variants of the edit prompt and "
                   "paraphrases (lower-cased article, mid-sentence, possessive, quoted, article dropped, question); "
                   "per kind with gate recall in the mentions section"),
        MetricSpec("chat_efficacy", _RATE, 100, "the edit prompt as a chat question (chat template, greedy, 16 "
                   "tokens): the answer contains target_new and not target_true"),
        MetricSpec("chat_generalization", _RATE, 100, "the same for the paraphrases"),
    )},
    "zsre": {},
}
CHAT_METRICS = ("chat_efficacy", "chat_generalization")
CHAT_TOKENS = 16
_CF_GROUPS = {"rewrite": ("efficacy", "efficacy_magnitude"), "paraphrase": ("generalization", "generalization_magnitude"),
              "neighborhood": ("specificity", "specificity_magnitude")}
_CONSISTENCY_FILES = ("attribute_snippets", "idf", "tfidf_vocab")
_CONSISTENCY_NAMES = {"attribute_snippets": "attribute_snippets.json", "idf": "idf.npy", "tfidf_vocab": "tfidf_vocab.json"}


# ----------------------------------------------------------------------------- inputs


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


def _load_dataset(dataset: Any, *, data_dir: Any, split: str) -> EvalCases:
    if isinstance(dataset, str) and dataset.lower() in ("counterfact", "zsre"):
        loader = load_counterfact if dataset.lower() == "counterfact" else load_zsre
        return loader(data_dir=data_dir, split=split, skip_invalid=True)
    if is_dataset(dataset) or is_hub_id(dataset):  # a datasets.Dataset / DatasetDict, or "org/name" on the hub
        return load_any(dataset, skip_invalid=True, split=split)
    if isinstance(dataset, (str, os.PathLike)):
        if not Path(dataset).exists():
            raise FileNotFoundError(f"dataset {str(dataset)!r} is neither 'counterfact', 'zsre', an existing file "
                                    "nor a hub dataset id ('org/name')")
        return load_any(dataset, skip_invalid=True)
    cases = list(dataset)
    bad = [type(c).__name__ for c in cases if not isinstance(c, EvalCase)]
    if bad:
        raise ValueError(f"dataset must be 'counterfact', 'zsre', a path, a hub id, a datasets.Dataset or a list of "
                         f"EvalCase; got a {bad[0]}")
    report = getattr(dataset, "report", None)
    if not isinstance(report, LoadReport):
        report = LoadReport("<given cases>", "evalcase", len(cases), len(cases))
    return EvalCases(cases, report)


def select_cases(cases: Sequence[EvalCase], db: Any, *, only_stored: bool, limit: int | None) -> tuple[list[EvalCase], list[str]]:
    """The cases to evaluate (those in the store when ``only_stored``), the first ``limit``; and notes."""
    notes: list[str] = []
    if only_stored:
        stored = [c for c in cases if c.fact.id in db]
        if not stored:
            raise ValueError(
                f"none of the {len(cases)} dataset cases is in the store ({len(db)} facts): store ids "
                f"{list(db.ids[:5])}{'...' if len(db) > 5 else ''}, dataset ids "
                f"{[c.fact.id for c in cases[:5]]}{'...' if len(cases) > 5 else ''}; edit the cases' facts first, "
                "or pass the cases as a list (or only_stored=False) to evaluate them anyway")
        missing = len(db) - len({c.fact.id for c in stored})
        if missing > 0:
            notes.append(f"{missing} of the store's {len(db)} facts are not cases of this dataset and were not evaluated")
        cases = stored
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        cases = list(cases)[:limit]
    ids = [c.fact.id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("the cases repeat a fact id; each case must have its own fact.id")
    return list(cases), notes


def _check_targets(cases: Sequence[EvalCase], db: Any) -> None:
    """A store fact edited to another target than the case's is an error (e.g. zsRE alt vs answers)."""
    for c in cases:
        stored = db.facts.get(c.fact.id) if c.fact.id in db else None
        if stored and stored.get("target_new") not in (None, c.fact.target_new):
            raise ValueError(
                f"fact {c.fact.id!r} was edited to {stored['target_new']!r} but the case's target_new is "
                f"{c.fact.target_new!r}; evaluate the data the store was built from (for zsRE: the same target= "
                "choice, 'answers' by default)")


def _kind(cases: Sequence[EvalCase]) -> str:
    kinds = sorted({c.kind for c in cases})
    if len(kinds) != 1:
        raise ValueError(f"the cases mix kinds {kinds}; evaluate CounterFact and zsRE separately")
    return kinds[0]


def _select_metrics(kind: str, metrics: Sequence[str] | str | None) -> list[str]:
    if metrics is None:
        return list(METRICS[kind])
    known = METRICS[kind] | EXTRA_METRICS.get(kind, {})
    if isinstance(metrics, str):
        metrics = [m for m in metrics.replace(",", " ").split() if m]
    unknown = [m for m in metrics if m not in known]
    if unknown or not metrics:
        import difflib

        hint = "".join(f" (did you mean {difflib.get_close_matches(m, known, 1)[0]!r} for {m!r}?)"
                       for m in unknown if difflib.get_close_matches(m, known, 1))
        raise ValueError(f"unknown {kind} metric(s) {unknown}{hint}; choose from {list(known)}")
    return [m for m in known if m in metrics]  # canonical order


def _consistency_reference(files: Any) -> tuple[Any, dict[str, str] | None]:
    if files is None:
        return None, None
    if isinstance(files, (str, os.PathLike)):
        paths = {k: str(Path(files) / name) for k, name in _CONSISTENCY_NAMES.items()}
    else:
        paths = {k: str(files[k]) for k in _CONSISTENCY_FILES if k in files}
        if len(paths) != 3:
            raise ValueError(f"consistency_files needs the keys {list(_CONSISTENCY_FILES)} (or one folder)")
    return load_tfidf_reference(**paths), paths


def _resolve_general_tasks(general_tasks: Any) -> list[str] | None:
    if general_tasks is None or general_tasks == [] or general_tasks == "":
        return None
    if isinstance(general_tasks, str):
        general_tasks = [t.strip() for t in general_tasks.split(",") if t.strip()]
    tasks = list(general_tasks)
    if "all" in tasks:
        from evals.tasks import SIX_TASKS

        tasks = list(dict.fromkeys([*SIX_TASKS, *(t for t in tasks if t != "all")]))
    return tasks


def check_general_tasks(general_tasks: Sequence[str] | str | None) -> list[str] | None:
    """The task names ``general_tasks`` resolves to ("all" = the paper's six); raises now if
    ``evals.general`` cannot be imported (so a long run does not fail at its end)."""
    tasks = _resolve_general_tasks(general_tasks)
    if tasks:
        _general_module()
    return tasks


def _general_module() -> Any:
    try:
        module = importlib.import_module("evals.general")
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"general_tasks needs evals.general.run_general_tasks, which could not be imported ({exc}); "
            "run without general tasks, or install the part that provides it") from exc
    if not callable(getattr(module, "run_general_tasks", None)):
        raise ModuleNotFoundError("evals.general has no run_general_tasks(); run without general tasks")
    return module


# ----------------------------------------------------------------------------- digests and identity


def store_digest(db: Any) -> str:
    """sha256 (16 hex digits) of the store's ids, keys, residuals, gamma and layer."""
    h = hashlib.sha256(json.dumps([db.ids, db.gamma, db.layer]).encode())
    for t in (db.keys, db.residuals):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _case_payload(c: EvalCase) -> dict[str, Any]:
    d = dataclasses.asdict(c)
    d["fact"] = c.fact.to_dict()
    d["fact"].pop("meta", None)
    return d


def cases_digest(cases: Sequence[EvalCase]) -> str:
    h = hashlib.sha256()
    for c in cases:
        h.update(json.dumps(_case_payload(c), sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:16]


def _model_info(model: Any) -> dict[str, Any]:
    from neuraldb.store import model_name

    param = next(iter(model.parameters()), None)
    return {"name": model_name(model), "class": type(model).__name__,
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
            "device": model_device(model).type,
            "parameters": sum(p.numel() for p in model.parameters())}


def _edit_summary(db: Any, cases: Sequence[EvalCase]) -> dict[str, Any] | None:
    """Mean and max final edit loss / NLL of the evaluated facts (from ``db.facts``)."""
    recs = [db.facts.get(c.fact.id, {}).get("edit") for c in cases]
    recs = [r for r in recs if isinstance(r, Mapping)]
    if not recs:
        return None
    out: dict[str, Any] = {"n": len(recs)}
    for key in ("loss", "nll", "steps"):
        vals = [float(r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = {"mean": sum(vals) / len(vals), "max": max(vals)}
    return out


def _versions() -> dict[str, str | None]:
    import neuraldb

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    import transformers

    return {"neuraldb": neuraldb.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": version("lm_eval") or version("lm-eval"), "scipy": version("scipy"),
            "python": platform.python_version(), "platform": platform.platform()}


# ----------------------------------------------------------------------------- the run folder


class RunFolder:
    """``run.json`` + ``cases.jsonl`` in ``output_dir`` (or nothing, in memory, without one)."""

    def __init__(self, output_dir: str | os.PathLike | None, identity: Mapping[str, Any]) -> None:
        self.dir = Path(output_dir) if output_dir is not None else None
        self.identity = json.loads(json.dumps(identity))
        self.done: dict[str, dict[str, Any]] = {}
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        run = self.dir / "run.json"
        if run.exists():
            saved = json.loads(run.read_text(encoding="utf-8")).get("identity")
            if saved != self.identity:
                was, now = rep.flatten(saved), rep.flatten(self.identity)
                diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
                raise ValueError(
                    f"{self.dir} holds a run with a different configuration (differs in: {', '.join(diff[:8])}"
                    f"{'...' if len(diff) > 8 else ''}); use another output_dir, or delete {run} and "
                    f"{self.dir / 'cases.jsonl'} to start over")
        else:
            rep.write_json({"schema": SCHEMA, "identity": self.identity,
                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, run)
        self.done = self._read_cases()

    @property
    def cases_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "cases.jsonl"

    def _read_cases(self) -> dict[str, dict[str, Any]]:
        path = self.cases_path
        if not path.exists():
            return {}
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a torn last line from a kill mid-write: drop it
            keep = raw.rfind(b"\n") + 1
            log.warning("%s: dropping a torn last line (%d bytes)", path, len(raw) - keep)
            with open(path, "r+b") as fh:
                fh.truncate(keep)
            raw = raw[:keep]
        done = {}
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {n} is not valid JSON ({exc}); delete the folder to start over") from None
                done[rec["fact_id"]] = rec
        return done

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Record finished cases: one write, flushed and fsynced (cases.jsonl grows by whole lines)."""
        lines = [json.dumps(r, ensure_ascii=False, allow_nan=False) for r in records]
        for r, line in zip(records, lines):
            self.done[r["fact_id"]] = json.loads(line)  # what a resumed run would read back
        if self.dir is None or not lines:
            return
        with open(self.cases_path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- per chunk


@dataclass(frozen=True)
class _Plan:
    kind: str
    metrics: tuple[str, ...]
    batch_size: int
    seed: int
    generation_prompts: int | None
    generation_tokens: int | None

    @property
    def fluency(self) -> bool:
        return self.kind == "counterfact" and ("fluency" in self.metrics or "consistency" in self.metrics)


def _reduced(case: EvalCase, plan: _Plan) -> EvalCase:
    """The case with only the prompts the selected metrics need (fewer forward passes)."""
    m = set(plan.metrics)
    fact = case.fact
    if plan.kind == "counterfact":
        fact = dataclasses.replace(
            fact, paraphrases=fact.paraphrases if m & {*_CF_GROUPS["paraphrase"], "mentions", "chat_generalization"}
            else (),
            neighborhood=fact.neighborhood if m & set(_CF_GROUPS["neighborhood"]) else ())
        gen = case.generation_prompts[: plan.generation_prompts] if plan.generation_prompts is not None else case.generation_prompts
        return dataclasses.replace(case, fact=fact, generation_prompts=gen)
    fact = dataclasses.replace(fact, paraphrases=fact.paraphrases if "generalization" in m else ())
    loc = case.loc_prompt if "specificity" in m else None
    return dataclasses.replace(case, fact=fact, loc_prompt=loc)


def _score(model: Any, tok: Any, cases: Sequence[EvalCase], plan: _Plan, reference: Any,
           timings: dict[str, float], phase: str) -> list[dict[str, Any]]:
    """Per-case metric values (raw units), details and generated texts, for the model as it is now."""
    t0 = time.perf_counter()
    out: list[dict[str, Any]] = []
    if plan.kind == "counterfact":
        for r in counterfact_scores(model=model, tokenizer=tok, cases=cases, batch_size=plan.batch_size):
            values = {"efficacy": r.efficacy, "generalization": r.generalization, "specificity": r.specificity,
                      "efficacy_magnitude": r.efficacy_diff, "generalization_magnitude": r.generalization_diff,
                      "specificity_magnitude": r.specificity_diff}
            detail = {g: [[c.nll_new, c.nll_true] for c in getattr(r, g)]
                      for g in ("rewrite", "paraphrase", "neighborhood")}
            out.append({"values": values, "detail": {"nll_new_true": detail}})
    else:
        for r in zsre_scores(model=model, tokenizer=tok, cases=cases, batch_size=plan.batch_size):
            values = {"efficacy": r.efficacy, "generalization": r.generalization, "specificity": r.specificity}
            detail = {"efficacy_correct": list(r.efficacy_correct),
                      "generalization_correct": [list(x) for x in r.generalization_correct],
                      "specificity_correct": list(r.specificity_correct)}
            out.append({"values": values, "detail": detail})
    timings[f"{phase}_scoring"] = timings.get(f"{phase}_scoring", 0.0) + time.perf_counter() - t0
    if plan.fluency:
        t0 = time.perf_counter()
        flu = fluency_scores(model=model, tokenizer=tok, cases=cases, max_new_tokens=plan.generation_tokens,
                             seed=plan.seed, batch_size=plan.batch_size)
        cons = (consistency_scores(cases=cases, generations=[f.texts for f in flu], reference=reference)
                if reference is not None else None)
        for k, f in enumerate(flu):
            out[k]["values"]["fluency"] = f.ngram_entropy
            if cons is not None and not cons.skipped:
                out[k]["values"]["consistency"] = cons.per_case[k][1]
            else:
                out[k]["values"]["consistency"] = None
            out[k]["texts"] = list(f.texts)
        timings[f"{phase}_generation"] = timings.get(f"{phase}_generation", 0.0) + time.perf_counter() - t0
    _score_extras(model, tok, cases, plan, out, timings, phase)
    for o in out:
        o["values"] = {k: v for k, v in o["values"].items() if k in plan.metrics}
    return out


def _score_extras(model: Any, tok: Any, cases: Sequence[EvalCase], plan: _Plan, out: list[dict[str, Any]],
                  timings: dict[str, float], phase: str) -> None:
    """The opt-in metrics (``EXTRA_METRICS``) into ``out``: mentions ES per kind (the gate recall is added
    with the store attached, see ``evaluate``), chat answers (None when the tokenizer has no chat template)."""
    if "mentions" in plan.metrics:
        t0 = time.perf_counter()
        for o, m in zip(out, mention_metric.mention_scores(model=model, tokenizer=tok, cases=cases,
                                                           batch_size=plan.batch_size)):
            o["values"]["mentions"] = m
        timings[f"{phase}_mentions"] = timings.get(f"{phase}_mentions", 0.0) + time.perf_counter() - t0
    if set(CHAT_METRICS) & set(plan.metrics):
        if chat_metric.missing_chat_template(tok) is not None:
            for o in out:
                o["values"].update(dict.fromkeys(CHAT_METRICS))
            return
        t0 = time.perf_counter()
        results = chat_metric.chat_scores(model=model, tokenizer=tok, cases=cases, max_new_tokens=CHAT_TOKENS,
                                          batch_size=plan.batch_size,
                                          paraphrases="chat_generalization" in plan.metrics)
        for o, r in zip(out, results):
            o["values"].update({"chat_efficacy": r.efficacy, "chat_generalization": r.generalization})
            o["detail"]["chat"] = [list(a) for a in r.answers]
        timings[f"{phase}_chat"] = timings.get(f"{phase}_chat", 0.0) + time.perf_counter() - t0


def _firing_prompts(case: EvalCase, texts: Sequence[str] | None) -> dict[str, list[str]]:
    groups = {"edit": [case.fact.text], "paraphrase": list(case.fact.paraphrases),
              "neighborhood": list(case.fact.neighborhood) if case.kind == "counterfact"
              else ([case.loc_prompt] if case.loc_prompt else [])}
    if texts:
        groups["generation"] = list(texts)
    return {g: p for g, p in groups.items() if p}


@torch.no_grad()
def _firing(model: Any, tok: Any, db: Any, cases: Sequence[EvalCase], texts: Sequence[Sequence[str] | None],
            row_of: Mapping[str, int], batch_size: int) -> list[dict[str, dict[str, int]]]:
    """Per case and prompt group: prompts, gated positions, fires, prompts fired, prompts fired on the own fact."""
    items = []  # (case index, group, prompt ids)
    for k, (case, t) in enumerate(zip(cases, texts)):
        for group, prompts in _firing_prompts(case, t).items():
            for p in prompts:
                ids = list(tok(p, add_special_tokens=True)["input_ids"])
                if ids:
                    items.append((k, group, ids))
    per_case: list[dict[str, dict[str, int]]] = [{} for _ in cases]
    device, pad = model_device(model), pad_id(tok)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][2]))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(items[i][2]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):  # right padding: the first real token is position 0
                ids[b, : len(items[i][2])] = torch.tensor(items[i][2])
                mask[b, : len(items[i][2])] = 1
            db.last_fire_mask = db.last_fire_index = None
            call_model(model, ids.to(device), mask.to(device), use_cache=False)
            fire = db.last_fire_mask.cpu() if db.last_fire_mask is not None else torch.zeros_like(mask, dtype=torch.bool)
            index = (db.last_fire_index.cpu() if db.last_fire_index is not None
                     else torch.full_like(mask, -1))
            for b, i in enumerate(idx):
                k, group, seq = items[i]
                own = row_of.get(cases[k].fact.id, -2)
                fires = int(fire[b].sum())
                own_fires = int((index[b] == own).sum()) if own >= 0 else 0
                c = per_case[k].setdefault(group, {"prompts": 0, "positions": 0, "fires": 0, "prompts_fired": 0,
                                                   "own_fires": 0, "prompts_fired_own": 0})
                c["prompts"] += 1
                c["positions"] += max(len(seq) - 1, 0)  # the store never gates the first token
                c["fires"] += fires
                c["prompts_fired"] += int(fires > 0)
                c["own_fires"] += own_fires
                c["prompts_fired_own"] += int(own_fires > 0)
    return per_case


# ----------------------------------------------------------------------------- summary


def _metric_kind(kind: str, name: str, cases: Sequence[EvalCase]) -> str:
    """'proportion' when every case contributes exactly one yes/no outcome (CounterFact rates)."""
    name = {"chat_efficacy": "efficacy", "chat_generalization": "generalization"}.get(name, name)
    if kind != "counterfact" or name not in ("efficacy", "generalization", "specificity"):
        return "mean"
    count = {"efficacy": lambda c: 1, "generalization": lambda c: len(c.fact.paraphrases),
             "specificity": lambda c: len(c.fact.neighborhood)}[name]
    return "proportion" if cases and all(count(c) == 1 for c in cases) else "mean"


def _summarize_metrics(kind: str, metrics: Sequence[str], cases: Sequence[EvalCase],
                       records: Sequence[Mapping[str, Any]], confidence: float, reference_paths: Any,
                       chat_skip: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in metrics:
        spec = (METRICS[kind] | EXTRA_METRICS.get(kind, {}))[name]
        base = {"unit": spec.unit, "scale": spec.scale, "description": spec.description}
        pre = [r["pre"].get(name) for r in records]
        post = [r["post"].get(name) for r in records]
        if name in CHAT_METRICS and chat_skip is not None:
            out[name] = base | {"skipped": True, "reason": chat_skip}
            continue
        if name == "mentions":
            out[name] = base | mention_metric.summarize_mentions(pre=pre, post=post, confidence=confidence)
            out[name]["interval"] = rep.T_METHOD + "; per kind: " + mention_metric.INTERVALS
            continue
        if name == "consistency" and reference_paths is None:
            out[name] = base | {"skipped": True, "reason": (
                "consistency needs ROME's attribute_snippets.json, idf.npy and tfidf_vocab.json "
                "(not available offline); pass consistency_files= (or --consistency-dir) to compute it")}
            continue
        if all(v is None for v in post):
            out[name] = base | {"skipped": True, "reason": "no case has this metric's prompts "
                                "(e.g. no generation prompts in this CounterFact format)"}
            continue
        mkind = _metric_kind(kind, name, cases)
        out[name] = base | rep.summarize_metric(pre, post, kind=mkind, confidence=confidence, scale=spec.scale)
        out[name]["interval"] = rep.WILSON_METHOD if mkind == "proportion" else rep.T_METHOD
        if name == "fluency":
            out[name]["word_tokenizer"] = word_tokenizer_name()
        if name == "consistency":
            out[name]["files"] = reference_paths
        if name in CHAT_METRICS:
            answers = {p: [(r.get("detail") or {}).get(p, {}).get("chat") for r in records] for p in ("pre", "post")}
            out[name] |= chat_metric.summary_extras(name=name, pre=answers["pre"], post=answers["post"],
                                                    max_new_tokens=CHAT_TOKENS)
            out[name]["examples"] = chat_metric.examples(cases=records)
    return out


def _summarize_firing(db: Any, records: Sequence[Mapping[str, Any]], confidence: float) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    keys = ("prompts", "positions", "fires", "prompts_fired", "own_fires", "prompts_fired_own")
    sections = [rep.firing_section(r) for r in records]  # "gate" in cases written before the rename
    for g in FIRING_GROUPS:
        per = [s[g] for s in sections if g in s]
        if not per:
            continue
        tot = {k: sum(p[k] for p in per) for k in keys}
        tot["fire_rate"] = tot["fires"] / tot["positions"] if tot["positions"] else None
        tot["prompt_fire"] = rep.proportion_ci(tot["prompts_fired"], tot["prompts"], confidence=confidence)
        tot["own_prompt_rate"] = tot["prompts_fired_own"] / tot["prompts"] if tot["prompts"] else None
        tot["cases_fired"] = sum(1 for p in per if p["prompts_fired"])
        groups[g] = tot
    return {"gamma": db.gamma, "layer": db.layer, "facts": len(db), "groups": groups,
            "method": "one forward pass per prompt with the store attached; positions exclude padding and the "
                      "first token; prompt_fire: prompts with >= 1 fire (Wilson interval); own: a fire retrieved "
                      "the case's own fact"}


# ----------------------------------------------------------------------------- the entry point


def evaluate(
    model: Any,
    db: Any,
    *,
    tokenizer: Any = None,
    dataset: Any = "counterfact",
    limit: int | None = None,
    metrics: Sequence[str] | str | None = None,
    batch_size: int = 16,
    output_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    general_tasks: Sequence[str] | str | None = None,
    general_limit: int | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    progress: bool = True,
    split: str = "eval",
    only_stored: bool | None = None,
    chunk_size: int | None = None,
    generation_prompts: int | None = None,
    generation_tokens: int | None = None,
    consistency_files: str | os.PathLike | Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` without and with the store ``db``; return a JSON-serialisable report.

    Args:
        tokenizer: default: found locally from ``model.config.name_or_path``.
        dataset: "counterfact", "zsre" (read from ``data_dir`` / ``$NEURALDB_DATA_DIR``,
            ``split``), a path to a CounterFact/zsRE file, or a list of ``EvalCase``.
        limit: evaluate at most this many cases (the first ones).
        metrics: names (see ``METRICS`` and the opt-in ``EXTRA_METRICS``); default all of ``METRICS``.
        only_stored: evaluate only the cases whose ``fact.id`` is in the store (an error
            if none is). Default: True for a name, path, hub id or datasets.Dataset; False for a
            list of cases.
        output_dir: makes the run resumable and receives report.json / report.md.
        general_tasks: lm-eval tasks ("all" = the six of the paper) run by
            ``evals.general.run_general_tasks``, ``general_limit`` examples per task.
        seed: fluency sampling seed. confidence: of every interval.
        chunk_size: cases per chunk (the unit of work between two appends); default batch_size.
        generation_prompts / generation_tokens: fluency on at most this many generation
            prompts per case / exactly this many new tokens (default: all prompts, ROME's
            100-token total length).
        consistency_files: a folder with ROME's attribute_snippets.json, idf.npy and
            tfidf_vocab.json, or a mapping with those three keys.

    The store's attachment state (and any store attached to ``model``) is restored on exit.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if batch_size < 1 or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    tasks = check_general_tasks(general_tasks)  # fail now, not after hours of work
    tok = tokenizer if tokenizer is not None else resolve_tokenizer(model)
    db.check_compatible(model)

    t0 = time.perf_counter()
    loaded = _load_dataset(dataset, data_dir=data_dir, split=split)
    if only_stored is None:
        only_stored = isinstance(dataset, (str, os.PathLike)) or is_dataset(dataset)  # a data source, not chosen cases
    cases, warnings = select_cases(loaded, db, only_stored=only_stored, limit=limit)
    if not cases:
        raise ValueError("no case to evaluate (limit=0 or an empty dataset)")
    if limit is not None and len(cases) < limit:
        where = (f"the store's {len(db)} facts among the {loaded.report.loaded} cases of {loaded.report.source}"
                 if only_stored else f"{loaded.report.source}: {loaded.report.loaded} cases loaded")
        warnings.append(f"only {len(cases)} cases to evaluate for limit={limit} ({where})")
    _check_targets(cases, db)
    kind = _kind(cases)
    selected = _select_metrics(kind, metrics)
    reference, reference_paths = (_consistency_reference(consistency_files)
                                  if "consistency" in selected else (None, None))
    timings["load_data"] = time.perf_counter() - t0
    plan = _Plan(kind, tuple(selected), batch_size, seed, generation_prompts, generation_tokens)

    store_info = {"facts": len(db), "layer": db.layer, "gamma": db.gamma, "module": db.module_name(model),
                  "model_name": db.model_name, "fingerprint": db.fingerprint, "digest": store_digest(db),
                  "config": db.config}
    store_info["edit"] = _edit_summary(db, cases)
    model_info = _model_info(model)
    dataset_info = {"name": str(dataset) if isinstance(dataset, (str, os.PathLike)) else kind,
                    "kind": kind, "split": split, "source": loaded.report.source, "format": loaded.report.format,
                    "n_cases": len(cases), "limit": limit, "only_stored": only_stored,
                    "cases_digest": cases_digest(cases)}
    fluency_cfg = {"top_k": 5, "max_length": 100 if generation_tokens is None else None,
                   "max_new_tokens": generation_tokens, "prompts_per_case": generation_prompts, "seed": seed}
    identity = {"schema": SCHEMA, "dataset": {k: dataset_info[k] for k in ("kind", "n_cases", "cases_digest")},
                "metrics": selected, "fluency": fluency_cfg if plan.fluency else None,
                "consistency": reference_paths is not None,
                "store": {k: store_info[k] for k in ("digest", "layer", "gamma", "facts")},
                "model": {k: model_info[k] for k in ("name", "dtype", "device")},
                "general": {"tasks": tasks, "limit": general_limit} if tasks else None}
    run = RunFolder(output_dir, identity)

    row_of = {fid: i for i, fid in enumerate(db.ids)}
    todo = [c for c in cases if c.fact.id not in run.done]
    chunk = chunk_size or batch_size
    unedited = contextlib.ExitStack()  # stores on the model (and db anywhere) are off, and back on at the end
    unedited.enter_context(detached(model, db))
    bar = tqdm(total=len(cases), initial=len(cases) - len(todo), desc="evaluate", unit="case", disable=not progress)
    general: dict[str, Any] | None = None
    try:
        order = {c.fact.id: i for i, c in enumerate(cases)}
        for start in range(0, len(cases), chunk):  # fixed chunks: a resumed run batches as the first one did
            batch = [c for c in cases[start:start + chunk] if c.fact.id not in run.done]
            if not batch:
                continue
            t_chunk = time.perf_counter()
            reduced = [_reduced(c, plan) for c in batch]
            pre = _score(model, tok, reduced, plan, reference, timings, "pre")
            db.attach(model, check=False)
            try:
                post = _score(model, tok, reduced, plan, reference, timings, "post")
                t0 = time.perf_counter()
                db.reset_stats()
                firing = _firing(model, tok, db, batch, [p.get("texts") for p in post], row_of, batch_size)
                timings["firing"] = timings.get("firing", 0.0) + time.perf_counter() - t0
                if "mentions" in plan.metrics:  # gate recall at the subject of each mention variant
                    t0 = time.perf_counter()
                    fired = mention_metric.mention_gate(model=model, tokenizer=tok, db=db, cases=reduced,
                                                        batch_size=batch_size)
                    for p, f in zip(post, fired):
                        for variant_kind, g in f.items():
                            p["values"]["mentions"][variant_kind].update(g)
                    timings["mentions_gate"] = timings.get("mentions_gate", 0.0) + time.perf_counter() - t0
            finally:
                db.detach()
            per_case_s = (time.perf_counter() - t_chunk) / len(batch)
            records = []
            for c, a, b, g in zip(batch, pre, post, firing):
                rec = {"case_id": c.case_id, "fact_id": c.fact.id, "pre": a["values"], "post": b["values"], "firing": g,
                       "detail": {"pre": a["detail"], "post": b["detail"]}, "seconds": per_case_s}
                if a.get("texts") or b.get("texts"):
                    rec["samples"] = {"pre": (a.get("texts") or [None])[0], "post": (b.get("texts") or [None])[0]}
                records.append(rep.clean_json(rec))
            run.append(records)
            bar.update(len(batch))
        bar.close()
        if tasks:
            general = _run_general(model, tok, db, run, tasks=tasks, limit=general_limit, batch_size=batch_size,
                                   data_dir=data_dir, confidence=confidence, timings=timings)
    finally:
        bar.close()
        unedited.close()

    records = sorted((run.done[c.fact.id] for c in cases), key=lambda r: order[r["fact_id"]])
    if reference is not None and any(r["post"].get("consistency") is None for r in records):
        warnings.append("some cases have no consistency score (no snippets for their target)")
    timings["total_this_call"] = time.perf_counter() - t_start
    timings["cases_seconds_all_calls"] = sum(r.get("seconds", 0.0) for r in records)
    result = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset_info | {"load_report": dataclasses.asdict(loaded.report)},
        "model": model_info,
        "store": store_info,
        "config": {"evaluate": {"dataset": dataset_info["name"], "split": split, "limit": limit, "metrics": selected,
                                "batch_size": batch_size, "chunk_size": chunk, "seed": seed,
                                "confidence": confidence, "only_stored": only_stored,
                                "fluency": fluency_cfg if plan.fluency else None,
                                "consistency_files": reference_paths, "general_tasks": tasks,
                                "general_limit": general_limit,
                                "output_dir": str(output_dir) if output_dir is not None else None,
                                "data_dir": str(data_dir) if data_dir is not None else os.environ.get("NEURALDB_DATA_DIR")}},
        "metrics": _summarize_metrics(kind, selected, cases, records, confidence, reference_paths,
                                      chat_skip=chat_metric.missing_chat_template(tok)),
        "firing": _summarize_firing(db, records, confidence),
        "general": general,
        "cases": records,
        "versions": _versions(),
        "timings": timings,
        "warnings": warnings,
    }
    result = rep.clean_json(result)
    if output_dir is not None:
        rep.write_report(result, output_dir)
    return result


def _run_general(model: Any, tok: Any, db: Any, run: RunFolder, *, tasks: list[str], limit: int | None,
                 batch_size: int, data_dir: Any, confidence: float, timings: dict[str, float]) -> dict[str, Any]:
    path = run.dir / "general.json" if run.dir is not None else None
    if path is not None and path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    module = _general_module()
    if data_dir is None and os.environ.get("NEURALDB_DATA_DIR"):
        data_dir = os.environ["NEURALDB_DATA_DIR"]
    result = rep.clean_json(module.run_general_tasks(model, tok, db, tasks=tasks, limit=limit, batch_size=batch_size,
                                                     data_dir=data_dir, confidence=confidence))
    timings["general"] = time.perf_counter() - t0
    if path is not None:
        rep.write_json(result, path)
    return result
