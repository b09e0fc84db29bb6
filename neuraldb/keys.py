"""Keys: the input of the MLP output projection at the subject's last token.

Example::

    templates = context_templates(model, tok, prefixes=("The", "Because"), length=10)
    keys = compute_keys(model, tok, facts, layer=10, templates=templates)   # (n_facts, d_ff)

A key is averaged over context templates (docs/method.md, 'Keys'): the bare
prompt, and short texts the model itself generated followed by ". {prompt}".
MEMIT averages within each group, then across the two groups
(``bare_weight``). A bare prompt whose subject ends on token 0 (the
attention-sink position, which never fires) does not contribute: that fact is
keyed on its prefixed contexts only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .arch import ModelArch, resolve_arch
from .facts import Fact, locate_subject
from .model_cache import PerModel
from .nethook import layer_input

__all__ = ["calibration_queries", "chat_context", "context_templates", "compute_keys", "pad_batch", "model_device"]

log = logging.getLogger(__name__)
_TEMPLATES = PerModel(per_model=8)  # context templates per live model (weakly keyed), see context_templates


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    return int(pid if pid is not None else 0)


def pad_batch(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists: (input_ids, attention_mask), both (batch, max_len)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def context_templates(
    model: nn.Module, tokenizer: Any, *, prefixes: Sequence[str], length: int, seed: int = 0, cache: bool = True
) -> list[str]:
    """``["{}"] + [<continuation of prefix> + ". {}" for each prefix]``.

    Top-5 sampling (MEMIT's ``generate_fast``) under a fixed seed, without
    touching the caller's random state, so the templates are reproducible.
    Braces and line breaks in generated text are removed.

    With ``cache`` the templates are generated once per model (held by a weak reference,
    :mod:`neuraldb.model_cache`), tokenizer, prefixes, length and seed, and again when the
    model's parameters change: an edit of a few facts no longer spends most of its fixed
    cost generating the same five texts.
    """
    if not cache:
        return _generate_templates(model, tokenizer, prefixes=prefixes, length=length, seed=seed)
    key = (tuple(prefixes), int(length), int(seed), id(tokenizer), getattr(tokenizer, "name_or_path", None),
           len(tokenizer))
    return list(_TEMPLATES.get(model, key, lambda: tuple(
        _generate_templates(model, tokenizer, prefixes=prefixes, length=length, seed=seed))))


@torch.no_grad()
def _generate_templates(model: nn.Module, tokenizer: Any, *, prefixes: Sequence[str], length: int,
                        seed: int) -> list[str]:
    out = ["{}"]
    device = model_device(model)
    devices = [device] if device.type == "cuda" else []
    for i, prefix in enumerate(prefixes):
        enc = tokenizer(prefix, return_tensors="pt").to(device)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + i)
            gen = model.generate(
                **enc, max_new_tokens=length, do_sample=True, top_k=5, pad_token_id=pad_id(tokenizer)
            )
        text = tokenizer.decode(gen[0], skip_special_tokens=True)
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        out.append(text + ". {}")
    return out


def chat_context(tokenizer: Any) -> str | None:
    """The tokenizer's chat template as a context template: ``{}`` is the user's message (the
    filled prompt) and the assistant's answer follows the string; None without a chat template.

    Example::

        chat_context(tok)   # '<|im_start|>system\\n...<|im_start|>user\\n{}<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    sentinel = "\x00neuraldb-prompt\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(sentinel) != 1:
        return None
    return text.replace("{", "{{").replace("}", "}}").replace(sentinel, "{}")


@dataclass(frozen=True)
class KeyRequest:
    fact: int  # index of the fact in the batch
    bare: bool
    ids: list[int]
    subject_pos: int


def key_requests(tokenizer: Any, facts: Sequence[Fact], templates: Sequence[str]) -> list[KeyRequest]:
    """One request per (fact, template); bare prompts keyed at position 0 are dropped."""
    reqs: list[KeyRequest] = []
    for i, f in enumerate(facts):
        for t in templates:
            ids, pos = locate_subject(tokenizer, t.replace("{}", f.prompt), f.subject)
            if pos == 0:
                log.debug("fact %s: subject ends at position 0 of %r; not keyed there", f.id, t)
                continue
            reqs.append(KeyRequest(i, t == "{}", ids, pos))
    return reqs


def combine_keys(
    vectors: torch.Tensor, reqs: Sequence[KeyRequest], n_facts: int, bare_weight: float
) -> torch.Tensor:
    """Average per fact within the bare and the prefixed group, then across groups.

    ``vectors`` is (len(reqs), d); returns (n_facts, d). A fact missing one group
    takes the other group's mean alone.
    """
    d = vectors.shape[1]
    sums = torch.zeros(2, n_facts, d, dtype=vectors.dtype, device=vectors.device)
    counts = torch.zeros(2, n_facts, 1, dtype=vectors.dtype, device=vectors.device)
    group = torch.tensor([0 if r.bare else 1 for r in reqs], device=vectors.device)
    fact = torch.tensor([r.fact for r in reqs], device=vectors.device)
    sums.index_put_((group, fact), vectors, accumulate=True)
    counts.index_put_((group, fact), torch.ones(len(reqs), 1, dtype=vectors.dtype, device=vectors.device), accumulate=True)
    means = sums / counts.clamp_min(1)  # (2, n_facts, d)
    w = torch.tensor([bare_weight, 1.0 - bare_weight], dtype=vectors.dtype, device=vectors.device).view(2, 1, 1)
    w = w * (counts > 0)  # a missing group gets no weight
    if (w.sum(0) == 0).any():
        raise ValueError("a fact has no usable key context (every template keyed it at position 0)")
    return (means * w).sum(0) / w.sum(0)


@torch.no_grad()
def compute_keys(
    model: nn.Module,
    tokenizer: Any,
    facts: Sequence[Fact],
    *,
    layer: int,
    templates: Sequence[str],
    bare_weight: float = 0.5,
    arch: ModelArch | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Keys (n_facts, d_ff) float32 on the model's device; runs layers up to ``layer`` only."""
    arch = arch or resolve_arch(model)
    device = model_device(model)
    reqs = key_requests(tokenizer, facts, templates)
    parts = []
    for start in range(0, len(reqs), batch_size):
        chunk = reqs[start : start + batch_size]
        ids, mask = pad_batch([r.ids for r in chunk], pad_id(tokenizer), device)
        x = layer_input(model, arch.mlp_out_at(layer), input_ids=ids, attention_mask=mask)  # (chunk, seq, d_ff)
        pos = torch.tensor([r.subject_pos for r in chunk], device=device)
        parts.append(x[torch.arange(len(chunk), device=device), pos].float())  # (chunk, d_ff)
    return combine_keys(torch.cat(parts), reqs, len(facts), bare_weight)


@torch.no_grad()
def calibration_queries(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    layer: int,
    arch: ModelArch | None = None,
    max_len: int = 128,
    batch_size: int = 32,
) -> torch.Tensor:
    """The gate's queries on generic text: (positions, d_ff) float32, for ``NeuralDB.calibrate``.

    Every position the store's hook would gate (real tokens except the first of each
    text) of each text truncated to ``max_len`` tokens; runs layers up to ``layer`` only.
    Use text that no stored fact is about (and not the text you evaluate on)::

        q = calibration_queries(model, tok, generic_texts, layer=db.layer)
        db.calibrate(q, margin=0.05)
    """
    arch = arch or resolve_arch(model)
    device = model_device(model)
    enc = [list(tokenizer(t, add_special_tokens=True)["input_ids"])[:max_len] for t in texts]
    enc = sorted((e for e in enc if len(e) > 1), key=len)  # little padding per batch
    out = []
    for start in range(0, len(enc), batch_size):
        ids, mask = pad_batch(enc[start : start + batch_size], pad_id(tokenizer), device)
        x = layer_input(model, arch.mlp_out_at(layer), input_ids=ids, attention_mask=mask)  # (batch, seq, d_ff)
        valid = mask.bool()
        valid[:, 0] = False  # the attention-sink position never fires
        out.append(x[valid].float())
    if not out:
        raise ValueError("calibration_queries: no text with at least two tokens")
    return torch.cat(out)
