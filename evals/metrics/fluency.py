"""Fluency: n-gram entropy of top-k sampled generations (CounterFact's generation metric).

Card
----
Measures: how repetitive the model's free text is after an edit (a degenerate model
repeats itself; its n-gram distribution has low entropy).

Generation (:func:`generate_texts`): top-k sampling (k = 5) from each prompt, no stop at
EOS. Length as in ROME's ``generate_fast(max_out_len=100)``: prompt + generated tokens
total ``max_length=100``; pass ``max_new_tokens=N`` for exactly N new tokens instead. The
text scored is the decoded prompt + continuation (ROME scores it with the prompt), NFKD
normalised with "\\n\\n" -> " " as ROME does; special tokens are skipped when decoding.
Sampling is reproducible and independent of batching: each prompt has its own
``torch.Generator`` on the model's device (seed from ``seed`` and, in :func:`fluency_scores`,
the case id and prompt index) and draws one uniform number per step, turned into a token
by inverse-CDF over the renormalised top-k probabilities.

Score (:func:`ngram_entropy`): per text, ``mean_n(w_n * H_n)`` over ``n = (2, 3)`` with
``w = (2/3, 4/3)`` and ``H_n = -sum f log2 f`` over the relative frequencies of the text's
word n-grams; then the mean over texts; reported x100 by the caller. NOTE: this is ROME's
code (``compute_n_gram_entropy`` takes ``np.mean`` of the weighted entropies), i.e.
``(2/3 H_2 + 4/3 H_3) / 2``, not the plain sum; it is what makes GPT-2 XL's ~620 and
Llama-3's ~635 come out. A text with fewer than n words contributes ``H_n = 0``.

Words: ``nltk.word_tokenize`` as in ROME when NLTK's ``punkt_tab`` data is installed;
otherwise (offline) sentences are split on ``[.!?]`` + whitespace and each is tokenised
with NLTK's Treebank ``NLTKWordTokenizer`` (what ``word_tokenize`` runs per sentence; it
differs from punkt only around abbreviations); without NLTK, the regex ``\\w+|[^\\w\\s]``.
:func:`word_tokenizer_name` says which one is in use; the summary records it.

Reference: ROME ``util/generate.py`` (``generate_fast``) and
``experiments/py/eval_utils_counterfact.py`` (``n_gram_entropy``), Meng et al. 2022.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from statistics import fmean
from typing import Any, Callable, Sequence

import torch

from neuraldb.nethook import cache_argument, cache_of

from .tokens import call_model, eval_mode, logits_of, model_device, pad_id

__all__ = ["FluencyCaseResult", "fluency_scores", "generate_texts", "ngram_entropy", "summarize_fluency",
           "text_ngram_entropy", "word_tokenize", "word_tokenizer_name"]


@lru_cache(maxsize=1)
def _word_tokenizer() -> tuple[str, Callable[[str], list[str]]]:
    try:
        import nltk
    except ImportError:
        return "regex", lambda text: re.findall(r"\w+|[^\w\s]", text)
    try:
        nltk.word_tokenize("Probe. Text.")
        return "nltk.word_tokenize", nltk.word_tokenize
    except LookupError:
        treebank = nltk.tokenize.NLTKWordTokenizer()

        def tokenize(text: str) -> list[str]:
            return [w for s in re.split(r"(?<=[.!?])\s+", text) if s for w in treebank.tokenize(s)]

        return "nltk-treebank (punkt data missing; regex sentence split)", tokenize


def word_tokenizer_name() -> str:
    return _word_tokenizer()[0]


def word_tokenize(text: str) -> list[str]:
    return _word_tokenizer()[1](text)


def _entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_ngram_entropy(text: str, *, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """``mean_n(w_n * H_n)`` of one text (ROME's ``compute_n_gram_entropy``)."""
    words = word_tokenize(text)
    parts = [w * _entropy(Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)))
             for n, w in zip(ns, weights, strict=True)]
    return fmean(parts)


def ngram_entropy(texts: Sequence[str], *, ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Mean over ``texts`` of :func:`text_ngram_entropy` (ROME's ``n_gram_entropy``, arithmetic)."""
    if isinstance(texts, str) or not texts:
        raise ValueError("ngram_entropy needs a non-empty list of texts")
    return fmean(text_ngram_entropy(t, ns=ns, weights=weights) for t in texts)


def _sample(logits: torch.Tensor, top_k: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    probs = logits.float().softmax(-1)
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # (B, k)
    cdf = (top_p / top_p.sum(-1, keepdim=True)).cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])  # one draw per row
    pick = (cdf < u[:, None]).sum(-1).clamp(max=top_p.shape[-1] - 1)
    return top_i.gather(1, pick[:, None]).squeeze(1)


def _clean(text: str) -> str:
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def generate_texts(*, model: Any, tokenizer: Any, prompts: Sequence[str], max_length: int = 100,
                   max_new_tokens: int | None = None, top_k: int = 5, seed: int = 0,
                   seeds: Sequence[int] | None = None, batch_size: int = 8, include_prompt: bool = True) -> list[str]:
    """Top-k sampled continuations, one per prompt (see the card for length and seeding).

    ``seeds`` gives each prompt its generator seed (default ``seed + index``). Prompts are
    left-padded with explicit ``position_ids``; the KV cache is used when the model returns one.
    """
    if top_k < 1 or batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 0):
        raise ValueError(f"need top_k >= 1, batch_size >= 1, max_new_tokens >= 0; got {top_k}, {batch_size}, "
                         f"{max_new_tokens}")
    if seeds is None:
        seeds = [seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    device, pad, cache_name = model_device(model), pad_id(tokenizer), cache_argument(model)
    encoded = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    if any(not e for e in encoded):
        raise ValueError("a prompt tokenises to nothing; generation needs at least one token")
    n_new = [max_new_tokens if max_new_tokens is not None else max(max_length - len(e), 0) for e in encoded]
    texts: list[str] = [""] * len(prompts)
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            width, steps = max(len(encoded[i]) for i in idx), max(n_new[i] for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):
                ids[b, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[b, width - len(encoded[i]):] = 1
            ids, mask = ids.to(device), mask.to(device)
            gens = [torch.Generator(device=device).manual_seed(int(seeds[i])) for i in idx]
            new: list[torch.Tensor] = []
            past, step_ids = None, ids
            for t in range(steps):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]  # (B, T) real positions
                extra = {cache_name: past, "use_cache": True} if cache_name else {}
                out = call_model(model, step_ids, mask, position_ids=pos, **extra)
                tok = _sample(logits_of(out)[:, -1, :], top_k, gens)
                new.append(tok)
                if t + 1 == steps:
                    break
                past = cache_of(out) if cache_name else None
                ids = torch.cat([ids, tok[:, None]], dim=1)
                mask = torch.cat([mask, mask.new_ones((len(idx), 1))], dim=1)
                step_ids = tok[:, None] if past is not None else ids
            gen = torch.stack(new, dim=1).cpu().tolist() if new else [[] for _ in idx]
            for b, i in enumerate(idx):
                body = (encoded[i] if include_prompt else []) + gen[b][: n_new[i]]
                texts[i] = _clean(tokenizer.decode(body, skip_special_tokens=True))
    return texts


@dataclass(frozen=True)
class FluencyCaseResult:
    case_id: int
    texts: tuple[str, ...]
    ngram_entropy: float | None  # None when the case has no generation prompts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fluency_scores(*, model: Any, tokenizer: Any, cases: Sequence[Any], max_length: int = 100,
                   max_new_tokens: int | None = None, top_k: int = 5, seed: int = 0,
                   batch_size: int = 8) -> list[FluencyCaseResult]:
    """Generate from every case's ``generation_prompts`` and score each case's texts.

    Prompt ``j`` of a case with id ``c`` is sampled with seed ``seed * 1_000_003 + c * 1_009 + j``,
    so a case's texts do not depend on which other cases are evaluated with it.
    """
    prompts, seeds, owner = [], [], []
    for k, case in enumerate(cases):
        for j, p in enumerate(case.generation_prompts):
            prompts.append(p)
            seeds.append(seed * 1_000_003 + int(case.case_id) * 1_009 + j)
            owner.append(k)
    texts = generate_texts(model=model, tokenizer=tokenizer, prompts=prompts, max_length=max_length,
                           max_new_tokens=max_new_tokens, top_k=top_k, seeds=seeds, batch_size=batch_size)
    per_case: list[list[str]] = [[] for _ in cases]
    for k, text in zip(owner, texts):
        per_case[k].append(text)
    return [FluencyCaseResult(c.case_id, tuple(t), ngram_entropy(t) if t else None) for c, t in zip(cases, per_case)]


def summarize_fluency(results: Sequence[FluencyCaseResult]) -> dict[str, Any]:
    """Mean over cases of the per-case n-gram entropy (x100 to report), and the word tokenizer used."""
    values = [r.ngram_entropy for r in results if r.ngram_entropy is not None]
    return {"ngram_entropy": fmean(values) if values else None, "n_cases": len(values),
            "n_skipped": len(results) - len(values), "word_tokenizer": word_tokenizer_name()}
