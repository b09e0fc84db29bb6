"""General abilities (six lm-eval tasks) before/after on SmolLM2, offline from the shared data dir;
the offline task overrides; the paired statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

import neuraldb  # noqa: E402
from neuraldb import Trace, resolve_arch  # noqa: E402
from neuraldb.store import layer_fingerprint  # noqa: E402

from evals.general import SIX_TASKS, run_general_tasks  # noqa: E402
from evals.stats import mean_ci, paired_test, perplexity_ci, proportion_ci  # noqa: E402
from evals.tasks import offline_include_path  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
LIMIT = 1  # examples per task (per subject for MMLU: 57 questions); keeps the file near 3 min on 2 cores
SUBJECTS = ["The Eiffel Tower", "LeBron James", "Danielle Darrieux", "Microsoft Windows"]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        mp.setenv("NEURALDB_CACHE_DIR", str(tmp_path_factory.mktemp("neuraldb_cache")))
        yield


# ----------------------------------------------------------------------------- statistics (no model)


def test_wilson_interval_and_mcnemar():
    low, high = proportion_ci(8, 10)["ci"]
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert proportion_ci(0, 3)["ci"][0] == 0.0
    assert proportion_ci(2, 2)["ci"][1] == 1.0
    test = paired_test([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0], test="mcnemar_exact")
    assert (test["lost"], test["gained"]) == (5, 0) and test["p_value"] == pytest.approx(0.0625)
    assert paired_test([1, 0, 1], [1, 0, 1], test="mcnemar_exact")["p_value"] == 1.0


def test_continuous_interval_and_wilcoxon():
    lls = [-1.0, -2.0, -3.0, -2.5]
    low, high = perplexity_ci(lls)
    assert low < math.exp(2.125) < high  # perplexity = exp(-mean log-likelihood)
    assert mean_ci([0.5])["ci"] is None
    assert paired_test(lls, lls, test="wilcoxon")["p_value"] == 1.0
    shifted = paired_test(lls, [x - 1.0 - 0.1 * i for i, x in enumerate(lls)], test="wilcoxon")
    assert shifted["name"] == "wilcoxon" and shifted["nonzero"] == 4 and shifted["mean_difference"] < 0


# ----------------------------------------------------------------------------- offline task overrides


def test_offline_include_path_is_absolute_and_checked(offline, shared_data, tmp_path):
    folder = offline_include_path(shared_data, cache_dir=tmp_path / "tasks")
    assert offline_include_path(shared_data, cache_dir=tmp_path / "tasks") == folder  # reused
    names = {p.name for p in folder.glob("*.yaml")}
    assert {"sciq.yaml", "commonsense_qa.yaml", "arc_challenge.yaml", "lambada_openai.yaml", "wsc273.yaml",
            "mmlu_anatomy.yaml"} <= names and len(names) == 5 + 57
    text = (folder / "sciq.yaml").read_text()
    assert f'"{shared_data.resolve()}/sciq/sciq_test.jsonl"' in text and "${" not in text
    partial = tmp_path / "partial"
    (partial / "sciq").mkdir(parents=True)
    (partial / "sciq" / "sciq_test.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="lambada_test.jsonl"):
        offline_include_path(partial, cache_dir=tmp_path / "tasks")


def test_mmlu_group_reads_the_local_file(offline, shared_data):
    from lm_eval.tasks import TaskManager

    rows = [json.loads(line) for line in (shared_data / "mmlu" / "mmlu_test.jsonl").open()]
    dev = [json.loads(line) for line in (shared_data / "mmlu" / "mmlu_dev.jsonl").open()]
    loaded = TaskManager(include_path=str(offline_include_path(shared_data))).load(["mmlu"])
    assert len(loaded["tasks"]) == 57 and "mmlu_stem" in loaded["groups"]
    assert sum(len(t.eval_docs) for t in loaded["tasks"].values()) == len(rows) == 14042
    anatomy = loaded["tasks"]["mmlu_anatomy"]
    local = [r for r in rows if r["subject"] == "anatomy"]
    assert len(anatomy.eval_docs) == len(local)
    assert anatomy.eval_docs[0]["question"] == local[0]["question"]
    assert [d["question"] for d in anatomy.fewshot_docs()] == [r["question"] for r in dev if r["subject"] == "anatomy"]


# ----------------------------------------------------------------------------- SmolLM2, six tasks


def subject_key_store(model, tok, gamma=0.65):
    """A store keyed on the real layer activations of a few subjects, with large random residuals:
    wherever it fires the output visibly changes, wherever it does not nothing may change."""
    arch = resolve_arch(model)
    layer = arch.default_layer
    name = arch.mlp_out_at(layer)
    keys = []
    for subject in SUBJECTS:
        enc = tok(subject, return_tensors="pt")
        with torch.no_grad(), Trace(model, name, retain_input=True, retain_output=False, stop=True) as t:
            model(**enc)
        keys.append(t.input[0, -1].float())
    d_model = model.get_input_embeddings().weight.shape[1]
    db = neuraldb.NeuralDB(
        layer=layer, d_key=keys[0].shape[0], d_model=d_model, gamma=gamma, module_template=arch.mlp_out,
        residual_template=arch.residual_out, model_name="smollm2-135m", fingerprint=layer_fingerprint(model, name),
    )
    g = torch.Generator().manual_seed(0)
    db.add([f"s{i}" for i in range(len(keys))], torch.stack(keys), 20 * torch.randn(len(keys), d_model, generator=g))
    return db


@pytest.fixture(scope="module")
def report(offline, smollm2, shared_data):
    model, tok = smollm2
    db = subject_key_store(model, tok)
    db.attach(model)  # run_general_tasks must detach it for the unedited run and re-attach it after
    try:
        out = run_general_tasks(model, tok, db, limit=LIMIT, batch_size=8, data_dir=shared_data)
        assert db.is_attached and model._neuraldb_store is db
    finally:
        db.detach()
    return out


@pytest.mark.slow
def test_six_tasks_before_and_after(report):
    assert list(report["tasks"]) == list(SIX_TASKS)
    json.dumps(report)  # JSON-serialisable as it is
    expected_metric = {"mmlu": "acc", "sciq": "acc", "commonsense_qa": "acc", "arc_challenge": "acc",
                       "lambada_openai": "perplexity", "wsc273": "acc"}
    for name, t in report["tasks"].items():
        assert t["metric"] == expected_metric[name] and t["shots"] == 0
        assert t["n"] == (57 * LIMIT if name == "mmlu" else LIMIT)
        assert isinstance(t["before"], float) and isinstance(t["after"], float)
        assert t["difference"] == pytest.approx(t["after"] - t["before"])
        assert t["test"]["name"] == ("wilcoxon" if name == "lambada_openai" else "mcnemar_exact")
        if name != "lambada_openai":
            assert 0.0 <= t["ci_before"][0] <= t["before"] <= t["ci_before"][1] <= 1.0
        assert t["firing"]["positions"] > 0 and t["firing"]["examples"] == t["n"]
    assert set(report["tasks"]["sciq"]["metrics"]) == {"acc", "acc_norm"}
    assert set(report["tasks"]["lambada_openai"]["metrics"]) == {"perplexity", "acc"}
    assert report["tasks"]["mmlu"]["subtasks"] == 57


@pytest.mark.slow
def test_where_the_gate_never_fired_nothing_changed(report):
    quiet = 0
    for name, t in report["tasks"].items():
        fired = set(t["firing"]["fired_examples"])
        assert set(t["changed_examples"]) <= fired, name  # a change without a fire is a leak
        if not fired:
            quiet += 1
            assert t["identical_outputs"] and t["identical_predictions"] and t["identical_fraction"] == 1.0
            assert t["before"] == t["after"] and t["test"]["p_value"] == 1.0
    assert quiet >= 1
