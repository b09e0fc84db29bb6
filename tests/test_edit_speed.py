"""What makes small edits fast keeps results: merged width blocks and the "auto" residual dtype."""

from dataclasses import replace

import pytest
import torch

import neuraldb
from neuraldb import EditConfig, Fact
from neuraldb import residual_batch, residuals
from neuraldb.keys import context_templates
from neuraldb.residual_batch import _merge_widths
from neuraldb.residuals import compute_residuals, fast_residual_dtype, optimisation_model, settle_residual_dtype

from test_edit import CFG, FACTS

# prompts of several lengths after the subject, so the batch has several widths
MIXED = FACTS + [
    Fact(prompt="{} was born in the beautiful old city of", subject="danielle darrieux", target_new="paris", id="m1"),
    Fact(prompt="{} plays", subject="lebron james", target_new="golf", id="m2"),
]


def test_merge_widths_trades_padding_against_blocks():
    widths = [2] * 10 + [3] * 10 + [4] * 2 + [9] * 10
    assert _merge_widths(widths, cost=0) == [2, 3, 4, 9]  # padding costs, a block is free: one per width
    assert _merge_widths(widths, cost=10**6) == [9]  # a block costs everything: one block
    # cost 12: merging 2 into 3 pads 10 tokens (< 12), 4 into 9 would pad 10 (< 12) but 3 into 4 pads 20 (> 12)
    assert _merge_widths(widths, cost=12) == [3, 9]
    assert _merge_widths([5], cost=64) == [5]
    for cost in (0, 7, 64, 1000):  # every width is covered by a block at least as wide
        ends = _merge_widths(widths, cost=cost)
        assert ends == sorted(ends) and all(any(w <= e for e in ends) for w in widths)


def test_merged_blocks_give_the_residuals_of_one_block_per_width(tiny_llama, monkeypatch):
    """Rows of a shorter width run with right padding in a wider block: same residuals (float32)."""
    model, tok = tiny_llama
    cfg = replace(CFG, residual_dtype=None)
    tm = context_templates(model, tok, prefixes=cfg.context_prefixes, length=cfg.context_length)
    out = {}
    for cost in (0, 10**6):
        monkeypatch.setattr(residual_batch, "BLOCK_COST_TOKENS", cost)
        lay = residual_batch._layout(tok, MIXED, tm, cfg.kl_prompt, torch.device("cpu"))
        out[cost] = (len(lay.block_end), *compute_residuals(model, tok, MIXED, layer=1, templates=tm, config=cfg))
    assert out[0][0] > 1 and out[10**6][0] == 1  # several blocks, then one
    assert out[0][2].steps == out[10**6][2].steps
    torch.testing.assert_close(out[10**6][1], out[0][1], atol=1e-4, rtol=1e-3)


def test_auto_means_bfloat16_only_for_float32_models_on_cpus_with_bfloat16_units(tiny_llama, monkeypatch):
    model, _ = tiny_llama
    for avx512, amx, want in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, None)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert fast_residual_dtype(model) == want
        assert settle_residual_dtype(model, EditConfig()).residual_dtype == want
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert fast_residual_dtype(model.to(torch.float64)) is None  # a model not in float32 keeps its dtype
    model.to(torch.float32)
    # a value the user chose is kept; a store's value wins over the machine's
    assert settle_residual_dtype(model, EditConfig(residual_dtype=None)).residual_dtype is None
    assert settle_residual_dtype(model, EditConfig(), {"residual_dtype": None}).residual_dtype is None
    assert settle_residual_dtype(model, EditConfig(), {"residual_dtype": "float32"}).residual_dtype == "float32"


def test_a_new_store_records_the_dtype_auto_chose_and_adding_to_a_store_keeps_its_own(tiny_llama, tmp_path,
                                                                                       monkeypatch):
    model, tok = tiny_llama
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    db = neuraldb.edit(model, tok, FACTS[:1], config=CFG, progress=False)
    assert CFG.residual_dtype == "auto" and db.config["residual_dtype"] == "bfloat16"
    # a store made with the model's dtype (e.g. before "auto" existed, or on another machine) resumes with the default
    ckpt = tmp_path / "run.safetensors"
    neuraldb.edit(model, tok, FACTS[:1], config=replace(CFG, residual_dtype=None), checkpoint=ckpt, progress=False)
    done = neuraldb.edit(model, tok, FACTS, config=CFG, checkpoint=ckpt, progress=False)
    assert done.ids == ["e1", "e2", "e3"] and done.config["residual_dtype"] is None


def test_the_optimisation_copy_is_made_once_per_model_and_again_when_its_weights_change(tiny_llama):
    model, _ = tiny_llama
    twin = optimisation_model(model, "bfloat16")
    assert twin is not model and next(twin.parameters()).dtype == torch.bfloat16
    assert optimisation_model(model, "bfloat16") is twin  # kept while the model is unchanged
    assert not any(p.requires_grad for p in twin.parameters())
    assert optimisation_model(model, None) is model and optimisation_model(model, "float32") is model
    weight = next(model.parameters())
    with torch.no_grad():
        weight.add_(0.0)  # an in-place update (a training step, loaded weights) makes a new copy
    assert optimisation_model(model, "bfloat16") is not twin
