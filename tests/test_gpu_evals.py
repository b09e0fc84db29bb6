"""`tox -e gpu-evals` honours its size: the data-dir file that holds --n is chosen (or an error names the
files), ZsRE runs too, the edit options reach `neuraldb evaluate`, the job ends with `neuraldb gate`,
and `neuraldb evaluate --dry-run` prints the plan without loading the model."""

from __future__ import annotations

import argparse
import configparser
import json
import logging
from pathlib import Path

import pytest
from transformers import LlamaConfig

import neuraldb
from evals import gpu_evals
from evals.sources import choose_source
from neuraldb.cli import main

REPO = Path(__file__).resolve().parents[1]


def _rome(i):
    return {"case_id": i, "requested_rewrite": {"prompt": "{} is located in", "subject": f"city {i}",
                                                "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
            "paraphrase_prompts": ["x"], "neighborhood_prompts": ["y"]}


def _mend(i):
    return {"case_id": i, "prompt": f"city {i} is located in", "subject": f"city {i}", "target_new": "Rome",
            "ground_truth": "Paris", "rephrase_prompt": "x", "locality_prompt": "y", "locality_ground_truth": "z"}


@pytest.fixture
def data_dir(tmp_path):
    """A data dir laid out like ../shared/data, small: ROME test 3 cases, MEND edit 5, MEND train 6."""
    root = tmp_path / "data"
    for rel, records in (("counterfact_rome/counterfact_rome_test2191.json", [_rome(i) for i in range(3)]),
                         ("counterfact/counterfact-edit.json", [_mend(i) for i in range(5)]),
                         ("counterfact/counterfact-train.json", [_mend(i) for i in range(10, 16)])):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(records))
    return root


def test_the_first_file_that_holds_n_is_chosen(data_dir, caplog):
    assert choose_source("counterfact", n=3, data_dir=data_dir).path.name == "counterfact_rome_test2191.json"
    assert choose_source("counterfact", data_dir=data_dir).path.name == "counterfact_rome_test2191.json"  # n=None
    with caplog.at_level(logging.WARNING, logger="evals.sources"):
        choice = choose_source("counterfact", n=4, data_dir=data_dir)
    assert choice.path.name == "counterfact-edit.json" and choice.records == 5 and choice.enough
    assert "too small: counterfact_rome_test2191.json (3)" in caplog.text  # said, not silent
    short = choose_source("counterfact", n=6, data_dir=data_dir)
    assert not short.enough and short.records == 5
    assert [p.name for _, p, _ in short.others_holding(6)] == ["counterfact-train.json"]
    assert choose_source("counterfact", split="any", data_dir=data_dir).path.name == "counterfact-train.json"


def test_the_loader_reads_the_file_that_holds_the_limit(data_dir):
    from evals.datasets import load_counterfact

    cases = load_counterfact(data_dir=data_dir, limit=4)
    assert len(cases) == 4 and cases.report.source.endswith("counterfact-edit.json")


def _plan_args(data_dir, *extra):
    return ["evaluate", "--dry-run", "--data-dir", str(data_dir), "--model", "no-such-model", *extra]


def test_more_cases_than_any_file_of_the_split_holds_is_an_error_naming_the_files(data_dir, capsys):
    assert main(_plan_args(data_dir, "--n", "6")) == 2
    err = capsys.readouterr().err
    assert "--n 6" in err and "counterfact-edit.json (eval): 5" in err
    assert "counterfact-train.json (train split: 6)" in err and "--split any" in err and "--fewer-ok" in err


def test_fewer_ok_is_a_loud_warning_with_the_number_used(data_dir, capsys):
    assert main(_plan_args(data_dir, "--n", "9", "--split", "any", "--fewer-ok")) == 0
    out = capsys.readouterr().out
    assert "WARNING: --n 9 but" in out and "evaluating 6 (--fewer-ok)" in out
    assert "6 cases from" in out and "counterfact-train.json" in out


def _llama3_folder(tmp_path):
    folder = tmp_path / "Meta-Llama-3-8B"
    LlamaConfig(num_hidden_layers=32, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=100).save_pretrained(folder)
    return folder


def test_dry_run_prints_the_plan_without_loading_the_model(tmp_path, capsys, monkeypatch, shared_data):
    def no_load(*a, **k):
        raise AssertionError("the dry run loaded the model")

    monkeypatch.setattr(neuraldb, "load_model", no_load)
    model = _llama3_folder(tmp_path)
    assert main(["evaluate", "--dry-run", "--data-dir", str(shared_data), "--model", str(model), "--dataset",
                 "counterfact", "--n", "10000", "--general-tasks", "sciq,mmlu", "--general-limit", "50",
                 "--no-word-check", "--gamma", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "10,000 cases from" in out and "counterfact/counterfact-edit.json" in out  # not the 2,191 test file
    assert "counterfact_rome_test2191.json (eval): 2,191" in out
    assert "metrics: efficacy, generalization, specificity" in out
    assert "general tasks: sciq, mmlu (50 examples per task)" in out
    assert "layer  8      model row Llama-3-8B" in out and "lr     0.1    model row Llama-3-8B" in out
    assert "gamma 0.7, word check off" in out


def test_dry_run_of_a_builtin_model_not_yet_converted_says_resolved_at_load(tmp_path, capsys, monkeypatch,
                                                                               shared_data):
    from neuraldb import models

    monkeypatch.setattr(models, "model_config", lambda name, **k: (None, f"{name} is not converted yet"))
    assert main(["evaluate", "--dry-run", "--data-dir", str(shared_data), "--model", "gemma3-270m", "--n", "5"]) == 0
    assert "layer, lr, steps: resolved at load (gemma3-270m is not converted yet)" in capsys.readouterr().out


def test_word_check_flags_and_gamma_reach_the_edit_config():
    from evals.cli import _edit_config, add_evaluate_arguments

    p = argparse.ArgumentParser()
    add_evaluate_arguments(p)
    assert _edit_config(p.parse_args([])).word_check is True
    assert _edit_config(p.parse_args(["--no-word-check"])).word_check is False
    assert _edit_config(p.parse_args(["--no-word-check", "--word-check"])).word_check is True
    cfg = _edit_config(p.parse_args(["--gamma", "0.7", "--lr", "0.1", "--steps", "20"]))
    assert (cfg.gamma, cfg.lr, cfg.steps) == (0.7, 0.1, 20)
    assert p.parse_args(["--n", "all"]).n is None
    assert _edit_config(p.parse_args([])).early_stop == "nll"
    assert _edit_config(p.parse_args(["--early-stop", "loss"])).early_stop == "loss"


def _gpu_args(*argv):
    p = argparse.ArgumentParser()
    gpu_evals.add_gpu_evals_arguments(p)
    return p.parse_args(list(argv))


def test_gpu_evals_runs_counterfact_then_zsre_then_the_gate_with_the_options_forwarded(capsys):
    ran = []
    args = _gpu_args("--model", "m", "--no-word-check", "--gamma", "0.7", "--early-stop", "loss", "--output-dir", "out")
    assert gpu_evals.run_gpu_evals(args, run=lambda argv: ran.append(list(argv)) or 0) == 0
    cf, zsre, gate = ran
    assert cf[:8] == ["evaluate", "--dataset", "counterfact", "--split", "eval", "--n", "10000", "--general-tasks"]
    assert zsre[:9] == ["evaluate", "--dataset", "zsre", "--split", "any", "--n", "10000", "--fewer-ok",
                        "--output-dir"]
    for step in (cf, zsre):
        assert "--no-word-check" in step and step[step.index("--gamma") + 1] == "0.7"
        assert step[step.index("--early-stop") + 1] == "loss"
        assert step[step.index("--model") + 1] == "m" and step[step.index("--device") + 1] == "cuda"
    assert gate == ["gate", "--report", str(Path("out") / "report.json"), "--policy", "strict", "--output-dir", "out"]
    assert "$ neuraldb gate --report" in capsys.readouterr().out


def test_gpu_evals_stops_at_a_failing_step_and_returns_the_gates_code():
    ran = []
    assert gpu_evals.run_gpu_evals(_gpu_args(), run=lambda argv: ran.append(argv[0]) or 2) == 2
    assert ran == ["evaluate"]
    codes = iter([0, 0, 1])
    assert gpu_evals.run_gpu_evals(_gpu_args(), run=lambda argv: next(codes)) == 1  # the gate said no


def test_gpu_evals_dry_run_plans_both_datasets_and_runs_no_gate(tmp_path, capsys, monkeypatch, shared_data):
    monkeypatch.setattr(neuraldb, "load_model", lambda *a, **k: pytest.fail("the dry run loaded the model"))
    rc = main(["gpu-evals", "--dry-run", "--device", "cpu", "--data-dir", str(shared_data),
               "--model", str(_llama3_folder(tmp_path)), "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "10,000 cases from" in out and "counterfact-edit.json" in out
    assert "1,000 cases from" in out and "zsre_mend_train-1k.json" in out and "evaluating 1,000 (--fewer-ok)" in out
    assert "would run: neuraldb gate --report" in out
    assert not (tmp_path / "out").exists()


def test_tox_gpu_evals_runs_the_job_at_10000_facts():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(REPO / "tox.ini")
    commands = tox["testenv:gpu-evals"]["commands"]
    assert "neuraldb gpu-evals" in commands and "--n {env:NEURALDB_EVAL_N:10000}" in commands
    assert "{posargs}" in commands
