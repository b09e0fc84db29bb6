import pytest
import torch

import neuraldb
from neuraldb import StoreError
from neuraldb.linear import LinearReader, estimate_c0, linear_delta

from test_edit import CFG, FACTS, next_token


def test_linear_delta_solves_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    keys, res = torch.randn(5, 12, generator=g), torch.randn(5, 3, generator=g)
    c0 = torch.eye(12) * 2.0
    d = linear_delta(keys, res, c0=c0, lam=0.5)  # (3, 12)
    k, r = keys.double().T, res.double().T
    # delta (K K^T + lam C0) = R K^T
    assert torch.allclose(d @ (k @ k.T + 0.5 * c0.double()), r @ k.T, atol=1e-9)
    # tiny lam: each key is mapped (almost) exactly onto its residual
    exact = linear_delta(keys, res, c0=None, lam=1e-8)
    assert torch.allclose(exact @ k, r, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_linear_reader_writes_and_restores_the_weight(family):
    from conftest import tiny_model

    model, tok = tiny_model(family)
    db = neuraldb.edit(model, tok, FACTS, config=CFG, progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reader = LinearReader(db, lam=1e-4)
    with reader.attached(model):
        assert [next_token(model, tok, f.text) for f in FACTS] == ["rome", "english", "tennis"]
        assert reader.stats()["reader"] == "linear" and len(reader) == 3 and reader.ids == db.ids
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_c0_and_gemma_refusal(tiny_llama):
    model, tok = tiny_llama
    c0 = estimate_c0(model, tok, ["the city of rome", "a big red dog"], layer=1)
    assert c0.shape == (64, 64) and torch.allclose(c0, c0.T)
    assert torch.linalg.eigvalsh(c0).min() > -1e-9
    db = neuraldb.NeuralDB(layer=1, d_key=64, d_model=32, module_template="m.{}.down", residual_template="m.{}.post_norm")
    with pytest.raises(StoreError, match="not equivalent"):
        LinearReader(db)


def test_linear_reader_follows_changes_of_its_store(tiny_llama):
    """The closed-form delta is cached between attaches but recomputed after the store changes."""
    from neuraldb.linear import LinearReader

    model, tok = tiny_llama
    db = neuraldb.edit(model, tok, FACTS[:1], config=CFG, progress=False)
    reader = LinearReader(db, lam=1e-3)
    with reader.attached(model):
        first = reader._delta[1]
    with reader.attached(model):
        assert reader._delta[1] is first  # same store: not recomputed
    db.update(db.ids[0], residual=db.residuals[0] * 2)  # in place: the residuals tensor stays the same object
    with reader.attached(model):
        assert torch.allclose(reader._delta[1], 2 * first, atol=1e-5)


def test_c0_sizes_come_from_prefixes_of_the_text(tiny_llama):
    """estimate_c0s gives, in one pass, what estimate_c0 gives on each prefix: a different C0 size is a different C0."""
    from neuraldb.linear import estimate_c0s

    model, tok = tiny_llama
    texts = ["the city of rome", "a big red dog", "tennis is a sport", "he spoke english"]
    c0s = estimate_c0s(model, tok, texts, sizes=[3, 1], layer=1, batch_size=2)
    assert sorted(c0s) == [1, 3]
    for n in (1, 3):
        assert torch.allclose(c0s[n], estimate_c0(model, tok, texts[:n], layer=1), atol=1e-12)
    assert not torch.allclose(c0s[1], c0s[3])
    with pytest.raises(ValueError, match="1..4"):
        estimate_c0s(model, tok, texts, sizes=[5], layer=1)


def test_written_share_is_one_when_stored_exactly_and_falls_with_lam():
    from neuraldb.linear import written_share

    g = torch.Generator().manual_seed(1)
    keys, res = torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)
    shares = [written_share(keys, res, linear_delta(keys, res, c0=None, lam=lam)) for lam in (1e-8, 1.0, 100.0)]
    assert abs(shares[0] - 1) < 1e-6 and shares[0] > shares[1] > shares[2] > 0
