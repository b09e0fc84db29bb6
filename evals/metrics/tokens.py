"""Teacher-forced target scoring: the one primitive every probability metric uses.

Card
----
Measures: for each (prompt, target) pair, how the model scores ``target`` as the
continuation of ``prompt`` when fed the true target tokens (teacher forcing).

Definition: ``p, t = neuraldb.encode_completion(tokenizer, prompt, target)`` (the target
with a leading space, tokenised as a continuation). The model reads ``p + t[:-1]``; the
logits at position ``len(p) - 1 + i`` predict ``t[i]``. Per target token we return

* ``correct[i]``  = ``argmax(logits) == t[i]`` (top-1, ties go to the lowest id),
* ``logprobs[i]`` = ``log_softmax(logits)[t[i]]`` computed in float32.

``mean_nll = -mean(logprobs)``, ``prob = exp(-mean_nll)`` (ROME's per-token-normalised
probability), ``accuracy = mean(correct)``.

Batching: sequences are right-padded with an attention mask (so positions of real tokens
never move, whatever the tokenizer's ``padding_side``) and sorted by length; one forward
per batch, results moved to the CPU once per batch. Device and dtype come from the model;
the model is put in eval mode for the call and restored afterwards.

Reference: the teacher-forced scoring of ROME/MEMIT ``experiments/py/eval_utils_*.py``
(Meng et al. 2022, 2023), written here once for all metrics.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from neuraldb import encode_completion

__all__ = ["TargetScore", "call_model", "eval_mode", "logits_of", "longest_first", "model_device", "pad_id",
           "score_targets"]


@dataclass(frozen=True)
class TargetScore:
    prompt: str
    target: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    correct: tuple[bool, ...]
    logprobs: tuple[float, ...]

    @property
    def sum_logprob(self) -> float:
        return math.fsum(self.logprobs)

    @property
    def mean_nll(self) -> float:
        return -self.sum_logprob / len(self.logprobs)

    @property
    def prob(self) -> float:
        """``exp(-mean_nll)``: the geometric mean of the target tokens' probabilities."""
        return math.exp(-self.mean_nll)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Eval mode and no grad inside; the model's training flag is restored in ``finally``."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def call_model(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> Any:
    """Call a causal LM with keyword arguments; returns its output object."""
    return model(input_ids=input_ids, attention_mask=attention_mask, **kw)


def logits_of(out: Any) -> torch.Tensor:
    """``out.logits`` (Hugging Face outputs) or ``out[0]`` (tuples)."""
    return out.logits if hasattr(out, "logits") else out[0]


def pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0  # masked out, any id will do


def longest_first(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices into ``lengths`` in batches of ``batch_size``, the longest sequences first (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def score_targets(*, model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                  batch_size: int = 16) -> list[TargetScore]:
    """Score each ``(prompt, target)`` pair; returns one :class:`TargetScore` per pair, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [encode_completion(tokenizer, p, t) for p, t in pairs]
    for (p, t), (p_ids, t_ids) in zip(pairs, encoded):
        if not p_ids:
            raise ValueError(f"prompt {p!r} tokenises to nothing; teacher forcing needs at least one "
                             "prompt token (use a non-empty prompt or a tokenizer that adds BOS)")
    device, pad = model_device(model), pad_id(tokenizer)
    order = sorted(range(len(pairs)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    results: list[TargetScore | None] = [None] * len(pairs)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = [encoded[i][0] + encoded[i][1][:-1] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            rows, cols, tgts = [], [], []
            for b, (i, seq) in enumerate(zip(idx, seqs)):
                ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[b, : len(seq)] = 1
                p_ids, t_ids = encoded[i]
                rows += [b] * len(t_ids)
                cols += range(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids))
                tgts += t_ids
            logits = logits_of(call_model(model, ids.to(device), mask.to(device), use_cache=False))
            picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)]
            picked = picked.float()  # (n_target_tokens, vocab)
            tgt = torch.tensor(tgts, device=picked.device)
            logp = picked.log_softmax(-1).gather(1, tgt[:, None]).squeeze(1)
            hit = picked.argmax(-1) == tgt
            logp_cpu, hit_cpu = logp.cpu().tolist(), hit.cpu().tolist()  # once per batch
            at = 0
            for i in idx:
                p_ids, t_ids = encoded[i]
                n = len(t_ids)
                results[i] = TargetScore(pairs[i][0], pairs[i][1], tuple(p_ids), tuple(t_ids),
                                         tuple(bool(h) for h in hit_cpu[at:at + n]), tuple(logp_cpu[at:at + n]))
                at += n
    return results  # type: ignore[return-value]
