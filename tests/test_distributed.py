"""Distributed editing (neuraldb.distributed): 2 gloo processes under torchrun give the
single-process store (same ids, order, records; bitwise keys and residuals), resume per rank,
and stop on every rank with an error naming the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuraldb import Fact, NeuralDB
from neuraldb.distributed import DistributedEditError, rank_checkpoint, shard

from conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]

# subject "paris" in batches 0 and 2 (of 2 facts): one unit, so it stays on one rank
SUBJECTS = ["paris", "rome", "berlin", "london", "madrid", "paris", "apple", "google"]
PROMPTS = ["the capital of {} is", "the city of {} is located in", "the tower of {} is", "the {} plays the sport of",
           "a team of {} plays", "the old {} was made by", "the new {} is", "the big {} is"]
TARGETS = ["tennis", "football", "red", "blue", "green", "toyota", "dog", "cat"]
FACTS = [{"id": f"f{i}", "prompt": p, "subject": s, "target_new": t}
         for i, (s, p, t) in enumerate(zip(SUBJECTS, PROMPTS, TARGETS))]

API_SCRIPT = """
import json, sys
import neuraldb
model, tok = neuraldb.load_model(sys.argv[1])
facts = json.load(open(sys.argv[2]))
import torch.distributed as dist, os
lr = 0.5 if sys.argv[5] != "differ" or os.environ["RANK"] == "0" else 0.4
if sys.argv[5] == "kill" and os.environ["RANK"] == "1":  # rank 1 dies after its first batch, as if killed
    from neuraldb import editor
    real, done = editor._edit_batch, []
    def dies(*args, **kwargs):
        if done:
            os._exit(9)
        done.append(real(*args, **kwargs))
        return done[-1]
    editor._edit_batch = dies
db = neuraldb.edit(model, tok, facts, config=neuraldb.EditConfig(batch_size=2, lr=lr), checkpoint=sys.argv[3],
                   distributed=True, progress=False)
print("rank", os.environ["RANK"], "got", None if db is None else len(db))
if db is not None:
    db.save(sys.argv[4])
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _run(args: list[str], *, cwd: Path, nproc: int = 0) -> subprocess.CompletedProcess:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc else []
    return subprocess.run([sys.executable, *launch, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=600)


def _edit(folder: Path, out: Path, *extra: str, nproc: int = 0, model: str | None = None,
          facts: Path | None = None) -> subprocess.CompletedProcess:
    return _run(["-m", "neuraldb", "edit", "--model", model or str(folder / "model"),
                 "--facts", str(facts or folder / "facts.json"), "--out", str(out), *extra],
                cwd=folder, nproc=nproc)


def _same_store(a: NeuralDB, b: NeuralDB) -> float:
    """Assert everything but the keys' and residuals' values is equal; return their max |difference|."""
    assert a.ids == b.ids
    assert a.facts == b.facts  # records, with each fact's loss, nll, steps and self-check
    assert a.config == b.config and a.layer == b.layer and a.fingerprint == b.fingerprint
    assert torch.equal(a.words, b.words) and torch.equal(a.word_starts, b.word_starts)
    assert torch.equal(a.thresholds, b.thresholds)
    return max((a.keys - b.keys).abs().max().item(), (a.residuals - b.residuals).abs().max().item())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist")
    model, tok = tiny_model("llama")
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    (folder / "facts.json").write_text(json.dumps(FACTS))
    (folder / "edit.py").write_text(API_SCRIPT)
    return folder


@pytest.fixture(scope="module")
def single(folder: Path) -> NeuralDB:
    """The single-process store of FACTS (batches of 2)."""
    done = _edit(folder, folder / "one.safetensors", "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    return NeuralDB.load(folder / "one.safetensors")


# ------------------------------------------------------------------------- sharding (no processes)
def _facts(subjects: list[str]) -> list[Fact]:
    return [Fact(prompt="the city of {} is", subject=s, target_new="rome", id=f"f{i}") for i, s in enumerate(subjects)]


def test_shard_keeps_whole_batches_and_subjects_together():
    parts = shard(_facts(SUBJECTS), batch_size=2, world_size=2)
    assert parts == [[0, 1, 4, 5], [2, 3, 6, 7]]  # batches 0 and 2 share "paris"
    assert sorted(i for p in parts for i in p) == list(range(8))
    parts = shard(_facts(SUBJECTS), batch_size=2, world_size=2, share_subjects=False)
    assert all(len(p) == 4 for p in parts)


def test_shard_puts_the_short_last_batch_last_on_its_rank():
    for n in range(4, 12):
        for p in shard(_facts([f"s{i}" for i in range(n)]), batch_size=3, world_size=2):
            full = [p[i : i + 3] for i in range(0, len(p), 3)]
            assert all(len(b) == 3 for b in full[:-1]) and p == sorted(p)


def test_shard_more_processes_than_units_names_the_fix():
    with pytest.raises(DistributedEditError, match=r"use at most 1 processes .* smaller batch_size"):
        shard(_facts(["a", "b", "a", "c"]), batch_size=2, world_size=2)  # both batches hold "a"


def test_rank_checkpoint_names():
    assert rank_checkpoint("out/run.partial.safetensors", 1, 4) == Path("out/run.partial.rank1-of-4.safetensors")


# ------------------------------------------------------------------------------- 2 gloo processes
def test_torchrun_edit_equals_single_process(folder: Path, single: NeuralDB):
    out = folder / "two.safetensors"
    done = _edit(folder, out, "--batch-size", "2", nproc=2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("facts ->") == 1 and "(2 processes)" in done.stdout  # only rank 0 writes
    two = NeuralDB.load(out)
    assert two.facts == single.facts  # records, with each fact's loss, nll and steps
    assert _same_store(single, two) == 0.0  # the same batches on each rank: bitwise
    assert torch.equal(single.keys, two.keys) and torch.equal(single.residuals, two.residuals)
    assert not list(folder.glob("two.partial.rank*"))  # the run finished: no checkpoint left


def test_python_api_and_resume_per_rank(folder: Path, single: NeuralDB):
    ckpt = folder / "api.partial.safetensors"
    done = _run([str(folder / "edit.py"), str(folder / "model"), str(folder / "facts.json"), str(ckpt),
                 str(folder / "api.safetensors"), "same"], cwd=folder, nproc=2)
    assert done.returncode == 0, done.stderr
    assert "rank 0 got 8" in done.stdout and "rank 1 got None" in done.stdout
    assert _same_store(single, NeuralDB.load(folder / "api.safetensors")) == 0.0
    # a kill after rank 1's first batch: its checkpoint holds 2 of its 4 facts (one marked), rank 0's all 4
    part = rank_checkpoint(ckpt, 1, 2)
    half = NeuralDB.load(part).head(2)
    marked = half.ids[0]
    half.update(marked, residual=torch.zeros(half.d_model))
    half.save(part)
    refused = _edit(folder, folder / "resumed.safetensors", "--batch-size", "2", "--checkpoint", str(ckpt), nproc=2)
    assert refused.returncode != 0 and "pass --resume" in refused.stderr
    done = _edit(folder, folder / "resumed.safetensors", "--batch-size", "2", "--checkpoint", str(ckpt), "--resume",
                 nproc=2)
    assert done.returncode == 0, done.stderr
    resumed = NeuralDB.load(folder / "resumed.safetensors")
    row = resumed.ids.index(marked)
    assert torch.equal(resumed.residuals[row], torch.zeros(resumed.d_model))  # kept from the checkpoint
    rest = [i for i in range(len(resumed)) if i != row]
    assert torch.equal(resumed.residuals[rest], single.residuals[rest])  # the rest as a single process
    assert torch.equal(resumed.keys, single.keys)
    assert not list(folder.glob("api.partial.rank*"))


def test_a_killed_rank_resumes_from_its_checkpoint(folder: Path, single: NeuralDB):
    ckpt = folder / "kill.partial.safetensors"
    out = folder / "kill.safetensors"
    killed = _run([str(folder / "edit.py"), str(folder / "model"), str(folder / "facts.json"), str(ckpt), str(out),
                   "kill"], cwd=folder, nproc=2)
    assert killed.returncode != 0 and not out.exists()
    assert len(NeuralDB.load(rank_checkpoint(ckpt, 1, 2))) == 2  # its first batch of 2 facts
    done = _edit(folder, out, "--batch-size", "2", "--checkpoint", str(ckpt), "--resume", nproc=2)
    assert done.returncode == 0, done.stderr
    assert _same_store(single, NeuralDB.load(out)) == 0.0
    assert not list(folder.glob("kill.partial.rank*"))


def test_ranks_with_different_configs_stop_with_an_error(folder: Path):
    done = _run([str(folder / "edit.py"), str(folder / "model"), str(folder / "facts.json"),
                 str(folder / "bad.partial.safetensors"), str(folder / "bad.safetensors"), "differ"],
                cwd=folder, nproc=2)
    assert done.returncode != 0
    assert "rank 1 has another config than rank 0" in done.stderr and "'lr': 0.4" in done.stderr
    assert not (folder / "bad.safetensors").exists()


def test_too_many_processes_or_another_world_size_stop_every_rank(folder: Path):
    done = _edit(folder, folder / "big.safetensors", "--batch-size", "8", nproc=2)
    assert done.returncode != 0 and "use at most 1 processes (--nproc-per-node)" in done.stderr
    (folder / "w.partial.rank0-of-3.safetensors").write_bytes(b"")
    done = _edit(folder, folder / "w.safetensors", "--batch-size", "2", "--resume", nproc=2)
    assert done.returncode != 0 and "another number of processes" in done.stderr


# ------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_torchrun_on_smollm2_equals_single_process(tmp_path: Path):
    """3 demo facts (default steps), batches of 2: 2 gloo processes vs 1 (about 2 minutes on 2 busy cores)."""
    from importlib import resources

    facts = json.loads(resources.files("neuraldb").joinpath("data/demo_facts.json").read_text())[:3]
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    runs = {}
    for name, nproc in (("one", 0), ("two", 2)):
        done = _edit(tmp_path, tmp_path / f"{name}.safetensors", "--batch-size", "2", model="smollm2-135m",
                     nproc=nproc)
        assert done.returncode == 0, done.stderr
        runs[name] = NeuralDB.load(tmp_path / f"{name}.safetensors")
    diff = _same_store(runs["one"], runs["two"])
    print(f"SmolLM2, 3 facts: max |difference| 2 ranks vs 1 = {diff}")
    assert diff == 0.0
