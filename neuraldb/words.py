"""The word check: a key fires only where the tokens spell its fact's subject.

Example::

    words = subject_words(tok, ["Brad Silverberg", "Kim Sun-a"])   # (2, 2, WORD_WIDTH) token ids
    db.add(ids, keys, residuals, words=words)
    # "House Leader Steinberg" no longer fires Brad Silverberg's key at "berg":
    # the tokens before it are " Stein", not " Brad Silver"

A key is the MLP input at the subject's last token. At the layer the method
edits, that vector is mostly the token itself in a name-like context, so a
different name that ends in the same word piece ("Steinberg" / "Silverberg",
"Rose-a" / "Kim Sun-a") or the same surname ("Aaron Sharp" / "Richard Sharp")
can pass the cosine gate (README, "False fires and recall"). The word check adds
what the cosine cannot see: the gate fires at a position only if the tokens
ending there spell the retrieved fact's subject, as it tokenises after a space
(" Brad Silverberg") or without one at the start of a word (at the start of a
text, after a line break, a quote or a bracket; not inside "BusinessWeek",
"Troll-Gods" or "Ann-Marie"). Paraphrases name the subject, so they pass; the
check is exact (the whole subject, cased and unmisspelt: "Silverberg" alone
does not fire "Brad Silverberg").

Words are stored right-aligned in ``WORD_WIDTH`` columns: ``NO_WORD`` (any
token) left of the word, and ``WORD_START`` just before the form without a
space (the token there must end in whitespace or an opening quote or bracket,
:func:`word_start_tokens`, or be the start of the text). A row whose first form
is all ``NO_WORD`` matches every position (no check: the paper's gate, e.g.
keys added without a tokenizer). A subject longer than ``WORD_WIDTH - 1`` tokens is
checked on its last ``WORD_WIDTH - 1`` tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["WORD_WIDTH", "NO_WORD", "WORD_START", "subject_words", "token_windows", "word_match",
           "word_start_tokens"]

WORD_WIDTH = 16
NO_WORD = -1  # padding left of a word; a form that is all NO_WORD matches anything
UNKNOWN = -2  # a token before the text (or the history the hook kept): never equal to a word token
WORD_START = -3  # the token here must end a word (whitespace, opening quote or bracket) or be before the text
_OPENERS = set("\"'“‘«([{</")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def subject_words(tokenizer: Any, subjects: Sequence[str], *, width: int = WORD_WIDTH) -> torch.Tensor:
    """(n, 2, width) long: each subject tokenised after a space and without one.

    Right-aligned, padded with ``NO_WORD``, ``WORD_START`` before the form without a
    space; subjects longer than ``width - 1`` tokens keep their last ``width - 1``
    tokens (and no ``WORD_START``). A tokenizer that gives both forms the same ids
    stores the form twice.
    """
    out = torch.full((len(subjects), 2, width), NO_WORD, dtype=torch.long)
    for i, s in enumerate(subjects):
        word = " ".join(s.split())
        if not word:
            raise ValueError(f"subject {s!r} has no word to check")
        for f, text in enumerate((" " + word, word)):
            full = _ids(tokenizer, text)
            if not full:
                raise ValueError(f"subject {s!r} tokenises to nothing")
            ids = full[-(width - 1):]
            out[i, f, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            if f == 1 and len(full) == len(ids):  # without its space the word must start there ("BusinessWeek")
                out[i, f, width - len(ids) - 1] = WORD_START
    return out


def word_start_tokens(tokenizer: Any) -> torch.Tensor:
    """(vocab,) bool: tokens after which a word starts (they end in whitespace, an opening quote
    or a bracket, or are special tokens: BOS, padding, chat markers), for the ``WORD_START``
    column of the form without a space."""
    n = len(tokenizer)
    out = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        text = tokenizer.decode([i])
        out[i] = bool(text) and (text[-1].isspace() or text[-1] in _OPENERS)
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
    """(m,) bool: ``windows`` (m, width) ends with one of the forms in ``words`` (m, 2, width).

    ``starts`` is :func:`word_start_tokens` (vocab,) on the windows' device; without it a
    ``WORD_START`` column is satisfied only before the text.
    """
    w = windows.unsqueeze(1)  # (m, 1, width)
    if starts is None or starts.numel() == 0:
        begins = w < 0
    else:
        begins = (w < 0) | starts[w.clamp(0, starts.numel() - 1)]
    hit = (words == NO_WORD) | (words == w) | ((words == WORD_START) & begins)  # (m, 2, width)
    return hit.all(dim=2).any(dim=1)
