from dataclasses import replace

import pytest
import torch

import neuraldb
from neuraldb import EditConfig, Fact, NeuralDB, StoreError

# Random tiny models route little information between positions, so the tiny-model
# facts end on the subject: the residual at the subject's last token then decides the
# next token directly. Long-range edits are tested on SmolLM2 (test_smollm2.py).
FACTS = [
    Fact(prompt="the city of {}", subject="the eiffel tower", target_new="rome", id="e1"),
    Fact(prompt="the mother tongue of {}", subject="danielle darrieux", target_new="english", id="e2"),
    Fact(prompt="the sport of {}", subject="lebron james", target_new="tennis", id="e3"),
]
# random tiny models have small, noisy hidden states: allow larger residuals than the 0.75 * ||h|| default
CFG = EditConfig(
    layer=1, steps=80, lr=0.5, clamp_norm_factor=8.0, context_prefixes=("the", "i"), context_length=3, batch_size=2
)


def next_token(model, tok, text):
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return tok.convert_ids_to_tokens(int(model(ids).logits[0, -1].argmax()))


def test_edit_makes_targets_on_every_family(tiny):
    model, tok = tiny
    db = neuraldb.edit(model, tok, FACTS, config=CFG, progress=False)
    assert len(db) == 3 and db.layer == 1 and db.d_key == 64 and db.d_model == 32
    before = [next_token(model, tok, f.text) for f in FACTS]
    with db.attached(model):
        after = [next_token(model, tok, f.text) for f in FACTS]
    assert after == ["rome", "english", "tennis"], (before, after)
    assert [next_token(model, tok, f.text) for f in FACTS] == before  # detached = original


def test_cached_prefix_and_width_groups_give_the_plain_residuals(tiny):
    """The shortcuts of compute_residuals (cached prefix, per-width groups, bypassed layers)
    give the residuals of recomputing every column, on every family."""
    from neuraldb.keys import context_templates
    from neuraldb.residuals import compute_residuals

    model, tok = tiny
    facts = FACTS + [Fact(prompt="{} plays the sport of", subject="lebron james", target_new="golf club", id="e4")]
    cfg = EditConfig(layer=1, steps=6, context_prefixes=("the", "i"), context_length=3)
    tm = context_templates(model, tok, prefixes=cfg.context_prefixes, length=cfg.context_length)
    fast, info = compute_residuals(model, tok, facts, layer=1, templates=tm, config=cfg)
    slow, info_slow = compute_residuals(model, tok, facts, layer=1, templates=tm, config=cfg, prefix_cache=False)
    assert fast.shape == (4, 32) and (fast.norm(dim=1) > 0).all()
    assert torch.allclose(fast, slow, atol=1e-4, rtol=1e-3), (fast - slow).abs().max()
    assert info.steps == info_slow.steps


def test_bfloat16_residual_optimisation_edits_the_float32_model(tiny):
    """residual_dtype='bfloat16' optimises on a bfloat16 copy: the float32 model is left as
    it was, keys are its own, and the residuals still make every target on every family."""
    model, tok = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.config._attn_implementation
    fp32 = neuraldb.edit(model, tok, FACTS, config=CFG, progress=False)
    db = neuraldb.edit(model, tok, FACTS, config=EditConfig(**{**CFG.to_dict(), "residual_dtype": "bfloat16"}),
                       progress=False)
    assert all(v.dtype == torch.float32 and torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.config._attn_implementation == attn
    assert db.residuals.dtype == torch.float32 and torch.equal(db.keys, fp32.keys)
    cos = torch.nn.functional.cosine_similarity(db.residuals, fp32.residuals, dim=1)
    assert (cos > 0.9).all(), cos  # the same optimisation up to bfloat16 rounding
    with db.attached(model):
        assert [next_token(model, tok, f.text) for f in FACTS] == ["rome", "english", "tennis"]
    assert db.config["residual_dtype"] == "bfloat16"


def test_residual_dtype_is_validated_and_part_of_the_resume_check(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="residual_dtype"):
        EditConfig(residual_dtype="int8")
    model, tok = tiny_llama
    ckpt = tmp_path / "run.safetensors"
    neuraldb.edit(model, tok, FACTS[:1], config=replace(CFG, residual_dtype=None), checkpoint=ckpt, progress=False)
    with pytest.raises(StoreError, match="different EditConfig \\(residual_dtype: stored None, given 'bfloat16'\\)"):
        neuraldb.edit(model, tok, FACTS, config=EditConfig(**{**CFG.to_dict(), "residual_dtype": "bfloat16"}),
                      checkpoint=ckpt, progress=False)


def test_a_store_written_before_a_config_field_existed_resumes(tmp_path, tiny_llama):
    """A field added to EditConfig later (here residual_dtype) takes its default on resume."""
    model, tok = tiny_llama
    ckpt = tmp_path / "run.safetensors"
    db = neuraldb.edit(model, tok, FACTS[:1], config=CFG, progress=False)
    del db.config["residual_dtype"]
    db.save(ckpt)
    done = neuraldb.edit(model, tok, FACTS, config=CFG, checkpoint=ckpt, progress=False)
    assert done.ids == ["e1", "e2", "e3"]


def test_early_stop_nll_stops_a_fact_once_its_target_is_learnt(tiny_llama):
    """early_stop="nll" (the default) drops a fact once its target NLL is below early_stop_loss,
    even while the KL term keeps its whole loss above it; "loss" (the paper's rule) does not."""
    from neuraldb.keys import context_templates
    from neuraldb.residuals import compute_residuals

    model, tok = tiny_llama
    # a heavy KL term keeps the whole loss well above the NLL on this tiny model
    cfg = EditConfig(**{**CFG.to_dict(), "kl_factor": 10.0, "early_stop_loss": 0.3})
    tm = context_templates(model, tok, prefixes=cfg.context_prefixes, length=cfg.context_length)
    _, by_loss = compute_residuals(model, tok, FACTS, layer=1, templates=tm, config=replace(cfg, early_stop="loss"))
    _, by_nll = compute_residuals(model, tok, FACTS, layer=1, templates=tm, config=cfg)
    assert cfg.early_stop == "nll"
    for i in range(len(FACTS)):
        if by_loss.steps[i] < cfg.steps:  # the paper's rule stops on the whole loss
            assert by_loss.loss[i] < 0.3
        if by_nll.steps[i] < cfg.steps:  # the default stops on the NLL, the whole loss still above the bound
            assert by_nll.nll[i] < 0.3 <= by_nll.loss[i]
    assert sum(by_nll.steps) < sum(by_loss.steps), (by_nll.steps, by_loss.steps)
    db = neuraldb.edit(model, tok, FACTS, config=cfg, progress=False)
    with db.attached(model):
        for f in FACTS:
            assert next_token(model, tok, f.prompt.format(f.subject)) == f.target_new


def test_a_store_made_before_early_stop_existed_resumes_under_the_papers_rule(tmp_path, tiny_llama):
    """A store whose config lacks early_stop was made with the whole-loss rule: resuming it with
    today's default is refused (it names the field), with early_stop="loss" it resumes, and forget
    re-fits its facts with that rule."""
    from neuraldb.refit import stored_config

    model, tok = tiny_llama
    ckpt = tmp_path / "run.safetensors"
    old = replace(CFG, early_stop="loss")
    db = neuraldb.edit(model, tok, FACTS[:1], config=old, progress=False)
    del db.config["early_stop"]
    db.save(ckpt)
    assert stored_config(NeuralDB.load(ckpt)).early_stop == "loss"
    with pytest.raises(StoreError, match="different EditConfig.*'early_stop': 'loss'"):
        neuraldb.edit(model, tok, FACTS, config=CFG, checkpoint=ckpt, progress=False)
    done = neuraldb.edit(model, tok, FACTS, config=old, checkpoint=ckpt, progress=False)
    assert done.ids == ["e1", "e2", "e3"]
    with pytest.raises(ValueError, match="early_stop"):
        EditConfig(early_stop="kl")


SAME_SUBJECT = [
    Fact(prompt="the city of {}", subject="lebron james", target_new="rome", id="s1"),
    Fact(prompt="the sport of {}", subject="the eiffel tower", target_new="tennis", id="s2"),
    Fact(prompt="the mother tongue of {}", subject="lebron james", target_new="english", id="s3"),
]


def test_facts_about_one_subject_share_a_residual(tiny_llama):
    """Keys read at the subject's last token cannot tell two facts about one subject apart,
    so their residual is optimised on both facts' prompts and shared (in one call, and
    across calls: a stored fact is re-optimised with a new fact about its subject)."""
    model, tok = tiny_llama
    db = neuraldb.edit(model, tok, SAME_SUBJECT, config=CFG, progress=False)
    res = dict(zip(db.ids, db.residuals))
    assert db.ids == ["s1", "s2", "s3"]  # the input order is kept
    assert torch.equal(res["s1"], res["s3"]) and not torch.equal(res["s1"], res["s2"])
    alone = neuraldb.edit(model, tok, SAME_SUBJECT, config=EditConfig(**{**CFG.to_dict(), "share_subject_residuals": False}),
                          progress=False)
    assert not torch.equal(alone.residuals[0], alone.residuals[2])
    assert torch.equal(alone.keys, db.keys) and torch.equal(alone.residuals[1], db.residuals[1])  # s2 is alone anyway

    later = neuraldb.edit(model, tok, SAME_SUBJECT[:2], config=CFG, progress=False)
    first = later.residuals[0].clone()
    later = neuraldb.edit(model, tok, SAME_SUBJECT[2:], config=CFG, db=later, progress=False)
    assert torch.equal(later.residuals[0], later.residuals[2]) and not torch.equal(later.residuals[0], first)
    assert torch.allclose(later.residuals, db.residuals, atol=1e-4, rtol=1e-3)  # = editing all three at once


def test_groups_of_one_give_the_per_fact_residuals(tiny_llama):
    from neuraldb.keys import context_templates
    from neuraldb.residuals import compute_residuals

    model, tok = tiny_llama
    cfg = EditConfig(layer=1, steps=5, context_prefixes=("the",), context_length=3)
    tm = context_templates(model, tok, prefixes=cfg.context_prefixes, length=cfg.context_length)
    plain, _ = compute_residuals(model, tok, SAME_SUBJECT, layer=1, templates=tm, config=cfg)
    ones, _ = compute_residuals(model, tok, SAME_SUBJECT, layer=1, templates=tm, config=cfg, groups=[7, 3, 5])
    shared, info = compute_residuals(model, tok, SAME_SUBJECT, layer=1, templates=tm, config=cfg, groups=[0, 1, 0])
    assert torch.equal(plain, ones)
    assert torch.equal(shared[0], shared[2]) and info.loss[0] == info.loss[2]
    with pytest.raises(ValueError, match="groups"):
        compute_residuals(model, tok, SAME_SUBJECT, layer=1, templates=tm, config=cfg, groups=[0, 1])


def test_edit_leaves_the_model_unchanged(tiny_llama):
    model, tok = tiny_llama
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    neuraldb.edit(model, tok, FACTS[:1], config=CFG, progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_batched_equals_one_at_a_time(tiny_llama):
    model, tok = tiny_llama
    together = neuraldb.edit(model, tok, FACTS, config=CFG, progress=False)
    alone = neuraldb.edit(model, tok, FACTS, config=EditConfig(**{**CFG.to_dict(), "batch_size": 1}), progress=False)
    assert torch.allclose(together.keys, alone.keys, atol=1e-5)
    assert torch.allclose(together.residuals, alone.residuals, atol=1e-3, rtol=1e-3)


def test_checkpoint_resume_skips_finished_facts(tmp_path, tiny_llama, monkeypatch):
    model, tok = tiny_llama
    ckpt = tmp_path / "run.safetensors"
    import neuraldb.editor as editor

    real = editor.compute_residuals
    calls = []

    def crash_on_second(*a, **k):
        calls.append(len(a[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(editor, "compute_residuals", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        neuraldb.edit(model, tok, FACTS, config=CFG, checkpoint=ckpt, progress=False)
    partial = NeuralDB.load(ckpt)
    assert partial.ids == ["e1", "e2"]
    monkeypatch.setattr(editor, "compute_residuals", real)
    done = neuraldb.edit(model, tok, FACTS, config=CFG, checkpoint=ckpt, progress=False)
    assert done.ids == ["e1", "e2", "e3"]
    assert torch.equal(done.keys[:2], partial.keys)
    fresh = neuraldb.edit(model, tok, FACTS, config=CFG, progress=False)
    assert torch.allclose(done.residuals, fresh.residuals, atol=1e-5)
    with pytest.raises(StoreError, match="different EditConfig"):
        neuraldb.edit(model, tok, FACTS, config=EditConfig(**{**CFG.to_dict(), "lr": 0.1}), checkpoint=ckpt)


def test_edit_detaches_an_attached_store_while_computing(tiny_llama):
    model, tok = tiny_llama
    first = neuraldb.edit(model, tok, FACTS[:1], config=CFG, progress=False)
    with first.attached(model):
        second = neuraldb.edit(model, tok, FACTS[:1], config=CFG, progress=False)
        assert first.is_attached
    assert torch.allclose(first.keys, second.keys) and torch.allclose(first.residuals, second.residuals)


def test_bad_input_is_rejected_before_work(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(neuraldb.FactError, match="prompt"):
        neuraldb.edit(model, tok, [{"prompt": "no slot", "subject": "x", "target_new": "y"}])
    with pytest.raises(ValueError, match="0 <= layer < 3"):
        neuraldb.edit(model, tok, FACTS, config=EditConfig(layer=7))
    with pytest.raises(ValueError, match="EditConfig.gamma"):
        EditConfig(gamma=2.0)


def test_chat_residuals_optimise_on_the_chat_turn_too(tiny_llama, caplog):
    import logging

    from neuraldb.keys import chat_context

    model, tok = tiny_llama
    facts = [Fact(prompt="the city of {} is in", subject="rome", target_new="france")]
    cfg = EditConfig(layer=1, steps=3, context_prefixes=("the",), context_length=3)
    with caplog.at_level(logging.WARNING, logger="neuraldb.editor"):  # no chat template: plain prompts only
        plain = neuraldb.edit(model, tok, facts, config=cfg, progress=False)
        same = neuraldb.edit(model, tok, facts, config=EditConfig(**{**cfg.to_dict(), "chat_residuals": True}),
                             progress=False)
    assert "no chat template" in caplog.text and torch.equal(plain.residuals, same.residuals)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<assistant>"
    try:
        assert chat_context(tok) == "<user> {} <assistant>"
        chat = neuraldb.edit(model, tok, facts, config=EditConfig(**{**cfg.to_dict(), "chat_residuals": True}),
                             progress=False)
    finally:
        tok.chat_template = None
    assert torch.equal(chat.keys, plain.keys) and not torch.equal(chat.residuals, plain.residuals)
