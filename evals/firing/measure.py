"""Measuring helpers shared by the false-fire report, the gate variants study and the model-level properties.

Example::

    model, tok = neuraldb.load_model("smollm2-135m")
    facts = load_facts("counterfact", n=2000)
    groups = group_keys(model, tok, facts, layer=10, templates=templates, cache_dir=cache)
    keys = groups.combine(bare_weight=0.0)                    # (n, d_ff), what edit() would store
    for batch in text_activations(model, tok, passages, layer=10):
        ...                                                    # batch.acts (b, t, d_ff), batch.valid

Keys are kept per fact as two group means (bare prompt, prefixed contexts) so any
``bare_weight`` can be measured from one computation. Firing depends on keys only,
so nothing here optimises a residual. Group means are computed in shards of
``shard`` facts and each shard is cached in a safetensors file named by a hash of
(model fingerprint, layer, templates, the shard's facts): an interrupted run resumes
and a larger ``n`` reuses the shards it shares with a smaller one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from neuraldb import Fact, resolve_arch, validate_facts
from neuraldb.facts import FactError, locate_subject
from neuraldb.keys import key_requests, model_device, pad_batch, pad_id
from neuraldb.nethook import layer_input
from neuraldb.store import layer_fingerprint

from .vocabulary import RELATIONS, SYLLABLES

__all__ = [
    "GroupKeys", "TextBatch", "default_cache_dir", "default_data_dir", "generated_facts", "generated_name",
    "group_keys", "keyable", "load_facts", "load_passages", "subject_last_positions", "text_activations",
]

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    """``$NEURALDB_DATA_DIR`` (laid out as in docs/method.md, 'Data directory'); an error naming
    the fix when it is not set (pass ``data_dir=`` / ``--data-dir`` instead)."""
    path = os.environ.get("NEURALDB_DATA_DIR")
    if not path:
        raise FileNotFoundError("no data directory: set NEURALDB_DATA_DIR or pass data_dir= / --data-dir "
                                "(a folder laid out as in docs/method.md, 'Data directory')")
    return Path(path)


def default_cache_dir() -> Path:
    root = os.environ.get("NEURALDB_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "neuraldb"
    return base / "keys"


# ------------------------------------------------------------------------- facts
_FACT_FILES = {
    "counterfact": "counterfact/counterfact-edit.json",
    "counterfact-train": "counterfact/counterfact-train.json",
    "counterfact-rome": "counterfact_rome/counterfact_rome_test2191.json",
    "zsre": "zsre/zsre_mend_train-1k.json",
}


def load_facts(source: str, *, n: int | None = None, offset: int = 0, data_dir: str | os.PathLike | None = None) -> list[Fact]:
    """Facts from a file of any supported format, or a short name (``counterfact``, ``zsre``...).

    Formats: CounterFact (ROME or MEND schema), zsRE (MEND schema), a JSON list of
    :class:`Fact` mappings, or ``generated`` (synthetic facts, see :func:`generated_facts`).
    """
    if source.startswith("generated"):
        seed = int(source.split(":", 1)[1]) if ":" in source else 0
        return generated_facts(n if n is not None else 1000, seed=seed, offset=offset)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = Path(source)
    if not path.exists() and source in _FACT_FILES:
        path = data_dir / _FACT_FILES[source]
    if not path.is_file():
        raise FileNotFoundError(f"no facts file {str(path)!r}; give a path or one of {sorted(_FACT_FILES)} / generated")
    with open(path, encoding="utf-8") as fh:
        records = json.load(fh)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    records = records[offset: None if n is None else offset + n]
    first = records[0]
    from evals.formats import parse_counterfact, parse_zsre  # the project's loaders

    if "requested_rewrite" in first or "ground_truth" in first or "rephrase_prompt" in first:
        return [c.fact for c in parse_counterfact(records, source=str(path), skip_invalid=True, index_offset=offset)]
    if "src" in first and "alt" in first:
        return [c.fact for c in parse_zsre(records, source=str(path), skip_invalid=True, index_offset=offset)]
    return validate_facts(records)


# Generated facts: names from :data:`~evals.firing.vocabulary.SYLLABLES`, relations from
# :data:`~evals.firing.vocabulary.RELATIONS`; unique subjects by construction.
def generated_name(i: int) -> str:
    """A deterministic, unique two-word pseudo-name for index ``i`` (``0 <= i < 48**5``).

    ``i`` is scrambled by a bijection of ``range(48**5)`` (multiplication by a number prime to
    it), then written in base 48 with syllables as digits: two syllables for the first word,
    three for the second. Distinct indices give distinct names, and neighbouring indices
    differ in every syllable, so last tokens are spread over the whole syllable set.
    """
    base = len(SYLLABLES)
    space = base ** 5
    if not 0 <= i < space:
        raise ValueError(f"generated_name: index {i} outside [0, {space})")
    j = (i * 1_000_003 + 12_345) % space  # 1_000_003 is prime and does not divide 48**5
    digits = []
    for _ in range(5):
        digits.append(SYLLABLES[j % base])
        j //= base
    return "".join(digits[:2]).capitalize() + " " + "".join(digits[2:]).capitalize()


def generated_facts(n: int, *, seed: int = 0, offset: int = 0) -> list[Fact]:
    """``n`` synthetic facts with unique subjects (names from syllables, templated relations)."""
    facts = []
    for i in range(offset, offset + n):
        h = int(hashlib.sha1(f"{seed}:{i}".encode()).hexdigest()[:8], 16)
        prompt, targets = RELATIONS[h % len(RELATIONS)]
        subject = generated_name(i)
        new, true = targets[(h >> 4) % len(targets)], targets[((h >> 4) + 1) % len(targets)]
        para = f"Here is a fact about {subject}. " + prompt.format(subject)
        facts.append(Fact(prompt=prompt, subject=subject, target_new=new, target_true=true,
                          paraphrases=(para,), id=f"gen-{seed}-{i}"))
    return facts


# -------------------------------------------------------------------------- keys
@dataclass
class GroupKeys:
    """Per-fact key group means: ``bare`` (n, d) and ``prefixed`` (n, d), float32 on the CPU."""

    ids: list[str]
    bare: torch.Tensor
    prefixed: torch.Tensor
    has_bare: torch.Tensor  # (n,) bool: False where the bare prompt put the subject at position 0

    def combine(self, bare_weight: float) -> torch.Tensor:
        """The key :func:`neuraldb.compute_keys` would return for this ``bare_weight``."""
        w = self.has_bare.float().unsqueeze(1) * bare_weight
        return w * self.bare + (1 - w) * self.prefixed

    def __len__(self) -> int:
        return len(self.ids)


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def _group_means_at(model: nn.Module, tok: Any, facts: Sequence[Fact], layer: int, templates: Sequence[str],
                    batch_size: int, offsets: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each of ``offsets``: bare and prefixed means (n, d) of the MLP input that many
    tokens before the subject's last token, and ``has_bare`` (n,); one forward pass per batch."""
    arch = resolve_arch(model)
    device = model_device(model)
    reqs = key_requests(tok, facts, templates)
    order = sorted(range(len(reqs)), key=lambda r: len(reqs[r].ids))  # little padding per batch
    sums: torch.Tensor | None = None  # (offsets, 2 groups, n, d)
    counts = torch.zeros(2, len(facts))
    rows = None
    for start in range(0, len(order), batch_size):
        chunk = [reqs[r] for r in order[start: start + batch_size]]
        ids, mask = pad_batch([r.ids for r in chunk], pad_id(tok), device)
        x = layer_input(model, arch.mlp_out_at(layer), input_ids=ids, attention_mask=mask)
        rows = torch.arange(len(chunk), device=device)
        g = torch.tensor([0 if r.bare else 1 for r in chunk])
        f = torch.tensor([r.fact for r in chunk])
        for j, offset in enumerate(offsets):
            pos = torch.tensor([max(r.subject_pos - offset, 0) for r in chunk], device=device)
            vec = x[rows, pos].float().cpu()  # (batch, d)
            if sums is None:
                sums = torch.zeros(len(offsets), 2, len(facts), vec.shape[1])
            sums[j].index_put_((g, f), vec, accumulate=True)
        counts.index_put_((g, f), torch.ones(len(chunk)), accumulate=True)
    assert sums is not None
    if (counts[1] == 0).any():
        bad = [facts[i].id for i in (counts[1] == 0).nonzero().flatten().tolist()[:5]]
        raise FactError(f"fact(s) {bad} have no prefixed context key")
    means = sums / counts.clamp_min(1).unsqueeze(2)  # (offsets, 2, n, d)
    return [(m[0], m[1], counts[0] > 0) for m in means]


def _group_means(model: nn.Module, tok: Any, facts: Sequence[Fact], layer: int, templates: Sequence[str],
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bare and prefixed means (n, d) of the MLP input at the subject's last token, and ``has_bare``."""
    return _group_means_at(model, tok, facts, layer, templates, batch_size, (0,))[0]


def keyable(tok: Any, facts: Sequence[Fact], templates: Sequence[str]) -> tuple[list[Fact], list[tuple[str, str]]]:
    """Split ``facts`` into those every template can key and ``(id, reason)`` for the rest."""
    kept, skipped = [], []
    for f in facts:
        try:
            key_requests(tok, [f], templates)
            kept.append(f)
        except (FactError, ValueError) as exc:
            skipped.append((f.id, str(exc)))
    return kept, skipped


def group_keys(model: nn.Module, tok: Any, facts: Sequence[Fact], *, layer: int, templates: Sequence[str],
               cache_dir: str | os.PathLike | None = None, shard: int = 500, batch_size: int = 128,
               progress: bool = True) -> GroupKeys:
    """Bare and prefixed key means for ``facts`` (see the module docstring for the cache).

    ``templates[0]`` must be the bare template ``"{}"``; the others are prefixed contexts.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    if templates[0] != "{}":
        raise ValueError("templates[0] must be the bare template '{}'")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    fp = layer_fingerprint(model, resolve_arch(model).mlp_out_at(layer))
    bare, pref, has = [], [], []
    bar = tqdm(total=len(facts), desc="keys", unit="fact", disable=not progress, mininterval=5)
    t0 = time.perf_counter()
    for start in range(0, len(facts), shard):
        part = list(facts[start: start + shard])
        key = _hash("groupkeys-v1", fp, layer, list(templates), [[f.id, f.prompt, f.subject] for f in part])
        path = cache / f"group-{key}.safetensors"
        if path.is_file():
            t = load_file(str(path))
        else:
            b, p, h = _group_means(model, tok, part, layer, templates, batch_size)
            t = {"bare": b.contiguous(), "prefixed": p.contiguous(), "has_bare": h.contiguous()}
            tmp = path.with_suffix(".tmp")
            save_file(t, str(tmp), metadata={"ids": json.dumps([f.id for f in part])})
            os.replace(tmp, path)
        bare.append(t["bare"]), pref.append(t["prefixed"]), has.append(t["has_bare"])
        bar.update(len(part))
    bar.close()
    log.info("keys for %d facts in %.1f s", len(facts), time.perf_counter() - t0)
    return GroupKeys([f.id for f in facts], torch.cat(bare), torch.cat(pref), torch.cat(has))


# -------------------------------------------------------------------------- text
def load_passages(path: str | os.PathLike | None = None, *, limit: int | None = None, offset: int = 0,
                  data_dir: str | os.PathLike | None = None) -> list[str]:
    """Unrelated text: a plain-text file (one passage a line) or a JSONL file with ``text``.

    Default: LAMBADA (``lambada_openai/lambada_test.jsonl`` in the data dir).
    """
    if path is None:
        path = Path(data_dir or default_data_dir()) / "lambada_openai" / "lambada_test.jsonl"
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                rec = json.loads(line)
                line = rec.get("text") or rec.get("sentence") or rec.get("question") or ""
            if line.strip():
                out.append(line)
    return out[offset: None if limit is None else offset + limit]


@dataclass
class TextBatch:
    ids: torch.Tensor  # (b, t) token ids
    valid: torch.Tensor  # (b, t) bool: positions the gate may fire at (not padding, not position 0)
    acts: torch.Tensor  # (b, t, d_ff) the gate's queries
    passage: list[int]  # index of each row's passage


@torch.no_grad()
def text_activations(model: nn.Module, tok: Any, passages: Sequence[str], *, layer: int, max_len: int = 128,
                     batch_size: int = 16, progress: bool = False) -> Iterator[TextBatch]:
    """The gate's queries (input of the MLP output projection at ``layer``) on each passage."""
    from tqdm.auto import tqdm

    arch = resolve_arch(model)
    device = model_device(model)
    enc = [tok(p, add_special_tokens=True)["input_ids"][:max_len] for p in passages]
    for start in tqdm(range(0, len(enc), batch_size), desc="text", disable=not progress, mininterval=5):
        seqs = enc[start: start + batch_size]
        ids, mask = pad_batch(seqs, pad_id(tok), device)
        x = layer_input(model, arch.mlp_out_at(layer), input_ids=ids, attention_mask=mask)
        valid = mask.bool().clone()
        valid[:, 0] = False
        yield TextBatch(ids.cpu(), valid.cpu(), x.float().cpu(), list(range(start, start + len(seqs))))


def subject_last_positions(tok: Any, text: str, subject: str) -> tuple[list[int], int | None]:
    """Token ids of ``text`` and the position of the subject's last token in it (None if absent)."""
    ids = tok(text, add_special_tokens=True)["input_ids"]
    m = re.search(re.escape(subject.strip()), text)
    if m is None:
        return list(ids), None
    if "{" in text or "}" in text:
        return list(ids), None
    template = text[: m.start()] + "{}" + text[m.end():]
    try:
        ids2, pos = locate_subject(tok, template, subject.strip())
    except (FactError, ValueError, IndexError):
        return list(ids), None
    return (list(ids2), pos) if list(ids2) == list(ids) else (list(ids), None)
