"""The edit-time self-check (neuraldb.reach): facts whose own texts cannot fire are never silent."""

import logging

import pytest
import torch

from neuraldb import EditConfig, Fact, NeuralDB
from neuraldb.reach import UnreachableFactError, find_unreached
from neuraldb.words import subject_words, word_start_tokens
from tests.test_words import store_with_position_keys


def test_find_unreached_names_each_reason(tiny_llama):
    model, tok = tiny_llama
    text = "the city of rome is in italy"
    # keys are each position's own input, so the gate opens at every position whose word check passes
    ids = tok(text)["input_ids"]
    n = len(ids)
    subjects = ["rome"] * n
    db, _ = store_with_position_keys(model, tok, text, subject_words(tok, subjects))
    db.word_starts = word_start_tokens(tok)
    db.facts = {fid: {"subject": "rome"} for fid in db.ids}
    fine = Fact(prompt="the city of {} is in", subject="rome", target_new="x", id=db.ids[0])
    found = find_unreached(model, tok, db, [fine])
    assert found == {}
    elsewhere = Fact(prompt="the city of {} is in", subject="rome", target_new="x", id=db.ids[0],
                     paraphrases=("the city is in italy",))  # does not name rome
    found = find_unreached(model, tok, db, [elsewhere])
    assert [(t["text"], t["reason"]) for t in found[db.ids[0]]] == [("the city is in italy", "no_word_match")]
    assert list(found) == [db.ids[0]] and -1.0 <= found[db.ids[0]][0]["cosine"] <= 1.0


def test_subject_at_the_sink_is_reported(tiny_llama):
    model, tok = tiny_llama
    if tok("rome")["input_ids"][0] in tok.all_special_ids:
        pytest.skip("this tokenizer adds BOS: no subject is at the sink")
    text = "rome is in italy"
    ids = tok(text)["input_ids"]
    db, _ = store_with_position_keys(model, tok, text, subject_words(tok, ["rome"] * len(ids)))
    db.word_starts = word_start_tokens(tok)
    db.facts = {fid: {"subject": "rome"} for fid in db.ids}
    fact = Fact(prompt="{} is in", subject="rome", target_new="x", id=db.ids[0])
    found = find_unreached(model, tok, db, [fact])
    assert [(t["text"], t["reason"]) for t in found[db.ids[0]]] == [("rome is in", "subject_at_sink")]
    assert abs(found[db.ids[0]][0]["cosine"] - 1.0) < 1e-5  # its own key, at its own position: only the sink stops it


def test_edit_warns_records_and_strict_raises(tiny_llama, caplog):
    model, tok = tiny_llama
    if tok("rome")["input_ids"][0] in tok.all_special_ids:
        pytest.skip("this tokenizer adds BOS: no subject is at the sink")
    import neuraldb

    cfg = EditConfig(layer=1, steps=2, context_prefixes=("the",), context_length=3)
    facts = [Fact(prompt="{} is in the city of", subject="rome", target_new="paris"),       # at the sink
             Fact(prompt="the city of {} is in", subject="italy", target_new="france")]
    with caplog.at_level(logging.WARNING, logger="neuraldb.editor"):
        db = neuraldb.edit(model, tok, facts, config=cfg, progress=False)
    assert [(t["text"], t["reason"]) for t in db.unreachable()[facts[0].id]] == [("rome is in the city of",
                                                                                   "subject_at_sink")]
    assert "cannot fire" in caplog.text and facts[0].id in caplog.text
    with pytest.raises(UnreachableFactError, match="subject_at_sink") as info:
        neuraldb.edit(model, tok, facts[:1], config=cfg, progress=False, strict=True)
    assert isinstance(info.value.db, NeuralDB) and facts[0].id in info.value.db  # the work is kept


def test_a_nearer_key_of_another_subject_is_reported_as_outranked(tiny_llama):
    from neuraldb import resolve_arch
    from neuraldb.nethook import Trace

    model, tok = tiny_llama
    arch = resolve_arch(model)
    with Trace(model, arch.mlp_out_at(1), retain_input=True) as t:
        model(tok("the city of rome", return_tensors="pt").input_ids)
    at_rome = t.input[0, -1]  # (d_ff,) the query where "rome" ends
    near = at_rome + 0.3 * at_rome.norm() / at_rome.numel() ** 0.5 * torch.randn(at_rome.shape,
                                                                                generator=torch.Generator().manual_seed(0))
    d_model = model.get_input_embeddings().weight.shape[1]
    db = NeuralDB(layer=1, d_key=at_rome.numel(), d_model=d_model, gamma=0.5, module_template=arch.mlp_out)
    # "rome"'s own key passes the threshold there, but "italy"'s key is the query itself: the nearest
    db.add(["rome", "italy"], torch.stack([near, at_rome]), torch.ones(2, d_model),
           words=subject_words(tok, ["rome", "italy"]))
    db.word_starts = word_start_tokens(tok)
    db.facts = {"rome": {"subject": "rome"}, "italy": {"subject": "italy"}}
    fact = Fact(prompt="the city of {} is in", subject="rome", target_new="x", id="rome")
    [found] = find_unreached(model, tok, db, [fact])["rome"]
    assert found["reason"] == "outranked" and found["cosine"] > found["threshold"] == 0.5
    db.remove(["italy"], stale_ok=True)  # without the nearer key it fires
    assert find_unreached(model, tok, db, [fact]) == {}
