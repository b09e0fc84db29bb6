"""Files the evaluation writes: ordinary modes (0666 / 0777 less the umask, not mkstemp's 0600) for
reports, gate reports and releases, and atomic writes that leave the old file and no temporary."""

from __future__ import annotations

import os
import stat

import pytest

import neuraldb
from evals import report as rep
from evals.gate import gate
from neuraldb.io import atomic_dir, atomic_write, write_text

from conftest import tiny_model
from test_gate import POLICY, general_task, synthetic_report


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def no_temporaries(folder) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_report_and_gate_report_files_are_0644(tmp_path, umask022):
    report = synthetic_report(general={"sciq": general_task()})
    json_path, md_path = rep.write_report(report, tmp_path / "new" / "run")
    assert mode(json_path) == mode(md_path) == 0o644 and mode(tmp_path / "new") == 0o755
    result = gate(POLICY, report=report, output_dir=tmp_path / "gate")
    assert result["passed"]
    names = {"gate.json", "gate.md", "gate_metrics.png", "gate_general.png", "gate_firing.png"}
    assert names <= {p.name for p in (tmp_path / "gate").iterdir()}
    assert {name: mode(tmp_path / "gate" / name) for name in names} == dict.fromkeys(names, 0o644)
    assert no_temporaries(tmp_path / "gate")


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
            os.chmod(tmp / "f", 0o600)  # like a file from tempfile.mkstemp
    finally:
        os.umask(old)
    assert mode(path) == 0o640 and mode(tmp_path / "d") == 0o750 and mode(tmp_path / "d" / "f") == 0o640


@pytest.fixture(scope="module")
def small_store():
    model, tok = tiny_model("llama")
    facts = [neuraldb.Fact(prompt="the city of {}", subject="the eiffel tower", target_new="rome",
                           target_true="paris", id="e1")]
    cfg = neuraldb.EditConfig(layer=1, steps=3, context_prefixes=("the",), context_length=2)
    return neuraldb.edit(model, tok, facts, config=cfg, progress=False)


def test_release_folder_and_files_have_ordinary_modes(tmp_path, umask022, small_store):
    report = {"schema": "neuraldb.gate/1", "passed": True, "failed": [], "policy": {"path": "p.yaml"}}
    out = neuraldb.save_release(tmp_path / "rel", "tiny-llama", small_store, report=report,
                                evaluation=synthetic_report())
    assert mode(out) == 0o755
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gate.json", "manifest.json", "report.json", "store.safetensors"]
    assert {name: mode(out / name) for name in files} == dict.fromkeys(files, 0o644)
    assert no_temporaries(tmp_path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "report.md", "old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    rep.write_json({"a": 1}, tmp_path / "report.json")
    with pytest.raises(ValueError):  # NaN is not JSON: nothing is written over the old report
        rep.write_json({"a": float("nan")}, tmp_path / "report.json")
    assert (tmp_path / "report.json").read_text() == '{\n "a": 1\n}\n' and no_temporaries(tmp_path)


def test_a_failed_folder_write_leaves_the_old_folder_and_no_temporary(tmp_path):
    target = tmp_path / "release"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    for existing in ("error", "replace", "keep"):
        with pytest.raises(RuntimeError):
            with atomic_dir(target, existing=existing) as tmp:
                (tmp / "a").write_text("new")
                raise RuntimeError("interrupted")
        assert (target / "a").read_text() == "old" and no_temporaries(tmp_path)
    with pytest.raises(FileExistsError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("new")
    with atomic_dir(target, existing="keep") as tmp:  # another writer finished first: theirs is kept
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "old"
    with atomic_dir(target, existing="replace") as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new" and no_temporaries(tmp_path)


def test_without_an_exchange_a_replace_takes_two_renames_and_an_error_restores_the_old(tmp_path, monkeypatch):
    from neuraldb import io

    target = tmp_path / "release"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # a system or file system without one
    with atomic_dir(target, existing="replace") as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new" and no_temporaries(tmp_path)
    real, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 3:  # 1: into place (refused), 2: the old one aside, 3: the new one in
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target, existing="replace") as tmp:
            (tmp / "a").write_text("newer")
    assert (target / "a").read_text() == "new" and no_temporaries(tmp_path)


def test_remove_stale_removes_only_dead_writers_temporaries(tmp_path):
    import subprocess
    import sys

    from neuraldb.io import remove_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    names = [f".r.tmp-{dead}-x", f".r.old-{dead}-1", f".r.tmp-{os.getpid()}-x", f".rr.tmp-{dead}-x", ".r.tmp-abc"]
    for name in names:
        (tmp_path / name).mkdir()
    assert sorted(p.name for p in remove_stale(tmp_path / "r")) == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
