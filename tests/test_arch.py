import pytest
from transformers import AutoConfig

from neuraldb import known_model_types, resolve_arch


@pytest.mark.parametrize(
    "model_type,mlp",
    [
        ("gpt2", "transformer.h.{}.mlp.c_proj"),
        ("gptj", "transformer.h.{}.mlp.fc_out"),
        ("gpt_neox", "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
        ("llama", "model.layers.{}.mlp.down_proj"),
        ("mistral", "model.layers.{}.mlp.down_proj"),
        ("qwen2", "model.layers.{}.mlp.down_proj"),
        ("gemma", "model.layers.{}.mlp.down_proj"),
        ("gemma2", "model.layers.{}.mlp.down_proj"),
        ("gemma3_text", "model.layers.{}.mlp.down_proj"),
    ],
)
def test_templates_per_family(model_type, mlp):
    cfg = AutoConfig.for_model(model_type)
    arch = resolve_arch(cfg)
    assert arch.mlp_out == mlp
    assert arch.mlp_out_at(3) == mlp.format(3)
    assert 0 < arch.default_layer < arch.n_layers


def test_default_layer_is_about_a_third():
    assert resolve_arch(AutoConfig.for_model("llama", num_hidden_layers=30)).default_layer == 10
    assert resolve_arch(AutoConfig.for_model("gpt2", n_layer=48)).default_layer == 17
    assert resolve_arch(AutoConfig.for_model("gptj", n_layer=28)).default_layer == 8


def test_unknown_family_says_how_to_pass_templates():
    cfg = AutoConfig.for_model("llama")
    cfg.model_type = "mystery"
    with pytest.raises(KeyError, match="mlp_out_template"):
        resolve_arch(cfg)
    arch = resolve_arch(cfg, layers="blocks.{}", mlp_out="blocks.{}.ff.out")
    assert arch.mlp_out_at(2) == "blocks.2.ff.out"


def test_template_without_placeholder_rejected():
    with pytest.raises(ValueError, match="needs"):
        resolve_arch(AutoConfig.for_model("llama"), mlp_out="model.layers.mlp")


def test_layer_range_checked():
    arch = resolve_arch(AutoConfig.for_model("llama", num_hidden_layers=4))
    with pytest.raises(ValueError, match="0 <= layer < 4"):
        arch.check_layer(4)
    assert "llama" in known_model_types()
