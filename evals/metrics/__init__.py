"""Evaluation metrics, one small module each with a card in its docstring.

``tokens`` (the shared teacher-forced scorer), ``zsre`` (token accuracy), ``counterfact``
(ES/PS/NS and magnitudes), ``fluency`` (n-gram entropy of sampled text) and
``consistency`` (ROME's TF-IDF reference score, skipped without ROME's data files).
The functions take ``model`` and ``tokenizer`` and know nothing about the NeuralDB store:
attach it around the call (``with db.attached(model): ...``).
"""

from .consistency import ConsistencyResult, consistency_scores, load_tfidf_reference
from .counterfact import counterfact_scores, summarize_counterfact
from .fluency import fluency_scores, generate_texts, ngram_entropy, summarize_fluency
from .tokens import TargetScore, score_targets
from .zsre import summarize_zsre, zsre_scores

__all__ = [
    "ConsistencyResult", "TargetScore", "consistency_scores", "counterfact_scores", "fluency_scores",
    "generate_texts", "load_tfidf_reference", "ngram_entropy", "score_targets", "summarize_counterfact",
    "summarize_fluency", "summarize_zsre", "zsre_scores",
]
