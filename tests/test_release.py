"""Releases on a tiny random model saved to a folder: round trip, gamma override, and every refusal
(tampered or truncated store, wrong base model, missing manifest fields, non-empty target)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import neuraldb
from evals import release as rel
from evals.release import ReleaseError
from neuraldb.io import sha256_file

from conftest import tiny_model

FACTS = [
    neuraldb.Fact(prompt="the city of {}", subject="the eiffel tower", target_new="rome", target_true="paris", id="e1"),
    neuraldb.Fact(prompt="the sport of {}", subject="lebron james", target_new="tennis", target_true="basketball",
                  id="e2"),
]
CFG = neuraldb.EditConfig(layer=1, steps=3, context_prefixes=("the",), context_length=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny llama saved as a local model folder (what load_model reads), and a store edited on it."""
    model, tok = tiny_model("llama")
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    db = neuraldb.edit(model, tok, FACTS, config=CFG, progress=False)
    return folder, model, tok, db


def _listing(path):
    return sorted((p.relative_to(path).as_posix(), p.read_bytes()) for p in path.rglob("*") if p.is_file())


def test_round_trip_loads_the_base_model_and_attaches_the_store(base, tmp_path):
    folder, model, tok, db = base
    report = {"schema": "neuraldb.gate/1", "passed": True, "failed": [], "policy": {"path": "p.yaml"}}
    out = neuraldb.save_release(tmp_path / "r1", folder, db, report=report)
    assert sorted(p.name for p in out.iterdir()) == ["gate.json", "manifest.json", "store.safetensors"]
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("base_model", "layer_fingerprint", "neuraldb_version", "gamma", "layer", "facts", "created"):
        assert manifest[key] not in (None, ""), key
    assert manifest["facts"] == 2 and manifest["layer"] == 1 and manifest["gamma"] == db.gamma
    assert manifest["per_key_thresholds"] is False
    assert manifest["layer_fingerprint"] == db.fingerprint and manifest["neuraldb_version"] == neuraldb.__version__
    store_entry = manifest["files"]["store"]
    assert store_entry["size"] == (out / "store.safetensors").stat().st_size
    assert store_entry["sha256"] == sha256_file(out / "store.safetensors")
    assert manifest["files"]["report"]["kind"] == "gate" and manifest["gate"]["passed"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    loaded_model, loaded_tok, loaded = neuraldb.load_release(out)
    try:
        assert loaded.is_attached and loaded_model._neuraldb_store is loaded
        assert loaded.ids == db.ids and torch.equal(loaded.keys, db.keys) and torch.equal(loaded.residuals, db.residuals)
        ids = loaded_tok("the city of the eiffel tower", return_tensors="pt").input_ids
        with torch.no_grad():
            edited = loaded_model(ids).logits
        with db.attached(model):
            with torch.no_grad():
                expected = model(ids).logits
        torch.testing.assert_close(edited, expected)
    finally:
        loaded.detach()
    assert rel.release_report(out) == report


def test_gamma_override_and_manifest_gamma(base, tmp_path):
    folder, model, tok, db = base
    out = neuraldb.save_release(tmp_path / "r", folder, db)
    _, _, forced = neuraldb.load_release(out, model=model, tokenizer=tok, gamma=0.0, attach=False)
    assert forced.gamma == 0.0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["gamma"] = -1.0  # editing the manifest re-tunes (here: breaks) the release
    (out / "manifest.json").write_text(json.dumps(manifest))
    _, _, edited = neuraldb.load_release(out, model=model, tokenizer=tok, attach=False)
    assert edited.gamma == -1.0
    with pytest.raises(ReleaseError, match="gamma"):
        neuraldb.load_release(out, model=model, tokenizer=tok, gamma=1.5)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_store_is_refused_before_anything_loads(base, tmp_path, monkeypatch, damage):
    folder, model, tok, db = base
    out = neuraldb.save_release(tmp_path / "r", folder, db)
    store = out / "store.safetensors"
    data = bytearray(store.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        store.write_bytes(bytes(data))
        match = "sha256"
    else:
        store.write_bytes(bytes(data[: len(data) - 100]))
        match = "truncated"

    def no_loading(*a, **k):
        raise AssertionError("nothing may be loaded from a damaged release")

    monkeypatch.setattr("neuraldb.models.load_model", no_loading)
    monkeypatch.setattr("neuraldb.store.NeuralDB.load", no_loading)
    with pytest.raises(ReleaseError, match=match):
        neuraldb.load_release(out)


def test_wrong_base_model_is_a_clear_error(base, tmp_path):
    folder, model, tok, db = base
    out = neuraldb.save_release(tmp_path / "r", folder, db)
    other, other_tok = tiny_model("llama", seed=1)  # same shapes, other weights
    with pytest.raises(neuraldb.StoreError, match="fingerprint"):
        neuraldb.load_release(out, model=other, tokenizer=other_tok)
    assert not hasattr(other, "_neuraldb_store")
    # the manifest pointing at another base model folder: the same refusal
    elsewhere = tmp_path / "other-model"
    other.save_pretrained(elsewhere)
    other_tok.save_pretrained(elsewhere)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["base_model"] = str(elsewhere)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match="made for base model .*fingerprint"):
        neuraldb.load_release(out)


def test_missing_manifest_fields_are_named(base, tmp_path):
    folder, model, tok, db = base
    out = neuraldb.save_release(tmp_path / "r", folder, db)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["gamma"], manifest["layer_fingerprint"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match="lacks the field\\(s\\) layer_fingerprint, gamma"):
        neuraldb.load_release(out, model=model, tokenizer=tok)
    (out / "manifest.json").unlink()
    with pytest.raises(ReleaseError, match="no manifest.json"):
        neuraldb.load_release(out, model=model, tokenizer=tok)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ReleaseError, match="not valid JSON"):
        neuraldb.load_release(out, model=model, tokenizer=tok)


def test_manifest_that_does_not_describe_its_store(base, tmp_path):
    folder, model, tok, db = base
    out = neuraldb.save_release(tmp_path / "r", folder, db)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["facts"] = 5
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match="facts: manifest 5, store 2"):
        neuraldb.load_release(out, model=model, tokenizer=tok)


def test_never_overwrites_unless_asked(base, tmp_path):
    folder, model, tok, db = base
    target = tmp_path / "r"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(ReleaseError, match="not empty; nothing was written"):
        neuraldb.save_release(target, folder, db)
    assert _listing(target) == [("keep.txt", b"precious")]
    empty = tmp_path / "empty"
    empty.mkdir()
    neuraldb.save_release(empty, folder, db)  # an empty folder is fine
    assert (empty / "manifest.json").is_file()
    neuraldb.save_release(target, folder, db, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "store.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_write_leaves_nothing(base, tmp_path, monkeypatch):
    folder, model, tok, db = base
    target = tmp_path / "r"
    neuraldb.save_release(target, folder, db)
    before = _listing(target)

    def broken_save(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(neuraldb.NeuralDB, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        neuraldb.save_release(tmp_path / "new", folder, db)
    with pytest.raises(OSError, match="disk full"):
        neuraldb.save_release(target, folder, db, overwrite=True)
    assert not (tmp_path / "new").exists()
    assert _listing(target) == before  # the old release is intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_release_with_a_loaded_model_checks_it(base, tmp_path):
    folder, model, tok, db = base
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(neuraldb.StoreError, match="fingerprint"):
        neuraldb.save_release(tmp_path / "r", other, db)
    assert not (tmp_path / "r").exists()
    out = neuraldb.save_release(tmp_path / "r", model, db)
    assert json.loads((out / "manifest.json").read_text())["base_model"] == "tiny-llama"


def test_evaluation_report_is_stored_as_report_json(base, tmp_path):
    folder, model, tok, db = base
    src = tmp_path / "report.json"
    src.write_text(json.dumps({"schema": "neuraldb.evaluate/1", "metrics": {}}))
    out = neuraldb.save_release(tmp_path / "r", folder, db, report=src)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["report"]["path"] == "report.json"
    (out / "report.json").write_text("{}")
    with pytest.raises(ReleaseError, match="report.json has"):
        rel.verify_release(out)
    assert os.path.exists(out / "store.safetensors")


def test_gate_and_evaluation_reports_together(base, tmp_path):
    folder, model, tok, db = base
    gate_report = {"schema": "neuraldb.gate/1", "passed": True, "failed": []}
    evaluation = {"schema": "neuraldb.evaluate/1", "metrics": {"efficacy": {}}}
    out = neuraldb.save_release(tmp_path / "r", folder, db, report=gate_report, evaluation=evaluation)
    assert rel.release_report(out) == gate_report and rel.release_report(out, "evaluation") == evaluation
    with pytest.raises(ReleaseError, match="pass each once"):
        neuraldb.save_release(tmp_path / "r2", folder, db, report=evaluation, evaluation=evaluation)
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("field,value", [("size", "str"), ("size", -1), ("size", True), ("sha256", 5),
                                         ("sha256", "abc"), ("path", 3)])
def test_wrongly_typed_manifest_file_entries_name_the_field(base, tmp_path, field, value):
    folder, model, tok, db = base
    out = neuraldb.save_release(tmp_path / "r", folder, db)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["files"]["store"]
    entry[field] = str(entry["size"]) if value == "str" else value
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match=f"files.store.{field} must be"):
        rel.verify_release(out)


_KILLED_SAVE = """
import os, shutil, sys
import neuraldb
from neuraldb import io
target, store, base, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = []
def step(real):
    def killed(*args, **kwargs):
        calls.append(real.__name__)
        if len(calls) == kill_at:
            os._exit(9)  # a kill: no except, no finally
        return real(*args, **kwargs)
    return killed
os.rename, os.replace, shutil.rmtree = step(os.rename), step(os.replace), step(shutil.rmtree)
if hasattr(io, "_exchange"):
    io._exchange = step(io._exchange)
neuraldb.save_release(target, base, neuraldb.NeuralDB.load(store), report={"version": "new"}, overwrite=True)
print("finished after", calls)
"""


@pytest.mark.parametrize("kill_at", [2, 3, 4])
def test_an_overwrite_killed_at_any_step_leaves_a_release_and_the_next_save_cleans_up(base, tmp_path, kill_at):
    """A real kill (os._exit in a child process) at the k-th rename/removal of an overwrite: the
    target still holds a whole release (old or new); the next save removes what the kill left."""
    import subprocess
    import sys

    folder, model, tok, db = base
    target, store = tmp_path / "r", db.save(tmp_path / "store.safetensors")
    neuraldb.save_release(target, folder, db, report={"version": "old"})
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's neuraldb, not an installed one
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(target), str(store), str(folder), str(kill_at)],
                   check=False, cwd=tmp_path, timeout=300, env=env)
    assert rel.release_report(target)["version"] in ("old", "new")  # verified: a whole release
    assert rel.load_store(target).ids == db.ids
    neuraldb.save_release(target, folder, db, report={"version": "newer"}, overwrite=True)
    assert rel.release_report(target)["version"] == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "store.safetensors"]  # no hidden copies left


def test_stale_temporaries_of_a_live_save_or_of_others_are_kept(base, tmp_path):
    folder, model, tok, db = base
    target = tmp_path / "r"
    live = tmp_path / f".r.tmp-{os.getpid()}-x"  # a save in progress in this very process
    dead_other = tmp_path / ".other.tmp-1-x"  # another release's temporary
    mine = tmp_path / ".r.tmp-notapid"  # not named by neuraldb.io
    for folder_ in (live, dead_other, mine):
        folder_.mkdir()
    neuraldb.save_release(target, folder, db)
    assert live.is_dir() and dead_other.is_dir() and mine.is_dir()


def test_a_store_without_fingerprint_is_not_released(base, tmp_path):
    folder, model, tok, db = base
    blank = db.head(len(db))
    blank.fingerprint = ""
    with pytest.raises(ReleaseError, match="'fingerprint' is empty"):
        neuraldb.save_release(tmp_path / "r", folder, blank)
    assert not (tmp_path / "r").exists()
