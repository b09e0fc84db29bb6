import json

import pytest
import torch

from neuraldb import NeuralDB, StoreError, resolve_arch
from neuraldb.store import layer_fingerprint


def store_for(model, n=0, gamma=0.65, seed=0, layer=1):
    arch = resolve_arch(model)
    d_key, d_model = 64, 32
    db = NeuralDB(
        layer=layer, d_key=d_key, d_model=d_model, gamma=gamma, module_template=arch.mlp_out,
        model_name="tiny", fingerprint=layer_fingerprint(model, arch.mlp_out_at(layer)),
    )
    if n:
        g = torch.Generator().manual_seed(seed)
        db.add([f"f{i}" for i in range(n)], torch.randn(n, d_key, generator=g), torch.randn(n, d_model, generator=g))
    return db


def brute_force(db, q):
    k = db.keys / db.keys.norm(dim=1, keepdim=True)
    s = (q / q.norm(dim=1, keepdim=True)) @ k.T
    return s.max(dim=1)


def test_retrieve_matches_brute_force_and_chunking():
    db = NeuralDB(layer=0, d_key=16, d_model=4)
    g = torch.Generator().manual_seed(1)
    db.add([str(i) for i in range(1000)], torch.randn(1000, 16, generator=g), torch.randn(1000, 4, generator=g))
    q = torch.randn(50, 16, generator=g)
    s, i = db.retrieve(q)
    bs, bi = brute_force(db, q)
    assert torch.equal(i, bi) and torch.allclose(s, bs, atol=1e-6)
    db.chunk_size = 7
    s2, i2 = db.retrieve(q)
    assert torch.equal(i2, i) and torch.allclose(s2, s, atol=1e-6)


def test_add_remove_update_by_id():
    db = NeuralDB(layer=0, d_key=4, d_model=2)
    db.add(["a", "b", "c"], torch.eye(4)[:3], torch.arange(6.0).view(3, 2))
    with pytest.raises(StoreError, match="already present"):
        db.add(["b"], torch.ones(1, 4), torch.ones(1, 2))
    db.remove("b")
    assert db.ids == ["a", "c"] and len(db) == 2
    assert torch.equal(db.retrieve(torch.eye(4)[2:3])[1], torch.tensor([1]))  # 'c' is row 1 now
    db.update("c", residual=torch.tensor([9.0, 9.0]))
    assert torch.equal(db.residuals[1], torch.tensor([9.0, 9.0]))
    with pytest.raises(StoreError, match="nothing was removed"):
        db.remove(["a", "zzz"])
    assert len(db) == 2
    with pytest.raises(StoreError, match=r"shape \(1, 4\)"):
        db.add(["d"], torch.ones(1, 5), torch.ones(1, 2))
    with pytest.raises(StoreError, match="zero vector"):
        db.add(["d"], torch.zeros(1, 4), torch.ones(1, 2))


def test_no_fire_means_bit_identical(tiny_llama):
    model, tok = tiny_llama
    ids = tok("the city of rome is in italy", return_tensors="pt").input_ids
    base = model(ids).logits
    db = store_for(model, n=200, gamma=0.99)  # random keys: nothing reaches 0.99
    with db.attached(model):
        edited = model(ids).logits
        assert db.stats()["fires"] == 0 and db.stats()["positions"] == ids.shape[1] - 1
    assert torch.equal(base, edited)
    assert torch.equal(model(ids).logits, base)


def test_fires_where_a_key_matches_but_never_at_position_0_or_padding(tiny_llama):
    model, tok = tiny_llama
    arch = resolve_arch(model)
    ids = tok("the city of rome is in italy", return_tensors="pt").input_ids
    from neuraldb import Trace

    with Trace(model, arch.mlp_out_at(1), retain_input=True) as t:
        model(ids)
    keys = t.input[0]  # (seq, d_ff): every position's own key
    db = store_for(model)
    db.add([f"p{i}" for i in range(len(keys))], keys, torch.ones(len(keys), 32))
    with db.attached(model):
        model(ids)
        fired = db.last_fire_mask[0]
        # padded batch: right padding and left padding
        two = tok(["the city of rome is in italy", "the city"], return_tensors="pt", padding=True)
        model(**two)
        mask_right = db.last_fire_mask
    assert not fired[0] and fired[1:].all()
    assert not mask_right[1, 2:].any() and not mask_right[:, 0].any()


def test_attach_detach_and_context_manager(tiny_llama):
    model, tok = tiny_llama
    ids = tok("the city of rome", return_tensors="pt").input_ids
    base = model(ids).logits
    db = store_for(model, n=5, gamma=-1.0)  # fires everywhere except the sink
    db.attach(model)
    with pytest.raises(StoreError, match="already attached"):
        db.attach(model)
    assert not torch.equal(model(ids).logits, base)
    db.detach()
    assert torch.equal(model(ids).logits, base)
    with pytest.raises(RuntimeError):
        with db.attached(model):
            raise RuntimeError("inside")
    assert torch.equal(model(ids).logits, base) and not db.is_attached


def test_save_load_round_trip(tmp_path, tiny_llama):
    model, tok = tiny_llama
    db = store_for(model, n=10, gamma=0.3)
    db.facts["f1"] = {"prompt": "{} is", "subject": "x", "target_new": "y"}
    path = db.save(tmp_path / "s.safetensors")
    back = NeuralDB.load(path, model=model)
    assert back.ids == db.ids and torch.equal(back.keys, db.keys) and torch.equal(back.residuals, db.residuals)
    assert back.gamma == 0.3 and back.layer == 1 and back.facts["f1"]["subject"] == "x"
    assert not list(tmp_path.glob("*.tmp"))
    ids = tok("the city of rome is in italy", return_tensors="pt").input_ids
    with db.attached(model):
        a = model(ids).logits
    with back.attached(model):
        b = model(ids).logits
    assert torch.equal(a, b)


def test_load_errors(tmp_path, tiny_llama):
    model, _ = tiny_llama
    db = store_for(model, n=3)
    path = db.save(tmp_path / "s.safetensors")
    with pytest.raises(StoreError, match="built for layer 1, not layer 2"):
        NeuralDB.load(path, model=model, layer=2)
    with pytest.raises(StoreError, match="built for layer 1, not layer 0"):
        NeuralDB.load(path).attach(model, layer=0)
    from conftest import tiny_model

    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(StoreError, match="fingerprint"):
        NeuralDB.load(path, model=other)
    gpt2, _ = tiny_model("gpt2")
    with pytest.raises(StoreError, match="no such module"):
        NeuralDB.load(path, model=gpt2)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="corrupt or truncated"):
        NeuralDB.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(StoreError, match="corrupt or truncated"):
        NeuralDB.load(tmp_path / "junk.safetensors")
    with pytest.raises(StoreError, match="no store file"):
        NeuralDB.load(tmp_path / "missing.safetensors")


def test_store_metadata_is_json(tmp_path):
    db = NeuralDB(layer=0, d_key=4, d_model=2, model_name="m")
    db.add(["a"], torch.ones(1, 4), torch.ones(1, 2))
    from safetensors import safe_open

    path = db.save(tmp_path / "x.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["neuraldb"])
    assert meta["ids"] == ["a"] and meta["format_version"] == 1 and meta["model_name"] == "m"


def test_screened_hook_gate_gives_the_brute_force_model_output(tiny_llama):
    """A large store's hook uses the low-rank screen; outputs and fires equal brute force."""
    model, tok = tiny_llama
    arch = resolve_arch(model)
    from neuraldb import Trace

    batch = tok(["the city of rome is in italy", "paris is the capital of france"], return_tensors="pt",
                padding=True)
    with Trace(model, arch.mlp_out_at(1), retain_input=True) as t:
        model(**batch)
    real = t.input[0, 2:5]  # three positions' own keys: these must fire
    db = store_for(model)
    g = torch.Generator().manual_seed(1)  # 3,000 keys in an 8-dimensional subspace, plus the three real ones
    db.add([f"f{i}" for i in range(3000)], torch.randn(3000, 8, generator=g) @ torch.randn(8, 64, generator=g),
           torch.randn(3000, 32, generator=g))
    db.add(["r0", "r1", "r2"], real, torch.randn(3, 32))
    outs, masks, screens = [], [], []
    for rank, min_keys in ((0, 10**9), (16, 1000)):  # brute force, then the screen
        db.screen_rank, db.screen_min_keys = rank, min_keys
        db._changed(keep_stats=True)
        with db.attached(model), torch.no_grad():
            outs.append(model(**batch).logits)
            masks.append(db.last_fire_mask.clone())
        screens.append(db.screen)
    assert screens[0] is None and screens[1] is not None and screens[1].screened > 0
    assert screens[1].rechecked < screens[1].screened  # the bound ruled some positions out
    assert masks[0][0, 2:5].all() and torch.equal(masks[0], masks[1])
    assert torch.equal(outs[0], outs[1])


def test_head_keeps_the_first_facts_and_the_settings(tiny_llama):
    model, _ = tiny_llama
    db = store_for(model, n=5, gamma=0.7)
    db.thresholds[1] = 0.9
    db.facts["f2"] = {"subject": "x"}
    small = db.head(3)
    assert small.ids == ["f0", "f1", "f2"] and small.gamma == 0.7 and small.fingerprint == db.fingerprint
    assert torch.equal(small.keys, db.keys[:3]) and torch.equal(small.residuals, db.residuals[:3])
    assert torch.equal(small.thresholds, db.thresholds[:3]) and small.facts == {"f2": {"subject": "x"}}
    assert len(db.head(0)) == 0 and db.head(0).d_key == db.d_key
    with pytest.raises(StoreError, match="head"):
        db.head(6)


def _rewrite(path, *, tensors=None, **fields):
    """Rewrite the store file at ``path`` with some metadata fields (and tensors) replaced."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["neuraldb"])
    save_file(load_file(str(path)) | (tensors or {}), str(path), metadata={"neuraldb": json.dumps(meta | fields)})


def test_an_empty_fingerprint_in_a_store_file_is_not_a_pass(tmp_path, tiny_llama):
    model, _ = tiny_llama
    path = store_for(model, n=2).save(tmp_path / "s.safetensors")
    _rewrite(path, fingerprint="")
    with pytest.raises(StoreError, match="'fingerprint' is empty"):
        NeuralDB.load(path, model=model)
    db = NeuralDB.load(path)  # reading without a model still works ...
    with pytest.raises(StoreError, match="'fingerprint' is empty"):
        db.attach(model)  # ... but it cannot be attached as if it had been checked
    db.attach(model, check=False).detach()  # unless the caller says so


def test_a_residual_width_other_than_the_models_is_refused_at_load_and_attach(tmp_path, tiny_llama):
    model, _ = tiny_llama
    path = store_for(model, n=2).save(tmp_path / "s.safetensors")
    _rewrite(path, tensors={"residuals": torch.randn(2, 33)}, d_model=33)
    with pytest.raises(StoreError, match=r"'d_model' is 33 .*32"):
        NeuralDB.load(path, model=model)
    with pytest.raises(StoreError, match=r"'d_model' is 33 .*32"):
        NeuralDB.load(path).attach(model)
