"""The start-of-batch check of the residual shortcuts (neuraldb.residual_runner): it must pass for
a bfloat16 copy of a model (rounding differs with the batch's shapes) and fail for a model whose
logits are not base model + LM head."""

import pytest
import torch

from neuraldb import EditConfig, Fact
from neuraldb.residual_runner import logits_close, shortcut_tolerance

FACTS = [
    Fact(prompt="the city of {}", subject="the eiffel tower", target_new="rome", id="e1"),
    Fact(prompt="the mother tongue of {}", subject="danielle darrieux", target_new="english", id="e2"),
]


def test_the_tolerance_holds_bfloat16_rounding_and_rejects_a_scaled_head():
    torch.manual_seed(0)
    want = torch.randn(6, 1000) * 4 + 21 * (torch.rand(6, 1000) > 0.999)  # logits up to ~21, as SmolLM2's
    want[:, 0] = 21.0
    tol = shortcut_tolerance(torch.bfloat16, 30)
    # SmolLM2-135M's bfloat16 shortcuts differ from its bfloat16 full pass by up to 4.0% of the largest logit
    assert logits_close(want + 0.04 * 21 * (2 * torch.rand_like(want) - 1), want, tol)
    assert not logits_close(want * 1.25, want, tol)  # an LM head that scales the logits
    assert not logits_close(want + 3.0, want, tol)  # or shifts them
    assert shortcut_tolerance(torch.float32, 30) == pytest.approx(1e-3)  # float32 stays as tight as before
    assert shortcut_tolerance(torch.bfloat16, 30) < shortcut_tolerance(torch.bfloat16, 64)


def test_a_model_whose_logits_are_not_base_plus_head_is_refused(tiny_llama):
    from neuraldb.keys import context_templates
    from neuraldb.residuals import compute_residuals

    model, tok = tiny_llama
    cfg = EditConfig(layer=1, steps=2, context_prefixes=("the",), context_length=3)
    tm = context_templates(model, tok, prefixes=cfg.context_prefixes, length=cfg.context_length)

    def scaled(module, args, output):  # post-processing the LM head does not know about
        output.logits = output.logits * 1.5 + 1.0
        return output

    handle = model.register_forward_hook(scaled)
    try:
        with pytest.raises(RuntimeError, match="do not reproduce the model's logits"):
            compute_residuals(model, tok, FACTS, layer=1, templates=tm, config=cfg)
    finally:
        handle.remove()
    res, _ = compute_residuals(model, tok, FACTS, layer=1, templates=tm, config=cfg)  # without it: fine
    assert res.shape == (2, 32)


def test_bfloat16_copy_of_smollm2_keeps_the_prefix_cache(smollm2):
    """Regression: `neuraldb study --sequential 10x50 --residual-dtype bfloat16` raised 'do not
    reproduce the model's logits': the bfloat16 shortcuts differ from the bfloat16 full pass by up
    to 0.625 on logits of scale 21 (2-4%), and the check's bound was 0.031 absolute."""
    from neuraldb.arch import resolve_arch
    from neuraldb.keys import context_templates
    from neuraldb.residual_batch import _layout
    from neuraldb.residual_runner import _runner, _unedited
    from neuraldb.residuals import optimisation_model
    from test_smollm2 import FACTS as REAL

    model, tok = smollm2
    cfg = EditConfig()
    tm = context_templates(model, tok, prefixes=cfg.context_prefixes, length=cfg.context_length)
    twin = optimisation_model(model, "bfloat16")
    lay = _layout(tok, REAL, tm, cfg.kl_prompt, torch.device("cpu"))
    run = _runner(twin, resolve_arch(twin), 10, lay, prefix_cache=True)
    assert run.start > 0
    _, ok = _unedited(run)
    assert ok  # the shortcuts (and their faster prefix cache) are kept
    _, ok_full = _unedited(type(run)(**{**run.__dict__, "start": 0, "cache": None}))
    assert ok_full
