"""Concurrent forwards and generate() on one model with a store attached give exactly the
single-threaded results: the hook's per-call state (the call's inputs, the routing, the word
check's history) is per thread, the store's caches are built once, its counters add up."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from neuraldb import NeuralDB, Trace, resolve_arch
from neuraldb.words import NO_WORD, WORD_WIDTH, subject_words, word_start_tokens

from conftest import WORDS, tiny_model

LAYER = 1
SUBJECTS = {  # subject: the text its key is read from (at the subject's last token)
    "danielle darrieux": "the mother tongue of danielle darrieux is",
    "lebron james": "lebron james plays the sport of",
    "eiffel tower": "the eiffel tower is located in the city of",
    "the city of rome": "the city of rome is the capital of",
}


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Serial and threaded runs under the same setting: one intra-op thread (no split reductions)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def in_threads(n: int, work) -> list:
    """``work(i)`` for i in range(n), each in its own thread, all started together (no grad)."""
    barrier = threading.Barrier(n)

    def run(i: int):
        barrier.wait()
        with torch.no_grad():
            return work(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def keys_at(model, tok, texts: list[str], layer: int = LAYER) -> torch.Tensor:
    """(len(texts), d_key): each text's MLP input at its last token."""
    rows = []
    for text in texts:
        with Trace(model, resolve_arch(model).mlp_out_at(layer), retain_input=True) as t:
            model(tok(text, return_tensors="pt").input_ids)
        rows.append(t.input[0, -1])
    return torch.stack(rows)


def subject_store(model, tok, *, gamma: float, residual_template: str | None = None,
                  screened: bool = False) -> NeuralDB:
    """A store of the four subjects (word-checked), with large random residuals; ``screened``:
    gated through the low-rank screen (:class:`~neuraldb.retrieval.LowRankScreen`) however small."""
    arch = resolve_arch(model)
    subjects = list(SUBJECTS)
    prefixes = [SUBJECTS[s][: SUBJECTS[s].index(s) + len(s)] for s in subjects]
    keys = keys_at(model, tok, prefixes)
    d_model = model.get_input_embeddings().weight.shape[1]
    db = NeuralDB(layer=LAYER, d_key=keys.shape[1], d_model=d_model, gamma=gamma, module_template=arch.mlp_out,
                  residual_template=residual_template, screen_min_keys=1 if screened else 4096,
                  screen_rank=8 if screened else None)
    g = torch.Generator().manual_seed(1)
    db.add(subjects, keys, 3.0 * torch.randn(len(subjects), d_model, generator=g), words=subject_words(tok, subjects))
    db.word_starts = word_start_tokens(tok)
    return db


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS[:-20]) for _ in range(rng.randint(2, 10))]
    if rng.random() < 0.5:  # about half the sentences mention a subject
        words.insert(rng.randint(1, len(words)), rng.choice(list(SUBJECTS)))
    return " ".join(words)


def jobs(tok, n: int, seed: int = 0) -> list[dict]:
    """``n`` model calls: batches of 1-3 sentences of varied lengths, left or right padded,
    some without an attention mask."""
    rng = random.Random(seed)
    out, side = [], tok.padding_side
    try:
        for j in range(n):
            tok.padding_side = "left" if j % 2 else "right"
            enc = tok([sentence(rng) for _ in range(rng.randint(1, 3))], return_tensors="pt", padding=True)
            if enc.input_ids.shape[0] == 1 and j % 3 == 0:
                out.append({"input_ids": enc.input_ids})
            else:
                out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
    finally:
        tok.padding_side = side
    return out


def serial(model, db, calls: list[dict]) -> tuple[list, list, list]:
    """Per call: logits, fire mask and (positions, fires, per_fact) counted, one call at a time."""
    logits, masks, counts = [], [], []
    with torch.no_grad():
        for kwargs in calls:
            db.reset_stats()
            logits.append(model(**kwargs).logits)
            masks.append(db.last_fire_mask.clone())
            counts.append((db.firing.positions.clone(), db.firing.fires.clone(), db.fires_per_fact.clone()))
    return logits, masks, counts


def threaded_forwards(model, db, calls, threads: int, per_thread: int) -> tuple[list[list[int]], list[list]]:
    """Each thread runs ``per_thread`` calls in its own shuffled order: (order, [(logits, mask)]) per thread."""
    orders = [random.Random(100 + t).choices(range(len(calls)), k=per_thread) for t in range(threads)]

    def work(t: int):
        out = []
        for j in orders[t]:
            logits = model(**calls[j]).logits
            out.append((logits, db.last_fire_mask.clone()))  # this thread's last call
        return out

    return orders, in_threads(threads, work)


def mismatches(orders, results, logits, masks) -> tuple[int, int]:
    bad_logits = sum(not torch.equal(got, logits[j]) for order, res in zip(orders, results)
                     for j, (got, _) in zip(order, res))
    bad_masks = sum(not torch.equal(mask, masks[j]) for order, res in zip(orders, results)
                    for j, (_, mask) in zip(order, res))
    return bad_logits, bad_masks


@pytest.mark.parametrize("residual_template, screened", [(None, False), ("model.layers.{}.mlp", False), (None, True)],
                         ids=["one-module", "two-modules", "screened"])
def test_threaded_forwards_equal_serial_ones_on_a_tiny_model(residual_template, screened):
    """Routed and added at the MLP output projection, or routed there and added at the MLP's
    output; gated by brute force or through the screen."""
    model, tok = tiny_model("llama")
    db = subject_store(model, tok, gamma=0.8, residual_template=residual_template, screened=screened)
    calls = jobs(tok, 24)
    with torch.no_grad():
        bare = [model(**kwargs).logits for kwargs in calls]
    with db.attached(model):
        logits, masks, counts = serial(model, db, calls)
        fired = [bool(m.any()) for m in masks]
        assert 0 < sum(fired) < len(calls), "the store must fire on some calls and not on others"
        assert all(torch.equal(a, b) != f for a, b, f in zip(logits, bare, fired))
        db.reset_stats()
        mine = next(j for j, f in enumerate(fired) if f)
        with torch.no_grad():
            model(**calls[mine])  # the main thread's last call
        db.gamma = db.gamma  # drops the device tensors (and screen): the threads build them at once
        orders, results = threaded_forwards(model, db, calls, threads=6, per_thread=40)
        assert mismatches(orders, results, logits, masks) == (0, 0)
        assert (db.screen is not None) == screened
        # the counters add up to the serial counts of the calls made
        made = [mine] + [j for order in orders for j in order]
        assert int(db.firing.positions) == sum(int(counts[j][0]) for j in made)
        assert int(db.firing.fires) == sum(int(counts[j][1]) for j in made)
        assert torch.equal(db.fires_per_fact, sum(counts[j][2] for j in made))
        # the main thread's last call is still its own, whatever the threads did after it
        assert torch.equal(db.last_fire_mask, masks[mine])
    with torch.no_grad():  # detached: the original model again
        assert torch.equal(model(**calls[0]).logits, bare[0])


def generation_store(model, tok, prompts: list[str], new: int) -> tuple[NeuralDB, list[torch.Tensor]]:
    """A store with one fact per prompt whose word is two generated tokens (g2 g3): it can only
    fire in the generation step that reads g3, with g2 from the step before as its history."""
    arch = resolve_arch(model)
    keys, words, plain = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            seq = model.generate(input_ids=ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
            plain.append(seq)
            at = ids.shape[1] + 2  # the position of g3
            with Trace(model, arch.mlp_out_at(LAYER), retain_input=True) as t:
                model(seq[:, : at + 1])
            keys.append(t.input[0, at])
            word = torch.full((1, WORD_WIDTH), NO_WORD, dtype=torch.long)
            word[0, -2:] = seq[0, at - 1 : at + 1]
            words.append(word)
    d_model = model.get_input_embeddings().weight.shape[1]
    db = NeuralDB(layer=LAYER, d_key=len(keys[0]), d_model=d_model, gamma=0.99, module_template=arch.mlp_out)
    residuals = 5.0 * torch.randn(len(prompts), d_model, generator=torch.Generator().manual_seed(2))
    db.add([f"g{i}" for i in range(len(prompts))], torch.stack(keys), residuals, words=torch.stack(words))
    return db, plain


def test_threaded_generate_keeps_each_threads_word_history():
    model, tok = tiny_model("llama", seed=3)
    prompts = ["the city of rome is", "lebron james plays", "what is the old river", "she said that the",
               "apple and google made", "the cat and the dog"]
    new = 8
    db, plain = generation_store(model, tok, prompts, new)
    jobs = [{"input_ids": tok(p, return_tensors="pt").input_ids} for p in prompts]
    side = tok.padding_side
    tok.padding_side = "left"
    try:  # and one left-padded batch of two (with its attention mask)
        jobs.append(dict(tok(prompts[2:4], return_tensors="pt", padding=True)))
    finally:
        tok.padding_side = side

    def generate(j: int) -> torch.Tensor:
        return model.generate(**jobs[j], max_new_tokens=new, do_sample=False, pad_token_id=0)

    with db.attached(model), torch.no_grad():
        expected = [generate(j) for j in range(len(jobs))]
        # the facts fire in their own generations (a word spanning two steps) and change the text after it
        assert sum(not torch.equal(a, b) for a, b in zip(expected, plain)) >= len(prompts) // 2
        rounds = 3
        results = in_threads(len(jobs), lambda t: [generate((t + r) % len(jobs)) for r in range(rounds)])
    bad = sum(not torch.equal(got, expected[(t + r) % len(jobs)])
              for t, res in enumerate(results) for r, got in enumerate(res))
    assert bad == 0


def test_threaded_forwards_equal_serial_ones_on_smollm2(smollm2):
    model, tok = smollm2
    arch = resolve_arch(model)
    subjects = ["Turkey", "Barack Obama", "The Eiffel Tower", "Danielle Darrieux"]
    contexts = ["The capital of Turkey", "The wife of Barack Obama", "The Eiffel Tower",
                "The mother tongue of Danielle Darrieux"]
    keys = keys_at(model, tok, contexts, layer=10)
    db = NeuralDB(layer=10, d_key=keys.shape[1], d_model=576, gamma=0.6, module_template=arch.mlp_out)
    g = torch.Generator().manual_seed(0)
    db.add(subjects, keys, 2.0 * torch.randn(len(subjects), 576, generator=g), words=subject_words(tok, subjects))
    db.word_starts = word_start_tokens(tok)
    texts = ["Turkey is a country in", "I had a cup of coffee and", "Barack Obama was born in",
             "The Eiffel Tower is located in", "The recipe calls for two eggs", "Danielle Darrieux speaks",
             "We flew to Turkey last", "The quick brown fox jumps"]
    calls = [{"input_ids": tok(t, return_tensors="pt").input_ids} for t in texts]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        calls.append(dict(tok(texts[:3], return_tensors="pt", padding=True)))
    finally:
        tok.padding_side = side
    with db.attached(model):
        logits, masks, _ = serial(model, db, calls)
        assert 0 < sum(bool(m.any()) for m in masks) < len(calls)
        orders, results = threaded_forwards(model, db, calls, threads=6, per_thread=10)
    assert mismatches(orders, results, logits, masks) == (0, 0)


def test_the_per_thread_state_copies_and_pickles():
    """A store (and a model holding one) still deep-copies: the copy has this thread's last call."""
    import copy
    import pickle

    model, tok = tiny_model("llama")
    db = subject_store(model, tok, gamma=0.8)
    call = tok(["the mother tongue of danielle darrieux is"], return_tensors="pt")
    with db.attached(model), torch.no_grad():
        model(**call)
        twin = copy.deepcopy(model)  # holds the store while it is attached
    assert twin._neuraldb_store is not db and torch.equal(twin._neuraldb_store.last_fire_mask, db.last_fire_mask)
    again = copy.deepcopy(db)
    assert torch.equal(again.last_fire_mask, db.last_fire_mask) and again.stats() == db.stats()
    back = pickle.loads(pickle.dumps(db.firing))  # a new lock, no thread's last call
    assert back.last_mask is None and back.stats() == db.stats()
