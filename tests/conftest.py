"""Shared fixtures: tiny random models of several families, a word-level tokenizer,
the real SmolLM2 (loaded once per session), and the shared data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a an of in is was to and city located capital country language mother tongue plays sport "
    "developed by product made river mountain team football basketball tennis rome paris berlin london "
    "madrid english french german spanish apple microsoft google toyota eiffel tower danielle darrieux "
    "lebron james windows france germany italy spain john mary peter alice bob said that it he she they "
    "we you i what where who which when why how . , ? ! some text about nothing here there this one two "
    "three four five red green blue big small old new good bad day night sun moon star cat dog bird tree"
).split()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# the library reads its data folder from $NEURALDB_DATA_DIR only (tox sets it); a bare pytest run
# gets the project's usual location, as tox would give it
if not os.environ.get("NEURALDB_DATA_DIR") and SHARED_DATA.is_dir():
    os.environ["NEURALDB_DATA_DIR"] = str(SHARED_DATA)


def word_tokenizer():
    """A word-level fast tokenizer built offline (lower-cases, splits on spaces and punctuation)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    return fast


def tiny_config(family: str, vocab: int):
    from transformers import AutoConfig

    # a large init range so a random tiny model has peaked next-token distributions to edit
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3, initializer_range=0.4)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=3, n_head=4, n_inner=64, n_positions=128, **common)
    if family == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox", hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, **common,
        )
    if family == "gemma2":
        return AutoConfig.for_model(
            "gemma2", hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=64, max_position_embeddings=128, **common,
        )
    return AutoConfig.for_model(  # llama, mistral, qwen2
        family, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, **common,
    )


def tiny_model(family: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    tok = word_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)))
    model.config.name_or_path = f"tiny-{family}"
    return model.eval(), tok


FAMILIES = ["llama", "gpt2", "gpt_neox", "qwen2", "mistral", "gemma2"]


@pytest.fixture(params=FAMILIES)
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted once into a cache, then ~1 s per session)."""
    import neuraldb

    return neuraldb.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(os.environ.get("NEURALDB_DATA_DIR", SHARED_DATA))
    if not path.is_dir():
        pytest.fail(f"the shared data directory {path} is missing: set NEURALDB_DATA_DIR")
    return path
