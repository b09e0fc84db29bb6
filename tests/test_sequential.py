"""evals.sequential: rounds of edits into one store, every earlier fact re-evaluated, vs all at once."""

import argparse
import json

import pytest

from evals.sequential import SequentialPlan, run_sequential
from evals.study import add_study_arguments

from test_edit import CFG
from test_study import _case

SUBJECTS = [("the eiffel tower", "rome", "paris"), ("danielle darrieux", "english", "french"),
            ("lebron james", "tennis", "football"), ("john", "madrid", "london"),
            ("the eiffel tower", "berlin", "paris"),  # shares a subject with round 1: re-fitted together in round 3
            ("alice", "german", "spanish")]


@pytest.fixture
def data_dir(tmp_path):
    cases = [_case(i, s, new, true) for i, (s, new, true) in enumerate(SUBJECTS)]
    cases[4]["requested_rewrite"]["prompt"] = "the capital of {}"  # another prompt: another fact, same subject
    (tmp_path / "counterfact_rome").mkdir()
    (tmp_path / "counterfact_rome" / "counterfact_rome_test2191.json").write_text(json.dumps(cases))
    return tmp_path


def _count_edits(monkeypatch, fail_at=None):
    """Count neuraldb.edit calls; with ``fail_at``, that call raises (an interrupted run)."""
    import neuraldb

    real, calls = neuraldb.edit, []

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == fail_at:
            raise KeyboardInterrupt("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(neuraldb, "edit", counted)
    return calls


def test_three_rounds_of_two_resume_and_compare(tiny_llama, data_dir, tmp_path, monkeypatch):
    model, tok = tiny_llama
    out = tmp_path / "seq"
    plan = SequentialPlan(rounds=3, per_round=2)
    calls = _count_edits(monkeypatch, fail_at=3)  # round 3's edit is interrupted
    with pytest.raises(KeyboardInterrupt):
        run_sequential(model, tok, plan=plan, output_dir=out, data_dir=data_dir, config=CFG, progress=False)
    assert calls == [2, 2, 2] and sorted(p.name for p in (out / "rounds").glob("round-??.json")) == [
        "round-01.json", "round-02.json"]

    monkeypatch.undo()
    calls = _count_edits(monkeypatch)
    result = run_sequential(model, tok, plan=plan, output_dir=out, data_dir=data_dir, config=CFG, progress=False)
    assert calls == [2, 6]  # round 3, then the all-at-once edit; rounds 1-2 read back, not redone

    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and [r["facts_stored"] for r in rounds] == [2, 4, 6]
    for r in rounds:  # the oldest edits are re-evaluated every round
        assert set(r["first_round"]) == {"efficacy", "generalization", "specificity"}
        assert r["first_round"]["efficacy"]["n"] == 2 and r["first_round"]["efficacy"]["post"] is not None
        assert r["all"]["efficacy"]["n"] == 2 * r["round"]
    assert rounds[0]["first_round"] == rounds[0]["all"]
    assert rounds[2]["refit_earlier"] == [rounds[0]["fact_ids"][0]]  # the eiffel tower's round-1 fact

    batch, cmp = result["all_at_once"], result["comparison"]
    assert batch["facts_stored"] == 6 and batch["all"]["efficacy"]["n"] == 6
    assert cmp["same_ids"] and cmp["cases_compared"] == 6 and cmp["facts_sharing_a_subject"] == 2
    assert cmp["max_key_diff"] == 0.0  # keys come from the unedited model, whatever the rounds
    for k in ("max_residual_diff", "max_residual_diff_shared_subject", "max_residual_diff_other",
              "max_relative_residual_diff", "cases_with_other_firing", "cases_with_other_scores", "same_thresholds"):
        assert k in cmp

    saved = json.loads((out / "sequential.json").read_text())
    assert len(saved["rounds"]) == 3 and saved["comparison"] == json.loads(json.dumps(cmp))
    md = (out / "sequential.md").read_text()
    assert md.count("\n| 1 | 2 |") == 1 and "\n| 3 | 6 |" in md and "\n| all at once | 6 |" in md
    assert "max |residual difference|" in md
    assert (out / "sequential.png").read_bytes()[:4] == b"\x89PNG"

    monkeypatch.undo()
    calls = _count_edits(monkeypatch)  # a finished run: nothing is edited again, the same result
    again = run_sequential(model, tok, plan=plan, output_dir=out, data_dir=data_dir, config=CFG, progress=False)
    assert calls == [] and again["rounds"] == json.loads(json.dumps(rounds))
    assert again["all_at_once"]["edit_seconds"] == batch["edit_seconds"] > 0  # kept from the run that edited


def test_a_run_stopped_during_a_rounds_evaluation_keeps_that_rounds_edit_time_and_refits(
        tiny_llama, data_dir, tmp_path, monkeypatch):
    import neuraldb

    model, tok = tiny_llama
    out = tmp_path / "seq"
    plan = SequentialPlan(rounds=3, per_round=2)
    real, evaluations = neuraldb.evaluate, []

    def stopped(*args, **kwargs):  # round 3's evaluation is interrupted, after its edit was checkpointed
        evaluations.append(1)
        if len(evaluations) == 3:
            raise KeyboardInterrupt("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(neuraldb, "evaluate", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(model, tok, plan=plan, output_dir=out, data_dir=data_dir, config=CFG, progress=False)
    kept = json.loads((out / "rounds" / "round-03-edit.json").read_text())
    assert kept["edit_seconds"] > 0 and len(kept["refit_earlier"]) == 1 and kept["edit_resumed"] is False

    monkeypatch.undo()
    calls = _count_edits(monkeypatch)
    result = run_sequential(model, tok, plan=plan, output_dir=out, data_dir=data_dir, config=CFG, progress=False)
    assert calls == [6]  # round 3's facts are in the checkpoint: not edited again; then the all-at-once edit
    third = result["rounds"][2]
    assert third["edit_seconds"] == kept["edit_seconds"] and third["edit_resumed"] is False
    assert third["refit_earlier"] == [result["rounds"][0]["fact_ids"][0]]  # as if never stopped
    assert "not counting" not in (out / "sequential.md").read_text()


def test_other_settings_in_the_same_folder_are_refused(tiny_llama, data_dir, tmp_path):
    import dataclasses

    model, tok = tiny_llama
    out = tmp_path / "seq"
    run_sequential(model, tok, plan=SequentialPlan(rounds=1, per_round=2), output_dir=out, data_dir=data_dir,
                   config=CFG, progress=False)
    with pytest.raises(ValueError, match="other per_round"):
        run_sequential(model, tok, plan=SequentialPlan(rounds=1, per_round=3), output_dir=out, data_dir=data_dir,
                       config=CFG, progress=False)
    with pytest.raises(ValueError, match="other edit_config"):
        run_sequential(model, tok, plan=SequentialPlan(rounds=1, per_round=2), output_dir=out, data_dir=data_dir,
                       config=dataclasses.replace(CFG, steps=5), progress=False)


def test_a_folder_written_before_early_stop_existed_continues_under_the_papers_rule(tiny_llama, data_dir, tmp_path):
    """Its sequential_run.json lacks early_stop: it ran the whole-loss rule, which a rerun must name."""
    import dataclasses
    import json

    model, tok = tiny_llama
    out = tmp_path / "seq"
    old = dataclasses.replace(CFG, early_stop="loss")
    run_sequential(model, tok, plan=SequentialPlan(rounds=1, per_round=2), output_dir=out, data_dir=data_dir,
                   config=old, progress=False)
    ident = json.loads((out / "sequential_run.json").read_text())
    del ident["edit_config"]["early_stop"]
    (out / "sequential_run.json").write_text(json.dumps(ident))
    with pytest.raises(ValueError, match="other edit_config"):
        run_sequential(model, tok, plan=SequentialPlan(rounds=1, per_round=2), output_dir=out, data_dir=data_dir,
                       config=dataclasses.replace(CFG, early_stop="nll"), progress=False)
    again = run_sequential(model, tok, plan=SequentialPlan(rounds=1, per_round=2), output_dir=out, data_dir=data_dir,
                           config=old, progress=False)
    assert len(again["rounds"]) == 1


def test_a_folder_continues_with_its_own_settings_where_the_command_line_gives_none(
        tiny_llama, data_dir, tmp_path, monkeypatch):
    """A run started under older defaults (here memory_budget_gb 3.0, the default before the
    bfloat16 copy was counted) resumes with the same command: unset flags take the folder's values."""
    import dataclasses

    import neuraldb
    from evals import sequential, study

    model, tok = tiny_llama
    out = tmp_path / "seq"
    made = dataclasses.replace(CFG, memory_budget_gb=3.0)
    first = run_sequential(model, tok, plan=SequentialPlan(rounds=1, per_round=2), output_dir=out,
                           data_dir=data_dir, config=made, progress=False)
    resumed = sequential.resume_config(out)
    assert resumed.residual_dtype != "auto"  # the folder records what "auto" was on the machine that made it
    assert resumed == dataclasses.replace(made, residual_dtype=resumed.residual_dtype)
    assert sequential.resume_config(out, early_stop="loss") == dataclasses.replace(resumed, early_stop="loss")
    assert sequential.resume_config(tmp_path / "empty", layer=3) == neuraldb.EditConfig(layer=3)  # no run: defaults

    monkeypatch.setattr(neuraldb, "load_model", lambda *a, **k: (model, tok))
    calls = _count_edits(monkeypatch)
    base = ["--sequential", "1x2", "--output-dir", str(out), "--data-dir", str(data_dir)]
    assert study.run_study_cli(_parser().parse_args(base)) == 0
    assert calls == []  # read back, nothing edited again
    assert json.loads((out / "sequential.json").read_text())["rounds"] == json.loads(json.dumps(first["rounds"]))

    with pytest.raises(ValueError) as exc:  # a flag that contradicts the folder is named, with both values
        study.run_study_cli(_parser().parse_args(base + ["--layer", "0"]))
    assert "edit_config.layer: the folder's run 1, this run 0" in str(exc.value) and "--output-dir" in str(exc.value)
    assert "memory_budget_gb" not in str(exc.value)
    # the library, given today's defaults for the fields that only group facts, continues too
    again = run_sequential(model, tok, plan=SequentialPlan(rounds=1, per_round=2), output_dir=out, data_dir=data_dir,
                           config=dataclasses.replace(resumed, memory_budget_gb=2.0, batch_size=1), progress=False)
    assert calls == [] and again["rounds"] == json.loads(json.dumps(first["rounds"]))


def _parser():
    p = argparse.ArgumentParser(prog="neuraldb study")
    add_study_arguments(p)
    return p


def test_cli_parses_rounds_by_k():
    args = _parser().parse_args(["--sequential", "10x50"])
    assert args.sequential == SequentialPlan(rounds=10, per_round=50) and args.sequential.facts == 500
    assert _parser().parse_args([]).sequential is None  # the scaling study, unchanged


@pytest.mark.parametrize("bad", ["10by50", "10x0", "x50", "10x50x2"])
def test_cli_rejects_other_formats_naming_the_flag(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--sequential", bad])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--sequential" in err and "ROUNDSxK" in err and "10x50" in err and bad in err


def test_cli_dispatches_to_sequential(monkeypatch, capsys, tmp_path):
    import neuraldb
    from evals import sequential, study

    monkeypatch.chdir(tmp_path)  # no reports/sequential run here: the defaults
    seen = {}
    monkeypatch.setattr(neuraldb, "load_model", lambda *a, **k: ("model", "tok"))
    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("ran the scaling study"))
    monkeypatch.setattr(sequential, "run_sequential", lambda *a, **k: seen.update(k) or {"fake": True})
    monkeypatch.setattr(sequential, "render_markdown", lambda result: "TABLE")
    args = _parser().parse_args(["--sequential", "3x4", "--sizes", "10", "--early-stop", "loss"])
    assert study.run_study_cli(args) == 0
    assert seen["plan"] == SequentialPlan(rounds=3, per_round=4) and seen["output_dir"] == "reports/sequential"
    assert seen["config"].early_stop == "loss"
    captured = capsys.readouterr()
    assert "TABLE" in captured.out and "does not use --sizes" in captured.err
