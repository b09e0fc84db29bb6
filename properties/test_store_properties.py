"""Store-level invariants on synthetic keys, up to 100,000 entries of SmolLM2's key size (1536).

No model here: ``NeuralDB.retrieve`` / ``gate`` / ``calibrate`` on key sets from
:func:`properties.strategies.key_sets`. Float note: a score computed in a matrix product
of another shape (another chunk, another batch) may differ in its last bits, so
comparisons of *which* key wins are made where the top-1 / top-2 gap, or the distance to
the gate threshold, is larger than ``TIE`` (1e-5); scores are compared to 1e-6.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuraldb import NeuralDB
from neuraldb.store import StoreError

from .conftest import examples
from .strategies import KeySet, key_sets, make_keys

TIE = 1e-5
BIG = 100_000
D_KEY = 1536  # SmolLM2-135M: d_ff of layer 10's mlp.down_proj


def store_of(ks: KeySet, *, gamma: float = 0.65, chunk_size: int = 16384, order=None) -> NeuralDB:
    db = NeuralDB(layer=0, d_key=ks.keys.shape[1], d_model=ks.residuals.shape[1], gamma=gamma, chunk_size=chunk_size)
    idx = list(range(len(ks))) if order is None else list(order)
    db.add([ks.ids[i] for i in idx], ks.keys[idx], ks.residuals[idx])
    return db


def brute(db: NeuralDB, q: torch.Tensor):
    k = db.keys / db.keys.norm(dim=1, keepdim=True)
    s = (q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ k.T
    top = s.topk(min(2, s.shape[1]), dim=1)
    gap = top.values[:, 0] - (top.values[:, 1] if s.shape[1] > 1 else -2.0)
    return top.values[:, 0], top.indices[:, 0], gap


def queries_near(ks: KeySet, seed: int, m: int, noise: float) -> torch.Tensor:
    """Queries: noisy copies of random stored keys plus fresh random directions."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(ks), (m,), generator=g)
    scale = ks.keys[pick].norm(dim=1, keepdim=True) / ks.keys.shape[1] ** 0.5
    q = ks.keys[pick] + noise * scale * torch.randn(m, ks.keys.shape[1], generator=g)
    return torch.cat([q, torch.randn(max(1, m // 4), ks.keys.shape[1], generator=g)])


@functools.lru_cache(maxsize=2)
def big_keyset(seed: int, structure: str) -> KeySet:
    keys = make_keys(BIG, D_KEY, seed=seed, structure=structure)
    res = torch.randn(BIG, 8, generator=torch.Generator().manual_seed(seed + 1))
    return KeySet([f"k{i}" for i in range(BIG)], keys, res, seed, structure)


@functools.lru_cache(maxsize=2)
def big_store(seed: int, structure: str) -> NeuralDB:
    return store_of(big_keyset(seed, structure))


# ------------------------------------------------------------------ recall at 100K
@settings(max_examples=examples("store", 0.2))
@given(seed=st.sampled_from([0, 1]), structure=st.sampled_from(["anisotropic", "gaussian"]),
       rows=st.lists(st.integers(0, BIG - 1), min_size=1, max_size=128, unique=True))
def test_recall_every_key_retrieves_itself_at_100k(seed, structure, rows):
    """Each stored key, used as the query, is its own top-1 above gamma (100,000 x 1536 keys).

    Rows are drawn by Hypothesis (shrinking to row 0); chunk boundaries are always included.
    """
    ks, db = big_keyset(seed, structure), big_store(seed, structure)
    rows = sorted(set(rows) | {0, db.chunk_size - 1, db.chunk_size, BIG - 1})
    q = ks.keys[rows]
    fire, index, scores = db.gate(q)
    assert index.tolist() == rows
    assert bool((scores > db.gamma).all()) and bool(fire.all())
    assert torch.allclose(scores, torch.ones_like(scores), atol=1e-5)
    # its residual is the one the gate would add
    assert torch.equal(db.residuals[index], ks.residuals[rows])


@settings(max_examples=examples("store", 0.2))
@given(seed=st.integers(0, 3), margin=st.floats(1e-4, 0.2))
def test_recall_survives_calibration_at_100k(seed, margin):
    """Per-key thresholds calibrated on generic queries keep every key's own recall
    (a key is never as close to generic text as to itself), at 100,000 entries."""
    ks = big_keyset(0, "anisotropic")
    db = store_of(ks)
    generic = make_keys(512, D_KEY, seed=1000 + seed, structure="anisotropic")
    db.calibrate(generic, margin=margin)
    rows = torch.randint(0, BIG, (64,), generator=torch.Generator().manual_seed(seed)).tolist()
    fire, index, _ = db.gate(ks.keys[rows])
    assert index.tolist() == rows and bool(fire.all())
    fire_g, _, _ = db.gate(generic)
    assert not bool(fire_g.any()), "a calibration query fires after calibration"


# ---------------------------------------------------------- exactness and equivalences
@settings(max_examples=examples("store"))
@given(ks=key_sets(min_size=1, max_size=300, dim=48), seed=st.integers(0, 2**16),
       chunk=st.integers(1, 400), gamma=st.floats(-0.2, 0.99), noise=st.floats(0.0, 3.0))
def test_gate_is_exact_top1_against_brute_force(ks, seed, chunk, gamma, noise):
    db = store_of(ks, gamma=gamma, chunk_size=chunk)
    q = queries_near(ks, seed, 64, noise)
    fire, index, scores = db.gate(q)
    bs, bi, gap = brute(db, q)
    assert torch.allclose(scores, bs, atol=1e-6)
    clear = gap > TIE
    assert torch.equal(index[clear], bi[clear])
    far = (bs - gamma).abs() > TIE
    assert torch.equal(fire[far], (bs > gamma)[far])


@settings(max_examples=examples("store"))
@given(ks=key_sets(min_size=1, max_size=600, dim=48), seed=st.integers(0, 2**16), rank=st.integers(1, 47),
       gamma=st.floats(-0.2, 0.99), noise=st.floats(0.0, 3.0), calibrated=st.booleans(),
       chunk=st.integers(1, 700))
def test_screened_hook_gate_equals_brute_force(ks, seed, rank, gamma, noise, calibrated, chunk):
    """The hook's low-rank screened gate fires exactly where brute force does, on the same key.

    Any basis keeps it exact (the bound is Cauchy-Schwarz); the rank only changes how
    many queries are re-checked. Per-key thresholds are screened by their minimum.
    Chunks of keys exercise the running best (a later chunk is checked only above the
    best cosine found so far) and the dense fallback (past chunk/16 candidates).
    """
    db = store_of(ks, gamma=gamma, chunk_size=chunk)
    db.screen_rank, db.screen_min_keys = rank, 1
    if calibrated:
        db.calibrate(queries_near(ks, seed + 1, 16, 1.0), margin=0.01)
    q = queries_near(ks, seed, 64, noise)
    fire, index = db._screened_gate(q)
    bf, bi, bs = db.gate(q)
    far = (bs - db.gate_thresholds()[bi]).abs() > TIE
    assert torch.equal(fire[far], bf[far])
    both = fire & bf
    assert torch.equal(index[both], bi[both])
    assert bool((index[~fire] == -1).all())
    # one query at a time (a batch-1 decoding step) takes the float16 bound: the same decisions
    one = [db._screened_gate(q[i : i + 1]) for i in range(8)]
    assert torch.equal(torch.cat([f for f, _ in one])[far[:8]], fire[:8][far[:8]])
    assert torch.equal(torch.cat([i for _, i in one])[far[:8]], index[:8][far[:8]])


@settings(max_examples=examples("store", 0.2))
@given(seed=st.integers(0, 3), noise=st.floats(0.0, 2.0))
def test_screened_hook_gate_at_100k(seed, noise):
    """At 100,000 x 1536 keys the hook's screened gate (default rank) equals brute force."""
    ks = big_keyset(0, "anisotropic")
    db = store_of(ks)
    assert len(db) >= db.screen_min_keys and 0 < db.screen_rank < D_KEY
    q = queries_near(ks, seed, 96, noise)
    fire, index = db._screened_gate(q)
    bf, bi, bs = db.gate(q)
    far = (bs - db.gamma).abs() > TIE
    assert torch.equal(fire[far], bf[far])
    assert torch.equal(index[fire & bf], bi[fire & bf])
    some = torch.arange(0, q.shape[0], 12)
    one = [db._screened_gate(q[i : i + 1]) for i in some]  # single queries: the float16 bound
    assert torch.equal(torch.cat([f for f, _ in one])[far[some]], fire[some][far[some]])
    assert torch.equal(torch.cat([i for _, i in one])[far[some]], index[some][far[some]])


@settings(max_examples=examples("store"))
@given(ks=key_sets(min_size=1, max_size=2000, dim=64), chunk=st.integers(1, 2500), seed=st.integers(0, 99))
def test_chunked_equals_unchunked(ks, chunk, seed):
    q = queries_near(ks, seed, 32, 1.0)
    one = store_of(ks, chunk_size=10**9)
    many = store_of(ks, chunk_size=chunk)
    s1, i1 = one.retrieve(q)
    s2, i2 = many.retrieve(q)
    _, _, gap = brute(one, q)
    assert torch.allclose(s1, s2, atol=1e-6)
    assert torch.equal(i1[gap > TIE], i2[gap > TIE])


@settings(max_examples=examples("store"))
@given(ks=key_sets(min_size=1, max_size=500, dim=64), seed=st.integers(0, 99), data=st.data())
def test_batched_query_equals_one_at_a_time(ks, seed, data):
    db = store_of(ks)
    q = queries_near(ks, seed, 24, 0.5)
    fire, index, scores = db.gate(q)
    _, _, gap = brute(db, q)
    for r in range(q.shape[0]):
        f1, i1, s1 = db.gate(q[r: r + 1])
        assert abs(float(s1[0]) - float(scores[r])) <= 1e-6
        if gap[r] > TIE:
            assert int(i1[0]) == int(index[r])
        if abs(float(scores[r]) - db.gamma) > TIE:
            assert bool(f1[0]) == bool(fire[r])


@settings(max_examples=examples("store"))
@given(ks=key_sets(min_size=2, max_size=400, dim=32), perm_seed=st.integers(0, 2**16), seed=st.integers(0, 99))
def test_insertion_order_does_not_change_answers(ks, perm_seed, seed):
    """A permuted insertion order retrieves the same fact (by id) with the same score."""
    order = torch.randperm(len(ks), generator=torch.Generator().manual_seed(perm_seed)).tolist()
    a, b = store_of(ks), store_of(ks, order=order)
    q = queries_near(ks, seed, 32, 0.8)
    fa, ia, sa = a.gate(q)
    fb, ib, sb = b.gate(q)
    _, _, gap = brute(a, q)
    assert torch.allclose(sa, sb, atol=1e-6)
    ids_a = [a.ids[i] for i in ia.tolist()]
    ids_b = [b.ids[i] for i in ib.tolist()]
    assert [x for x, g in zip(ids_a, gap) if g > TIE] == [y for y, g in zip(ids_b, gap) if g > TIE]
    far = (sa - a.gamma).abs() > TIE
    assert torch.equal(fa[far], fb[far])


# ----------------------------------------------------------------- independence
@settings(max_examples=examples("store"))
@given(ks=key_sets(min_size=3, max_size=300, dim=32), data=st.data(), seed=st.integers(0, 99),
       calibrated=st.booleans())
def test_add_remove_update_touch_no_other_fact(ks, data, seed, calibrated):
    """Adding, removing or updating fact X changes a query's answer only where X is (or was)
    the answer; removing every fact leaves a store that never fires."""
    x = data.draw(st.integers(0, len(ks) - 1), label="fact X")
    rest = [i for i in range(len(ks)) if i != x]
    q = queries_near(ks, seed, 48, 0.7)
    generic = torch.randn(64, ks.keys.shape[1], generator=torch.Generator().manual_seed(seed + 7))

    db = NeuralDB(layer=0, d_key=ks.keys.shape[1], d_model=ks.residuals.shape[1])
    db.add([ks.ids[i] for i in rest], ks.keys[rest], ks.residuals[rest])
    if calibrated:
        db.calibrate(generic, margin=0.01)
    before = db.gate(q)
    thr_before = db.thresholds.clone()

    def same_except(after, x_row):
        f0, i0, s0 = before
        f1, i1, s1 = after
        ids0 = [db.ids[i] if i < len(db.ids) else None for i in i0.tolist()]
        return f0, i0, ids0, f1, i1

    db.add([ks.ids[x]], ks.keys[x: x + 1], ks.residuals[x: x + 1])
    if calibrated:
        db.calibrate(generic, margin=0.01, ids=[ks.ids[x]])
    assert torch.equal(db.thresholds[:-1], thr_before), "adding X changed another fact's threshold"
    f1, i1, s1 = db.gate(q)
    xr = db._index[ks.ids[x]]
    untouched = i1 != xr
    assert torch.equal(i1[untouched], before[1][untouched])
    assert torch.equal(f1[untouched], before[0][untouched])

    # update X's key: answers change only at queries that pick X now or picked X before
    new_key = torch.randn(1, ks.keys.shape[1], generator=torch.Generator().manual_seed(seed + 11))
    db.update(ks.ids[x], key=new_key)
    f2, i2, s2 = db.gate(q)
    keep = (i2 != xr) & (i1 != xr)
    assert torch.equal(i2[keep], i1[keep]) and torch.equal(f2[keep], f1[keep])
    assert float(db.thresholds[xr]) == float("-inf"), "a new key must not keep the old key's threshold"

    # remove X: exactly the store before X was added
    db.remove(ks.ids[x])
    f3, i3, s3 = db.gate(q)
    assert torch.equal(i3, before[1]) and torch.equal(f3, before[0]) and torch.equal(s3, before[2])
    assert torch.equal(db.thresholds, thr_before)

    db.remove(list(db.ids))
    f4, i4, _ = db.gate(q)
    assert len(db) == 0 and not bool(f4.any()) and bool((i4 == -1).all())


# ----------------------------------------------------------------- monotonicity
@settings(max_examples=examples("store"))
@given(ks=key_sets(min_size=1, max_size=400, dim=32), g1=st.floats(-0.5, 0.99), g2=st.floats(-0.5, 0.99),
       seed=st.integers(0, 99), margin=st.one_of(st.none(), st.floats(0.0, 0.3)))
def test_raising_gamma_never_adds_a_fire(ks, g1, g2, seed, margin):
    lo, hi = sorted((g1, g2))
    q = queries_near(ks, seed, 64, 1.0)
    a, b = store_of(ks, gamma=lo), store_of(ks, gamma=hi)
    if margin is not None:
        generic = torch.randn(32, ks.keys.shape[1], generator=torch.Generator().manual_seed(seed))
        a.calibrate(generic, margin=margin)
        b.calibrate(generic, margin=margin)
        assert torch.equal(a.thresholds, b.thresholds)
    fa, _, _ = a.gate(q)
    fb, _, _ = b.gate(q)
    assert not bool((fb & ~fa).any()), "a fire appeared when gamma was raised"
    # and raising the calibration margin never adds a fire either
    if margin is not None:
        c = store_of(ks, gamma=lo)
        c.calibrate(generic, margin=margin + 0.05)
        fc, _, _ = c.gate(q)
        assert not bool((fc & ~fa).any())


@settings(max_examples=examples("store"))
@given(ks=key_sets(min_size=1, max_size=300, dim=64), seed=st.integers(0, 99), margin=st.floats(1e-4, 0.3))
def test_calibration_queries_never_fire(ks, seed, margin):
    db = store_of(ks, gamma=-1.0)  # the gate is shut only by the per-key thresholds
    generic = queries_near(ks, seed, 96, 2.0)
    db.calibrate(generic, margin=margin)
    fire, _, _ = db.gate(generic)
    assert not bool(fire.any())


# ------------------------------------------------------------------ dtype
BF16_MARGIN = 0.01  # |cos(bf16 key) - cos(f32 key)| stays well below this for d <= 4096


@settings(max_examples=examples("store"))
@given(ks=key_sets(min_size=1, max_size=600, dim=D_KEY, structures=("anisotropic", "gaussian", "clustered")),
       seed=st.integers(0, 99), noise=st.floats(0.0, 3.0))
def test_bfloat16_storage_agrees_outside_margin(ks, seed, noise):
    """Keys stored in bfloat16 fire the same facts as float32 keys wherever the float32
    score is more than BF16_MARGIN from the threshold."""
    q = queries_near(ks, seed, 64, noise)
    f32 = store_of(ks)
    bf = NeuralDB(layer=0, d_key=ks.keys.shape[1], d_model=ks.residuals.shape[1], gamma=f32.gamma)
    bf.add(ks.ids, ks.keys.to(torch.bfloat16), ks.residuals.to(torch.bfloat16))
    fa, ia, sa = f32.gate(q)
    fb, ib, sb = bf.gate(q)
    assert float((sa - sb).abs().max()) < BF16_MARGIN / 2
    far = (sa - f32.gamma).abs() > BF16_MARGIN
    assert torch.equal(fa[far], fb[far])
    _, _, gap = brute(f32, q)
    sure = far & fa & (gap > BF16_MARGIN)
    assert torch.equal(ia[sure], ib[sure])


# ------------------------------------------------------------------ persistence
@settings(max_examples=examples("store", 0.5))
@given(ks=key_sets(min_size=1, max_size=300, dim=32), calibrated=st.booleans(), seed=st.integers(0, 99))
def test_save_load_round_trip_is_identity(tmp_path_factory, ks, calibrated, seed):
    db = store_of(ks, gamma=0.5)
    if calibrated:
        db.calibrate(torch.randn(16, ks.keys.shape[1], generator=torch.Generator().manual_seed(seed)), margin=0.02)
    path = tmp_path_factory.mktemp("rt") / "db.safetensors"
    db.save(path)
    back = NeuralDB.load(path)
    assert back.ids == db.ids and back.gamma == db.gamma
    for name in ("keys", "residuals", "thresholds"):
        assert torch.equal(getattr(back, name), getattr(db, name)), name
    q = queries_near(ks, seed, 32, 1.0)
    for x, y in zip(db.gate(q), back.gate(q)):
        assert torch.equal(x, y)


def test_save_load_round_trip_at_100k(tmp_path):
    ks = big_keyset(0, "anisotropic")
    db = store_of(ks)
    db.calibrate(make_keys(256, D_KEY, seed=5, structure="anisotropic"), margin=0.05)
    db.save(tmp_path / "big.safetensors")
    back = NeuralDB.load(tmp_path / "big.safetensors")
    assert back.ids == db.ids
    assert torch.equal(back.keys, db.keys) and torch.equal(back.thresholds, db.thresholds)
    q = ks.keys[:: BIG // 97]
    for x, y in zip(db.gate(q), back.gate(q)):
        assert torch.equal(x, y)


def test_uncalibrated_store_file_has_no_thresholds_tensor(tmp_path):
    """Stores that never calibrate write exactly the old format (readable by older code)."""
    from safetensors import safe_open

    ks = KeySet(["a", "b"], torch.randn(2, 8), torch.randn(2, 4), 0, "gaussian")
    db = store_of(ks)
    db.save(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == {"keys", "residuals"}
    assert torch.equal(NeuralDB.load(tmp_path / "s.safetensors").thresholds, torch.full((2,), float("-inf")))


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [0.1, 0.2]])
def test_bad_thresholds_are_rejected(bad):
    db = NeuralDB(layer=0, d_key=4, d_model=2)
    with pytest.raises(StoreError):
        db.add(["a"], torch.randn(1, 4), torch.randn(1, 2), thresholds=bad)


@st.composite
def word_cases(draw, *, vocab: int = 12, width: int = 8):
    """A token sequence, some subjects' tokens (token lists, with or without a space
    form) and a random set of word-start tokens."""
    seq = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=24))
    words = draw(st.lists(st.tuples(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=width - 1),
                                    st.lists(st.integers(0, vocab - 1), min_size=1, max_size=width - 1)),
                          min_size=1, max_size=6))
    if draw(st.booleans()):  # plant a word in the sequence, so that matches are not all rare accidents
        spaced, bare = draw(st.sampled_from(words))
        at = draw(st.integers(0, len(seq)))
        seq = seq[:at] + draw(st.sampled_from([spaced, bare])) + seq[at:]
    starts = draw(st.lists(st.booleans(), min_size=vocab, max_size=vocab))
    return seq, words, starts


@settings(max_examples=examples(200))
@given(case=word_cases(), split=st.integers(0, 30))
def test_word_check_is_exact_suffix_matching_across_calls(case, split):
    """The word check fires at a position iff the tokens ending there are the spaced form, or the
    bare form at a word start (the text's start or after a word-start token), whether the text comes
    in one call or in two (the hook's history), for every stored word."""
    from neuraldb.words import NO_WORD, WORD_START, token_windows, word_match

    seq, words, starts = case
    width = 8
    table = torch.full((len(words), 2, width), NO_WORD, dtype=torch.long)
    for i, (spaced, bare) in enumerate(words):
        table[i, 0, width - len(spaced):] = torch.tensor(spaced)
        table[i, 1, width - len(bare):] = torch.tensor(bare)
        table[i, 1, width - len(bare) - 1] = WORD_START
    starts_t = torch.tensor(starts)

    def reference(t: int, spaced: list[int], bare: list[int]) -> bool:
        if t + 1 >= len(spaced) and seq[t + 1 - len(spaced): t + 1] == spaced:
            return True
        b = t + 1 - len(bare)
        return b >= 0 and seq[b: t + 1] == bare and (b == 0 or starts[seq[b - 1]])

    ids = torch.tensor([seq])
    cut = min(split, len(seq))
    whole = token_windows(ids, width=width)[0]  # (seq, width)
    first = token_windows(ids[:, :cut], width=width)[0]
    second = token_windows(ids[:, cut:], first[-1:, 1:] if cut else None, width=width)[0]
    assert torch.equal(torch.cat([first, second]), whole)  # history carries the earlier call's tokens
    for i, (spaced, bare) in enumerate(words):
        got = word_match(table[i].expand(len(seq), -1, -1), whole, starts_t).tolist()
        assert got == [reference(t, spaced, bare) for t in range(len(seq))]
