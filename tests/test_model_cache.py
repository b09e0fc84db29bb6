"""What neuraldb.edit computes once per model (neuraldb.model_cache): context templates and the
check of the residual shortcuts. Cached per live model and state, never shared between models."""

import gc

import pytest
import torch

from conftest import tiny_model
from neuraldb import EditConfig, Fact
from neuraldb.keys import context_templates
from neuraldb.model_cache import PerModel

FACTS = [Fact(prompt="the city of {}", subject="the eiffel tower", target_new="rome", id="e1")]


def counting_generate(model):
    calls = []
    real = model.generate

    def generate(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    model.generate = generate
    return calls


def test_context_templates_are_generated_once_per_model_and_state():
    model, tok = tiny_model("llama", seed=0)
    other, _ = tiny_model("llama", seed=1)
    calls = counting_generate(model)
    first = context_templates(model, tok, prefixes=("the", "i"), length=4)
    assert context_templates(model, tok, prefixes=("the", "i"), length=4) == first and len(calls) == 2
    assert context_templates(model, tok, prefixes=("the", "i"), length=4, seed=1) and len(calls) == 4  # other seed
    assert context_templates(other, tok, prefixes=("the", "i"), length=4) != first  # never another model's
    assert context_templates(model, tok, prefixes=("the", "i"), length=4, cache=False) == first and len(calls) == 6
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # weights changed in place: generated again
    context_templates(model, tok, prefixes=("the", "i"), length=4)
    assert len(calls) == 8


def test_per_model_entries_go_with_their_model_and_are_bounded():
    cache = PerModel(per_model=2)
    model, _ = tiny_model("llama")
    for k in range(3):
        cache.put(model, k, k)
    assert not cache.has(model, 0) and cache.has(model, 1) and cache.has(model, 2)  # the oldest went
    assert cache.get(model, 2, lambda: pytest.fail("recomputed")) == 2
    del model
    gc.collect()
    assert len(cache._entries) == 0


def test_the_shortcut_check_runs_once_per_model_and_again_after_a_change(tiny_llama, monkeypatch):
    import neuraldb.residual_runner as runner
    from neuraldb.residuals import compute_residuals

    model, tok = tiny_llama
    cfg = EditConfig(layer=1, steps=2, context_prefixes=("the",), context_length=3)
    tm = context_templates(model, tok, prefixes=cfg.context_prefixes, length=cfg.context_length)
    checks = []
    real = runner._reproduces
    monkeypatch.setattr(runner, "_reproduces", lambda *a: checks.append(1) or real(*a))
    first, _ = compute_residuals(model, tok, FACTS, layer=1, templates=tm, config=cfg)
    again, _ = compute_residuals(model, tok, FACTS, layer=1, templates=tm, config=cfg)
    assert len(checks) == 1 and torch.equal(first, again)  # skipping the check changes nothing
    compute_residuals(model, tok, FACTS, layer=0, templates=tm, config=cfg)
    assert len(checks) == 2  # another layer is checked

    def scaled(module, args, output):  # a hook that post-processes the logits, added later
        output.logits = output.logits * 1.5 + 1.0
        return output

    model.register_forward_hook(scaled)
    with pytest.raises(RuntimeError, match="do not reproduce"):
        compute_residuals(model, tok, FACTS, layer=1, templates=tm, config=cfg)
