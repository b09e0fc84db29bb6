"""EditConfig.memory_budget_gb: facts per optimisation batch chosen from a memory budget."""

from dataclasses import replace

import pytest
import torch

import neuraldb
from neuraldb import EditConfig, Fact
from neuraldb.editor import batch_bytes_per_fact, copy_bytes, facts_per_batch

FACTS = [
    Fact(prompt="the city of {}", subject="the eiffel tower", target_new="rome", id="e1"),
    Fact(prompt="the mother tongue of {}", subject="danielle darrieux", target_new="english", id="e2"),
    Fact(prompt="the sport of {}", subject="lebron james", target_new="tennis", id="e3"),
]
CFG = EditConfig(layer=1, steps=10, lr=0.5, clamp_norm_factor=8.0, context_prefixes=("the", "i"), context_length=3)


@pytest.mark.parametrize("bad", [0, -1.0, True, "3"])
def test_the_budget_is_validated(bad):
    with pytest.raises(ValueError, match="memory_budget_gb"):
        EditConfig(memory_budget_gb=bad)
    assert EditConfig(memory_budget_gb=None).memory_budget_gb is None


def test_the_budget_sets_the_facts_per_batch(tiny_llama):
    model, _ = tiny_llama
    from neuraldb.residuals import fast_residual_dtype

    per_fact = batch_bytes_per_fact(model, CFG)
    assert per_fact > 0
    as_model = batch_bytes_per_fact(model, EditConfig(**{**CFG.to_dict(), "residual_dtype": None}))
    assert batch_bytes_per_fact(model, EditConfig(**{**CFG.to_dict(), "residual_dtype": "bfloat16"})) < as_model
    # the default ("auto") is estimated in the dtype it runs in on this machine
    auto = EditConfig(**{**CFG.to_dict(), "residual_dtype": fast_residual_dtype(model)})
    assert per_fact == batch_bytes_per_fact(model, auto)
    two = EditConfig(**{**CFG.to_dict(), "memory_budget_gb": 2.5 * as_model / 2**30, "residual_dtype": None})
    assert facts_per_batch(model, two) == 2
    # a bfloat16 copy of the model counts against the budget, once
    copy = copy_bytes(model, EditConfig(residual_dtype="bfloat16"))
    assert copy == sum(p.numel() for p in model.parameters()) * 2 + sum(b.numel() for b in model.buffers()) * 2
    assert copy_bytes(model, EditConfig(residual_dtype=None)) == 0 == copy_bytes(model, EditConfig(residual_dtype="float32"))
    bf = EditConfig(**{**CFG.to_dict(), "residual_dtype": "bfloat16"})
    per_bf = batch_bytes_per_fact(model, bf)
    assert facts_per_batch(model, replace(bf, memory_budget_gb=(copy + 2.5 * per_bf) / 2**30)) == 2
    assert facts_per_batch(model, replace(bf, memory_budget_gb=(copy + 3.5 * per_bf) / 2**30)) == 3
    assert facts_per_batch(model, EditConfig(**{**CFG.to_dict(), "memory_budget_gb": 1e-9})) == 1  # at least one
    assert facts_per_batch(model, EditConfig(**{**CFG.to_dict(), "memory_budget_gb": None})) == CFG.batch_size


def test_a_small_budget_splits_the_batch_without_changing_the_store(tiny_llama, monkeypatch):
    import neuraldb.editor as editor

    model, tok = tiny_llama
    sizes = []
    real = editor._edit_batch
    monkeypatch.setattr(editor, "_edit_batch", lambda step, db, batch, *a: sizes.append(len(batch)) or
                        real(step, db, batch, *a))
    whole = neuraldb.edit(model, tok, FACTS, config=EditConfig(**{**CFG.to_dict(), "memory_budget_gb": None}),
                          progress=False)
    assert sizes == [3]
    small = EditConfig(**{**CFG.to_dict(), "memory_budget_gb": 1e-9})
    split = neuraldb.edit(model, tok, FACTS, config=small, progress=False)
    assert sizes == [3, 1, 1, 1]
    assert torch.allclose(whole.residuals, split.residuals, atol=1e-3, rtol=1e-3)
    assert split.config["memory_budget_gb"] == 1e-9  # written into the store's config
