"""The linear reader's settings and their choice on held-out facts (evals.linear_sweep)."""
import argparse

import pytest

from evals.linear_sweep import DEFAULT_LAMS, LinearSweep, choose, generic_texts, heldout_cases
from evals.study import add_study_arguments


def test_settings_are_checked_and_name_their_option():
    assert LinearSweep().lams == DEFAULT_LAMS and LinearSweep().sweeps
    assert not LinearSweep(lams=(15000,)).sweeps and LinearSweep(lams=(1, 1, 10)).lams == (1.0, 10.0)
    for bad, option in (({"lams": ()}, "--linear-lams"), ({"lams": (10, 0)}, "--linear-lams"),
                        ({"lams": (float("nan"),)}, "--linear-lams"), ({"c0_passages": (0,)}, "--linear-c0-passages"),
                        ({"heldout": 0}, "--linear-heldout")):
        with pytest.raises(ValueError, match=option):
            LinearSweep(**bad)


def _parser():
    p = argparse.ArgumentParser(prog="neuraldb study")
    add_study_arguments(p)
    return p


@pytest.mark.parametrize("bad", ["1,ten", "0", "-5,10", ""])
def test_bad_lam_list_exits_2_naming_the_option(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["--linear-lams", bad])
    assert exc.value.code == 2 and "--linear-lams" in capsys.readouterr().err


def test_cli_options_reach_the_settings():
    from evals.study import _linear_sweep

    args = _parser().parse_args(["--linear-lams", "1,1e3", "--linear-c0-passages", "1000,200", "--linear-heldout", "30"])
    assert _linear_sweep(args) == LinearSweep(lams=(1.0, 1000.0), c0_passages=(200, 1000), heldout=30)
    assert _parser().parse_args(["--lam", "15000"]).linear_lams == (15000.0,)  # the old flag: a fixed lam


def test_choose_takes_the_best_held_out_score_ties_to_the_larger_lam():
    rows = [{"size": 10, "lam": None, "c0_passages": None, "score": 99.0},  # the unedited model is no candidate
            {"size": 10, "lam": 1.0, "c0_passages": 200, "score": 60.0},
            {"size": 10, "lam": 100.0, "c0_passages": 200, "score": 80.0},
            {"size": 10, "lam": 1000.0, "c0_passages": 200, "score": 80.0},
            {"size": 100, "lam": 1.0, "c0_passages": 200, "score": 70.0},
            {"size": 100, "lam": 1.0, "c0_passages": 1000, "score": 75.0}]
    best = choose(rows)
    assert (best[10]["lam"], best[10]["c0_passages"]) == (1000.0, 200)
    assert (best[100]["lam"], best[100]["c0_passages"]) == (1.0, 1000)


class _Case:
    def __init__(self, i, subject):
        self.fact = argparse.Namespace(id=f"f{i}", subject=subject)


def test_heldout_cases_are_about_other_subjects():
    study = [_Case(0, "Rome"), _Case(1, "Paris")]
    later = [_Case(2, "rome"), _Case(3, "Oslo"), _Case(4, "Paris"), _Case(5, "Bern")]
    assert [c.fact.id for c in heldout_cases(later, study, 2)] == ["f3", "f5"]
    with pytest.raises(ValueError, match="--linear-heldout asks for 3"):
        heldout_cases(later, study, 3)


def test_generic_texts_from_a_file_of_ones_own(tmp_path):
    (tmp_path / "wiki.txt").write_text("first passage\n\nsecond passage\nthird\n")
    assert generic_texts(2, source=tmp_path / "wiki.txt") == ["first passage", "second passage"]
    with pytest.raises(ValueError, match="holds 3 passages"):
        generic_texts(4, source=tmp_path / "wiki.txt")
