"""`neuraldb fire-rate` (evals.firing.fire_rate) end to end on SmolLM2 (a few facts, a few passages)."""

import json




def test_fire_rate_report_counts_positions_recall_and_misses(smollm2, shared_data, tmp_path, capsys):
    from evals.firing.fire_rate import main

    out = tmp_path / "report.json"
    assert main(["--facts", "counterfact", "--n", "24", "--passages", "0:6", "--calibrate", "no", "--gamma", "0.65",
                 "0.9", "--data-dir", str(shared_data), "--cache-dir", str(tmp_path / "keys"), "--quiet",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["stored"] == 24 and report["unrelated"]["positions"] > 300
    gates = {(g["gamma"], g["word_check"]): g for g in report["gates"]}
    assert sorted(gates) == [(0.65, False), (0.65, True), (0.9, False), (0.9, True)]
    for word in (False, True):  # raising gamma never adds a fire
        assert gates[0.9, word]["false_fires"] <= gates[0.65, word]["false_fires"]
    for gamma in (0.65, 0.9):  # the word check only removes fires, and keeps the subject's own
        plain, checked = gates[gamma, False], gates[gamma, True]
        assert checked["false_fires"] <= plain["false_fires"]
        assert checked["paraphrase"]["fires_on_other_facts"] <= plain["paraphrase"]["fires_on_other_facts"]
        assert checked["paraphrase"]["recall_subject"] >= plain["paraphrase"]["recall_subject"] - 0.05
    low, high = gates[0.65, False], gates[0.9, False]
    for g in report["gates"]:
        p = g["paraphrase"]
        assert p["prompts"] >= 24 and 0.0 <= p["recall_any"] <= 1.0
        missed = p["subject_located"] - round(p["recall_subject"] * p["subject_located"])
        assert sum(p["subject_misses"].values()) == missed  # every subject-token miss has a reason
    assert high["paraphrase"]["recall_subject"] <= low["paraphrase"]["recall_subject"]
    printed = capsys.readouterr().out
    assert "FALSE FIRES" in printed and "subject-token misses" in printed


def test_fire_rate_calibrated_margins_on_the_same_activations(smollm2, shared_data, tmp_path, capsys):
    """Several calibration margins are measured in one run; a larger margin never adds a
    fire nor a recalled paraphrase, and the calibrated report prints."""
    from evals.firing.fire_rate import main

    out = tmp_path / "report.json"
    assert main(["--facts", "counterfact", "--n", "24", "--passages", "0:4", "--calibrate", "only", "--gamma", "0.65",
                 "--margin", "0.0", "0.1", "--calib-text", "lambada@2:16", "--word-check", "no", "--data-dir", str(shared_data),
                 "--cache-dir", str(tmp_path / "keys"), "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["calibration"]["margins"] == [0.0, 0.1] and report["calibration"]["positions"] > 100
    # passages 2 and 3 are evaluated: they are dropped from the calibration text (held out by construction)
    assert report["calibration"]["dropped_evaluated"] == 2 and report["calibration"]["texts"] == 12
    small, large = report["gates"]
    assert (small["margin"], large["margin"]) == (0.0, 0.1) and small["calibrated"] and large["calibrated"]
    assert large["false_fires"] <= small["false_fires"]
    assert large["paraphrase"]["recall_any"] <= small["paraphrase"]["recall_any"]
    assert "margins [0.0, 0.1]" in capsys.readouterr().out


def test_default_calibration_text_is_never_the_evaluated_text(tmp_path):
    """``default`` calibration: the general tasks' inputs plus the LAMBADA passages that are
    not evaluated (all of them when another text is evaluated)."""
    from pathlib import Path

    from evals.firing.fire_rate import calibration_texts, load_text_spec

    d = Path(tmp_path)
    (d / "sciq").mkdir(), (d / "mmlu").mkdir(), (d / "wsc273").mkdir(), (d / "lambada_openai").mkdir()
    (d / "sciq" / "sciq_test.jsonl").write_text("".join(json.dumps({"support": f"support {i}"}) + "\n" for i in range(3)))
    (d / "mmlu" / "mmlu_test.jsonl").write_text("".join(json.dumps({"question": f"q {i}"}) + "\n" for i in range(10)))
    (d / "wsc273" / "wsc273_test.jsonl").write_text(json.dumps({"text": "The trophy did not fit."}) + "\n")
    (d / "lambada_openai" / "lambada_test.jsonl").write_text(
        "".join(json.dumps({"text": f"passage {i}"}) + "\n" for i in range(6)))
    assert calibration_texts(d) == ["support 0", "support 1", "support 2", "q 0", "q 5", "The trophy did not fit."]
    evaluated_slice = load_text_spec("default", d, (None, "1:3"))
    assert [t for t in evaluated_slice if t.startswith("passage")] == ["passage 0", "passage 3", "passage 4", "passage 5"]
    other_text = load_text_spec("default", d, ("my_text.txt", None))
    assert [t for t in other_text if t.startswith("passage")] == [f"passage {i}" for i in range(6)]
    assert not any(t.startswith("passage") for t in load_text_spec("default", d, (None, None)))  # all evaluated


def test_a_fire_at_a_word_of_the_subject_is_related_anywhere_else_false():
    from evals.firing.fire_rate import fired_on_subject_word

    class Tok:  # decode is all the rule needs
        vocab = ["<s>", "Mr", ".", " Hend", "erson", "'s", " said", " Stein", "berg", " of", " the", " Brad"]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))

    tok = Tok()
    assert fired_on_subject_word(tok, [0, 1, 2, 3, 4], "Erin Henderson")  # "Mr. Henderson" at "Henderson"
    assert fired_on_subject_word(tok, [0, 1, 2, 3, 4, 5], "Erin Henderson")  # possessive
    assert fired_on_subject_word(tok, [0, 1, 2, 3], "Erin Henderson")  # "Hend": the word so far, 4+ letters
    assert not fired_on_subject_word(tok, [0, 11, 7, 8], "Brad Silverberg")  # "Brad Steinberg": another name
    assert not fired_on_subject_word(tok, [0, 1, 2, 3, 4, 6], "Erin Henderson")  # fired at " said"
    assert not fired_on_subject_word(tok, [0, 9], "Autonomous University of Barcelona")  # " of" names no one
    assert not fired_on_subject_word(tok, [0, 10], "The Lesson")
    assert fired_on_subject_word(tok, [0, 11], "Brad Silverberg")


def test_glue_text_is_one_text_per_sentence_and_a_missing_file_is_named(tmp_path):
    import pytest

    from evals.firing.fire_rate import unrelated_texts

    glue = tmp_path / "glue"
    glue.mkdir()
    rows = {"sst2": [{"sentence": "a fine film ", "label": 1}], "rte": [{"sentence1": "A man sleeps.", "sentence2": "Nobody sleeps."}],
            "mrpc": [{"sentence1": "Shares rose.", "sentence2": ""}], "cola": [{"sentence": "Him saw she."}]}
    for task, recs in rows.items():
        (glue / f"{task}_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert unrelated_texts("glue", tmp_path) == ["a fine film", "A man sleeps.", "Nobody sleeps.", "Shares rose.",
                                                 "Him saw she."]
    (glue / "cola_validation.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="cola_validation.jsonl"):
        unrelated_texts("glue", tmp_path)


def test_report_keys_are_the_edit_keys_and_one_pass_serves_two_offsets(tiny_llama, tmp_path):
    """The report stores the keys ``neuraldb.edit`` would compute; reading the position
    before the subject in the same forward passes changes nothing of the keys."""
    import torch

    import neuraldb
    from neuraldb import Fact
    from evals.firing.measure import _group_means, _group_means_at, group_keys

    model, tok = tiny_llama
    facts = [Fact(prompt="{} plays the", subject=s, target_new="piano", id=f"f{i}")
             for i, s in enumerate(["alpha beta", "gamma", "delta epsilon zeta"])]
    templates = ["{}", "the cat . {}", "a dog saw . {}"]
    keys = group_keys(model, tok, facts, layer=1, templates=templates, cache_dir=tmp_path, progress=False).combine(0.5)
    torch.testing.assert_close(keys, neuraldb.compute_keys(model, tok, facts, layer=1, templates=templates).cpu(),
                               rtol=1e-5, atol=1e-6)
    at0, at1 = _group_means_at(model, tok, facts, 1, templates, 2, (0, 1))
    for a, b in zip(at0, _group_means(model, tok, facts, 1, templates, 2)):
        assert torch.equal(a, b)
    assert not torch.equal(at0[1], at1[1])  # the previous position is another activation


def test_case_folding_study_picks_only_texts_with_a_subject_in_another_case():
    from evals.firing.case_folding import candidate_texts, case_variants

    assert case_variants("The Eiffel Tower") == ["the eiffel tower", "THE EIFFEL TOWER"]
    assert case_variants("euro") == ["EURO", "Euro"]
    texts = ["We saw The Eiffel Tower.", "we saw the eiffel tower.", "THE EIFFEL TOWER!", "An eiffel of towers.",
             "Both The Eiffel Tower and the eiffel tower."]
    assert candidate_texts(texts, ["The Eiffel Tower", "Brian De Palma"]) == [1, 2, 4]
