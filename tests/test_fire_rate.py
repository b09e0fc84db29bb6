"""`python -m properties.fire_rate` end to end on SmolLM2 (a few facts, a few passages)."""

import json




def test_fire_rate_report_counts_positions_recall_and_misses(smollm2, shared_data, tmp_path, capsys):
    from properties.fire_rate import main

    out = tmp_path / "report.json"
    assert main(["--facts", "counterfact", "--n", "24", "--passages", "0:6", "--calibrate", "no", "--gamma", "0.65",
                 "0.9", "--data-dir", str(shared_data), "--cache-dir", str(tmp_path / "keys"), "--quiet",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["stored"] == 24 and report["unrelated"]["positions"] > 300
    low, high = report["gates"]
    assert high["false_fires"] <= low["false_fires"]  # raising gamma never adds a fire
    for g in (low, high):
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
    from properties.fire_rate import main

    out = tmp_path / "report.json"
    assert main(["--facts", "counterfact", "--n", "24", "--passages", "0:4", "--calibrate", "only", "--gamma", "0.65",
                 "--margin", "0.0", "0.1", "--calib-text", "lambada@10:16", "--data-dir", str(shared_data),
                 "--cache-dir", str(tmp_path / "keys"), "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["calibration"]["margins"] == [0.0, 0.1] and report["calibration"]["positions"] > 100
    small, large = report["gates"]
    assert (small["margin"], large["margin"]) == (0.0, 0.1) and small["calibrated"] and large["calibrated"]
    assert large["false_fires"] <= small["false_fires"]
    assert large["paraphrase"]["recall_any"] <= small["paraphrase"]["recall_any"]
    assert "margins [0.0, 0.1]" in capsys.readouterr().out
