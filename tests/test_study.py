import json

import pytest

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
                       config=CFG, lam=1e-4, progress=False)
    rows = {(r["size"], r["reader"]): r for r in result["rows"]}
    assert set(rows) == {(n, r) for n in (2, 3) for r in ("gated", "calibrated", "linear")}
    assert rows[(2, "gated")]["efficacy"]["post"] == 100.0  # tiny edits that end on the subject
    for r in result["rows"]:
        assert r["efficacy"]["pre"] == rows[(2, "gated")]["efficacy"]["pre"]  # same unedited model
    assert (out / "study.png").stat().st_size > 0 and "| 3 | linear |" in (out / "study.md").read_text()
    assert json.loads((out / "study.json").read_text())["facts"] == 3
    # rerun: the store is resumed from its checkpoint, nothing is edited again
    import neuraldb.editor as editor

    monkeypatch.setattr(editor, "compute_residuals", lambda *a, **k: pytest.fail("recomputed a residual"))
    again = run_study(model, tok, sizes=[2, 3], eval_cases=2, output_dir=out, data_dir=data_dir,
                      config=CFG, lam=1e-4, progress=False)
    assert again["rows"] == result["rows"]
    assert result["edited_this_call"] == 3 and again["edited_this_call"] == 0
    assert "0 in this call" in render_markdown(again) and "3 resumed from the checkpoint" in render_markdown(again)


def test_unknown_reader_is_refused_before_any_edit(tiny_llama, data_dir, tmp_path, monkeypatch):
    import neuraldb

    model, tok = tiny_llama
    monkeypatch.setattr(neuraldb, "edit", lambda *a, **k: pytest.fail("edited before checking the readers"))
    with pytest.raises(ValueError, match="readers \\['gatd'\\] unknown"):
        run_study(model, tok, sizes=[2], readers=["gatd"], output_dir=tmp_path, data_dir=data_dir, config=CFG)
