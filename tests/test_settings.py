"""Per-model edit settings (neuraldb/settings.json): the row a model gets, the user's fields win,
the family fraction stays the fallback, and `neuraldb settings` prints where each value comes from."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoConfig, GPT2Config, LlamaConfig

import neuraldb
from neuraldb import settings as settings_mod
from neuraldb.cli import main
from neuraldb.config import EditConfig
from neuraldb.settings import load_settings_table, resolve_settings

from conftest import tiny_model


def _llama3_config_dir(tmp_path, name="Meta-Llama-3-8B"):
    """A Llama-3-8B-shaped config.json (32 layers, model_type llama) saved to a folder, no weights."""
    folder = tmp_path / name
    LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(folder)
    return folder


def test_llama3_8b_from_a_config_file_gets_layer_8_and_lr_0_1(tmp_path):
    config = AutoConfig.from_pretrained(_llama3_config_dir(tmp_path) / "config.json")
    resolved = resolve_settings(config)
    assert (resolved.config.layer, resolved.config.lr, resolved.config.steps) == (8, 0.1, 25)
    assert resolved.row == "Llama-3-8B"
    assert all(resolved.sources[k] == "model row Llama-3-8B" for k in ("layer", "lr", "steps"))
    assert "Llama3-8B.json" in resolved.row_source  # the cited hparams file


def test_the_name_given_is_matched_case_insensitively(tmp_path):
    config = AutoConfig.from_pretrained(_llama3_config_dir(tmp_path, name="checkpoint"))
    assert resolve_settings(config).config.layer == 11  # no name that matches: the family fraction
    assert resolve_settings(config, name="meta-llama/meta-llama-3-8b-instruct").config.layer == 8


def test_gpt2_xl_and_gpt_j_rows():
    xl = GPT2Config(n_layer=48, n_embd=64, n_head=4)
    xl.name_or_path = "openai-community/gpt2-xl"
    got = resolve_settings(xl).config
    assert (got.layer, got.lr, got.steps) == (17, 0.5, 20)
    gptj = AutoConfig.for_model("gptj", n_layer=28, n_embd=64, n_head=4, rotary_dim=8)
    gptj.name_or_path = "EleutherAI/gpt-j-6B"
    assert resolve_settings(gptj).config.layer == 8


def test_your_editconfig_fields_always_win(tmp_path):
    config = AutoConfig.from_pretrained(_llama3_config_dir(tmp_path))
    resolved = resolve_settings(config, config=EditConfig(layer=5, lr=0.5))
    assert (resolved.config.layer, resolved.config.lr, resolved.config.steps) == (5, 0.5, 25)
    assert resolved.sources["layer"] == resolved.sources["lr"] == "your EditConfig"
    assert resolved.sources["steps"] == "model row Llama-3-8B"


def test_a_model_without_a_row_keeps_the_family_fraction_and_the_fallbacks():
    config = AutoConfig.for_model("llama", num_hidden_layers=30)  # SmolLM2-135M's shape, no row
    resolved = resolve_settings(config, name="smollm2-135m")
    assert (resolved.config.layer, resolved.config.lr, resolved.config.steps) == (10, 0.5, 25)
    assert resolved.sources["layer"].startswith("family default: round(0.33 x 30 layers)")
    assert resolved.sources["lr"].startswith("EditConfig default")
    assert resolved.row is None


def test_a_matching_name_with_another_shape_does_not_use_the_row(caplog):
    config = AutoConfig.for_model("llama", num_hidden_layers=16)  # e.g. a pruned "Llama-3-8B" derivative
    with caplog.at_level(logging.WARNING, logger="neuraldb.settings"):
        resolved = resolve_settings(config, name="someone/Llama-3-8B-pruned")
    assert resolved.config.layer == 5 and resolved.config.lr == 0.5
    assert "16 layers" in caplog.text and "not used" in caplog.text


def test_family_rows_apply_to_every_model_of_the_type():
    table = {"models": [], "families": {"llama": {"settings": {"lr": 0.2}, "source": "a test"}}}
    resolved = resolve_settings(AutoConfig.for_model("llama", num_hidden_layers=30), table=table)
    assert resolved.config.lr == 0.2 and resolved.sources["lr"] == "family row llama"
    assert resolved.config.layer == 10  # the family fraction


@pytest.mark.parametrize("row, message", [
    ({"match": "x", "model_type": "llama", "n_layers": 2, "settings": {"gamma": 0.7}}, "cannot be set per model"),
    ({"match": "x", "model_type": "llama", "n_layers": 2, "settings": {"lr": -1}}, "EditConfig.lr"),
    ({"match": "x", "model_type": "llama", "settings": {"lr": 0.1}}, "needs 'n_layers'"),
    ({"match": "x", "model_type": "llama", "n_layers": 2, "colour": "red"}, "unknown key(s) ['colour']"),
])
def test_a_bad_table_row_is_an_error_naming_the_row_and_field(row, message):
    with pytest.raises(ValueError, match=r"models\[0\]") as info:
        load_settings_table({"models": [row]})
    assert message in str(info.value)


def test_the_packaged_table_loads_and_cites_a_source_per_row():
    rows, families = load_settings_table()
    assert {r.name for r in rows} >= {"GPT-2 XL", "GPT-J 6B", "Llama-3-8B"}
    assert all(r.source for r in rows)


def test_edit_uses_the_models_row_and_writes_the_values_into_the_store(monkeypatch):
    model, tok = tiny_model("llama")  # name_or_path "tiny-llama", 3 layers
    table = {"models": [{"name": "tiny", "match": "^tiny-llama$", "model_type": "llama", "n_layers": 3,
                         "settings": {"layer": 2, "lr": 0.2, "steps": 3}, "source": "test"}]}
    monkeypatch.setattr(settings_mod, "_packaged", lambda: load_settings_table(table))
    facts = [neuraldb.Fact(prompt="{} is located in", subject="the eiffel tower", target_new="rome")]
    small = dict(context_prefixes=("the",), context_length=2)
    db = neuraldb.edit(model, tok, facts, config=EditConfig(**small), progress=False, check=False)
    assert db.layer == 2 and db.config["lr"] == 0.2 and db.config["steps"] == 3
    db = neuraldb.edit(model, tok, facts, config=EditConfig(layer=1, lr=0.4, **small), progress=False, check=False)
    assert db.layer == 1 and db.config["lr"] == 0.4 and db.config["steps"] == 3


def test_editconfig_leaves_lr_and_steps_to_the_model_and_filled_gives_the_fallbacks():
    cfg = EditConfig()
    assert cfg.lr is None and cfg.steps is None
    assert (cfg.filled().lr, cfg.filled().steps) == (0.5, 25)
    assert EditConfig(lr=0.1).filled().lr == 0.1
    with pytest.raises(ValueError, match="EditConfig.steps"):
        EditConfig(steps=-1)


def test_cli_prints_the_settings_of_a_llama3_config_file(tmp_path, capsys):
    folder = _llama3_config_dir(tmp_path, name="llama")
    rc = main(["settings", "--config", str(folder / "config.json"), "--model-name", "meta-llama/Meta-Llama-3-8B"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "llama, 32 layers" in out
    assert "layer  8      model row Llama-3-8B" in out and "lr     0.1    model row Llama-3-8B" in out
    rc = main(["settings", "--config", str(folder), "--model-name", "Meta-Llama-3-8B", "--lr", "0.3", "--json"])
    got = json.loads(capsys.readouterr().out)
    assert got["settings"]["lr"] == {"value": 0.3, "source": "your EditConfig"}
    assert got["settings"]["layer"]["value"] == 8


def test_cli_settings_without_a_readable_config_exits_2(tmp_path, capsys):
    assert main(["settings", "--config", str(tmp_path / "missing" / "config.json")]) == 2
    assert "pass --config" in capsys.readouterr().err


def test_neuraldb_edit_prints_the_settings_it_edits_with(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(neuraldb, "load_model", lambda name, **kw: tiny_model("llama"))
    small = dict(steps=2, context_prefixes=("the",), context_length=2)
    monkeypatch.setattr(neuraldb, "EditConfig", lambda **kw: EditConfig(**(small | kw)))
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "the city of {}", "subject": "the eiffel tower", "target_new": "rome"}]))
    assert main(["edit", "--facts", str(facts), "--out", str(tmp_path / "s.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "edit settings:" in out
    assert "layer  1      family default: round(0.33 x 3 layers)" in out and "lr     0.5    EditConfig default" in out
    assert neuraldb.NeuralDB.load(tmp_path / "s.safetensors").config["lr"] == 0.5
