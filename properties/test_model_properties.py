"""Model-level invariants on SmolLM2-135M with real keys (CounterFact + generated facts).

The store under test is built the recommended way: keys as ``neuraldb.edit`` computes them
(default EditConfig: layer 10, bare_weight 0.5, five generated context prefixes), then
per-key thresholds calibrated on generic text (SciQ + MMLU, never the evaluation text),
``NeuralDB.calibrate(margin=0.05)``. Residuals are random vectors (firing depends on keys
only; a random residual makes any fire visible in the logits), except in the real-edit
test, which optimises a few residuals with ``neuraldb.edit``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import neuraldb
from neuraldb import EditConfig, NeuralDB, Trace

from .conftest import LAYER, examples
from .strategies import fact_sets, unrelated_prompts

POOL = 120  # CounterFact facts always in the store (80% of CounterFact prompts start with the subject)
MARGIN = 0.05
RESIDUAL_NORM = 8.0
MODULE = f"model.layers.{LAYER}.mlp.down_proj"


def keys_for(model, tok, templates, facts, cache) -> torch.Tensor:
    todo = [f for f in facts if (f.id, f.prompt, f.subject) not in cache]
    if todo:
        k = neuraldb.compute_keys(model, tok, todo, layer=LAYER, templates=templates, bare_weight=0.5)
        for f, row in zip(todo, k):
            cache[(f.id, f.prompt, f.subject)] = row
    return torch.stack([cache[(f.id, f.prompt, f.subject)] for f in facts])


def residuals_for(n: int, d_model: int, seed: int) -> torch.Tensor:
    r = torch.randn(n, d_model, generator=torch.Generator().manual_seed(seed))
    return RESIDUAL_NORM * r / r.norm(dim=1, keepdim=True)


def empty_store(model) -> NeuralDB:
    from neuraldb.store import layer_fingerprint

    return NeuralDB(layer=LAYER, d_key=1536, d_model=576, gamma=0.65, module_template="model.layers.{}.mlp.down_proj",
                    model_name="smollm2-135m", fingerprint=layer_fingerprint(model, MODULE))


# CounterFact subjects whose naive keys were measured to fire on common tokens of LAMBADA
# (`neuraldb fire-rate --calibrate no`): "Basel" alone fired 848 times on 32,384
# positions; its last token sits at position 1 of the bare prompt, next to the attention sink.
SINK_LIKE = ("Basel", "deadstar", "Till Death...")


@pytest.fixture(scope="module")
def cf_facts(smollm2, templates, data_dir):
    """The first POOL keyable CounterFact facts, plus the known sink-like ones."""
    from evals.firing.measure import keyable, load_facts

    _, tok = smollm2
    every = load_facts("counterfact", n=2000, data_dir=data_dir)
    picked = every[: POOL + 10] + [f for f in every if f.subject in SINK_LIKE]
    facts, _ = keyable(tok, picked, templates)
    return facts[:POOL] + [f for f in facts if f.subject in SINK_LIKE]


@pytest.fixture(scope="module")
def naive_pool(smollm2, templates, cf_facts, key_cache):
    """CounterFact keys with random residuals, the paper's gate (global gamma only)."""
    model, tok = smollm2
    db = empty_store(model)
    db.add([f.id for f in cf_facts], keys_for(model, tok, templates, cf_facts, key_cache),
           residuals_for(len(cf_facts), 576, 0))
    return db


@pytest.fixture(scope="module")
def pool(naive_pool, calibration_queries):
    db = copy.deepcopy(naive_pool)
    db.calibrate(calibration_queries, margin=MARGIN)
    return db


def with_facts(base: NeuralDB, model, tok, templates, facts, cache, calibration_queries, *, seed=1) -> NeuralDB:
    db = copy.deepcopy(base)
    db.add([f.id for f in facts], keys_for(model, tok, templates, facts, cache), residuals_for(len(facts), 576, seed))
    if torch.isfinite(base.thresholds).any():
        db.calibrate(calibration_queries, margin=MARGIN, ids=[f.id for f in facts])
    return db


def logits(model, tok, texts):
    enc = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits, enc["attention_mask"].bool()


def fires_on(db: NeuralDB, model, tok, texts) -> tuple[int, list]:
    """(fires, [(text, token, fact id)]) when ``db`` is attached and ``texts`` are run."""
    db.reset_stats()
    enc = tok(list(texts), return_tensors="pt", padding=True)
    with db.attached(model), torch.no_grad():
        model(**enc)
    where = []
    for b, t in (db.last_fire_mask if db.last_fire_mask is not None else torch.zeros(0, 0)).nonzero().tolist():
        where.append((texts[b], tok.decode([int(enc["input_ids"][b, t])]), db.ids[int(db.last_fire_index[b, t])]))
    return db.stats()["fires"], where


# --------------------------------------------------------------- no activation
@settings(max_examples=examples("model", 2.0))
@given(facts=fact_sets(min_size=1, max_size=6), data=st.data())
def test_unrelated_prompts_leave_the_model_bit_identical(smollm2, templates, pool, passages, key_cache,
                                                         calibration_queries, facts, data):
    """With the store attached, text that mentions no stored subject gives bit-identical
    logits and the gate reports zero fires (CounterFact pool + generated facts)."""
    model, tok = smollm2
    db = with_facts(pool, model, tok, templates, facts, key_cache, calibration_queries)
    subjects = sorted({key[2] for key in key_cache})  # every stored subject (pool and drawn facts)
    texts = data.draw(unrelated_prompts(subjects=subjects, corpus=passages, max_words=48), label="unrelated texts")
    plain, mask = logits(model, tok, texts)
    db.reset_stats()
    with db.attached(model):
        edited, _ = logits(model, tok, texts)
    stats = db.stats()
    assert stats["positions"] == int(mask.sum()) - len(texts), "the gate did not see every position"
    if stats["fires"]:
        _, where = fires_on(db, model, tok, texts)
        pytest.fail(f"the gate fired {stats['fires']} times on unrelated text: {where[:5]}")
    assert torch.equal(plain[mask], edited[mask])


def test_naive_gate_is_caught_firing_on_unrelated_text(smollm2, naive_pool, pool, passages):
    """The failure class of docs/method.md, 'False fires on SmolLM2': keys averaged with a bare prompt that starts
    with the subject fire on common tokens of unrelated text under the global gamma alone.
    The check above finds it; per-key calibration removes it on the same text."""
    model, tok = smollm2
    texts = passages[:48]
    n_naive, where = fires_on(naive_pool, model, tok, texts)
    n_fixed, where_fixed = fires_on(pool, model, tok, texts)
    assert n_naive > 0, "the naive gate no longer fires on LAMBADA: update docs/method.md, 'False fires on SmolLM2'"
    assert n_fixed < n_naive, where_fixed[:5]


@pytest.fixture(scope="module")
def worded_pool(smollm2, naive_pool, cf_facts):
    """The store ``neuraldb.edit`` makes by default: the paper's gate with the word check, no calibration."""
    from neuraldb.words import subject_words, word_start_tokens

    model, tok = smollm2
    db = empty_store(model)
    db.add(naive_pool.ids, naive_pool.keys, naive_pool.residuals, words=subject_words(tok, [f.subject for f in cf_facts]))
    db.word_starts = word_start_tokens(tok)
    return db


def test_word_check_alone_leaves_unrelated_text_bit_identical_and_keeps_recall(smollm2, naive_pool, worded_pool,
                                                                               passages, cf_facts):
    """Without any calibration, the word check stops every fire of the naive gate on LAMBADA
    (logits bit-identical), and the facts' own prompts fire their own keys as often as before."""
    model, tok = smollm2
    texts = passages[:48]
    n_naive, _ = fires_on(naive_pool, model, tok, texts)
    n, where = fires_on(worded_pool, model, tok, texts)
    assert n_naive > 0 and n == 0, where[:5]
    plain, mask = logits(model, tok, texts)
    with worded_pool.attached(model):
        edited, _ = logits(model, tok, texts)
    assert torch.equal(plain[mask], edited[mask])
    prompts = [f.text for f in cf_facts]
    own = {(f.text, f.id) for f in cf_facts}
    hits_naive = {(t, i) for t, _, i in fires_on(naive_pool, model, tok, prompts)[1]} & own
    hits = {(t, i) for t, _, i in fires_on(worded_pool, model, tok, prompts)[1]} & own
    assert hits == hits_naive and len(hits) >= 0.9 * len(cf_facts)


# --------------------------------------------------------------------- recall
@settings(max_examples=examples("model"))
@given(facts=fact_sets(min_size=1, max_size=8))
def test_every_key_retrieves_its_own_fact_among_real_keys(smollm2, templates, pool, key_cache,
                                                          calibration_queries, facts):
    model, tok = smollm2
    db = with_facts(pool, model, tok, templates, facts, key_cache, calibration_queries)
    fire, index, scores = db.gate(db.keys)
    assert index.tolist() == list(range(len(db)))
    assert bool(fire.all()), [db.ids[i] for i in (~fire).nonzero().flatten().tolist()]
    assert bool((db.gate_thresholds() < 1.0).all()), "a calibrated threshold locks its key out"


@settings(max_examples=examples("model"))
@given(facts=fact_sets(min_size=1, max_size=6))
def test_edit_prompt_fires_its_own_fact(smollm2, templates, pool, key_cache, calibration_queries, facts):
    """Each fact's own prompt fires that fact at the subject's last token (top-1, gated)."""
    model, tok = smollm2
    db = with_facts(pool, model, tok, templates, facts, key_cache, calibration_queries)
    from neuraldb import locate_subject

    for f in facts:
        ids, pos = locate_subject(tok, f.prompt, f.subject)
        if pos == 0:
            continue  # the sink position never fires
        x = torch.tensor([ids])
        with Trace(model, MODULE, retain_input=True, stop=True) as t:
            model(input_ids=x)
        fire, index, score = db.gate(t.input[0, pos: pos + 1])
        assert db.ids[int(index[0])] == f.id and bool(fire[0]), (f.text, float(score[0]),
                                                                 float(db.gate_thresholds()[db._index[f.id]]))


# ---------------------------------------------------------------- real edits
@pytest.fixture(scope="module")
def real_edits(smollm2):
    """Three real edits (residuals optimised) on generated subjects; ~10-40 s on 2 cores."""
    model, tok = smollm2
    from evals.firing.measure import generated_facts

    facts = generated_facts(3, seed=7)
    db = neuraldb.edit(model, tok, facts, config=EditConfig(layer=LAYER, steps=8), progress=False)
    return facts, db


def test_edits_are_independent_and_removal_restores_the_model(smollm2, real_edits):
    """Removing one fact changes no other fact's outputs; removing all gives the original model."""
    model, tok = smollm2
    facts, db0 = real_edits
    prompts = [f.text for f in facts] + ["The weather today is", "\"I don't know,\" she said."]
    base, mask = logits(model, tok, prompts)
    db = copy.deepcopy(db0)
    with db.attached(model):
        full, _ = logits(model, tok, prompts)
        fired_full = db.last_fire_index.clone()
    assert not torch.equal(full[mask], base[mask]), "the real edits changed nothing"
    for drop in facts:
        d = copy.deepcopy(db0)
        d.remove(drop.id)
        with d.attached(model):
            part, _ = logits(model, tok, prompts)
        for b, f in enumerate(facts):
            if f.id == drop.id:
                continue
            # rows whose positions never fired the dropped fact are bit-identical
            if not bool((fired_full[b] == db0._index[drop.id]).any()):
                assert torch.equal(part[b][mask[b]], full[b][mask[b]]), (drop.id, f.id)
    db.remove([f.id for f in facts])
    with db.attached(model):
        empty, _ = logits(model, tok, prompts)
    assert torch.equal(empty[mask], base[mask])
    # detaching is the original model too
    after, _ = logits(model, tok, prompts)
    assert torch.equal(after[mask], base[mask])


# ------------------------------------------------------- batching, gamma, dtype, files
def traced(model, tok, texts):
    enc = tok(list(texts), return_tensors="pt", padding=True)
    with Trace(model, MODULE, retain_input=True, stop=True) as t, torch.no_grad():
        model(**enc)
    valid = enc["attention_mask"].bool().clone()
    valid[:, 0] = False
    return t.input, valid


@settings(max_examples=examples("model"))
@given(texts=unrelated_prompts(min_size=2, max_size=4, max_words=24), facts=fact_sets(min_size=1, max_size=4))
def test_batched_equals_one_at_a_time(smollm2, templates, pool, key_cache, calibration_queries, texts, facts):
    """The hook's gate on a padded batch equals the gate on each text alone (away from ties)."""
    model, tok = smollm2
    db = with_facts(pool, model, tok, templates, facts, key_cache, calibration_queries)
    texts = texts + [f.text for f in facts]
    acts, valid = traced(model, tok, texts)
    fb, ib, sb = (x.reshape(valid.shape) for x in db.gate(acts.reshape(-1, 1536)))
    thr = db.gate_thresholds()[ib]
    for b, text in enumerate(texts):
        a1, v1 = traced(model, tok, [text])
        f1, i1, s1 = db.gate(a1[0])
        n = int(v1[0].sum()) + 1
        sure = (sb[b, :n] - thr[b, :n]).abs() > 1e-4
        assert torch.equal((fb[b, :n] & valid[b, :n])[sure], (f1[:n] & v1[0, :n])[sure]), text
        assert torch.allclose(sb[b, :n], s1[:n], atol=1e-4)


@settings(max_examples=examples("model"))
@given(facts=fact_sets(min_size=1, max_size=4), gammas=st.lists(st.floats(0.3, 0.95), min_size=2, max_size=4))
def test_raising_gamma_never_adds_a_fire_on_real_activations(smollm2, templates, pool, passages, key_cache,
                                                             calibration_queries, facts, gammas):
    model, tok = smollm2
    db = with_facts(pool, model, tok, templates, facts, key_cache, calibration_queries)
    acts, valid = traced(model, tok, passages[:6] + [f.text for f in facts] + [p for f in facts for p in f.paraphrases])
    q = acts[valid]
    prev = None
    for g in sorted(gammas):
        d = copy.copy(db)
        d.gamma = g  # drops the device index built for the old gamma
        fire, _, _ = d.gate(q)
        if prev is not None:
            assert not bool((fire & ~prev).any())
        prev = fire


def test_bfloat16_storage_fires_the_same_facts_on_real_activations(smollm2, pool, passages, cf_facts):
    """Keys stored in bfloat16: the same facts fire wherever the float32 score is more than
    0.01 from the key's gate threshold."""
    model, tok = smollm2
    acts, valid = traced(model, tok, passages[:24] + [f.text for f in cf_facts[:40]])
    q = acts[valid]
    bf = NeuralDB(layer=LAYER, d_key=1536, d_model=576, gamma=pool.gamma)
    bf.add(pool.ids, pool.keys.to(torch.bfloat16), pool.residuals, thresholds=pool.thresholds)
    fa, ia, sa = pool.gate(q)
    fb, ib, sb = bf.gate(q)
    thr = pool.gate_thresholds()[ia]
    far = (sa - thr).abs() > 0.01
    assert float((sa - sb).abs().max()) < 0.005
    assert torch.equal(fa[far], fb[far])
    assert bool(fa.any()), "nothing fired: the comparison says nothing"


def test_save_load_round_trip_with_the_model(smollm2, pool, cf_facts, tmp_path):
    model, tok = smollm2
    pool.save(tmp_path / "pool.safetensors")
    back = NeuralDB.load(tmp_path / "pool.safetensors", model=model, layer=LAYER)
    prompts = [f.text for f in cf_facts[:8]]
    with pool.attached(model):
        a, mask = logits(model, tok, prompts)
        fa = pool.last_fire_index.clone()
    with back.attached(model):
        b, _ = logits(model, tok, prompts)
        fb = back.last_fire_index.clone()
    assert torch.equal(fa, fb) and torch.equal(a[mask], b[mask])
    assert bool((fa >= 0).any()), "no edit prompt fired: the round trip says nothing"
