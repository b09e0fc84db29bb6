"""Consistency (ROME's "reference score"): TF-IDF cosine of generations vs. Wikipedia snippets.

Card
----
Measures: whether what the model writes about the subject after an edit agrees with text
about the new object (e.g. after "Danielle Darrieux's mother tongue is English", her
generations should read like text about English speakers).

Definition, per CounterFact case (ROME schema, needs ``relation_id`` and ``target_new_id``):
``cos(v(" ".join(generations)), v(" ".join(snippets[relation_id][target_new_id])))`` where
``v`` is ROME's TF-IDF vector: lower-cased words matching ``(?u)\\b\\w\\w+\\b`` (scikit-learn's
``TfidfVectorizer`` defaults), raw counts of in-vocabulary words times ``idf`` (the L2
normalisation ROME's vectorizer applies does not change a cosine). The corpus value is the
mean over cases (x100 to report). A case with no snippets for its target is left out and
counted (ROME asserts instead); a zero vector gives 0.

Data: ROME's ``attribute_snippets.json`` (list of ``{relation_id, target_id, samples: [{name,
text}]}``), ``idf.npy`` (loaded with ``allow_pickle=False``) and ``tfidf_vocab.json``
(word -> column). They are not shipped; without them :func:`consistency_scores` returns a
result with ``skipped=True`` and the reason, never a made-up number.

Reference: ROME ``experiments/py/eval_utils_counterfact.py`` (``tfidf_similarity``,
``test_generation``), ``dsets/tfidf_stats.py``, ``dsets/attr_snippets.py`` (Meng et al. 2022).
The ``essence_score`` (perplexity on snippets about the subject) is not implemented.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean
from typing import Any, Mapping, Sequence

__all__ = ["ConsistencyResult", "TfidfReference", "consistency_scores", "load_tfidf_reference",
           "tfidf_similarity"]

_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_NEEDS = ("consistency needs attribute_snippets.json, idf.npy and tfidf_vocab.json (ROME's data, "
          "https://rome.baulab.info/data/dsets/); pass attribute_snippets=, idf=, tfidf_vocab= paths")


@dataclass(frozen=True)
class TfidfReference:
    idf: Any  # numpy array (numpy is imported when the files are loaded)
    vocab: Mapping[str, int]
    snippets: Mapping[tuple[str, str], tuple[str, ...]]  # (relation_id, target_id) -> texts

    def vector(self, text: str) -> dict[int, float]:
        counts = Counter(self.vocab[w] for w in _TOKEN.findall(text.lower()) if w in self.vocab)
        return {j: c * float(self.idf[j]) for j, c in counts.items()}


def _cosine(a: Mapping[int, float], b: Mapping[int, float]) -> float:
    na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
    if na == 0 or nb == 0:
        return 0.0
    return sum(v * b[j] for j, v in a.items() if j in b) / (na * nb)


def tfidf_similarity(text_a: str, text_b: str, *, reference: TfidfReference) -> float:
    """Cosine between the TF-IDF vectors of two texts."""
    return _cosine(reference.vector(text_a), reference.vector(text_b))


def load_tfidf_reference(*, attribute_snippets: str | os.PathLike, idf: str | os.PathLike,
                         tfidf_vocab: str | os.PathLike) -> TfidfReference:
    """Load ROME's three files; a missing or inconsistent file is a ``ValueError`` naming it."""
    import numpy as np

    for name, path in (("attribute_snippets", attribute_snippets), ("idf", idf), ("tfidf_vocab", tfidf_vocab)):
        if not Path(path).is_file():
            raise ValueError(f"{name}={str(path)!r} is not a file; {_NEEDS}")
    idf_arr = np.load(idf, allow_pickle=False)
    if idf_arr.ndim != 1:
        raise ValueError(f"{idf}: expected a 1-D idf array, got shape {idf_arr.shape}")
    vocab = json.loads(Path(tfidf_vocab).read_text(encoding="utf-8"))
    if not isinstance(vocab, dict) or any(not isinstance(j, int) or not 0 <= j < len(idf_arr) for j in vocab.values()):
        raise ValueError(f"{tfidf_vocab}: expected a JSON object word -> column index below {len(idf_arr)}")
    snips: dict[tuple[str, str], list[str]] = defaultdict(list)
    for el in json.loads(Path(attribute_snippets).read_text(encoding="utf-8")):
        snips[(el["relation_id"], el["target_id"])] += [s["text"] for s in el["samples"]]
    return TfidfReference(idf_arr, vocab, {k: tuple(v) for k, v in snips.items()})


@dataclass(frozen=True)
class ConsistencyResult:
    skipped: bool
    reason: str | None = None
    mean: float | None = None
    per_case: tuple[tuple[int, float | None], ...] = ()  # (case_id, score or None)
    n_without_snippets: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def consistency_scores(*, cases: Sequence[Any], generations: Sequence[Sequence[str]],
                       reference: TfidfReference | None = None, attribute_snippets: str | os.PathLike | None = None,
                       idf: str | os.PathLike | None = None,
                       tfidf_vocab: str | os.PathLike | None = None) -> ConsistencyResult:
    """Reference score per case from the texts generated for it (``generations[k]`` for ``cases[k]``,
    e.g. ``FluencyCaseResult.texts``). Give ``reference`` or the three paths; otherwise skipped."""
    if len(generations) != len(cases):
        raise ValueError(f"got generations for {len(generations)} cases, expected {len(cases)}")
    if reference is None:
        missing = [n for n, v in (("attribute_snippets", attribute_snippets), ("idf", idf),
                                  ("tfidf_vocab", tfidf_vocab)) if v is None]
        if missing:
            return ConsistencyResult(skipped=True, reason=f"{_NEEDS} (missing: {', '.join(missing)})")
        reference = load_tfidf_reference(attribute_snippets=attribute_snippets, idf=idf, tfidf_vocab=tfidf_vocab)
    per_case, no_snips = [], 0
    for case, texts in zip(cases, generations):
        key = (getattr(case, "relation_id", None), getattr(case, "target_new_id", None))
        refs = reference.snippets.get(key) if None not in key else None
        if not refs or not texts:
            no_snips += 1
            per_case.append((case.case_id, None))
            continue
        per_case.append((case.case_id, tfidf_similarity(" ".join(texts), " ".join(refs), reference=reference)))
    scores = [s for _, s in per_case if s is not None]
    if not scores:
        return ConsistencyResult(skipped=True, n_without_snippets=no_snips, per_case=tuple(per_case),
                                 reason="no case had generations and snippets for (relation_id, target_new_id); "
                                        "consistency needs CounterFact cases in ROME's schema")
    return ConsistencyResult(skipped=False, mean=fmean(scores), per_case=tuple(per_case), n_without_snippets=no_snips)
