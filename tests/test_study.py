import json

import pytest

from evals.linear_sweep import LinearSweep
from evals.study import render_markdown, run_study

from test_edit import CFG


def _case(i, subject, target_new, target_true):
    return {
        "case_id": i,
        "requested_rewrite": {
            "prompt": "the city of {}", "subject": subject, "relation_id": "P1",
            "target_new": {"str": target_new, "id": "Q1"}, "target_true": {"str": target_true, "id": "Q2"},
        },
        "paraphrase_prompts": [f"some text . the city of {subject}", f"what about the city of {subject}"],
        "neighborhood_prompts": ["the city of the moon", "the city of the sun"],
        "attribute_prompts": [], "generation_prompts": [f"{subject} is"],
    }


FIXED = LinearSweep(lams=(1e-4,), c0_passages=(2,))  # the old fixed setting, on the fixture's 2 passages


@pytest.fixture
def data_dir(tmp_path):
    cases = [_case(0, "the eiffel tower", "rome", "paris"), _case(1, "danielle darrieux", "english", "french"),
             _case(2, "lebron james", "tennis", "football")]
    (tmp_path / "counterfact_rome").mkdir()
    (tmp_path / "counterfact_rome" / "counterfact_rome_test2191.json").write_text(json.dumps(cases))
    (tmp_path / "lambada_openai").mkdir()
    (tmp_path / "lambada_openai" / "lambada_test.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in ["the old man said that it was a good day", "a big red dog and a small cat"])
    )
    return tmp_path


def test_study_runs_both_readers_on_prefixes_and_resumes(tiny_llama, data_dir, tmp_path, monkeypatch):
    model, tok = tiny_llama
    out = tmp_path / "study"
    result = run_study(model, tok, sizes=[2, 3], eval_cases=2, output_dir=out, data_dir=data_dir,
                       config=CFG, linear=FIXED, progress=False)
    rows = {(r["size"], r["reader"]): r for r in result["rows"]}
    assert set(rows) == {(n, r) for n in (2, 3) for r in ("gated", "calibrated", "linear")}
    assert rows[(2, "gated")]["efficacy"]["post"] == 100.0  # tiny edits that end on the subject
    for r in result["rows"]:
        assert r["efficacy"]["pre"] == rows[(2, "gated")]["efficacy"]["pre"]  # same unedited model
    assert (out / "study.png").stat().st_size > 0 and "| 3 | linear (lam 0.0001, C0 2) |" in (out / "study.md").read_text()
    assert not (out / "heldout.safetensors").exists()  # one lam, one C0: nothing to choose, nothing held out
    assert "fixed lam 0.0001, C0 from the last 2 LAMBADA passages" in (out / "study.md").read_text()
    assert json.loads((out / "study.json").read_text())["facts"] == 3
    # rerun: the store is resumed from its checkpoint, nothing is edited again
    import neuraldb.editor as editor

    monkeypatch.setattr(editor, "compute_residuals", lambda *a, **k: pytest.fail("recomputed a residual"))
    again = run_study(model, tok, sizes=[2, 3], eval_cases=2, output_dir=out, data_dir=data_dir,
                      config=CFG, linear=FIXED, progress=False)
    assert again["rows"] == result["rows"]
    assert result["edited_this_call"] == 3 and again["edited_this_call"] == 0
    assert "0 in this call" in render_markdown(again) and "3 resumed from the checkpoint" in render_markdown(again)


def test_unknown_reader_is_refused_before_any_edit(tiny_llama, data_dir, tmp_path, monkeypatch):
    import neuraldb

    model, tok = tiny_llama
    monkeypatch.setattr(neuraldb, "edit", lambda *a, **k: pytest.fail("edited before checking the readers"))
    with pytest.raises(ValueError, match="readers \\['gatd'\\] unknown"):
        run_study(model, tok, sizes=[2], readers=["gatd"], output_dir=tmp_path, data_dir=data_dir, config=CFG)


def test_linear_reader_takes_the_lam_with_the_best_held_out_score(tiny_llama, data_dir, tmp_path, monkeypatch):
    """lam and C0 are swept on a held-out fact (never a reported one); the study's linear row uses the winner."""
    import evals.metrics.counterfact as cf
    from neuraldb.hook import attached_reader

    model, tok = tiny_llama
    real_scores, real_summary = cf.counterfact_scores, cf.summarize_counterfact
    seen = []

    def scores(**kw):  # runs with the reader attached: note its lam
        reader = attached_reader(model)
        seen.append(([c.case_id for c in kw["cases"]], reader and reader.lam))
        return real_scores(**kw)

    def summary(results):  # the held-out score of that reader: best at lam 10
        return {**real_summary(results), "score": {None: 0.99, 1.0: 0.5, 10.0: 0.9, 100.0: 0.7}[seen[-1][1]]}

    monkeypatch.setattr(cf, "counterfact_scores", scores)
    monkeypatch.setattr(cf, "summarize_counterfact", summary)
    out = tmp_path / "study"
    result = run_study(model, tok, sizes=[2], readers=["linear"], eval_cases=2, output_dir=out, data_dir=data_dir,
                       config=CFG, linear=LinearSweep(lams=(1, 10, 100), c0_passages=(1, 2), heldout=1), progress=False)
    sweep_calls = [lam for ids, lam in seen if ids == [2]]  # the held-out case (lebron james) only
    assert sorted(sweep_calls, key=str) == sorted([None] + [1.0, 10.0, 100.0] * 2, key=str)
    assert all(set(ids) <= {0, 1} for ids, _ in seen if ids != [2])  # the study's own evaluation: reported cases
    assert result["linear"]["heldout_ids"] == ["counterfact-2"] and (out / "heldout.safetensors").is_file()
    sweep = result["linear"]["sweep"]
    assert len(sweep) == 1 + 2 * 3 and {(r["c0_passages"], r["lam"]) for r in sweep if r["lam"]} == \
        {(c, lam) for c in (1, 2) for lam in (1.0, 10.0, 100.0)}
    (row,) = result["rows"]
    assert (row["lam"], row["c0_passages"]) == (10.0, 2) == (result["linear"]["chosen"]["2"]["lam"], 2)
    md = (out / "study.md").read_text()
    assert "lam and C0 chosen on 1 held-out facts" in md and "| 2 | 1 | 2 | 10 |" in md and "chosen" in md
    # a rerun resumes the sweep from linear_sweep.json: nothing is scored again
    seen.clear()
    run_study(model, tok, sizes=[2], readers=["linear"], eval_cases=2, output_dir=out, data_dir=data_dir,
              config=CFG, linear=LinearSweep(lams=(1, 10, 100), c0_passages=(1, 2), heldout=1), progress=False)
    assert not [ids for ids, _ in seen if ids == [2]]


def test_c0_may_not_reach_the_general_tasks_lambada_sample(tiny_llama, data_dir, tmp_path, monkeypatch):
    import neuraldb

    model, tok = tiny_llama
    monkeypatch.setattr(neuraldb, "edit", lambda *a, **k: pytest.fail("edited before checking C0's passages"))
    with pytest.raises(ValueError, match="--linear-c0-passages 5200"):
        run_study(model, tok, sizes=[2], readers=["linear"], output_dir=tmp_path, data_dir=data_dir, config=CFG,
                  general_tasks="lambada_openai", general_limit=20,
                  linear=LinearSweep(lams=(1.0,), c0_passages=(5200,)))
