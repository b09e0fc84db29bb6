"""What ``neuraldb gate`` judges: reports, stores, releases and base models, loaded and checked.

Example::

    from evals.gate_inputs import read_report, store_cases
    report, path = read_report("reports/cf/report.json", "report")   # a GateError if it is not one
    cases = store_cases(db)          # CounterFact-style cases from the facts saved in a store

Every problem is a :class:`~evals.decision.GateError` (or the store's / release's own
``StoreError``), whose message names the input and the fix; :mod:`evals.gate` turns them into
exit code 2.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from evals import report as rep
from evals.decision import GateError
from evals.policy import Policy
from neuraldb import config

__all__ = [
    "check_gamma", "check_report_is_of", "judged_sources", "load_base", "load_judged", "prepare_store", "read_report",
    "store_cases", "store_of_report", "store_summary",
]


def read_report(source: Any, what: str) -> tuple[dict[str, Any], str | None]:
    """(report, its path or None) from a report.json, its folder or a dict; a GateError unless it is one."""
    if isinstance(source, Mapping):
        data, path = dict(source), None
    else:
        path = str(source)
        try:
            data = rep.load_report(source)
        except (ValueError, UnicodeDecodeError, OSError) as exc:  # FileNotFoundError included
            raise GateError(f"{what}: {exc}") from None
    schema = str(data.get("schema", ""))
    if schema and not schema.startswith("neuraldb.evaluate"):
        raise GateError(f"{what} {path or ''} has schema {schema!r}, not an evaluation report (neuraldb.evaluate/1); "
                        "pass the report.json that neuraldb evaluate wrote")
    if not isinstance(data.get("metrics"), Mapping):
        raise GateError(f"{what} {path or ''} has no 'metrics' mapping: it is not a neuraldb evaluation report")
    return data, path


def store_cases(db: Any) -> list[Any]:
    """CounterFact-style evaluation cases built from the facts saved in the store (``dataset: store``).

    Each stored fact needs ``target_true`` (efficacy compares it with ``target_new``); its
    paraphrases and neighbourhood prompts give generalization and specificity.
    """
    from neuraldb.facts import Fact

    from evals.cases import EvalCase

    known = set(Fact.__dataclass_fields__)
    cases = []
    for index, fid in enumerate(db.ids):
        rec = db.facts.get(fid)
        if not rec:
            raise GateError(f"evaluation.dataset: store needs the facts saved in the store, but fact {fid!r} has no "
                            "saved prompt (stores written by neuraldb.edit keep them); set evaluation.dataset to "
                            "the dataset the facts came from (counterfact, zsre or a file)")
        fact = Fact.from_dict({k: v for k, v in rec.items() if k in known} | {"id": fid})
        if not fact.target_true:
            raise GateError(f"evaluation.dataset: store evaluates CounterFact-style facts, but fact {fid!r} has no "
                            "target_true; set evaluation.dataset to the dataset it came from (e.g. zsre)")
        cases.append(EvalCase(case_id=index, kind="counterfact", fact=fact))
    if not cases:
        raise GateError("the store is empty: there is nothing to evaluate")
    return cases


def prepare_store(db: Any, model: Any, gamma: float | None) -> Any:
    """The store (loaded from a file if a path), checked against ``model`` when given, with ``gamma`` set."""
    from neuraldb.store import NeuralDB

    if isinstance(db, (str, os.PathLike)):
        db = NeuralDB.load(db, model=model)
    elif model is not None:
        db.check_compatible(model)
    if gamma is not None:
        check_gamma(gamma)
        db.gamma = float(gamma)
    return db


def check_gamma(gamma: Any) -> float:
    """``gamma`` (``--gamma``) as a float if it is a cosine threshold, else a GateError."""
    return config.check_gamma(gamma, where="gamma", error=GateError)


def load_base(model: Any, db: Any, device: Any, dtype: Any) -> tuple[Any, Any]:
    """(model, tokenizer or None): ``model`` as given, loaded by name, or the store's own model name."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model, None
    from neuraldb.models import load_model
    from neuraldb.store import NeuralDB

    name = model
    if name is None:
        meta = NeuralDB.load(db) if isinstance(db, (str, os.PathLike)) else db
        name = meta.model_name
        if not name:
            raise GateError("the store does not record its base model; pass the model (--model)")
    try:
        return load_model(name, device=device, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise GateError(f"could not load the base model {str(name)!r}: {exc}") from None


def judged_sources(release: Any, db: Any, gamma: float | None) -> tuple[dict[str, Any], Any]:
    """What is judged, as gate.json records it; the release's verified manifest (None without a release)."""
    if release is not None and db is not None:
        raise GateError("give either a release or a store (db), not both")
    sources: dict[str, Any] = {"report": None, "baseline": None, "release": None, "store": None, "model": None,
                               "gamma_override": gamma}
    manifest = None
    if release is not None:
        from evals.release import verify_release

        manifest = verify_release(release)  # checksums before anything is loaded
        sources["release"], sources["model"] = os.fspath(release), manifest["base_model"]
    if isinstance(db, (str, os.PathLike)):
        sources["store"] = os.fspath(db)
    return sources, manifest


def store_of_report(report: Mapping[str, Any], path: str | None, *, release: Any, db: Any, model: Any,
                    gamma: float | None, manifest: Any) -> dict[str, Any] | None:
    """With a report and a release / store: check that the report is of that store; its summary."""
    if release is None and db is None:
        return None
    model_obj = None if model is None or isinstance(model, (str, os.PathLike)) else model
    if release is not None:
        from evals.release import load_store

        store = load_store(release, model=model_obj, gamma=gamma, manifest=manifest)
    else:
        store = prepare_store(db, model_obj, gamma)
    check_report_is_of(report, store, path)
    return store_summary(store)


def load_judged(pol: Policy, *, release: Any, db: Any, model: Any, tokenizer: Any, gamma: float | None,
                device: Any, dtype: Any) -> tuple[Any, Any, Any]:
    """(store, model, tokenizer) to evaluate: from the release, or the store and its base model."""
    pol.require_evaluation()
    if release is not None:
        from evals.release import load_release

        given = None
        if model is not None:
            given, tok0 = load_base(model, None, device, dtype)
            tokenizer = tokenizer if tokenizer is not None else tok0
        model_obj, tokenizer, store = load_release(release, gamma=gamma, model=given, tokenizer=tokenizer,
                                                   device=device, dtype=dtype, attach=False)
        return store, model_obj, tokenizer
    if db is None:
        raise GateError("nothing to judge: give a report (--report), a release (--release) or a store (--store)")
    model_obj, tok0 = load_base(model, db, device, dtype)
    return prepare_store(db, model_obj, gamma), model_obj, tokenizer if tokenizer is not None else tok0


def store_summary(db: Any) -> dict[str, Any]:
    from evals.runs import store_digest

    return {"facts": len(db), "layer": db.layer, "gamma": db.gamma, "model_name": db.model_name,
            "fingerprint": db.fingerprint, "digest": store_digest(db)}


def check_report_is_of(report: Mapping[str, Any], db: Any, path: str | None) -> None:
    from evals.runs import store_digest

    rs = report.get("store") or {}
    digest = store_digest(db)
    if rs.get("digest") and rs["digest"] != digest:
        diff = [k for k, v in (("gamma", db.gamma), ("facts", len(db)), ("layer", db.layer)) if rs.get(k) != v]
        raise GateError(f"the report {path or ''} was made with another store (digest {rs['digest']} vs {digest}"
                        f"{'; differs in ' + ', '.join(diff) if diff else ''}); evaluate this store (drop --report) or "
                        "pass the report of this store")
