"""``neuraldb gate``: policy validation, the decision rules on synthetic reports, the compare path
(no re-run), and the exit codes on real small runs with a tiny model (pass, gamma 0 fails on the
firing criterion, corrupt store and wrong base model are input errors)."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import yaml

import neuraldb
from evals import report as rep
from evals.compare import compare_reports
from evals import stats
from evals.decision import GateError, decide
from evals.gate import add_gate_arguments, run_gate
from evals.policy import PolicyError, load_policy, resolve_policy

from conftest import SHARED_DATA, tiny_model

POLICY = {
    "version": 1,
    "confidence": 0.95,
    "evaluation": {"dataset": "store", "n": 10, "general_tasks": ["sciq"], "general_limit": 4, "batch_size": 4},
    "criteria": {"efficacy_min": 80, "generalization_min": 30, "specificity_max_drop": 10, "general_max_drop": 10,
                 "general_max_firing_rate": 0.05},
    "regression": {"efficacy_max_drop": 5, "generalization_max_drop": 5, "specificity_max_drop": 5,
                   "general_max_drop": 5},
}


def policy(**criteria):
    p = json.loads(json.dumps(POLICY))
    p["criteria"].update(criteria)
    return p


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="neuraldb gate")
    add_gate_arguments(parser)
    return run_gate(parser.parse_args([str(a) for a in argv]))


# ----------------------------------------------------------------------------- synthetic reports


def _ones(n: int, k: int, seed: int) -> list[float]:
    vals = [1.0] * k + [0.0] * (n - k)
    random.Random(seed).shuffle(vals)
    return vals


def synthetic_report(*, n=40, efficacy=(0, 38), generalization=(2, 30), specificity=(32, 31), general=None,
                     model="tiny", fact_prefix="f", post_override=None):
    """A report in evaluate()'s format: per-case 0/1 values (counts of 1s pre/post) and their summaries."""
    cases = [{"fact_id": f"{fact_prefix}{i}", "case_id": i, "pre": {}, "post": {}} for i in range(n)]
    metrics = {}
    for name, (k_pre, k_post) in (("efficacy", efficacy), ("generalization", generalization),
                                  ("specificity", specificity)):
        pre = _ones(n, k_pre, 1)
        post, flip = list(pre), k_post - k_pre  # flip exactly |k_post - k_pre| cases (all one way)
        for i in [i for i, v in enumerate(pre) if v == (0.0 if flip > 0 else 1.0)][: abs(flip)]:
            post[i] = 1.0 - post[i]
        post = (post_override or {}).get(name, post)
        for c, a, b in zip(cases, pre, post):
            c["pre"][name], c["post"][name] = a, b
        metrics[name] = {"unit": "%", "scale": 100} | stats.summarize_metric(pre, post, kind="proportion", scale=100)
    return {"schema": "neuraldb.evaluate/1", "metrics": metrics, "cases": cases,
            "dataset": {"name": "<cases>", "kind": "counterfact", "n_cases": n}, "model": {"name": model},
            "store": {"facts": n, "gamma": 0.65, "layer": 1}, "config": {"evaluate": {"confidence": 0.95}},
            "firing": {"groups": {"edit": {"fire_rate": 0.2, "prompt_fire": {"mean": 1.0}}}},
            "general": None if general is None else {"config": {"tasks": list(general), "limit": 100},
                                                     "tasks": general}}


def general_task(*, n=100, before=60, after=60, lost=0, rate=0.0):
    """One general task: ``before``/``after`` correct out of ``n`` (``lost`` right->wrong flips)."""
    b = [1.0] * before + [0.0] * (n - before)
    a = list(b)
    for i in range(lost):
        a[i] = 0.0
    gained = after - (before - lost)
    for i in range(before, before + gained):
        a[i] = 1.0
    return {"metric": "acc", "n": n, "before": sum(b) / n, "after": sum(a) / n, "higher_is_better": True,
            "difference": (sum(a) - sum(b)) / n, "ci_before": stats.proportion_ci(int(sum(b)), n)["ci"],
            "ci_after": stats.proportion_ci(int(sum(a)), n)["ci"],
            "test": stats.paired_test(b, a, test="mcnemar_exact"),
            "firing": {"fires": int(rate * 1000), "positions": 1000, "rate": rate, "examples": n,
                       "examples_fired": 0, "fraction_examples_fired": 0.0}, "metrics": {}}


def statuses(result):
    return {c["name"]: c["status"] for c in result["criteria"]}


# ----------------------------------------------------------------------------- policy


def test_packaged_policies_load():
    default = resolve_policy("default")
    assert default.evaluation.dataset == "store" and default.criteria.general_max_firing_rate is not None
    strict = resolve_policy("strict")
    assert strict.criteria.minimum_rule == "ci_low" and strict.criteria.general_max_drop_per_task
    assert load_policy(POLICY).alpha == pytest.approx(0.05)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda p: p["criteria"].pop("efficacy_min"), "field 'criteria.efficacy_min' is missing; add it, e.g. efficacy_min: 80"),
    (lambda p: p.pop("confidence"), "field 'confidence' is missing"),
    (lambda p: p.__setitem__("confidence", 95), "field 'confidence' is 95.0.*use a level in \\(0, 1\\)"),
    (lambda p: p["criteria"].__setitem__("efficacy_mni", 3), "'criteria.efficacy_mni' is not a policy field; did you mean 'criteria.efficacy_min'"),
    (lambda p: p["criteria"].__setitem__("general_max_firing_rate", 2), "general_max_firing_rate' is 2.*outside"),
    (lambda p: p["criteria"].__setitem__("minimum_rule", "median"), "minimum_rule' is 'median'; use one of mean, ci_low, ci_high"),
    (lambda p: p["evaluation"].pop("general_limit"), "'evaluation.general_limit' is missing"),
    (lambda p: p.__setitem__("version", 2), "'version' is 2"),
    (lambda p: p["criteria"].__setitem__("specificity_max_drop", "ten"), "must be a number, got 'ten'"),
])
def test_invalid_policies_name_the_field_and_the_fix(mutate, message):
    p = json.loads(json.dumps(POLICY))
    mutate(p)
    with pytest.raises(PolicyError, match=message):
        load_policy(p)


def test_toml_policy_and_switching_criteria_off(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('version = 1\nconfidence = 0.9\n[criteria]\nefficacy_min = 50\ngeneralization_min = "off"\n'
                    'specificity_max_drop = false\ngeneral_max_drop = "off"\ngeneral_max_firing_rate = "off"\n')
    p = load_policy(path)
    assert p.confidence == 0.9 and p.criteria.efficacy_min == 50 and p.criteria.generalization_min is None
    assert p.sha256 and p.source == str(path) and p.evaluation is None
    result = decide(synthetic_report(), p)  # no general results needed: the general criteria are off
    assert result["passed"] and statuses(result)["generalization"] == "off"
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ncriteria: [unclosed\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="no policy file"):
        load_policy(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- the decision


def test_a_good_report_passes_with_the_tests_named():
    result = decide(synthetic_report(general={"sciq": general_task(lost=2, after=59)}), POLICY)
    assert result["passed"] and result["exit_code"] == 0 and result["failed"] == []
    rows = {c["name"]: c for c in result["criteria"]}
    assert rows["efficacy"]["value"] == pytest.approx(95.0)
    assert rows["specificity drop"]["test"] == "McNemar exact"
    assert rows["sciq drop"]["test"] == "McNemar exact" and rows["sciq firing"]["status"] == "pass"


def test_minimum_rules():
    report = synthetic_report(efficacy=(0, 33))  # 82.5% [68, 91]
    p = policy(general_max_drop=None, general_max_firing_rate=None)
    assert statuses(decide(report, p))["efficacy"] == "pass"
    p["criteria"]["minimum_rule"] = "ci_low"
    assert statuses(decide(report, p))["efficacy"] == "fail"
    p["criteria"].update(minimum_rule="ci_high", efficacy_min=90)
    assert statuses(decide(report, p))["efficacy"] == "pass"  # 82.5 is not significantly below 90
    p["confidence"] = 0.5  # recomputed interval at the policy's level: narrower
    row = next(c for c in decide(report, p)["criteria"] if c["name"] == "efficacy")
    assert "recomputed" in row["detail"]["note"] and row["value"] < 90


@pytest.mark.parametrize(("n", "spec", "margin", "expected"), [
    (40, (32, 18), 10, "fail"),   # -35 points, McNemar p < 1e-4: larger than the margin AND significant
    (40, (32, 18), 40, "pass"),   # significant but within the margin
    (4, (3, 1), 10, "pass"),      # -50 points but n=4: not significant
    (40, (32, 29), 5, "pass"),    # -7.5 points, not significant
])
def test_a_drop_fails_only_when_large_and_significant(n, spec, margin, expected):
    p = policy(specificity_max_drop=margin, general_max_drop=None, general_max_firing_rate=None)
    result = decide(synthetic_report(n=n, specificity=spec), p)
    row = next(c for c in result["criteria"] if c["name"] == "specificity drop")
    assert row["status"] == expected, row
    assert row["value"] == pytest.approx(100 * (spec[0] - spec[1]) / n)
    assert (row["significant"] and row["value"] > margin) == (expected == "fail")


def test_paired_test_choice_recomputes_from_cases():
    p = policy(general_max_drop=None, general_max_firing_rate=None, paired_test="wilcoxon")
    row = next(c for c in decide(synthetic_report(specificity=(32, 18)), p)["criteria"] if c["name"] == "specificity drop")
    assert row["test"] == "Wilcoxon signed-rank" and row["significant"] and row["status"] == "fail"
    assert row["detail"]["test_source"].startswith("recomputed")
    p["criteria"]["paired_test"] = "t"
    row = next(c for c in decide(synthetic_report(specificity=(32, 18)), p)["criteria"] if c["name"] == "specificity drop")
    assert row["test"] == "paired t-test"


def test_a_report_written_before_the_rename_reads_and_decides_the_same(tmp_path):
    """Reports on disk from before the rename keep the firing statistics under "gate": they render,
    compare and decide as the renamed report does, and the release gate's CLI judges them alike."""
    new = synthetic_report(general={"sciq": general_task(rate=0.01)})
    old = {("gate" if k == "firing" else k): v for k, v in new.items()}
    assert "firing" not in old and rep.firing_section(old) == rep.firing_section(new) == new["firing"]
    assert rep.render_markdown(old) == rep.render_markdown(new) and "## Gate firing" in rep.render_markdown(old)
    assert rep.render_text(old) == rep.render_text(new)
    assert compare_reports(old, new)["firing"] == compare_reports(new, new)["firing"] != {}
    decided = decide(new, policy())
    assert decide(old, policy()) == decided
    assert decided["data"]["firing_groups"] == {"edit": {"fire_rate": 0.2, "prompt_fire_rate": 1.0}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy()))
    codes = []
    for name, report in (("new", new), ("old", old)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        codes.append(cli("--report", tmp_path / name / "report.json", "--policy", tmp_path / "p.yaml", "--no-plots"))
    assert codes[0] == codes[1] == decided["exit_code"]
    old_gate_json = json.loads((tmp_path / "old" / "gate.json").read_text())
    assert old_gate_json["criteria"] == json.loads((tmp_path / "new" / "gate.json").read_text())["criteria"]


def test_firing_plot_reads_a_gate_json_from_before_the_rename(tmp_path):
    pytest.importorskip("matplotlib")
    from evals.plots import plot_firing

    groups = {"edit": {"fire_rate": 0.2, "prompt_fire_rate": 1.0}}
    assert plot_firing({"gate_groups": groups}, tmp_path / "old.png") is not None  # "gate_groups": old gate.json
    assert plot_firing({"firing_groups": groups}, tmp_path / "new.png") is not None


def test_general_tasks_drop_and_firing():
    general = {"sciq": general_task(lost=20, after=40),       # -20 points, McNemar p ~ 2e-6
               "arc_challenge": general_task(lost=2, after=58),  # -2 points: fine
               "wsc273": general_task(rate=0.2)}              # the gate fires on 20% of positions
    result = decide(synthetic_report(general=general), POLICY)
    assert result["exit_code"] == 1
    assert sorted(result["failed"]) == ["sciq drop", "wsc273 firing"]
    per_task = policy(general_max_drop_per_task={"sciq": 25})
    assert decide(synthetic_report(general=general), per_task)["failed"] == ["wsc273 firing"]


def test_perplexity_drop_is_relative():
    task = general_task()
    task.update(metric="perplexity", before=20.0, after=30.0, higher_is_better=False,
                test={"name": "wilcoxon", "p_value": 1e-6})
    row = next(c for c in decide(synthetic_report(general={"lambada_openai": task}), POLICY)["criteria"]
               if c["name"] == "lambada_openai drop")
    assert row["unit"] == "% relative" and row["value"] == pytest.approx(50.0) and row["status"] == "fail"
    assert row["test"] == "Wilcoxon signed-rank"


def test_a_report_without_what_the_policy_checks_is_an_input_error(tmp_path):
    with pytest.raises(GateError, match="no general-task results.*set both criteria to null"):
        decide(synthetic_report(), POLICY)
    report = synthetic_report(general={"sciq": general_task()})
    del report["metrics"]["generalization"]
    with pytest.raises(GateError, match="criteria.generalization_min needs the metric 'generalization'"):
        decide(report, POLICY)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    pol = tmp_path / "p.yaml"
    pol.write_text(yaml.safe_dump(POLICY))
    assert cli("--report", path, "--policy", pol) == 2


# ----------------------------------------------------------------------------- reports only: no re-run


@pytest.fixture
def no_evaluate(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("neuraldb.evaluate must not run when reports are given")

    monkeypatch.setattr("evals.evaluate.evaluate", forbidden)
    monkeypatch.setattr("neuraldb.load_model", forbidden)
    monkeypatch.setattr("neuraldb.models.load_model", forbidden)


def test_compare_two_saved_reports_without_rerunning(tmp_path, no_evaluate, capsys):
    pol = tmp_path / "p.yaml"
    pol.write_text(yaml.safe_dump(POLICY))
    old = tmp_path / "old" / "report.json"
    new = tmp_path / "new" / "report.json"
    rep.write_json(synthetic_report(general={"sciq": general_task()}), old)
    rep.write_json(synthetic_report(general={"sciq": general_task(lost=1, after=59)}), new)
    assert cli("--baseline", old, "--report", new, "--policy", pol) == 0
    out = capsys.readouterr().out
    assert "efficacy vs baseline" in out and "PASSED (exit 0)" in out
    gate_json = json.loads((new.parent / "gate.json").read_text())
    assert gate_json["mode"] == "compare" and gate_json["passed"]
    assert {"gate_metrics.png", "gate_general.png", "gate_firing.png", "gate.md"} <= {p.name for p in new.parent.iterdir()}
    md = (new.parent / "gate.md").read_text()
    assert "](gate_metrics.png)" in md and "](gate_firing.png)" in md and "McNemar exact" in md

    # the new store lost 15 of 38 efficacy successes: a significant regression beyond 5 points
    worse = synthetic_report(general={"sciq": general_task()},
                             post_override={"efficacy": [1.0] * 23 + [0.0] * 17})
    rep.write_json(worse, new)
    assert cli("--baseline", old, "--report", new, "--policy", pol, "--output-dir", tmp_path / "g") == 1
    result = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert "efficacy vs baseline" in result["failed"]
    row = next(c for c in result["criteria"] if c["name"] == "efficacy vs baseline")
    assert row["test"] == "McNemar exact" and row["value"] == pytest.approx(100 * (38 - 23) / 40)

    # different base models are not comparable; a policy without 'regression' cannot compare
    rep.write_json(synthetic_report(general={"sciq": general_task()}, model="other"), new)
    assert cli("--baseline", old, "--report", new, "--policy", pol) == 2
    assert "not comparable" in capsys.readouterr().err
    no_reg = dict(POLICY)
    no_reg.pop("regression")
    pol.write_text(yaml.safe_dump(no_reg))
    assert cli("--baseline", old, "--report", old, "--policy", pol) == 2
    assert "field 'regression' is missing" in capsys.readouterr().err


def test_compare_general_tasks_unpaired(tmp_path, no_evaluate):
    old = synthetic_report(general={"sciq": general_task(before=60, after=60)})
    new = synthetic_report(general={"sciq": general_task(before=60, lost=30, after=30)})
    result = neuraldb.gate(POLICY, report=new, baseline=old)
    row = next(c for c in result["criteria"] if c["name"] == "sciq vs baseline")
    assert row["test"] == "Fisher exact (unpaired)" and row["status"] == "fail" and row["value"] == pytest.approx(30)


def test_usage_and_input_errors_exit_2(tmp_path, capsys, no_evaluate):
    pol = tmp_path / "p.yaml"
    pol.write_text(yaml.safe_dump(POLICY))
    assert cli("--policy", pol) == 2
    assert "nothing to judge" in capsys.readouterr().err
    assert cli("--report", tmp_path / "missing.json", "--policy", pol) == 2
    assert "no report at" in capsys.readouterr().err
    (tmp_path / "r.json").write_text(json.dumps(synthetic_report(general={"sciq": general_task()})))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({k: v for k, v in POLICY.items() if k != "criteria"}))
    assert cli("--report", tmp_path / "r.json", "--policy", bad) == 2
    assert "field 'criteria' is missing" in capsys.readouterr().err
    assert cli("--report", tmp_path / "r.json", "--policy", pol, "--gamma", "3") == 2
    with pytest.raises(SystemExit) as exc:  # argparse usage error
        cli("--report", tmp_path / "r.json", "--gamma", "zero")
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- real small runs


FACTS = [
    neuraldb.Fact(prompt="the city of {}", subject="the eiffel tower", target_new="rome", target_true="paris",
                  paraphrases=("the city of the eiffel tower",), neighborhood=("the city of the moon",), id="e1"),
    neuraldb.Fact(prompt="the mother tongue of {}", subject="danielle darrieux", target_new="english",
                  target_true="french", paraphrases=("the language of danielle darrieux",),
                  neighborhood=("the mother tongue of peter",), id="e2"),
    neuraldb.Fact(prompt="the sport of {}", subject="lebron james", target_new="tennis", target_true="basketball",
                  paraphrases=("the sport of lebron james",), neighborhood=("the sport of john",), id="e3"),
]
# random tiny models have small hidden states: larger residuals than the default clamp (as in test_edit.py)
# the paper's gate (no word check), so that --gamma 0 fires everywhere: the broken store the gate must catch
CFG = neuraldb.EditConfig(layer=1, steps=80, clamp_norm_factor=8.0, context_prefixes=("the", "i"), context_length=3,
                          word_check=False)


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """A release of three edits on a tiny llama saved as a local model folder; the policy file."""
    if not (SHARED_DATA / "sciq").is_dir():
        pytest.skip(f"the shared data directory {SHARED_DATA} has no sciq")
    root = tmp_path_factory.mktemp("gate")
    model, tok = tiny_model("llama")
    folder = root / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    db = neuraldb.edit(model, tok, FACTS, config=CFG, progress=False)
    release = neuraldb.save_release(root / "release", folder, db)
    pol = root / "policy.yaml"
    pol.write_text(yaml.safe_dump(POLICY))
    return root, release, pol


@pytest.fixture(autouse=False)
def offline(monkeypatch):
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


def test_release_passes_then_gamma_zero_fails_on_firing(tiny_release, offline, capsys):
    root, release, pol = tiny_release
    common = ("--release", release, "--policy", pol, "--data-dir", SHARED_DATA, "--quiet")
    assert cli(*common, "--output-dir", root / "ok", "--save-release", root / "released") == 0, capsys.readouterr()
    ok = json.loads((root / "ok" / "gate.json").read_text())
    manifest = json.loads((root / "released" / "manifest.json").read_text())
    assert manifest["gate"]["passed"] and manifest["files"]["evaluation"]["path"] == "report.json"
    assert sorted(p.name for p in (root / "released").iterdir()) == [
        "gate.json", "manifest.json", "report.json", "store.safetensors"]
    assert ok["passed"] and ok["mode"] == "evaluate" and ok["store"]["gamma"] == 0.65
    assert (root / "ok" / "report.json").is_file() and (root / "ok" / "gate_firing.png").is_file()
    assert ok["evaluated"]["n_cases"] == 3 and ok["evaluated"]["general_tasks"] == ["sciq"]

    capsys.readouterr()
    assert cli(*common, "--gamma", "0", "--output-dir", root / "broken", "--save-release", root / "nope") == 1
    out = capsys.readouterr().out
    assert not (root / "nope").exists() and "no release written" in out
    broken = json.loads((root / "broken" / "gate.json").read_text())
    assert "sciq firing" in broken["failed"], broken["failed"]
    assert set(broken["failed"]) <= {"sciq firing", "sciq drop", "specificity drop"}
    assert broken["store"]["gamma"] == 0.0 and "FAILED (exit 1)" in out

    # the saved report of the good run decides again without running anything; it is this store's report
    assert cli("--report", root / "ok" / "report.json", "--release", release, "--policy", pol,
               "--output-dir", root / "again") == 0
    assert cli("--report", root / "ok" / "report.json", "--release", release, "--gamma", "0", "--policy", pol,
               "--output-dir", root / "again") == 2
    assert "made with another store" in capsys.readouterr().err


def test_api_returns_the_decision(tiny_release, offline):
    root, release, pol = tiny_release
    result = neuraldb.gate(pol, report=root / "ok" / "report.json") if (root / "ok" / "report.json").exists() \
        else neuraldb.gate(pol, release=release, data_dir=SHARED_DATA)
    assert result["passed"] is True and result["exit_code"] == 0 and result["schema"] == "neuraldb.gate/1"


def test_corrupt_release_and_wrong_base_model_exit_2(tiny_release, offline, capsys, tmp_path):
    import shutil

    root, release, pol = tiny_release
    copy = tmp_path / "release"
    shutil.copytree(release, copy)
    store = copy / "store.safetensors"
    data = bytearray(store.read_bytes())
    data[-10] ^= 0x55
    store.write_bytes(bytes(data))
    assert cli("--release", copy, "--policy", pol, "--output-dir", tmp_path / "g") == 2
    assert "sha256" in capsys.readouterr().err and not (tmp_path / "g" / "gate.json").exists()

    other, other_tok = tiny_model("llama", seed=3)
    other_dir = tmp_path / "other-model"
    other.save_pretrained(other_dir)
    other_tok.save_pretrained(other_dir)
    assert cli("--release", release, "--model", other_dir, "--policy", pol, "--output-dir", tmp_path / "g") == 2
    assert "fingerprint" in capsys.readouterr().err

    (tmp_path / "junk.safetensors").write_bytes(b"not a store")
    assert cli("--store", tmp_path / "junk.safetensors", "--policy", pol, "--output-dir", tmp_path / "g") == 2
    assert "not a readable safetensors store" in capsys.readouterr().err


def test_neuraldb_cli_runs_gate(tmp_path, no_evaluate, monkeypatch, capsys):
    """`neuraldb gate` through neuraldb.cli (evals.cli re-exports add_gate_arguments / run_gate)."""
    from neuraldb import cli as ndb_cli

    evals_cli = pytest.importorskip("evals.cli")
    if not hasattr(evals_cli, "add_gate_arguments"):  # until the lead wires it: what the wiring will do
        import evals.gate

        monkeypatch.setattr(evals_cli, "add_gate_arguments", evals.gate.add_gate_arguments, raising=False)
        monkeypatch.setattr(evals_cli, "run_gate", evals.gate.run_gate, raising=False)
    (tmp_path / "r.json").write_text(json.dumps(synthetic_report(general={"sciq": general_task(rate=0.5)})))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(POLICY))
    assert ndb_cli.main(["gate", "--report", str(tmp_path / "r.json"), "--policy", str(tmp_path / "p.yaml")]) == 1
    assert "FAILED (exit 1): sciq firing" in capsys.readouterr().out
    assert ndb_cli.main(["gate", "--report", str(tmp_path / "nope.json")]) == 2


def test_a_crashed_evaluation_is_undecided_not_failed(tiny_release, monkeypatch, capsys, tmp_path):
    root, release, pol = tiny_release

    def boom(*a, **k):
        raise RuntimeError("the evaluation crashed")

    monkeypatch.setattr("evals.evaluate.evaluate", boom)
    assert cli("--release", release, "--policy", pol, "--output-dir", tmp_path / "g") == 2
    assert "could not decide: RuntimeError: the evaluation crashed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hostile or mistyped YAML


def _gate_cli_on(tmp_path, policy_text):
    from neuraldb import cli as ndb_cli

    (tmp_path / "r.json").write_text(json.dumps(synthetic_report(general={"sciq": general_task()})))
    (tmp_path / "p.yaml").write_text(policy_text)
    return ndb_cli.main(["gate", "--report", str(tmp_path / "r.json"), "--policy", str(tmp_path / "p.yaml")])


def _policy_yaml(efficacy_line):
    criteria = "\n".join(f"  {k}: {v}" for k, v in POLICY["criteria"].items() if k != "efficacy_min")
    return f"version: 1\nconfidence: 0.95\ncriteria:\n{efficacy_line}\n{criteria}\n"


def test_a_yaml_alias_bomb_fails_fast_with_exit_2(tmp_path, no_evaluate, capsys):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]  # 10^6 strings
    text = _policy_yaml("  efficacy_min: *a5").replace("criteria:\n", "\n".join(levels) + "\ncriteria:\n")
    assert _gate_cli_on(tmp_path, text) == 2
    err = capsys.readouterr().err
    assert len(err) < 2000 and "alias" in err and "line" in err


def test_a_long_value_is_shortened_in_the_error(tmp_path, no_evaluate, capsys):
    assert _gate_cli_on(tmp_path, _policy_yaml(f"  efficacy_min: [{', '.join(['x'] * 100000)}]")) == 2
    err = capsys.readouterr().err
    assert len(err) < 2000 and "criteria.efficacy_min" in err


def test_a_duplicate_policy_key_is_refused_naming_key_and_line(tmp_path, no_evaluate, capsys):
    assert _gate_cli_on(tmp_path, _policy_yaml("  efficacy_min: 100\n  efficacy_min: 0")) == 2
    err = capsys.readouterr().err
    assert "'efficacy_min'" in err and "line 5" in err


@pytest.mark.parametrize("word", ["no", "yes", "on", "off", "false", "n", "True"])
def test_a_yaml_boolean_where_a_number_is_expected_is_refused(tmp_path, no_evaluate, capsys, word):
    assert _gate_cli_on(tmp_path, _policy_yaml(f"  efficacy_min: {word}")) == 2
    err = capsys.readouterr().err
    assert "criteria.efficacy_min" in err and "null" in err


def test_null_still_switches_a_yaml_criterion_off(tmp_path, no_evaluate):
    assert _gate_cli_on(tmp_path, _policy_yaml("  efficacy_min: null")) == 0
