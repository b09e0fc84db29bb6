"""Where the word check passes, tokenizer family by tokenizer family (neuraldb.words).

A stored fact's gate may fire at a token only if the tokens ending there spell the fact's
subject. These tests pin down, for every tokenizer family (``tokenizer_families.py``), the
exact positions where the check passes for a subject written the ways text writes it:

* at the start of the text, mid-sentence, after a quote / bracket / newline, inside a chat
  template, possessive, followed by punctuation, and with a leading article of the subject
  ("The Eiffel Tower") capitalised, lower-cased or dropped, or an alias passed to
  ``subject_words(..., aliases=...)``: the check passes at the mention's last token, and
  only there;
* inside another word ("BusinessWeek", "MegaDanube"), after a hyphen ("Ann-Marie"), a
  different name sharing the last word or a word piece ("Aaron Sharp", "Steinberg"), or the
  subject's last word alone: it passes nowhere.

The mention's last token is found from the tokenizer's offsets (the token holding the
subject's last character), positions index ``tokenizer(text)["input_ids"]`` with the
tokenizer's default special tokens. The check is computed with the public pieces
(``subject_words`` + ``token_windows`` + ``word_match`` + ``word_start_tokens``) in
:func:`fired`, so these tests do not depend on any helper built on top of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import pytest
import torch

from neuraldb.models import ModelPackageMissing
from neuraldb.words import subject_words, token_windows, word_match, word_start_tokens
from tokenizer_families import FAMILIES, OFFLINE, _byte_level, _sentencepiece, build


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer: Any
    starts: torch.Tensor  # word_start_tokens(tokenizer), computed once (seconds for Gemma's 262k tokens)


@pytest.fixture(scope="module", params=FAMILIES)
def tokenizer_family(request) -> Family:
    """Each tokenizer family once per module; the real ones skip when their model package is absent."""
    try:
        tok = build(request.param)
    except ModelPackageMissing as exc:
        pytest.skip(f"the {request.param} tokenizer comes with its model package, which is not installed: {exc}")
    return Family(request.param, tok, word_start_tokens(tok))


# ------------------------------------------------------------------ helpers
def fired(fam: Family, subject: str, text: str, aliases: Sequence[str] = ()) -> list[int]:
    """Positions of ``tokenizer(text)["input_ids"]`` where the word check passes for ``subject``."""
    tok = fam.tokenizer
    kwargs = {"aliases": [list(aliases)]} if aliases else {}  # only pass the option when a test needs it
    words = subject_words(tok, [subject], **kwargs)  # (1, forms, width)
    ids = torch.tensor([tok(text)["input_ids"]])
    win = token_windows(ids, width=words.shape[-1])[0]  # (seq, width)
    hit = word_match(words.expand(win.shape[0], -1, -1), win, fam.starts)
    return hit.nonzero().flatten().tolist()


def parse(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """``"I met {Barack Obama}."`` -> ("I met Barack Obama.", [(6, 18)]): the text and its mentions' spans."""
    text, spans = "", []
    for piece in re.split(r"(\{[^{}]*\})", marked):
        if piece.startswith("{"):
            spans.append((len(text), len(text) + len(piece) - 2))
            piece = piece[1:-1]
        text += piece
    return text, spans


def last_tokens(tok: Any, text: str, spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each span, the position of the token holding its last character (which must end there)."""
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for start, end in spans:
        holding = [i for i, (a, b) in enumerate(offsets) if a < b and a <= end - 1 < b]
        assert holding, f"no token holds character {end - 1} of {text!r}"
        i = holding[-1]  # byte fallback: a character's bytes share its offsets
        assert offsets[i][1] == end, (  # a test-setup problem, not a word-check one
            f"the token at {i} ({tok.convert_ids_to_tokens(tok(text)['input_ids'])[i]!r}) runs past the "
            f"mention {text[start:end]!r}: pick a context whose next character starts a new token")
        out.append(i)
    return out


def explain(fam: Family, subject: str, text: str, got: list[int], want: list[int]) -> str:
    toks = fam.tokenizer.convert_ids_to_tokens(fam.tokenizer(text)["input_ids"])
    return (f"[{fam.name}] subject {subject!r} in {text!r}: the check passes at {got} "
            f"{[toks[i] for i in got]}, expected {want} {[toks[i] for i in want]}; tokens {list(enumerate(toks))}")


def check(fam: Family, subject: str, text: str, spans: Sequence[tuple[int, int]], aliases: Sequence[str] = ()):
    want = last_tokens(fam.tokenizer, text, spans)
    got = fired(fam, subject, text, aliases)
    assert got == want, explain(fam, subject, text, got, want)


# ------------------------------------------------------------------ mentions: the check passes at the last token
MENTIONS = [
    # id, subject, text with each mention in braces, aliases
    ("start", "Barack Obama", "{Barack Obama} was born in Hawaii.", ()),
    ("start_one_word", "Danube", "{Danube} is a river.", ()),
    ("mid", "Barack Obama", "Yesterday I met {Barack Obama} in Paris.", ()),
    ("mid_one_word", "Danube", "They sailed down the {Danube} to Vienna.", ()),
    ("mid_camel_case", "LeBron James", "The crowd cheered for {LeBron James} loudly.", ()),
    ("after_quote", "Barack Obama", 'He said "{Barack Obama}" twice.', ()),
    ("after_quote_at_start", "LeBron James", '"{LeBron James} is tall," she said.', ()),
    ("after_bracket", "LeBron James", "She wrote ({LeBron James}) in the margin.", ()),
    ("after_square_bracket_at_start", "Danube", "[{Danube}] was the title.", ()),
    ("after_newline", "Danube", "The notes read:\n{Danube} was there.", ()),
    ("after_newline_two_words", "Barack Obama", "Notes:\n{Barack Obama} was there.", ()),
    ("possessive", "Barack Obama", "Have you seen {Barack Obama}'s new book?", ()),
    ("possessive_at_start", "LeBron James", "{LeBron James}'s team won.", ()),
    ("comma", "The Eiffel Tower", "We visited {The Eiffel Tower}, then went home.", ()),
    ("period", "LeBron James", "Everyone talks about {LeBron James}.", ()),
    ("question_mark", "Danube", "Where is the {Danube}?", ()),
    ("article_capitalised_at_start", "The Eiffel Tower", "{The Eiffel Tower} is located in Paris.", ()),
    ("article_lower_cased", "The Eiffel Tower", "I saw {the Eiffel Tower} at night.", ()),
    ("article_lower_cased_at_start", "The Eiffel Tower", "{the Eiffel Tower} at night", ()),
    ("article_dropped_at_start", "The Eiffel Tower", "{Eiffel Tower} is tall.", ()),
    ("article_dropped_mid", "The Eiffel Tower", "We climbed {Eiffel Tower} twice.", ()),
    ("article_dropped_after_quote", "The Eiffel Tower", 'She said "{Eiffel Tower}" twice.', ()),
    ("article_a_lower_cased", "A Tribe Called Quest", "I played {a Tribe Called Quest} song.", ()),
    ("article_a_dropped", "A Tribe Called Quest", "I listened to {Tribe Called Quest} all day.", ()),
    ("alias_at_start", "Barack Obama", "{Obama} said no.", ("Obama",)),
    ("alias_mid_possessive", "Barack Obama", "I met {Obama}'s wife.", ("Obama",)),
    ("alias_and_subject", "Barack Obama", "{Barack Obama}, or {Obama}, spoke.", ("Obama",)),
    ("three_times", "Danube", "{Danube}, {Danube} and the {Danube}.", ()),
]


@pytest.mark.parametrize("subject, marked, aliases", [pytest.param(*m[1:], id=m[0]) for m in MENTIONS])
def test_mention_fires_at_its_last_token(tokenizer_family, subject, marked, aliases):
    text, spans = parse(marked)
    check(tokenizer_family, subject, text, spans, aliases)


@pytest.mark.parametrize("content", ["What sport does LeBron James play?", "LeBron James plays what sport?"],
                         ids=["mid_message", "message_start"])
@pytest.mark.parametrize("generation_prompt", [False, True], ids=["", "generation_prompt"])
def test_mention_fires_inside_chat_template(tokenizer_family, content, generation_prompt):
    tok = tokenizer_family.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=generation_prompt)
    start = text.index("LeBron James")
    check(tokenizer_family, "LeBron James", text, [(start, start + len("LeBron James"))])


def test_mentions_fire_in_every_turn_of_a_chat(tokenizer_family):
    tok = tokenizer_family.tokenizer
    chat = [{"role": "user", "content": "Tell me about Barack Obama."},
            {"role": "assistant", "content": "Barack Obama was the 44th president."},
            {"role": "user", "content": "Did Barack Obama's team win?"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    spans = [(m.start(), m.end()) for m in re.finditer("Barack Obama", text)]
    assert len(spans) == 3
    check(tokenizer_family, "Barack Obama", text, spans)


# ------------------------------------------------------------------ non-mentions: the check passes nowhere
NON_MENTIONS = [
    # id, subject, text that does not mention it
    ("inside_word", "Week", "BusinessWeek Online has learned."),
    ("inside_word_two_word_subject", "TV Week", "BusinessWeek Online has learned."),
    ("inside_compound", "Danube", "We went to the MegaDanube festival."),
    ("inside_compound_at_start", "Danube", "MegaDanube is a festival."),
    ("after_hyphen", "Marie", "He had told Soren and Ann-Marie."),
    ("after_hyphen_two_word_subject", "Kelly Marie", "He had told Soren and Ann-Marie."),
    ("shared_word_piece", "Brad Silverberg", "House Leader Steinberg said no."),
    ("last_word_alone", "Brad Silverberg", "Mr Silverberg said no."),
    ("same_surname", "Richard Sharp", '"Yeah," Aaron Sharp said.'),
    ("same_surname_at_start", "Barack Obama", "Michelle Obama spoke."),
    ("surname_alone_without_alias", "Barack Obama", "I met Obama yesterday."),
    ("same_surname_mid", "LeBron James", "She read Henry James all day."),
    ("last_word_alone_at_start", "LeBron James", "James said no."),
    ("same_last_word", "The Eiffel Tower", "The Tokyo Tower is tall."),
    ("last_word_alone_after_article", "The Eiffel Tower", "We saw the Tower of London."),
    ("first_word_alone", "The Eiffel Tower", "Eiffel was an engineer."),
    ("article_and_last_word", "A Tribe Called Quest", "It was a Quest for fire."),
]


@pytest.mark.parametrize("subject, text", [pytest.param(*m[1:], id=m[0]) for m in NON_MENTIONS])
def test_non_mention_fires_nowhere(tokenizer_family, subject, text):
    got = fired(tokenizer_family, subject, text)
    assert got == [], explain(tokenizer_family, subject, text, got, [])


# ------------------------------------------------------------------ the named target
@pytest.mark.parametrize("subject, marked", [("Barack Obama", "I met {Barack Obama}"),
                                             ("Barack Obama", "Yesterday I met {Barack Obama} in Paris."),
                                             ("Danube", "They sailed down the {Danube} to Vienna.")])
def test_sp_legacy_subject_fires_mid_sentence(subject, marked):
    """Llama-2 / Mistral / TinyLlama: neither the subject alone after a space (a lone "▁" first)
    nor the subject alone without one (a "▁" first, not a word start after "▁met") is how the
    subject tokenises mid-sentence, yet a mid-sentence mention must fire."""
    tok = build("sp_legacy")
    fam = Family("sp_legacy", tok, word_start_tokens(tok))
    alone = tok.convert_ids_to_tokens(tok(" Barack Obama", add_special_tokens=False)["input_ids"])
    assert alone[0] == "▁" and alone[1].startswith("▁")  # the premise of the bug
    text, spans = parse(marked)
    check(fam, subject, text, spans)


# ------------------------------------------------------------------ the offline families are what they claim
def tokens(tok, text, **kw) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text, **kw)["input_ids"])


@pytest.mark.parametrize("family", OFFLINE)
def test_offline_family_traits(family):
    tok = build(family)
    mid = tokens(tok, "I met Barack Obama")
    if family == "byte_bpe":  # GPT-2 style: no BOS, the space is part of the next token
        assert mid[0] == "I" and mid[-1] == "ĠObama"
        assert tokens(tok, "Barack Obama")[0] != tokens(tok, " Barack Obama")[0]
        assert "Ċ" in tokens(tok, "a\nb")
    elif family == "sp_legacy":  # Llama-2 style: a dummy "▁" before the text, a lone "▁" before a leading space
        assert mid[:3] == ["<s>", "▁I", "▁met"] and "▁" not in mid and mid[-1] == "▁Obama"
        assert tokens(tok, " Barack Obama")[:2] == ["<s>", "▁"]
        assert tokens(tok, "Barack Obama")[1].startswith("▁")
        assert "<0x0A>" in tokens(tok, "a\nb")  # byte fallback
        assert not tokens(tok, 'He said "Barack', add_special_tokens=False)[-1].startswith("▁")
    else:  # Gemma style: no dummy prefix
        assert mid[:3] == ["<bos>", "I", "▁met"] and mid[-1] == "▁Obama"
        assert not tokens(tok, "Barack Obama")[1].startswith("▁")
        assert "\n" in tokens(tok, "a\nb")
    for text in ["I met Barack Obama's team.", 'He said "LeBron James" (twice)\nthen left.', "Hawaii, 1961!"]:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "Hi" in chat and chat != "Hi"
    assert tok.pad_token is not None


def test_offline_families_train_deterministically():
    rebuilt = {"byte_bpe": _byte_level(), "sp_legacy": _sentencepiece(prefix=True),
               "sp_no_prefix": _sentencepiece(prefix=False)}
    for family, tok in rebuilt.items():
        assert tok.backend_tokenizer.to_str() == build(family).backend_tokenizer.to_str(), family
