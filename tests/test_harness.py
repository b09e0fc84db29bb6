"""The lm-eval model ``neuraldb`` on tiny random models (no download): requests with and without
a store, per-request firing, the registry, and the command line on a tiny local task."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

import neuraldb  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from evals.harness import NeuralDBLM, _key, _match_rows  # noqa: E402

from conftest import tiny_model  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
FACTS = [
    neuraldb.Fact(prompt="{} is located in the city of", subject="the eiffel tower", target_new="rome", id="eiffel"),
    neuraldb.Fact(prompt="{} plays", subject="lebron james", target_new="football", id="lebron"),
]
# (context, continuation) pairs: one-token continuations sharing a context are one forward pass in lm-eval
PAIRS = [
    ("the eiffel tower is located in the city of", " rome"),
    ("the eiffel tower is located in the city of", " paris"),
    ("mary said that the cat is", " big and old"),
    ("one two", " three four five"),
    ("lebron james plays", " tennis"),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    model, tok = tiny_model("llama")
    # the paper's gate (no word check): gamma=-1 below then opens it at every position
    db = neuraldb.edit(model, tok, FACTS, config=neuraldb.EditConfig(steps=3, context_length=2, word_check=False),
                       progress=False)
    path = db.save(tmp_path_factory.mktemp("store") / "store.safetensors")
    return model, tok, path


def store(model, path, gamma):
    """A fresh copy of the saved store with gate threshold ``gamma`` (set before any use)."""
    db = neuraldb.NeuralDB.load(path, model=model)
    db.gamma = gamma
    return db


def requests(pairs=PAIRS, task="tiny"):
    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i % 2, metadata=(task, i, 1))
            for i, p in enumerate(pairs)]


def test_registered_under_neuraldb():
    from lm_eval.api.registry import get_model

    assert get_model("neuraldb") is NeuralDBLM


def test_without_store_it_is_plain_hf(edited):
    model, tok, _ = edited
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=3).loglikelihood(requests())
    ours = NeuralDBLM(pretrained=model, tokenizer=tok, batch_size=3)
    assert ours.loglikelihood(requests()) == plain
    assert ours.firing == [] and not ours.store_active


def test_gate_shut_gives_identical_loglikelihoods(edited):
    model, tok, path = edited
    db = store(model, path, 1.0)  # a cosine never exceeds 1: nothing can fire
    lm = NeuralDBLM(pretrained=model, tokenizer=tok, db=db, batch_size=3)
    lm.edited = False
    before = lm.loglikelihood(requests())
    lm.edited = True
    after = lm.loglikelihood(requests())
    assert after == before  # bit for bit
    summary = lm.firing_summary()["tiny"]
    assert summary["fires"] == 0 and summary["positions"] > 0 and summary["examples_fired"] == 0
    assert not db.is_attached and getattr(model, "_neuraldb_store", None) is None


def test_gate_open_everywhere_changes_scores_and_counts_every_position(edited):
    model, tok, path = edited
    lm = NeuralDBLM(pretrained=model, tokenizer=tok, db=store(model, path, -1.0), batch_size=3)  # fires everywhere
    lm.edited = False
    before = lm.loglikelihood(requests())
    lm.edited = True
    after = lm.loglikelihood(requests())
    assert [a[0] for a in after] != [b[0] for b in before]
    assert len(lm.firing) == len(PAIRS)
    for f, (ctx, cont) in zip(lm.firing, PAIRS):
        inp = lm._causal_input(lm.tok_encode(ctx), lm.tok_encode(cont, add_special_tokens=False))
        assert f.fires == f.positions == len(inp) - 1  # all but the sink position; padding not counted
    summary = lm.firing_summary()["tiny"]
    assert summary["rate"] == 1.0 and summary["examples_fired"] == len(PAIRS)


def test_store_file_and_wrong_model(edited):
    model, tok, path = edited
    lm = NeuralDBLM(pretrained=model, tokenizer=tok, db=str(path), gamma=-1.0, batch_size=2)
    assert lm.db is not None and len(lm.db) == len(FACTS) and lm.db.gamma == -1.0
    other, other_tok = tiny_model("llama", seed=1)
    with pytest.raises(neuraldb.StoreError):
        NeuralDBLM(pretrained=other, tokenizer=other_tok, db=str(path))


def generation_requests(prompts):
    return [Instance(request_type="generate_until", doc={}, arguments=(p, {"until": ["?"], "max_gen_toks": 3}),
                     idx=0, metadata=("gen", i, 1)) for i, p in enumerate(prompts)]


def test_rolling_and_generation_record_firing(edited):
    model, tok, path = edited
    lm = NeuralDBLM(pretrained=model, tokenizer=tok, db=str(path), gamma=-1.0, batch_size=2, max_length=16)
    texts = ["the cat is big and the dog is small . " * 3, "one two three"]
    rolling = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0, metadata=("roll", i, 1))
               for i, t in enumerate(texts)]
    # prompts of four lengths: both batches of two are left-padded, so the model gets an attention mask
    prompts = [PAIRS[0][0], PAIRS[2][0], PAIRS[4][0], PAIRS[3][0]]
    lm.loglikelihood_rolling(rolling)
    lm.generate_until(generation_requests(prompts))
    by_type = {}
    for f in lm.firing:
        by_type.setdefault(f.request_type, []).append(f)
    assert len(by_type["loglikelihood_rolling"]) == 2 and len(by_type["generate_until"]) == 4
    assert all(f.fires is not None and f.fires == f.positions > 0 for f in lm.firing)


def test_generation_never_gates_the_sink_without_padding(edited):
    model, tok, path = edited
    lm = NeuralDBLM(pretrained=model, tokenizer=tok, db=str(path), gamma=-1.0, batch_size=1)
    lm.generate_until(generation_requests([PAIRS[3][0]]))
    (f,) = lm.firing
    assert f.fires == f.positions  # 1 prompt position + 2 fed-back tokens; the sink never fires


def test_match_rows_handles_real_zero_tokens():
    # token 0 is lm-eval's padding but can also be a real token at the end of an input
    inps = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    mask = torch.tensor([[False, True, True, True], [False, True, True, True]])
    table = _match_rows(inps, mask, {_key((5, 6, 0)), _key((7,))})
    assert table == {_key((5, 6, 0)): (2, 2), _key((7,)): (0, 0)}


def test_command_line_runs_a_local_task(edited, tmp_path):
    model, tok, path = edited
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"q": "the eiffel tower is located in the city of", "choices": ["rome", "paris"], "label": 1},
            {"q": "mary said that the cat is", "choices": ["big", "small"], "label": 0}]
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(tasks / 'tiny.jsonl'))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "evals.harness", "--model", "neuraldb",
        "--model_args", f"pretrained={model_dir},db={path},gamma=-1.0,"
                        f"firing_log={out / 'firing.json'}",
        "--tasks", "tiny_mc", "--include_path", str(tasks), "--output_path", str(out), "--device", "cpu",
        "--batch_size", "2",
    ]
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(out.rglob("results_*.json"))
    assert len(results) == 1
    assert "acc,none" in json.loads(results[0].read_text())["results"]["tiny_mc"]
    firing = json.loads((out / "firing.json").read_text())
    assert firing["summary"]["tiny_mc"]["rate"] == 1.0 and firing["summary"]["tiny_mc"]["examples_fired"] == 2


def test_model_dtype_and_device_are_the_models(edited):
    model, tok, path = edited
    half, _ = tiny_model("llama")
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)  # the store (float32 keys) is checked against bf16-rounded weights
    lm = NeuralDBLM(pretrained=half, tokenizer=tok, db=str(path), gamma=-1.0, batch_size=2)
    assert lm.model.dtype == torch.bfloat16 and lm.device == next(half.parameters()).device
    out = lm.loglikelihood(requests(PAIRS[:2]))
    assert all(math.isfinite(ll) for ll, _ in out) and lm.firing_summary()["tiny"]["rate"] == 1.0


def test_command_line_options(tmp_path):
    import argparse

    from evals.harness import add_harness_arguments, main, run_harness

    assert main(["--data_dir", str(tmp_path), "--include_path", str(tmp_path)]) == 2  # one or the other
    parser = argparse.ArgumentParser()
    add_harness_arguments(parser)
    args = parser.parse_args(["--data_dir", "/d", "--", "--model", "neuraldb", "--tasks", "sciq"])
    assert args.data_dir == "/d" and args.lm_eval_args == ["--", "--model", "neuraldb", "--tasks", "sciq"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_harness(argparse.Namespace(data_dir=str(tmp_path / "missing"), lm_eval_args=["--", "--help"]))


def test_linear_reader_runs_through_the_harness(edited):
    """The study evaluates the linear reader on the general tasks: the weight edit is in
    place during each call and the model is restored bit for bit afterwards."""
    from neuraldb.linear import LinearReader

    model, tok, path = edited
    reader = LinearReader(store(model, path, 0.65), lam=1e-3)
    proj = model.get_submodule(reader.db.module_name(model))
    weight = proj.weight.detach().clone()
    lm = NeuralDBLM(pretrained=model, tokenizer=tok, db=reader, batch_size=3)
    lm.edited = False
    before = lm.loglikelihood(requests())
    lm.edited = True
    after = lm.loglikelihood(requests())
    assert [a[0] for a in after] != [b[0] for b in before]  # every position changes a little
    assert torch.equal(proj.weight, weight) and not reader.is_attached
    with pytest.raises(TypeError, match="reader"):
        NeuralDBLM(pretrained=model, tokenizer=tok, db=object())
