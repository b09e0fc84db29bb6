"""The word check across tokenizer families: generated mentions fire, generated non-mentions never do.

No model: ``neuraldb.words`` on the three offline tokenizer families of
``tests/tokenizer_families.py`` (byte-level BPE, legacy SentencePiece with a dummy prefix,
SentencePiece without one), each built once per module. A small store of subjects
(:data:`SUBJECTS`, some with aliases) is checked against generated texts:

* a text that mentions one stored subject, spelt as text spells it (its leading article
  capitalised, lower-cased or dropped, or an alias), at the start, mid-sentence or after
  an opening quote, bracket or line break, possessive or not, followed by punctuation or
  not: the check passes for that subject at the mention's last token and nowhere else, and
  for no other subject anywhere;
* a text of everyday words and look-alikes (names sharing a last word or a word piece with
  a stored subject, a subject glued inside another word or after a hyphen, a subject's last
  word alone): the check passes for no subject anywhere.

Positions index ``tokenizer(text)["input_ids"]`` with the tokenizer's special tokens; the
mention's last token holds its last character (from the offsets).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from neuraldb.words import subject_words, token_windows, word_match, word_start_tokens

from .conftest import REPO, examples
from .strategies import COMMON_WORDS


def _tokenizer_families():
    """``tests/tokenizer_families.py`` (tests/ is not a package), imported once."""
    if "tokenizer_families" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tokenizer_families", REPO / "tests" / "tokenizer_families.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["tokenizer_families"] = module
        spec.loader.exec_module(module)
    return sys.modules["tokenizer_families"]


families = _tokenizer_families()
FAMILIES = families.OFFLINE

# The store: multi-word and one-word names, with and without a leading article; none inside another.
SUBJECTS = ("Barack Obama", "The Eiffel Tower", "LeBron James", "Danube", "Turkey", "Richard Sharp",
            "Brad Silverberg", "TV Week", "The Beatles", "A Tribe Called Quest", "Angela Merkel", "Kelly Marie")
ALIASES = {"Barack Obama": ("Obama",), "Angela Merkel": ("Merkel", "Chancellor Merkel"), "LeBron James": ("King James",)}
# Names that share a last word or a word piece with a stored subject, and pieces of subjects.
LOOKALIKES = ("Aaron Sharp", "Steinberg", "Greenberg", "Silverberg", "Silver", "BusinessWeek", "Ann-Marie",
              "Michelle Obama", "Henry James", "Tokyo Tower", "Blackpool Tower", "MegaDanube", "Obama", "James",
              "Tower", "Sharp", "Week", "Eiffel", "Merkel", "Quest", "Tribe", "Marie", "Brad", "Beatle", "Danubian",
              "Turk", "Richard")
GLUES = ("Mega", "Business", "Super", "Ann-", "X", "Neo", "Pro", "Mc")  # glued before a name: inside another word
OPENERS = ('"', "(", "[", "\n")
TRAILS = ("", "", ",", ".", "?", "!", '"', ")", ";", ":")
_ARTICLE = re.compile(r"^(The|A|An) (.+)$")


def spellings(name: str, *, drop_single: bool = False) -> list[str]:
    """How text spells ``name``: itself, its leading article lower-cased, and without the article
    when two or more words remain (``drop_single`` also drops it before one word, for the
    non-mention filter, which must err on the side of calling a text a mention)."""
    out = [name]
    m = _ARTICLE.match(name)
    if m:
        out.append(f"{m.group(1).lower()} {m.group(2)}")
        if drop_single or " " in m.group(2):
            out.append(m.group(2))
    return out


def _mentioned(text: str, name: str) -> bool:
    """Does ``text`` hold a spelling of ``name`` where a word starts (text start, whitespace, an opener)?"""
    starts = r"(?:^|(?<=[\s\"'(\[“‘«{<]))"
    return any(re.search(starts + re.escape(s), text) for s in spellings(name, drop_single=True))


assert not any(a != b and _mentioned(b, a) for a in SUBJECTS for b in SUBJECTS), "the store's names nest"
assert not any(_mentioned(w, s) for w in COMMON_WORDS for s in SUBJECTS + tuple(a for v in ALIASES.values() for a in v))


# ------------------------------------------------------------------ the store, once per family
@functools.lru_cache(maxsize=None)
def tokenizer(family: str):
    return families.build(family)


@functools.lru_cache(maxsize=None)
def starts(family: str) -> torch.Tensor:
    return word_start_tokens(tokenizer(family))


@functools.lru_cache(maxsize=None)
def store_words(family: str, with_aliases: bool) -> torch.Tensor:
    """(n, F, width): the forms of every stored subject (and of its aliases)."""
    if with_aliases:
        return subject_words(tokenizer(family), list(SUBJECTS), aliases=[list(ALIASES.get(s, ())) for s in SUBJECTS])
    return subject_words(tokenizer(family), list(SUBJECTS))


def fires(family: str, text: str, *, with_aliases: bool) -> dict[str, list[int]]:
    """{subject: positions of ``tokenizer(text)["input_ids"]`` where its check passes} (subjects that pass somewhere)."""
    words = store_words(family, with_aliases)
    n, _, width = words.shape
    ids = torch.tensor([tokenizer(family)(text)["input_ids"]])
    win = token_windows(ids, width=width)[0]  # (seq, width)
    seq = win.shape[0]
    hit = word_match(words.repeat_interleave(seq, dim=0), win.repeat(n, 1), starts(family)).view(n, seq)
    return {SUBJECTS[i]: hit[i].nonzero().flatten().tolist() for i in range(n) if hit[i].any()}


def last_token(family: str, text: str, end: int) -> int:
    offsets = tokenizer(family)(text, return_offsets_mapping=True)["offset_mapping"]
    i = [j for j, (a, b) in enumerate(offsets) if a < b and a <= end - 1 < b][-1]
    assert offsets[i][1] == end, f"the token holding the mention's end runs past it in {text!r}"
    return i


def describe(family: str, text: str) -> str:
    tok = tokenizer(family)
    return f"tokens: {list(enumerate(tok.convert_ids_to_tokens(tok(text)['input_ids'])))}"


# ------------------------------------------------------------------ strategies
def _filler(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(COMMON_WORDS), min_size=min_size, max_size=max_size).map(" ".join)


@st.composite
def mentions(draw) -> tuple[str, str, str, tuple[int, int]]:
    """``(family, subject, text, (start, end))``: a text that mentions ``subject`` once, at that span.

    Shrinks towards the first family, "Barack Obama" spelt as stored at the start of the text,
    no possessive, no punctuation, no words around it.
    """
    family = draw(st.sampled_from(FAMILIES))
    subject = draw(st.sampled_from(SUBJECTS))
    spelling = draw(st.sampled_from(spellings(subject) + list(ALIASES.get(subject, ()))))
    place = draw(st.sampled_from(["start", "mid", "opener"]))
    prefix = ""
    if place == "mid":
        prefix = draw(_filler(1, 8)) + " "
    elif place == "opener":
        before = draw(_filler(0, 8))
        opener = draw(st.sampled_from(OPENERS))
        prefix = (before + ("" if opener == "\n" else " ") if before else "") + opener
    possessive = "'s" if draw(st.booleans()) else ""
    trail = draw(st.sampled_from(TRAILS))
    after = draw(_filler(0, 8))
    text = prefix + spelling + possessive + trail + (" " + after if after else "")
    return family, subject, text, (len(prefix), len(prefix) + len(spelling))


@st.composite
def _lookalike(draw) -> str:
    kind = draw(st.sampled_from(["lookalike", "glued", "word"]))
    if kind == "lookalike":
        word = draw(st.sampled_from(LOOKALIKES))
    elif kind == "glued":  # a stored name without its article (or its last word) inside another word or after a hyphen
        name = spellings(draw(st.sampled_from(SUBJECTS)))[-1]
        word = draw(st.sampled_from(GLUES)) + draw(st.sampled_from([name, name.split()[-1]]))
    else:
        word = draw(st.sampled_from(COMMON_WORDS))
    opener = draw(st.sampled_from(("",) * 4 + OPENERS))
    return opener + word + draw(st.sampled_from(TRAILS + ("'s",)))


@st.composite
def non_mentions(draw) -> tuple[str, str]:
    """``(family, text)``: everyday words and look-alikes that spell no stored subject at a word start.

    Shrinks towards the first family and a single look-alike ("Aaron Sharp").
    """
    family = draw(st.sampled_from(FAMILIES))
    text = " ".join(draw(st.lists(_lookalike(), min_size=1, max_size=12)))
    assume(not any(_mentioned(text, s) for s in SUBJECTS))
    return family, text


# ------------------------------------------------------------------ properties
@settings(max_examples=examples("store", 10))
@given(case=mentions())
def test_a_mention_fires_its_subject_at_its_last_token_only(case):
    family, subject, text, (start, end) = case
    want = {subject: [last_token(family, text, end)]}
    got = fires(family, text, with_aliases=True)
    assert got == want, f"[{family}] {text!r} mentions {text[start:end]!r}: fired {got}, want {want}; " \
                        f"{describe(family, text)}"


@settings(max_examples=examples("store", 10))
@given(case=non_mentions())
def test_a_non_mention_fires_no_subject(case):
    family, text = case
    got = fires(family, text, with_aliases=False)
    assert got == {}, f"[{family}] {text!r} mentions no stored subject, yet fired {got}; {describe(family, text)}"
