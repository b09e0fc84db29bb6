"""neuraldb.evaluate end to end on SmolLM2-135M with real CounterFact and zsRE facts.

A few minutes on a laptop CPU: 20 CounterFact + 5 zsRE facts are edited once per session,
fluency runs on one generation prompt per case with 20 new tokens.
"""

from __future__ import annotations

import json

import pytest

import neuraldb
from evals.datasets import load_counterfact, load_zsre
from evals.report import render_markdown

pytestmark = pytest.mark.slow
N_CF, N_ZSRE = 20, 5


@pytest.fixture(scope="session")
def cf_run(smollm2, shared_data, tmp_path_factory):
    model, tok = smollm2
    cases = load_counterfact(data_dir=shared_data, limit=N_CF)
    out = tmp_path_factory.mktemp("cf")
    db = neuraldb.edit(model, tok, [c.fact for c in cases], checkpoint=out / "store.safetensors", progress=False)
    report = neuraldb.evaluate(model, db, tokenizer=tok, dataset="counterfact", data_dir=shared_data,
                               output_dir=out, generation_prompts=1, generation_tokens=20, progress=False)
    return report, out


def test_counterfact_edits_work_and_neighbours_keep(cf_run):
    r, out = cf_run
    m = r["metrics"]
    assert r["dataset"]["n_cases"] == N_CF and r["dataset"]["only_stored"]
    assert m["efficacy"]["post"]["mean"] >= 90 and m["efficacy"]["post"]["mean"] - m["efficacy"]["pre"]["mean"] >= 40
    assert m["efficacy"]["test"]["p_value"] < 0.01
    assert m["generalization"]["post"]["mean"] > m["generalization"]["pre"]["mean"] + 20
    assert abs(m["specificity"]["post"]["mean"] - m["specificity"]["pre"]["mean"]) <= 8
    assert m["efficacy_magnitude"]["post"]["mean"] > 50
    assert 200 < m["fluency"]["pre"]["mean"] and abs(m["fluency"]["post"]["mean"] - m["fluency"]["pre"]["mean"]) < 100
    firing = r["firing"]["groups"]
    assert firing["edit"]["prompt_fire"]["mean"] >= 0.9 and firing["edit"]["own_prompt_rate"] >= 0.9
    assert firing["neighborhood"]["own_prompt_rate"] <= 0.1  # neighbours rarely retrieve the edited fact
    assert json.loads((out / "report.json").read_text())["metrics"] == m
    assert "| efficacy (%) |" in (out / "report.md").read_text()


def test_counterfact_rerun_recomputes_nothing(cf_run, smollm2, shared_data, monkeypatch):
    from evals import scoring

    r, out = cf_run
    model, _ = smollm2
    db = neuraldb.NeuralDB.load(out / "store.safetensors", model=model)

    def fail(**kw):
        raise AssertionError("a finished case was recomputed")

    monkeypatch.setattr(scoring, "counterfact_scores", fail)
    again = neuraldb.evaluate(model, db, dataset="counterfact", data_dir=shared_data,  # tokenizer from the alias
                              output_dir=out, generation_prompts=1, generation_tokens=20, progress=False)
    assert again["metrics"] == r["metrics"] and again["firing"] == r["firing"]


def test_zsre_token_accuracy_rises(smollm2, shared_data):
    model, tok = smollm2
    cases = load_zsre(data_dir=shared_data, limit=N_ZSRE)  # target = answers[0] (ROME/MEMIT protocol)
    db = neuraldb.edit(model, tok, [c.fact for c in cases], progress=False)
    r = neuraldb.evaluate(model, db, tokenizer=tok, dataset=cases, progress=False)
    m = r["metrics"]
    assert list(m) == ["efficacy", "generalization", "specificity"]
    assert m["efficacy"]["post"]["mean"] >= 80 and m["efficacy"]["post"]["mean"] > m["efficacy"]["pre"]["mean"] + 20
    assert abs(m["specificity"]["post"]["mean"] - m["specificity"]["pre"]["mean"]) <= 15
    assert "zsre" in render_markdown(r)
