"""neuraldb.evaluate on tiny random models: report structure, the closed gate, resuming,
configuration mismatches, intervals against scipy, case selection, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types

import pytest
import torch
from scipy import stats

import neuraldb
from evals import evaluate as ev
from evals import report as rep
from evals import scoring
from evals import stats as ev_stats
from evals.cases import EvalCase
from evals.config import EvalConfig, resolve_config
from evals.metrics.specs import METRICS
from neuraldb import EditConfig, Fact, NeuralDB

from conftest import tiny_model

# facts end on the subject (see test_edit.py): the tiny model's residual decides the next token
FACTS = [
    Fact(prompt="the city of {}", subject="the eiffel tower", target_new="rome", target_true="paris", id="e1",
         paraphrases=("the eiffel tower", "a city of the eiffel tower"),
         neighborhood=("the city of london", "the city of john")),
    Fact(prompt="the mother tongue of {}", subject="danielle darrieux", target_new="english",
         target_true="french", id="e2", paraphrases=("danielle darrieux",),
         neighborhood=("the mother tongue of john",)),
    Fact(prompt="the sport of {}", subject="lebron james", target_new="tennis", target_true="football", id="e3",
         paraphrases=("lebron james",), neighborhood=("the sport of mary", "the sport of bob")),
]
CASES = [EvalCase(case_id=i, kind="counterfact", fact=f,
                  generation_prompts=(f"the city of {f.subject}", f"{f.subject} is")) for i, f in enumerate(FACTS)]
CFG = EditConfig(layer=1, steps=80, lr=0.5, clamp_norm_factor=8.0, context_prefixes=("the", "i"), context_length=3,
                 batch_size=2)
FAST = dict(batch_size=2, generation_tokens=4, progress=False)
TOP_KEYS = {"schema", "created", "dataset", "model", "store", "config", "metrics", "firing", "general", "cases",
            "versions", "timings", "warnings"}


@pytest.fixture(scope="module")
def edited():
    model, tok = tiny_model("llama")
    db = neuraldb.edit(model, tok, FACTS, config=CFG, progress=False)
    return model, tok, db


def copy_store(db: NeuralDB, tmp_path, **changes) -> NeuralDB:
    path = db.save(tmp_path / f"copy-{len(list(tmp_path.iterdir()))}.safetensors")
    out = NeuralDB.load(path)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def deterministic(report):
    """The parts of a report that must not depend on timing or on where it was written."""
    cases = [{k: v for k, v in c.items() if k != "seconds"} for c in report["cases"]]
    return {"metrics": report["metrics"], "firing": report["firing"], "cases": cases, "store": report["store"],
            "dataset": report["dataset"]}


def test_report_structure_and_json(edited):
    model, tok, db = edited
    r = neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, **FAST)
    assert set(r) == TOP_KEYS and r["schema"] == ev.SCHEMA
    json.dumps(r, allow_nan=False)  # strict JSON
    assert list(r["metrics"]) == list(METRICS["counterfact"])
    eff = r["metrics"]["efficacy"]
    assert eff["kind"] == "proportion" and eff["pre"]["method"] == "wilson" and eff["unit"] == "%"
    assert eff["post"]["mean"] == 100.0 and eff["test"]["p_value"] is not None
    assert r["metrics"]["generalization"]["kind"] == "mean"  # 1-2 paraphrases per case: a mean of means
    assert r["metrics"]["consistency"]["skipped"] and "attribute_snippets.json" in r["metrics"]["consistency"]["reason"]
    assert r["metrics"]["fluency"]["pre"]["n"] == 3 and r["metrics"]["fluency"]["word_tokenizer"]
    assert [c["fact_id"] for c in r["cases"]] == ["e1", "e2", "e3"]
    case = r["cases"][0]
    assert set(case) >= {"case_id", "fact_id", "pre", "post", "firing", "detail", "samples", "seconds"}
    assert set(case["firing"]) == {"edit", "paraphrase", "neighborhood", "generation"}
    firing = r["firing"]["groups"]
    assert firing["edit"]["prompts"] == 3 and firing["paraphrase"]["prompts"] == 4
    assert firing["neighborhood"]["prompts"] == 5
    assert firing["edit"]["prompts_fired"] == 3 and firing["edit"]["prompts_fired_own"] == 3  # the subject's key fires
    assert r["firing"]["gamma"] == db.gamma and r["store"]["facts"] == 3 and r["store"]["digest"]
    assert r["store"]["edit"]["n"] == 3 and r["store"]["config"]["layer"] == 1
    assert r["dataset"]["load_report"]["loaded"] == 3 and r["dataset"]["n_cases"] == 3
    assert {"neuraldb", "torch", "transformers", "lm_eval", "python"} <= set(r["versions"])
    assert r["config"]["evaluate"]["confidence"] == 0.95 and r["timings"]["total_this_call"] > 0
    assert not db.is_attached and not hasattr(model, "_neuraldb_store")
    md = rep.render_markdown(r)
    assert "| efficacy (%) |" in md and "## Gate firing" in md and "consistency" in md
    assert "efficacy (%)" in rep.render_text(r)


def test_closed_gate_gives_identical_pre_and_post(edited, tmp_path):
    model, tok, db = edited
    closed = copy_store(db, tmp_path, gamma=1.0)  # cos > 1 never holds
    r = neuraldb.evaluate(model, closed, tokenizer=tok, dataset=CASES, **FAST)
    for c in r["cases"]:
        assert c["pre"] == c["post"] and c["detail"]["pre"] == c["detail"]["post"]
        assert c["samples"]["pre"] == c["samples"]["post"]
        assert all(g["fires"] == 0 and g["prompts_fired"] == 0 for g in c["firing"].values())
    for name, m in r["metrics"].items():
        if not m.get("skipped"):
            assert m["pre"] == m["post"] and m["difference"]["mean"] == 0, name
            assert m["test"]["p_value"] == 1.0
    for g in r["firing"]["groups"].values():
        assert g["fires"] == 0 and g["fire_rate"] == 0 and g["prompt_fire"]["mean"] == 0 and g["positions"] > 0


def test_resume_skips_finished_cases_and_matches_an_uninterrupted_run(edited, tmp_path, monkeypatch):
    model, tok, db = edited
    real = scoring.counterfact_scores
    seen: list[str] = []
    fail_on = {3}

    def counting(*, cases, **kw):
        seen.extend(c.fact.id for c in cases)
        if len(seen) in fail_on:
            raise KeyboardInterrupt("simulated kill")
        return real(cases=cases, **kw)

    monkeypatch.setattr(scoring, "counterfact_scores", counting)
    out = tmp_path / "run"
    kw = dict(tokenizer=tok, dataset=CASES, chunk_size=1, output_dir=out, **FAST)
    with pytest.raises(KeyboardInterrupt):  # chunk 1: pre+post done; chunk 2: pre raises
        neuraldb.evaluate(model, db, **kw)
    assert seen == ["e1", "e1", "e2"]
    lines = (out / "cases.jsonl").read_text().splitlines()
    assert [json.loads(x)["fact_id"] for x in lines] == ["e1"]
    assert not db.is_attached and not hasattr(model, "_neuraldb_store")
    assert not (out / "report.json").exists()

    fail_on.clear()
    seen.clear()
    resumed = neuraldb.evaluate(model, db, **kw)
    assert seen == ["e2", "e2", "e3", "e3"]  # e1 is not recomputed
    seen.clear()
    again = neuraldb.evaluate(model, db, **kw)  # everything done: nothing recomputed
    assert seen == [] and deterministic(again) == deterministic(resumed)
    whole = neuraldb.evaluate(model, db, **{**kw, "output_dir": tmp_path / "whole"})
    assert deterministic(resumed) == deterministic(whole)
    assert json.loads((out / "report.json").read_text())["metrics"] == whole["metrics"]
    assert (out / "report.md").read_text().startswith("# NeuralDB evaluation")


def test_cases_written_before_the_rename_resume_with_the_same_firing(edited, tmp_path, monkeypatch):
    """A cases.jsonl whose records keep the firing statistics under "gate" (written before the
    rename) resumes without recomputing anything and summarises to the same report["firing"]."""
    model, tok, db = edited
    out = tmp_path / "run"
    kw = dict(tokenizer=tok, dataset=CASES, output_dir=out, metrics=["efficacy"], **FAST)
    first = neuraldb.evaluate(model, db, **kw)
    path = out / "cases.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({("gate" if k == "firing" else k): v for k, v in r.items()}) + "\n"
                            for r in records))

    def fail(**kw):
        raise AssertionError("a finished case was recomputed")

    monkeypatch.setattr(scoring, "counterfact_scores", fail)
    again = neuraldb.evaluate(model, db, **kw)
    assert again["firing"] == first["firing"] and again["firing"]["groups"]["edit"]["prompts"] == 3
    assert again["metrics"] == first["metrics"]


def test_pre_from_reuses_an_earlier_runs_unedited_scores(edited, tmp_path, monkeypatch):
    """A second evaluation of more cases with another store scores the unedited model only on the
    cases the first run did not have; the report equals a run that scored everything."""
    model, tok, db = edited
    first = tmp_path / "first"
    neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES[:2], output_dir=first, **FAST)
    other = copy_store(db, tmp_path, gamma=0.7)
    whole = neuraldb.evaluate(model, other, tokenizer=tok, dataset=CASES, **FAST)
    real, phases = scoring.score, []
    monkeypatch.setattr(scoring, "score", lambda m, t, cases, *a: phases.append((a[-1], [c.fact.id for c in cases]))
                        or real(m, t, cases, *a))
    reused = neuraldb.evaluate(model, other, tokenizer=tok, dataset=CASES, pre_from=first, **FAST)
    assert [ids for phase, ids in phases if phase == "pre"] == [["e3"]]  # e1, e2: from the first run
    assert sorted(ids for phase, ids in phases if phase == "post") == [["e1", "e2"], ["e3"]]
    assert reused["config"]["evaluate"]["pre_reused"] == 2 and reused["config"]["evaluate"]["pre_from"] == str(first)
    assert reused["metrics"] == whole["metrics"]
    assert [{k: v for k, v in c.items() if k not in ("seconds", "pre_reused")} for c in reused["cases"]] == \
        [{k: v for k, v in c.items() if k != "seconds"} for c in whole["cases"]]


def test_pre_from_another_configuration_is_refused(edited, tmp_path):
    model, tok, db = edited
    first = tmp_path / "first"
    neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, output_dir=first, metrics=["efficacy"], **FAST)
    with pytest.raises(ValueError, match="pre_from=.*another metrics"):
        neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, pre_from=first, metrics=["specificity"], **FAST)
    with pytest.raises(ValueError, match="pre_from=.*no run.json"):
        neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, pre_from=tmp_path / "none", **FAST)


def test_torn_last_line_is_dropped(edited, tmp_path):
    model, tok, db = edited
    out = tmp_path / "run"
    kw = dict(tokenizer=tok, dataset=CASES, chunk_size=1, output_dir=out, metrics=["efficacy"], **FAST)
    first = neuraldb.evaluate(model, db, **kw)
    path = out / "cases.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing case 2
    again = neuraldb.evaluate(model, db, **kw)
    assert deterministic(again) == deterministic(first)
    assert len(path.read_text().splitlines()) == 3


def test_configuration_mismatch_is_an_error(edited, tmp_path):
    model, tok, db = edited
    out = tmp_path / "run"
    neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, output_dir=out, metrics=["efficacy"], **FAST)
    with pytest.raises(ValueError, match=r"different configuration \(differs in: metrics"):
        neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, output_dir=out, metrics=["specificity"], **FAST)
    with pytest.raises(ValueError, match="store.digest, store.gamma"):
        neuraldb.evaluate(model, copy_store(db, tmp_path, gamma=0.7), tokenizer=tok, dataset=CASES,
                          output_dir=out, metrics=["efficacy"], **FAST)
    with pytest.raises(ValueError, match="dataset.cases_digest, dataset.n_cases"):
        neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES[:2], output_dir=out, metrics=["efficacy"], **FAST)


def test_intervals_and_tests_match_scipy(edited):
    model, tok, db = edited
    r = neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, confidence=0.9, **FAST)
    m = r["metrics"]["efficacy_magnitude"]
    pre = [c["pre"]["efficacy_magnitude"] for c in r["cases"]]
    post = [c["post"]["efficacy_magnitude"] for c in r["cases"]]
    n = len(post)
    lo, hi = stats.t.interval(0.9, n - 1, loc=sum(post) / n, scale=stats.sem(post))
    assert m["post"]["ci"] == pytest.approx([100 * lo, 100 * hi], rel=1e-9)
    assert m["post"]["mean"] == pytest.approx(100 * sum(post) / n)
    diffs = [b - a for a, b in zip(pre, post)]
    lo, hi = stats.t.interval(0.9, n - 1, loc=sum(diffs) / n, scale=stats.sem(diffs))
    assert m["difference"]["ci"] == pytest.approx([100 * lo, 100 * hi], rel=1e-9)
    assert m["test"]["p_value"] == pytest.approx(stats.ttest_rel(post, pre).pvalue, rel=1e-9)
    e = r["metrics"]["efficacy"]
    k = sum(c["pre"]["efficacy"] for c in r["cases"])
    ci = stats.binomtest(int(k), n).proportion_ci(confidence_level=0.9, method="wilson")
    assert e["pre"]["ci"] == pytest.approx([100 * ci.low, 100 * ci.high], rel=1e-9)


def test_stats_helpers_against_closed_forms():
    z = stats.norm.ppf(0.975)
    k, n = 7, 20
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert ev_stats.proportion_ci(k, n)["ci"] == pytest.approx([centre - half, centre + half], rel=1e-9)
    vals = [0.2, 0.4, 0.9, 1.0]
    sd = stats.tstd(vals)
    t = stats.t.ppf(0.975, 3)
    mean = sum(vals) / 4
    assert ev_stats.mean_ci(vals)["ci"] == pytest.approx([mean - t * sd / 2, mean + t * sd / 2], rel=1e-9)
    mc = ev_stats.paired_test([0, 0, 0, 1, 1], [1, 1, 1, 1, 0], test="mcnemar_exact")
    assert (mc["gained"], mc["lost"]) == (3, 1) and mc["p_value"] == pytest.approx(stats.binomtest(3, 4).pvalue)
    assert ev_stats.paired_test([1, 1], [1, 1], test="mcnemar_exact")["p_value"] == 1.0
    assert ev_stats.mean_ci([])["mean"] is None and ev_stats.mean_ci([0.5])["ci"] is None
    assert ev_stats.mean_ci([0.5, 0.5])["ci"] == [0.5, 0.5]
    assert rep.clean_json({"a": (float("nan"), 1)}) == {"a": [None, 1]}


def test_dataset_path_selects_the_stored_cases(edited, tmp_path):
    model, tok, db = edited
    records = [{"case_id": i, "pararel_idx": i,
                "requested_rewrite": {"prompt": f.prompt, "relation_id": "P1", "subject": f.subject,
                                      "target_new": {"str": f.target_new, "id": "Q1"},
                                      "target_true": {"str": f.target_true, "id": "Q2"}},
                "paraphrase_prompts": list(f.paraphrases), "neighborhood_prompts": list(f.neighborhood),
                "attribute_prompts": [], "generation_prompts": []} for i, f in enumerate(FACTS)]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"none of the 3 dataset cases is in the store .*'e1'.*'counterfact-0'"):
        neuraldb.evaluate(model, db, tokenizer=tok, dataset=path, **FAST)
    stored = neuraldb.edit(model, tok, [Fact(**{**FACTS[1].to_dict(), "id": "counterfact-1"})],
                           config=CFG, progress=False)
    r = neuraldb.evaluate(model, stored, tokenizer=tok, dataset=path, metrics="efficacy specificity", **FAST)
    assert [c["fact_id"] for c in r["cases"]] == ["counterfact-1"] and list(r["metrics"]) == ["efficacy", "specificity"]
    from datasets import Dataset, DatasetDict  # the same records as a datasets.Dataset, or a DatasetDict's split

    for given in (Dataset.from_list(records), DatasetDict({"eval": Dataset.from_list(records)})):
        again = neuraldb.evaluate(model, stored, tokenizer=tok, dataset=given, metrics="efficacy specificity", **FAST)
        assert [c["fact_id"] for c in again["cases"]] == ["counterfact-1"]
        assert again["metrics"]["efficacy"] == r["metrics"]["efficacy"]
    assert r["dataset"]["only_stored"] is True and r["dataset"]["load_report"]["records"] == 3
    assert "fluency" not in r["metrics"] and "generation" not in r["firing"]["groups"]
    r = neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, limit=2, metrics=["efficacy"], **FAST)
    assert r["dataset"]["n_cases"] == 2
    with pytest.raises(ValueError, match="did you mean 'efficacy'"):
        neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, metrics=["eficacy"], **FAST)
    moved = [EvalCase(case_id=0, kind="counterfact", fact=Fact(**{**FACTS[0].to_dict(), "target_new": "berlin"}))]
    with pytest.raises(ValueError, match="was edited to 'rome' but the case's target_new is 'berlin'"):
        neuraldb.evaluate(model, db, tokenizer=tok, dataset=moved, **FAST)


def test_attachment_state_is_restored(edited):
    model, tok, db = edited
    db.attach(model)
    try:
        r = neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, metrics=["efficacy"], **FAST)
        assert db.is_attached and model._neuraldb_store is db
        assert r["metrics"]["efficacy"]["pre"]["mean"] < 100  # pre ran without the store
    finally:
        db.detach()


def test_zsre_cases(edited):
    model, tok, db = edited
    cases = [EvalCase(case_id=i, kind="zsre", fact=f, loc_prompt="the city of london", loc_answer="is")
             for i, f in enumerate(FACTS)]
    r = neuraldb.evaluate(model, db, tokenizer=tok, dataset=cases, **FAST)
    assert list(r["metrics"]) == ["efficacy", "generalization", "specificity"]
    assert all(m["kind"] == "mean" for m in r["metrics"].values())
    assert r["metrics"]["efficacy"]["post"]["mean"] == 100.0
    assert set(r["cases"][0]["firing"]) == {"edit", "paraphrase", "neighborhood"}


def test_general_tasks_through_a_fake_module(edited, tmp_path, monkeypatch):
    model, tok, db = edited
    calls = []

    def run_general_tasks(model_, tokenizer, store, **kw):
        calls.append(kw)
        assert store is db and not db.is_attached
        return {"tasks": {t: {"metric": "acc", "before": 0.5, "after": 0.5, "difference": 0.0} for t in kw["tasks"]}}

    monkeypatch.setitem(sys.modules, "evals.general", types.SimpleNamespace(run_general_tasks=run_general_tasks))
    out = tmp_path / "run"
    kw = dict(tokenizer=tok, dataset=CASES, metrics=["efficacy"], output_dir=out, general_tasks="all",
              general_limit=5, **FAST)
    r = neuraldb.evaluate(model, db, **kw)
    from evals.tasks import SIX_TASKS

    assert calls[0]["tasks"] == list(SIX_TASKS) and calls[0]["limit"] == 5 and calls[0]["batch_size"] == 2
    assert set(r["general"]["tasks"]) == set(SIX_TASKS) and (out / "general.json").exists()
    assert "| mmlu |" in rep.render_markdown(r)
    neuraldb.evaluate(model, db, **kw)
    assert len(calls) == 1  # resumed from general.json

    monkeypatch.setitem(sys.modules, "evals.general", None)  # the module is not there
    with pytest.raises(ModuleNotFoundError, match="general_tasks needs evals.general"):
        neuraldb.evaluate(model, db, **{**kw, "output_dir": tmp_path / "other"})
    assert not (tmp_path / "other").exists()  # failed before any work


def test_options_as_a_frozen_config_or_as_keywords(edited):
    model, tok, db = edited
    cfg = EvalConfig(metrics="efficacy, specificity", batch_size=2, limit=2, seed=1, confidence=0.9)
    assert cfg.metrics == ("efficacy", "specificity") and cfg.chunk == 2 and cfg.general_tasks is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.limit = 3  # type: ignore[misc]
    by_config = neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, config=cfg, progress=False)
    by_keywords = neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, metrics=["efficacy", "specificity"],
                                    batch_size=2, limit=2, seed=1, confidence=0.9, progress=False)
    assert deterministic(by_config) == deterministic(by_keywords)
    assert by_config["config"]["evaluate"] == by_keywords["config"]["evaluate"]
    assert by_config["config"]["evaluate"]["metrics"] == ["efficacy", "specificity"]
    overridden = neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, config=cfg, limit=1, progress=False)
    assert overridden["dataset"]["n_cases"] == 1 and overridden["config"]["evaluate"]["confidence"] == 0.9
    assert cfg.limit == 2  # the given config is not changed
    with pytest.raises(TypeError, match=r"'bath_size' \(did you mean 'batch_size'\?\)"):
        neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, bath_size=2)
    with pytest.raises(TypeError, match="config must be an EvalConfig"):
        neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, config={"limit": 2})


@pytest.mark.parametrize("options, message", [
    ({"confidence": 1.0}, r"confidence must lie in \(0, 1\), got 1.0"),
    ({"confidence": "high"}, "confidence must be a number"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"chunk_size": 0}, "chunk_size must be >= 1 or None, got 0"),
    ({"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
    ({"limit": -1}, "limit must be >= 0 or None, got -1"),
    ({"generation_tokens": -5}, "generation_tokens must be >= 0"),
    ({"split": ""}, "split must be a split name"),
    ({"only_stored": "yes"}, "only_stored must be True, False or None"),
    ({"metrics": []}, "metrics names no metric"),
    ({"metrics": ["eficacy"]}, r"unknown metric\(s\) \['eficacy'\] \(did you mean 'efficacy' for 'eficacy'\?\) in metrics"),
    ({"consistency_files": 3}, "consistency_files must be a folder or a mapping"),
])
def test_config_errors_name_the_field_and_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**options)


def test_config_resolves_general_tasks_and_checks_them_now(monkeypatch):
    from evals.tasks import SIX_TASKS

    assert EvalConfig(general_tasks="all").general_tasks == SIX_TASKS
    assert EvalConfig(general_tasks="sciq, all").general_tasks == (*SIX_TASKS,)
    assert EvalConfig(general_tasks="").general_tasks is None and EvalConfig(general_tasks=[]).general_tasks is None
    assert resolve_config(EvalConfig(general_tasks="all"), batch_size=4).general_tasks == SIX_TASKS
    monkeypatch.setitem(sys.modules, "evals.general", None)
    with pytest.raises(ModuleNotFoundError, match="general_tasks needs evals.general"):
        EvalConfig(general_tasks=["sciq"])


def test_tokenizer_resolved_from_a_model_directory(edited, tmp_path):
    model, tok, db = edited
    tok.save_pretrained(tmp_path / "m")
    model.config.name_or_path = str(tmp_path / "m")
    try:
        r = neuraldb.evaluate(model, db, dataset=CASES, metrics=["efficacy"], **FAST)
        assert r["metrics"]["efficacy"]["post"]["mean"] == 100.0
    finally:
        model.config.name_or_path = "tiny-llama"
    with pytest.raises(ValueError, match="pass tokenizer="):
        neuraldb.evaluate(model, db, dataset=CASES, **FAST)


def _saved_model_and_zsre_file(tmp_path):
    """A tiny model saved at tmp_path/model and FACTS as a zsRE file (its path): what the CLI reads."""
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    records = [{"subject": f.subject, "src": f.text, "rephrase": f.paraphrases[0], "alt": "x",
                "answers": [f.target_new], "loc": "the city of", "loc_ans": "london", "pred": "", "cond": ""}
               for f in FACTS]
    data = tmp_path / "z.json"
    data.write_text(json.dumps(records))
    return data


def test_cli_evaluate_resume_and_compare(tmp_path, capsys, monkeypatch):
    from neuraldb.cli import main

    data = _saved_model_and_zsre_file(tmp_path)
    args = ["evaluate", "--model", str(tmp_path / "model"), "--dataset", str(data), "--n", "2", "--layer", "1",
            "--batch-size", "2", "--output-dir", str(tmp_path / "a"), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "efficacy (%)" in out and "gate firing" in out and "report:" in out
    assert (tmp_path / "a" / "store.safetensors").exists() and (tmp_path / "a" / "report.md").exists()
    saved = json.loads((tmp_path / "a" / "report.json").read_text())
    assert saved["dataset"]["kind"] == "zsre" and saved["dataset"]["n_cases"] == 2
    assert "edit_this_call" in saved["timings"] and saved["config"]["cli"]["n"] == 2
    assert main(args) == 0  # resumes: the store from the checkpoint, the cases from cases.jsonl
    assert len((tmp_path / "a" / "cases.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--dataset", str(data), "--n", "2",
                 "--store", str(tmp_path / "a" / "store.safetensors"), "--gamma", "0.9", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "b"), "--quiet", "--metrics", "efficacy,specificity"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "efficacy" in out and "store.gamma: 0.65 -> 0.9" in out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "nope.json")]) == 2
    real_locate = neuraldb.locate_subject

    def locate(tokenizer, template, subject):  # as SmolLM2 does with zsRE's "What's Your Hurry??"
        if subject == "lebron james":
            raise neuraldb.FactError("field 'subject': the last token runs past the subject")
        return real_locate(tokenizer, template, subject)

    monkeypatch.setattr(neuraldb, "locate_subject", locate)
    capsys.readouterr()
    assert main([*args[:5], "--n", "3", *args[7:-3], "--output-dir", str(tmp_path / "c"), "--metrics", "efficacy",
                 "--quiet"]) == 0
    assert "1 fact(s) cannot be edited" in capsys.readouterr().out
    saved = json.loads((tmp_path / "c" / "report.json").read_text())
    assert saved["dataset"]["n_cases"] == 2 and "zsre-2: field 'subject'" in saved["warnings"][-1]
    assert saved["dataset"]["load_report"]["records"] == 3
    capsys.readouterr()
    # checked before the model is loaded (the model name here does not even exist)
    assert main(["evaluate", "--model", "no-such-model", "--metrics", "eficacy"]) == 2
    assert "unknown counterfact metric(s) ['eficacy']" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "evals.general", None)
    assert main(["evaluate", "--model", "no-such-model", "--general-tasks", "all"]) == 2
    assert "general_tasks needs evals.general" in capsys.readouterr().err


def test_cli_evaluate_edit_options_reach_the_edit(tmp_path, capsys, monkeypatch):
    """--chat-residuals / --residual-dtype make the edit's EditConfig; with --store (no edit) they are an error."""
    from neuraldb.cli import main

    data = _saved_model_and_zsre_file(tmp_path)
    seen = []
    real_edit = neuraldb.edit

    def edit(*a, config, **kw):
        seen.append(config)
        return real_edit(*a, config=config, **kw)

    monkeypatch.setattr(neuraldb, "edit", edit)
    base = ["evaluate", "--model", str(tmp_path / "model"), "--dataset", str(data), "--n", "1", "--layer", "1",
            "--metrics", "efficacy", "--quiet"]
    assert main([*base, "--output-dir", str(tmp_path / "a"), "--chat-residuals", "--residual-dtype", "bfloat16"]) == 0
    assert seen[-1].chat_residuals is True and seen[-1].residual_dtype == "bfloat16"
    assert main([*base, "--output-dir", str(tmp_path / "b")]) == 0
    assert seen[-1].chat_residuals is False and seen[-1].residual_dtype == "auto"  # EditConfig's default
    assert main([*base, "--output-dir", str(tmp_path / "c"), "--residual-dtype", "model"]) == 0
    assert seen[-1].residual_dtype is None  # "model": the model's own dtype
    capsys.readouterr()
    store = str(tmp_path / "a" / "store.safetensors")
    assert main([*base, "--store", store, "--chat-residuals"]) == 2
    assert "with --store nothing is edited" in capsys.readouterr().err
