"""The store's hook (neuraldb.hook): detached(), the Reader protocol, and what a saved store keeps."""

import pytest
import torch

from neuraldb import NeuralDB, StoreError
from neuraldb.hook import Reader, attached_reader, detached
from neuraldb.linear import LinearReader
from tests.test_store import store_for


def test_detached_removes_whatever_reader_is_on_the_model_and_restores_it(tiny_llama):
    model, tok = tiny_llama
    ids = tok("the city of rome", return_tensors="pt").input_ids
    base = model(ids).logits
    db = store_for(model, n=5, gamma=-1.0)  # fires everywhere except the sink
    with db.attached(model):
        edited = model(ids).logits
        assert not torch.equal(edited, base)
        with detached(model) as was:
            assert was is db and not db.is_attached and attached_reader(model) is None
            assert torch.equal(model(ids).logits, base)
        assert db.is_attached and db.model is model and attached_reader(model) is db
        assert torch.equal(model(ids).logits, edited)
    with pytest.raises(RuntimeError):  # restored even when the block raises
        with db.attached(model), detached(model):
            raise RuntimeError("inside")
    assert not db.is_attached and attached_reader(model) is None
    with detached(model) as was:  # nothing attached: a no-op
        assert was is None


def test_detached_takes_a_store_off_another_model_too(tiny_llama):
    model, tok = tiny_llama
    from tests.conftest import tiny_model

    other, _ = tiny_model("llama", seed=0)
    db = store_for(model, n=3, gamma=-1.0)
    db.attach(other)
    with detached(model, db):
        assert not db.is_attached
    assert db.is_attached and db.model is other
    db.detach()


def test_linear_reader_and_store_are_readers_and_exclude_each_other(tiny_llama):
    model, tok = tiny_llama
    ids = tok("the city of rome", return_tensors="pt").input_ids
    base = model(ids).logits
    db = store_for(model, n=4, gamma=0.5)
    reader = LinearReader(db)
    assert isinstance(db, Reader) and isinstance(reader, Reader)
    with reader.attached(model):
        assert attached_reader(model) is reader and reader.model is model
        with pytest.raises(StoreError, match="another store is attached"):
            db.attach(model)
        with detached(model):
            assert torch.equal(model(ids).logits, base)
        assert reader.is_attached
    assert attached_reader(model) is None and torch.equal(model(ids).logits, base)


def test_load_keeps_the_retrieval_settings(tmp_path, tiny_llama):
    model, _ = tiny_llama
    db = store_for(model, n=3)
    db.chunk_size, db.screen_rank, db.screen_min_keys = 7, 5, 11
    back = NeuralDB.load(db.save(tmp_path / "s.safetensors"))
    assert (back.chunk_size, back.screen_rank, back.screen_min_keys) == (7, 5, 11)
    head = db.head(2)
    assert (head.chunk_size, head.screen_rank, head.screen_min_keys) == (7, 5, 11)


@pytest.mark.parametrize("field,value", [("gamma", "0.5"), ("layer", "x"), ("d_key", [3]), ("ids", "f0"),
                                         ("config", 5), ("fingerprint", 3)])
def test_wrongly_typed_metadata_is_a_store_error_naming_the_field(tmp_path, tiny_llama, field, value):
    import json

    from safetensors.torch import load_file, save_file

    model, _ = tiny_llama
    path = store_for(model, n=2).save(tmp_path / "s.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["neuraldb"])
    meta[field] = value
    save_file(load_file(str(path)), str(path), metadata={"neuraldb": json.dumps(meta)})
    with pytest.raises(StoreError, match=repr(field)):
        NeuralDB.load(path)


def test_saved_store_is_readable_by_others(tmp_path, tiny_llama):
    import os

    model, _ = tiny_llama
    old = os.umask(0o022)
    try:
        path = store_for(model, n=2).save(tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left
