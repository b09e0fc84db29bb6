"""The word-checked gate's token-id prefilter (neuraldb.wordindex) decides exactly as the full gate.

What users rely on: a store with the word check fires the same fact at the same positions,
adding the same residual, whether or not the hook skips positions whose token cannot end a
stored subject (``db.word_prefilter``, on by default); and that stays true after ``add``,
``remove``, ``update`` and ``save``/``load``. The reference here is brute force: the top-1
cosine over every key, its threshold, and the word check of that key
(:func:`neuraldb.words.word_match`) at the position's window.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neuraldb import NeuralDB
from neuraldb.models import ModelPackageMissing
from neuraldb.retrieval import top1, unit_rows
from neuraldb.wordindex import WordIndex
from neuraldb.words import NO_FORM, NO_WORD, WORD_START, subject_words, token_windows, word_match, word_start_tokens
from tokenizer_families import FAMILIES, build

SUBJECTS = ["Barack Obama", "Danube", "LeBron James", "The Eiffel Tower", "A Tribe Called Quest", "Brad Silverberg",
            "Richard Sharp", "Week", "Marie", "Kelly Marie", "TV Week", "Henry James", "The Who"]
ALIASES = {"Barack Obama": ["Obama"]}
TEXTS = [
    "Yesterday I met Barack Obama in Paris, then Obama's wife.",
    "They sailed down the Danube to Vienna; the Danube is long.",
    "The crowd cheered for LeBron James while she read Henry James.",
    'I saw the Eiffel Tower at night. "Eiffel Tower" twice; The Eiffel Tower, again.',
    "I played a Tribe Called Quest song, then The Who and TV Week.",
    "House Leader Steinberg and Brad Silverberg said no; Aaron Sharp and Richard Sharp too.",
    "BusinessWeek Online has learned that Ann-Marie and Kelly Marie met Marie.",
]


# ------------------------------------------------------------------ unit: the index itself
def test_index_finds_the_keys_whose_word_ends_at_each_token_and_ignores_padding_forms():
    w = torch.full((4, 2, 4), NO_WORD, dtype=torch.long)
    w[0, 0, -2:] = torch.tensor([5, 7])  # key 0 is "5 7" ...
    w[0, 1, -1] = 9  # ... or "9" (another form, e.g. an alias)
    w[1, 0, -3:] = torch.tensor([WORD_START, 3, 7])  # key 1 is "3 7" at a word start
    w[1, 1, -1] = NO_FORM  # a padding form matches nothing
    w[2] = w[0]  # key 2: the same subject as key 0 (one group)
    w[3, 0, -1] = 9
    w[3, 1, -1] = 9  # two forms ending in the same token: the key once
    index = WordIndex.build(w)
    assert index.complete and index.words.shape[0] == 3
    windows = torch.tensor([[0, 1, 5, 7], [0, 1, 3, 7], [0, 0, 1, 9], [-2, -2, -2, 7], [0, 0, 0, 100]])
    pos, row = index.candidates(windows, None)
    assert sorted(zip(pos.tolist(), row.tolist())) == [(0, 0), (0, 2), (2, 0), (2, 2), (2, 3)]
    starts = torch.zeros(10, dtype=torch.bool)
    starts[1] = True  # token 1 ends in whitespace: "3 7" after it starts a word
    pos, row = index.candidates(windows, starts)
    assert sorted(zip(pos.tolist(), row.tolist())) == [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2), (2, 3)]


def test_candidates_are_every_key_the_word_check_passes(family_tok):
    """Per tokenizer family: the index's (position, key) pairs are exactly those where
    word_match of that key passes, over every position of the texts and every stored subject."""
    tok = family_tok
    words = subject_words(tok, SUBJECTS, aliases=[ALIASES.get(s, []) for s in SUBJECTS])
    words = torch.cat([words, words[:3]])  # three subjects stored twice (facts sharing a subject)
    starts = word_start_tokens(tok)
    windows = torch.cat([token_windows(torch.tensor([tok(t)["input_ids"]]), width=words.shape[2])[0] for t in TEXTS])
    m, n = windows.shape[0], words.shape[0]
    every = word_match(words.repeat(m, 1, 1), windows.repeat_interleave(n, 0), starts).reshape(m, n)
    pos, row = WordIndex.build(words).candidates(windows, starts)
    assert sorted(zip(pos.tolist(), row.tolist())) == [tuple(x) for x in every.nonzero().tolist()]
    assert pos.numel() >= len(TEXTS)  # the texts mention stored subjects


@pytest.mark.parametrize("last", [NO_WORD, WORD_START])
def test_index_is_incomplete_when_a_key_matches_any_token(last):
    """A key added without words (the paper's gate) fires whatever the token: nothing may be skipped."""
    w = torch.full((2, 1, 4), NO_WORD, dtype=torch.long)
    w[0, 0, -1] = 5
    w[1, 0, -1] = last
    assert not WordIndex.build(w).complete


# ------------------------------------------------------------------ the gate, tokenizer family by family
def brute_force(db: NeuralDB, queries: torch.Tensor, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fire, fired index or -1): top-1 cosine over every key, its threshold, its word check."""
    s, i = top1(unit_rows(queries), unit_rows(db.keys))
    fire = (s > db.gate_thresholds()[i]) & word_match(db.words[i], windows, db.word_starts)
    return fire, torch.where(fire, i, -1)


def decided(db: NeuralDB, queries: torch.Tensor, windows: torch.Tensor, prefilter: bool):
    db.word_prefilter = prefilter
    fire, index = db.fire_checked(queries, windows)
    return fire, torch.where(fire, index, -1)


def store_for(tok, subjects, *, d: int, seed: int, screen: bool) -> NeuralDB:
    g = torch.Generator().manual_seed(seed)
    db = NeuralDB(layer=0, d_key=d, d_model=4, gamma=0.65, screen_rank=3 if screen else 0,
                  screen_min_keys=1)
    words = subject_words(tok, subjects, aliases=[ALIASES.get(s, []) for s in subjects])
    db.add([f"f{i}" for i in range(len(subjects))], torch.randn(len(subjects), d, generator=g),
           torch.randn(len(subjects), 4, generator=g), words=words)
    db.word_starts = word_start_tokens(tok)
    return db


def queries_near(db: NeuralDB, m: int, *, seed: int) -> torch.Tensor:
    """(m, d) queries mixing two random stored keys: top-1 keys of all kinds pass and miss the
    gate, and the second key often passes it too (a nearer key of another subject must win)."""
    g = torch.Generator().manual_seed(seed)
    k = unit_rows(db.keys)
    a, b = torch.randint(0, len(db), (2, m), generator=g)
    w = torch.rand(m, 1, generator=g)
    return k[a] + w * k[b] + 0.3 * torch.randn(m, db.d_key, generator=g)


@pytest.fixture(scope="module", params=FAMILIES)
def family_tok(request):
    try:
        return build(request.param)
    except ModelPackageMissing as exc:
        pytest.skip(f"the {request.param} tokenizer needs its model package: {exc}")


@pytest.mark.parametrize("screen", [False, True], ids=["scan", "screened"])
def test_prefilter_decides_as_brute_force_in_every_family(family_tok, screen):
    tok = family_tok
    db = store_for(tok, SUBJECTS, d=8, seed=0, screen=screen)
    ids = [torch.tensor([tok(t)["input_ids"]]) for t in TEXTS]
    windows = torch.cat([token_windows(i, width=db.words.shape[2])[0] for i in ids])  # (M, width)
    fires = 0
    for seed in range(4):
        q = queries_near(db, windows.shape[0], seed=seed)
        want = brute_force(db, q, windows)
        for prefilter in (True, False):
            got = decided(db, q, windows, prefilter)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (prefilter, seed)
        fires += int(want[0].sum())
    assert fires > 0  # the comparison saw fires, not only shut gates


def test_a_nearer_key_of_another_subject_still_shuts_the_gate():
    """At a mention of "Danube" whose query is nearer "Week"'s key, the full gate's top-1 is "Week"
    and its word check fails: nothing fires, as without the prefilter (not Danube's residual)."""
    tok = build("byte_bpe")
    db = store_for(tok, ["Danube", "Week"], d=8, seed=1, screen=False)
    k = torch.eye(8)[:2]  # Danube e0, Week e1
    db.update("f0", key=k[0])
    db.update("f1", key=k[1])
    ids = torch.tensor([tok("They sailed down the Danube")["input_ids"]])
    windows = token_windows(ids, width=db.words.shape[2])[0]
    q = (k[1] + 0.9 * k[0]).expand(windows.shape[0], -1)  # cos 0.669 with Danube, 0.743 with Week
    assert float(unit_rows(q[:1]) @ k[0]) > 0.65
    last = windows.shape[0] - 1
    for prefilter in (True, False):
        fire, _ = decided(db, q, windows, prefilter)
        assert not fire.any(), prefilter
    db.remove(["f1"])  # without Week, the mention fires Danube, at its last token only
    fire, index = decided(db, q, windows, True)
    assert fire.nonzero().squeeze(1).tolist() == [last] and index[last] == 0


# ------------------------------------------------------------------ the index follows the store
def test_prefilter_follows_add_remove_update_and_load(tmp_path: Path):
    tok = build("byte_bpe")
    db = store_for(tok, SUBJECTS[:6], d=8, seed=2, screen=False)
    ids = [torch.tensor([tok(t)["input_ids"]]) for t in TEXTS]
    windows = torch.cat([token_windows(i, width=db.words.shape[2])[0] for i in ids])
    g = torch.Generator().manual_seed(3)

    def check(store: NeuralDB) -> int:
        q = queries_near(store, windows.shape[0], seed=5)
        want = brute_force(store, q, windows)
        got = decided(store, q, windows, True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        return int(want[0].sum())

    fires = check(db)
    db.add(["new"], torch.randn(1, 8, generator=g), torch.randn(1, 4, generator=g),
           words=subject_words(tok, ["Henry James"]))  # a subject the index did not know
    fires += check(db)
    db.remove(["f0", "f3"], stale_ok=True)
    fires += check(db)
    db.update("f1", key=torch.randn(8, generator=g), words=subject_words(tok, ["Richard Sharp"])[0])  # upsert
    fires += check(db)
    db.save(tmp_path / "s.safetensors")
    fires += check(NeuralDB.load(tmp_path / "s.safetensors"))
    db.clear_words()  # the paper's gate: every position is gated again
    q = queries_near(db, windows.shape[0], seed=5)
    s, i = top1(unit_rows(q), unit_rows(db.keys))
    assert torch.equal(decided(db, q, windows, True)[0], s > db.gate_thresholds()[i])
    assert fires > 0


def test_mixed_store_gates_every_position():
    """One key without words makes every position a candidate: the prefilter steps aside."""
    tok = build("byte_bpe")
    db = store_for(tok, SUBJECTS[:4], d=8, seed=4, screen=False)
    g = torch.Generator().manual_seed(4)
    db.add(["plain"], torch.randn(1, 8, generator=g), torch.randn(1, 4, generator=g))  # words=None
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    windows = token_windows(ids, width=db.words.shape[2])[0]
    q = queries_near(db, windows.shape[0], seed=6)
    db.fire_checked(q, windows)
    assert not db.device_index(q.device).word_index.complete
    want = brute_force(db, q, windows)
    got = decided(db, q, windows, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------ through the hook: generation
def test_generation_fires_the_same_facts_with_and_without_the_prefilter():
    """model.generate with a KV cache: every call (prefill and each one-token step) fires the same
    fact at the same positions, so the text is the same; the facts' words span two steps."""
    from conftest import tiny_model
    from test_threads import generation_store

    model, tok = tiny_model("llama", seed=3)
    prompts = ["the city of rome is", "lebron james plays", "what is the old river", "apple and google made"]
    db, plain = generation_store(model, tok, prompts, 8)
    calls: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda *_: calls.append(db.last_fire_index.clone()))
    runs = {}
    try:
        with db.attached(model), torch.no_grad():
            for prefilter in (True, False):
                db.word_prefilter = prefilter
                calls.clear()
                seqs = [model.generate(input_ids=tok(p, return_tensors="pt").input_ids, max_new_tokens=8,
                                       do_sample=False, pad_token_id=0) for p in prompts]
                runs[prefilter] = (seqs, list(calls))
    finally:
        handle.remove()
    (seqs_on, calls_on), (seqs_off, calls_off) = runs[True], runs[False]
    assert all(torch.equal(a, b) for a, b in zip(seqs_on, seqs_off))
    assert len(calls_on) == len(calls_off) and all(torch.equal(a, b) for a, b in zip(calls_on, calls_off))
    assert sum(int((c >= 0).sum()) for c in calls_on) >= len(prompts) // 2  # facts did fire
    assert sum(not torch.equal(a, b) for a, b in zip(seqs_on, plain)) >= len(prompts) // 2


def test_positions_without_a_stored_last_token_are_not_gated(monkeypatch):
    """Text that mentions no stored subject never reaches the full gate (the point of the index)."""
    from neuraldb.retrieval import DeviceIndex

    tok = build("byte_bpe")
    db = store_for(tok, ["Danube", "LeBron James"], d=8, seed=7, screen=False)
    gated = []
    real = DeviceIndex.fire
    monkeypatch.setattr(DeviceIndex, "fire", lambda self, q, **kw: gated.append(q.shape[0]) or real(self, q, **kw))
    ids = torch.tensor([tok("Yesterday I met Barack Obama in Paris.")["input_ids"]])
    windows = token_windows(ids, width=db.words.shape[2])[0]
    q = unit_rows(db.keys)[0].expand(windows.shape[0], -1)  # every position is Danube's key itself
    assert not decided(db, q, windows, True)[0].any() and gated == []
    assert not decided(db, q, windows, False)[0].any() and gated == [windows.shape[0]]
