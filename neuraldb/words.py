"""The word check: a key fires only where the tokens spell its fact's subject.

Example::

    words = subject_words(tok, ["Brad Silverberg", "The Eiffel Tower"])   # (2, F, WORD_WIDTH) token ids
    db.add(ids, keys, residuals, words=words)
    # "House Leader Steinberg" no longer fires Brad Silverberg's key at "berg":
    # the tokens before it are " Stein", not " Brad Silver"
    mention_positions(tok, "The Eiffel Tower", "I visited the Eiffel Tower's top")   # [5]

A key is the MLP input at the subject's last token. At the layer the method
edits, that vector is mostly the token itself in a name-like context, so a
different name that ends in the same word piece ("Steinberg" / "Silverberg",
"Rose-a" / "Kim Sun-a") or the same surname ("Aaron Sharp" / "Richard Sharp")
can pass the cosine gate (README, "False fires and recall"). The word check adds
what the cosine cannot see: the gate fires at a position only if the tokens
ending there spell one of the retrieved fact's *forms*.

The forms of a subject are its tokens as they appear inside text, for every
tokenizer family: the subject is tokenised in a few contexts (at the start of a
text; after a word and a space; after a quote, a bracket or a line break;
followed by a space, "'s", a comma, a full stop, a question mark, a quote or a
bracket) and the tokens that cover it are kept (:func:`subject_forms`). So a
byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) stores " Barack Obama" and
"Barack Obama"; a legacy SentencePiece with a dummy prefix (Llama 2, Mistral,
TinyLlama, Phi-3) stores "▁Barack ▁Obama" as it reads mid-sentence, not the
"▁ ▁Barack ▁Obama" of the subject tokenised alone. A form whose first token
does not itself begin with whitespace or a boundary character must start a word:
``WORD_START`` before it asks for the start of the text, or a token that ends in
whitespace, an opening quote or a bracket (:func:`word_start_tokens`); so
"BusinessWeek" does not fire "Week" and "Ann-Marie" does not fire "Marie".

Natural variants of a mention (:func:`name_variants`): a leading article ("The",
"A", "An") in either case ("the Eiffel Tower" fires "The Eiffel Tower"), and
dropped when two words or more remain ("Eiffel Tower"; "The Who" and "The Nanny"
keep it: one word alone is too often an ordinary word, "Who is ...", "to Nanny"); aliases a fact names
deliberately (``Fact(aliases=["Obama"])``). The check is otherwise exact
(cased, unmisspelt, the whole name: "Silverberg" alone does not fire "Brad
Silverberg"); the cosine still decides between stored facts.

Forms are stored right-aligned in ``WORD_WIDTH`` columns, ``F`` forms per fact
(``(N, F, width)``): ``NO_WORD`` (any token) left of a form, ``NO_FORM`` rows
that match nothing where a fact has fewer forms than ``F``. A fact whose first
form is all ``NO_WORD`` matches every position (no check: the paper's gate, e.g.
keys added without a tokenizer). A form longer than ``WORD_WIDTH - 1`` tokens is
checked on its last ``WORD_WIDTH - 1`` tokens.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

__all__ = ["WORD_WIDTH", "NO_WORD", "NO_FORM", "WORD_START", "mention_positions", "name_variants",
           "same_forms", "subject_forms", "subject_words", "token_windows", "word_match", "word_start_tokens"]

WORD_WIDTH = 16
NO_WORD = -1  # padding left of a form; a form that is all NO_WORD matches anything
UNKNOWN = -2  # a token before the text (or the history the hook kept): never equal to a word token
WORD_START = -3  # the token here must end a word (whitespace, opening quote or bracket) or be before the text
NO_FORM = -4  # a padding form: matches nothing
_OPENERS = set("\"'“‘«([{</")
_ARTICLE = re.compile(r"^(the|a|an)\s+(\S.*)$", re.IGNORECASE)
# the subject tokenised between these: (text before, text after); the first block moves the start, the second the end
_BEFORE = ("", "In ", '"', "(", "\n", "'", "“")
_AFTER = (" is", "", "'s", ",", ".", "?", '"', ")", ":", "!", "’s")
_CONTEXTS = tuple((b, " is") for b in _BEFORE) + tuple(("In ", a) for a in _AFTER[1:])


def name_variants(name: str) -> list[str]:
    """The spellings of ``name`` that count as a mention: itself, its leading article in the
    other case, and without the article when two words or more remain.

    ``name_variants("The Eiffel Tower")`` -> ["The Eiffel Tower", "the Eiffel Tower", "Eiffel Tower"];
    "The Who", "The Nanny", "The Sopranos" keep their article (one word alone is too often an
    ordinary word: "Who is ...", "to Nanny"); ``Fact(aliases=["Sopranos"])`` adds it deliberately.
    """
    name = " ".join(name.split())
    out = [name]
    m = _ARTICLE.match(name)
    if m:
        article, rest = m.group(1), m.group(2)
        other = article.lower() if article[0].isupper() else article[0].upper() + article[1:]
        out.append(f"{other} {rest}")
        if len(rest.split()) >= 2:
            out.append(rest)
    return out


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Tokens:
    """Per tokenizer: which tokens begin with whitespace (decoded after a reference token), cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        ref = _ids(tokenizer, "a")
        self.ref = ref[-1:] if ref else []
        self.ref_text = tokenizer.decode(self.ref, clean_up_tokenization_spaces=False) if self.ref else ""
        self._space: dict[int, bool] = {}

    def starts_with_space(self, token: int) -> bool:
        if token not in self._space:
            text = self.tok.decode(self.ref + [token], clean_up_tokenization_spaces=False)[len(self.ref_text):]
            self._space[token] = bool(text) and text[0].isspace()
        return self._space[token]


def _spans(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character spans of each text (no special tokens)."""
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(list(i), [tuple(o) for o in off]) for i, off in zip(enc["input_ids"], enc["offset_mapping"])]
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer: spans by decoding prefixes
        out = []
        for text in texts:
            ids = _ids(tokenizer, text)
            ends = [len(tokenizer.decode(ids[: i + 1], clean_up_tokenization_spaces=False)) for i in range(len(ids))]
            out.append((ids, [(a, b) for a, b in zip([0] + ends[:-1], ends)]))
        return out


def subject_forms(tokenizer: Any, name: str, *, tokens: _Tokens | None = None) -> list[list[int]]:
    """The token forms of ``name`` as it reads inside text, one list of ids per distinct form;
    ``WORD_START`` first where the form must start a word. Variants are :func:`name_variants`."""
    tokens = tokens or _Tokens(tokenizer)
    texts, where = [], []
    for variant in name_variants(name):
        for before, after in _CONTEXTS:
            texts.append(before + variant + after)
            where.append((len(before), len(before) + len(variant)))
    forms: list[list[int]] = []
    for (ids, spans), (start, end) in zip(_spans(tokenizer, texts), where):
        cover = [i for i, (a, b) in enumerate(spans) if b > a and a < end and b > start]
        if not cover:
            continue
        form = ids[cover[0] : cover[-1] + 1]
        self_delimiting = spans[cover[0]][0] < start or tokens.starts_with_space(form[0])
        forms.append(form if self_delimiting else [WORD_START] + form)
    return _minimal(forms)


def _minimal(forms: list[list[int]]) -> list[list[int]]:
    """Distinct forms, without any form another one already covers (a plain form that is a
    suffix of it: every window ending with the longer one ends with the shorter one)."""
    unique = list(dict.fromkeys(tuple(f) for f in forms))
    keep = []
    for f in unique:
        covered = any(g != f and WORD_START not in g and len(g) <= len(f) and f[len(f) - len(g):] == g
                      for g in unique)
        if not covered:
            keep.append(list(f))
    return keep


def subject_words(tokenizer: Any, subjects: Sequence[str], *, width: int = WORD_WIDTH,
                  aliases: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
    """(n, F, width) long: the forms (:func:`subject_forms`) of each subject and its aliases.

    Right-aligned, padded with ``NO_WORD``; ``F`` is the most forms any subject has, rows
    beyond a subject's own forms are ``NO_FORM``. A form longer than ``width - 1``
    tokens keeps its last ``width - 1`` tokens (and no ``WORD_START``).
    """
    tokens = _Tokens(tokenizer)
    per: list[list[list[int]]] = []
    for i, s in enumerate(subjects):
        word = " ".join(s.split())
        if not word:
            raise ValueError(f"subject {s!r} has no word to check")
        names = [word, *(" ".join(a.split()) for a in (aliases[i] if aliases is not None else ()))]
        forms = _minimal([f for n in names if n for f in subject_forms(tokenizer, n, tokens=tokens)])
        if not forms:
            raise ValueError(f"subject {s!r} tokenises to nothing")
        per.append(forms)
    n_forms = max((len(f) for f in per), default=1)
    out = torch.full((len(subjects), n_forms, width), NO_WORD, dtype=torch.long)
    for i, forms in enumerate(per):
        for f, form in enumerate(forms):
            form = form[-(width - 1):] if len(form) > width - 1 else form
            out[i, f, width - len(form):] = torch.tensor(form, dtype=torch.long)
        out[i, len(forms):, -1] = NO_FORM
    return out


def word_start_tokens(tokenizer: Any) -> torch.Tensor:
    """(vocab,) bool: tokens after which a word starts (they end in whitespace, an opening quote
    or a bracket, or are special tokens: BOS, padding, chat markers), for the ``WORD_START``
    column of a form. Each token is decoded after a reference token, so tokenizers whose
    decoder strips a leading space ("▁" alone) are read as they are in text."""
    n = len(tokenizer)
    tokens = _Tokens(tokenizer)
    texts = tokenizer.batch_decode([tokens.ref + [i] for i in range(n)], clean_up_tokenization_spaces=False)
    cut = len(tokens.ref_text)
    out = torch.tensor([len(t) > cut and (t[-1].isspace() or t[-1] in _OPENERS) for t in texts], dtype=torch.bool)
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < n]
    out[special] = True
    return out


def token_windows(ids: torch.Tensor, history: torch.Tensor | None = None, *, width: int = WORD_WIDTH) -> torch.Tensor:
    """(batch, seq, width): for each position, the ``width`` token ids ending there.

    ``ids`` is (batch, seq); ``history`` (batch, >= width - 1) holds the tokens before
    ``ids`` (a generation step's earlier tokens), else those positions are ``UNKNOWN``.
    """
    batch = ids.shape[0]
    if ids.shape[1] == 0:
        return torch.empty(batch, 0, width, dtype=torch.long, device=ids.device)
    if history is None or history.shape[0] != batch:
        history = torch.full((batch, width - 1), UNKNOWN, dtype=torch.long, device=ids.device)
    ctx = torch.cat([history[:, history.shape[1] - (width - 1):].to(ids.device, torch.long), ids.long()], dim=1)
    return ctx.unfold(1, width, 1)  # (batch, seq, width)


def word_match(words: torch.Tensor, windows: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
    """(m,) bool: ``windows`` (m, width) ends with one of the forms in ``words`` (m, F, width).

    ``starts`` is :func:`word_start_tokens` (vocab,) on the windows' device; without it a
    ``WORD_START`` column is satisfied only before the text.
    """
    w = windows.unsqueeze(1)  # (m, 1, width)
    if starts is None or starts.numel() == 0:
        begins = w < 0
    else:
        begins = (w < 0) | starts[w.clamp(0, starts.numel() - 1)]
    hit = (words == NO_WORD) | (words == w) | ((words == WORD_START) & begins)  # (m, F, width)
    return hit.all(dim=2).any(dim=1)


def mention_positions(tokenizer: Any, subject: str, text: str, *, aliases: Sequence[str] = (),
                      words: torch.Tensor | None = None, starts: torch.Tensor | None = None) -> list[int]:
    """Token positions of ``tokenizer(text)["input_ids"]`` (special tokens as the tokenizer adds
    them) where the word check of ``subject`` passes: the last token of each mention.

    Example::

        ids = tok("I met Barack Obama")["input_ids"]
        mention_positions(tok, "Barack Obama", "I met Barack Obama")   # [len(ids) - 1]
    """
    words = subject_words(tokenizer, [subject], aliases=[list(aliases)]) if words is None else words
    starts = word_start_tokens(tokenizer) if starts is None else starts
    ids = torch.tensor([list(tokenizer(text)["input_ids"])], dtype=torch.long)  # (1, seq)
    windows = token_windows(ids, width=words.shape[-1])[0]  # (seq, width)
    hit = word_match(words.expand(windows.shape[0], -1, -1), windows, starts)
    return hit.nonzero().squeeze(1).tolist()


def same_forms(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` (N, F, width) and ``b`` (n, G, width) with as many forms each: the one with fewer
    gets ``NO_FORM`` rows (forms that match nothing)."""
    forms = max(a.shape[1], b.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        if t.shape[1] == forms:
            return t
        extra = torch.full((t.shape[0], forms - t.shape[1], t.shape[2]), NO_WORD, dtype=t.dtype)
        extra[:, :, -1] = NO_FORM
        return torch.cat([t, extra], dim=1)

    return pad(a), pad(b)
