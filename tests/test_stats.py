"""evals.stats: one name per test, old reports' names still read, and the gate deciding an old
report (written with the names of earlier versions) exactly as a new one."""

from __future__ import annotations

import json

import pytest

from evals import report as rep
from evals import stats
from evals.decision import decide

from test_gate import POLICY, general_task, synthetic_report

OLD_NAMES = {
    "exact McNemar (binomial test on discordant pairs)": "mcnemar_exact",  # report.py, before evals.stats
    "paired t-test": "t",
    "McNemar exact": "mcnemar_exact",  # gate rows
    "Wilcoxon signed-rank": "wilcoxon",
    "Fisher exact (unpaired)": "fisher_exact",
    "z-test from the intervals (unpaired)": "z_intervals",
}


def test_every_name_maps_to_one_id_and_one_display_name():
    for ident, shown in stats.TEST_IDS.items():
        assert stats.canonical_test(ident) == ident and stats.canonical_test(shown) == ident
        assert stats.display_name(ident) == shown
    for old, ident in OLD_NAMES.items():
        assert stats.canonical_test(old) == ident
    assert stats.canonical_test(None) is None and stats.display_name("") is None
    assert stats.display_name("some other test") == "some other test"


def test_reports_store_the_ids():
    m = stats.summarize_metric([0, 0, 1, 1], [1, 1, 1, 0], kind="proportion")
    assert m["test"]["name"] == "mcnemar_exact"
    assert stats.summarize_metric([0.1, 0.2, 0.4], [0.3, 0.2, 0.9], kind="mean")["test"]["name"] == "t"
    with pytest.raises(ValueError, match="unknown paired test"):
        stats.paired_test([1], [0], test="sign")


def test_wilson_interval_at_the_ends_is_scipys():
    assert stats.proportion_ci(0, 5)["ci"][0] == 0.0 and stats.proportion_ci(5, 5)["ci"][1] == 1.0
    assert stats.proportion_ci(0, 0)["ci"] is None


def _with_old_names(report):
    old = json.loads(json.dumps(report))
    for m in old["metrics"].values():
        m["test"]["name"] = {"mcnemar_exact": "exact McNemar (binomial test on discordant pairs)",
                             "t": "paired t-test"}[m["test"]["name"]]
    return old


def test_the_gate_reads_reports_written_with_old_test_names(tmp_path):
    new = synthetic_report(specificity=(32, 18), general={"sciq": general_task(lost=20, after=40)})
    old = _with_old_names(new)
    assert old["metrics"]["specificity"]["test"]["name"].startswith("exact McNemar")
    path = tmp_path / "report.json"
    rep.write_json(old, path)
    a, b = decide(new, POLICY), decide(rep.load_report(path), POLICY)
    assert a["criteria"] == b["criteria"] and a["failed"] == b["failed"] == ["specificity drop", "sciq drop"]
    row = next(c for c in b["criteria"] if c["name"] == "specificity drop")
    assert row["test"] == "McNemar exact" and row["p_value"] < 1e-3
    md = rep.render_markdown(rep.load_report(path))
    assert "| McNemar exact |" in md
