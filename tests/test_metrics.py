"""Metrics on models whose numbers can be computed by hand.

``BigramLM`` returns fixed next-token log-probabilities that depend only on the current
token, so every NLL / accuracy / ES / PS / NS below is written out in the test. A tiny
random ``LlamaForCausalLM`` checks the real Hugging Face path (padding, batching, KV cache).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutput

from evals.cases import EvalCase
from evals.metrics import consistency, fluency
from evals.metrics.consistency import consistency_scores, load_tfidf_reference
from evals.metrics.counterfact import counterfact_scores, summarize_counterfact
from evals.metrics.fluency import fluency_scores, generate_texts, ngram_entropy, summarize_fluency, word_tokenize
from evals.metrics.tokens import score_targets
from evals.metrics.zsre import summarize_zsre, zsre_scores
from neuraldb import Fact, encode_completion

WORDS = ("<pad> <unk> tower bridge museum is in at near on located lies sits new york paris rome "
         "nq question it bob smith alice a b c d e f").split()
V = {w: i for i, w in enumerate(WORDS)}


def make_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(V, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    out.padding_side = padding_side
    return out


def row(**probs: float) -> torch.Tensor:
    """Log-probabilities: the given words get their probability, the rest share what is left."""
    p = torch.zeros(len(WORDS), dtype=torch.float64)
    rest = [i for w, i in V.items() if w not in probs]
    for w, q in probs.items():
        p[V[w]] = q
    left = 1.0 - sum(probs.values())
    p[rest] = left / len(rest)
    return p.log()


# Next-token distributions (after the keyed word).
TABLE = {
    "in": dict(paris=0.6, rome=0.3),
    "at": dict(rome=0.7, paris=0.1),
    "near": dict(rome=0.5, paris=0.2),
    "on": dict(new=0.9),
    "new": dict(york=0.8),
    "it": dict(alice=0.5, bob=0.3),
    "bob": dict(smith=0.9),
}


class BigramLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: exact, position- and padding-independent."""

    def __init__(self, table: dict[str, dict[str, float]], dtype: torch.dtype = torch.float32):
        super().__init__()
        logits = torch.zeros(len(WORDS), len(WORDS), dtype=torch.float64)
        for w, probs in table.items():
            logits[V[w]] = row(**probs)
        self.table = nn.Parameter(logits.to(dtype), requires_grad=False)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> CausalLMOutput:
        self.calls += 1
        return CausalLMOutput(logits=self.table[input_ids])


def rest(probs: dict[str, float]) -> float:
    return (1.0 - sum(probs.values())) / (len(WORDS) - len(probs))


@pytest.fixture()
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture()
def bigram() -> BigramLM:
    return BigramLM(TABLE)


def cf_case(case_id: int = 0, **kw) -> EvalCase:
    fact = Fact(prompt="{} is in", subject="tower", target_new="rome", target_true="paris",
                paraphrases=("tower located at", "tower lies in"), neighborhood=("bridge is in", "museum near"),
                id=f"cf-{case_id}", **kw)
    return EvalCase(case_id=case_id, kind="counterfact", fact=fact)


def zsre_case(case_id: int = 0) -> EvalCase:
    fact = Fact(prompt="{} is in", subject="tower", target_new="new york", paraphrases=("tower sits on",),
                id=f"z-{case_id}")
    return EvalCase(case_id=case_id, kind="zsre", fact=fact, loc_prompt="nq question it", loc_answer="bob smith")


# --------------------------------------------------------------------------- tokens


def test_score_targets_exact_values(tok, bigram):
    s_one, s_two = score_targets(model=bigram, tokenizer=tok, pairs=[("tower is in", "paris"),
                                                                      ("tower is in", "new york")])
    assert s_one.target_ids == (V["paris"],)
    assert s_one.correct == (True,)
    assert s_one.logprobs == pytest.approx((math.log(0.6),), rel=1e-6)
    assert s_one.prob == pytest.approx(0.6, rel=1e-6)
    p_new = rest(TABLE["in"])
    assert s_two.target_ids == (V["new"], V["york"])
    assert s_two.correct == (False, True)
    assert s_two.mean_nll == pytest.approx(-(math.log(p_new) + math.log(0.8)) / 2, rel=1e-6)
    assert s_two.prob == pytest.approx(math.sqrt(p_new * 0.8), rel=1e-6)
    assert s_two.accuracy == 0.5
    assert (list(s_two.prompt_ids), list(s_two.target_ids)) == encode_completion(tok, "tower is in", "new york")


def test_score_targets_restores_training_flag_and_rejects_bad_input(tok, bigram):
    bigram.train()
    score_targets(model=bigram, tokenizer=tok, pairs=[("tower is in", "paris")])
    assert bigram.training
    with pytest.raises(ValueError, match="batch_size"):
        score_targets(model=bigram, tokenizer=tok, pairs=[("tower is in", "paris")], batch_size=0)
    with pytest.raises(ValueError, match="tokenises to nothing"):
        score_targets(model=bigram, tokenizer=tok, pairs=[("", "paris")])


def test_score_targets_one_forward_per_batch(tok, bigram):
    pairs = [("tower is in", "paris")] * 5
    score_targets(model=bigram, tokenizer=tok, pairs=pairs, batch_size=2)
    assert bigram.calls == 3


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


PAIRS = [("tower is in", "paris"), ("a b c d e f tower", "new york"), ("it", "bob smith alice"),
         ("museum near", "rome"), ("nq question it", "bob")]


@pytest.mark.parametrize("batch_size", [1, 2, 4])
@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_batching_and_padding_side_do_not_change_scores(batch_size, side):
    model = tiny_llama()
    ref_tok = make_tokenizer()
    expected = []
    for prompt, target in PAIRS:  # unpadded reference, computed directly
        p, t = encode_completion(ref_tok, prompt, target)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([p + t[:-1]])).logits[0].log_softmax(-1)
        expected.append([logp[len(p) - 1 + i, t[i]].item() for i in range(len(t))])
    got = score_targets(model=model, tokenizer=make_tokenizer(side), pairs=PAIRS, batch_size=batch_size)
    for g, e in zip(got, expected):
        assert g.logprobs == pytest.approx(e, abs=1e-5)


def test_bfloat16_model_scores_in_float32(tok):
    model = BigramLM(TABLE, dtype=torch.bfloat16)
    (s,) = score_targets(model=model, tokenizer=tok, pairs=[("tower is in", "paris")])
    assert isinstance(s.logprobs[0], float)
    assert s.logprobs[0] == pytest.approx(math.log(0.6), abs=1e-2)


# --------------------------------------------------------------------------- zsRE


def test_zsre_exact(tok, bigram):
    (r,) = zsre_scores(model=bigram, tokenizer=tok, cases=[zsre_case()])
    # edit: after "in" argmax is paris (not new) -> 0; after "new" argmax york -> 1
    assert r.efficacy_correct == (False, True) and r.efficacy == 0.5
    # rephrase "tower sits on": on -> new (0.9), new -> york: both right
    assert r.generalization_correct == ((True, True),) and r.generalization == 1.0
    # loc "nq question it" -> "bob smith": it -> alice (wrong), bob -> smith (right)
    assert r.specificity_correct == (False, True) and r.specificity == 0.5
    summary = summarize_zsre([r, r])
    assert summary == {"n_cases": 2, "efficacy": 0.5, "generalization": 1.0, "specificity": 0.5}


def test_zsre_batch_size_invariant(tok, bigram):
    cases = [zsre_case(i) for i in range(5)]
    one = zsre_scores(model=bigram, tokenizer=tok, cases=cases, batch_size=1)
    four = zsre_scores(model=bigram, tokenizer=tok, cases=cases, batch_size=4)
    assert one == four


def test_zsre_case_without_loc_or_paraphrase(tok, bigram):
    case = EvalCase(case_id=3, kind="zsre", fact=Fact(prompt="{} is in", subject="tower", target_new="paris"))
    (r,) = zsre_scores(model=bigram, tokenizer=tok, cases=[case])
    assert (r.efficacy, r.generalization, r.specificity) == (1.0, None, None)
    assert summarize_zsre([r])["specificity"] is None


# --------------------------------------------------------------------------- CounterFact


def test_counterfact_exact(tok, bigram):
    (r,) = counterfact_scores(model=bigram, tokenizer=tok, cases=[cf_case()])
    # edit "tower is in": P(rome)=.3 < P(paris)=.6 -> fail, diff -.3
    assert r.efficacy == 0.0 and r.efficacy_diff == pytest.approx(0.3 - 0.6, abs=1e-6)
    # paraphrases: "at" (rome .7 vs paris .1: win), "in" (lose)
    assert r.generalization == 0.5
    assert r.generalization_diff == pytest.approx(((0.7 - 0.1) + (0.3 - 0.6)) / 2, abs=1e-6)
    # neighbourhood: "in" keeps paris (win), "near" prefers rome (lose)
    assert r.specificity == 0.5
    assert r.specificity_diff == pytest.approx(((0.6 - 0.3) + (0.2 - 0.5)) / 2, abs=1e-6)
    assert r.rewrite[0].nll_new == pytest.approx(-math.log(0.3), rel=1e-6)
    assert r.rewrite[0].nll_true == pytest.approx(-math.log(0.6), rel=1e-6)
    assert [c.prompt for c in r.neighborhood] == ["bridge is in", "museum near"]
    d = r.to_dict()
    assert d["specificity"] == 0.5 and len(d["paraphrase"]) == 2


def test_counterfact_summary_and_multi_token_target(tok, bigram):
    fact = Fact(prompt="{} is in", subject="tower", target_new="new york", target_true="paris",
                paraphrases=("tower sits on",), neighborhood=("bridge is in",))
    case = EvalCase(case_id=1, kind="counterfact", fact=fact)
    r0, r1 = counterfact_scores(model=bigram, tokenizer=tok, cases=[cf_case(), case])
    p_new_edit = math.sqrt(rest(TABLE["in"]) * 0.8)  # exp(-mean NLL) of "new york" after "in"
    assert r1.efficacy == 0.0 and r1.efficacy_diff == pytest.approx(p_new_edit - 0.6, rel=1e-5)
    p_para = math.sqrt(0.9 * 0.8)  # "on" -> new .9, "new" -> york .8; paris after "on" is rest(on)
    assert r1.generalization == 1.0
    assert r1.generalization_diff == pytest.approx(p_para - rest(TABLE["on"]), rel=1e-5)
    assert r1.specificity == 1.0
    s = summarize_counterfact([r0, r1])
    assert s["n_cases"] == 2
    assert s["efficacy"] == 0.0 and s["generalization"] == 0.75 and s["specificity"] == 0.75
    assert s["score"] == 0.0  # harmonic mean with a zero
    from evals.metrics.counterfact import _hmean
    assert _hmean([0.5, 1.0, 1.0]) == pytest.approx(0.75)
    assert s["efficacy_diff"] == pytest.approx(((0.3 - 0.6) + (p_new_edit - 0.6)) / 2, rel=1e-5)


def test_counterfact_batch_size_and_padding_side_invariant(bigram):
    cases = [cf_case(i) for i in range(4)]
    ref = counterfact_scores(model=bigram, tokenizer=make_tokenizer("right"), cases=cases, batch_size=1)
    assert counterfact_scores(model=bigram, tokenizer=make_tokenizer("left"), cases=cases, batch_size=4) == ref


def test_counterfact_llama_batch_invariant():
    model = tiny_llama(1)
    cases = [cf_case(i) for i in range(3)]
    a = counterfact_scores(model=model, tokenizer=make_tokenizer("left"), cases=cases, batch_size=1)
    b = counterfact_scores(model=model, tokenizer=make_tokenizer("right"), cases=cases, batch_size=4)
    for x, y in zip(a, b):
        for gx, gy in zip((x.rewrite, x.paraphrase, x.neighborhood), (y.rewrite, y.paraphrase, y.neighborhood)):
            assert [c.nll_new for c in gx] == pytest.approx([c.nll_new for c in gy], abs=1e-5)
            assert [c.nll_true for c in gx] == pytest.approx([c.nll_true for c in gy], abs=1e-5)


def test_counterfact_needs_target_true(tok, bigram):
    case = EvalCase(case_id=0, kind="zsre", fact=Fact(prompt="{} is in", subject="tower", target_new="rome"))
    with pytest.raises(ValueError, match="target_true"):
        counterfact_scores(model=bigram, tokenizer=tok, cases=[case])


# --------------------------------------------------------------------------- fluency

LOG3 = math.log2(3)


@pytest.mark.parametrize("text, expected", [
    ("a b c d", (2 / 3 * LOG3 + 4 / 3 * 1.0) / 2),  # 3 distinct bigrams, 2 distinct trigrams
    ("a a a a", 0.0),
    ("a b a b a", (2 / 3 * 1.0 + 4 / 3 * (LOG3 - 2 / 3)) / 2),  # bigrams ab,ba x2; trigrams aba x2, bab
    ("a", 0.0),
    ("", 0.0),
])
def test_ngram_entropy_exact(text, expected):
    assert ngram_entropy([text]) == pytest.approx(expected, abs=1e-12)


def test_ngram_entropy_mean_over_texts_and_options():
    texts = ["a b c d", "a a a a"]
    assert ngram_entropy(texts) == pytest.approx((2 / 3 * LOG3 + 4 / 3) / 4)
    assert ngram_entropy(["a b c d"], ns=(1,), weights=(1.0,)) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        ngram_entropy([])
    with pytest.raises(ValueError):
        ngram_entropy("a b c")  # a string is not a list of texts


def test_word_tokenizer_splits_punctuation():
    assert word_tokenize("Hello, world.") == ["Hello", ",", "world", "."]
    assert fluency.word_tokenizer_name()


CHAIN = {"a": dict(b=1.0), "b": dict(c=1.0), "c": dict(a=1.0)}


def test_generate_deterministic_chain_lengths(tok):
    model = BigramLM(CHAIN)  # a -> b -> c -> a with probability 1
    assert generate_texts(model=model, tokenizer=tok, prompts=["a"], max_new_tokens=4) == ["a b c a b"]
    # ROME's default: prompt + continuation = max_length tokens in all
    assert generate_texts(model=model, tokenizer=tok, prompts=["a b", "c"], max_length=5) == ["a b c a b", "c a b c a"]
    assert generate_texts(model=model, tokenizer=tok, prompts=["a"], max_new_tokens=2, include_prompt=False) == ["b c"]
    assert generate_texts(model=model, tokenizer=tok, prompts=["a b c"], max_length=2) == ["a b c"]


def test_generate_samples_only_top_k(tok):
    probs = dict(a=0.3, b=0.25, c=0.2, d=0.1, e=0.09, f=0.06)  # f is 6th: never with top_k=5
    model = BigramLM({"it": probs})
    texts = generate_texts(model=model, tokenizer=tok, prompts=["it"] * 300, max_new_tokens=1,
                           include_prompt=False, seed=7)
    counts = {w: texts.count(w) for w in probs}
    assert counts["f"] == 0 and sum(counts.values()) == 300
    assert counts["a"] > counts["e"]
    only_a = generate_texts(model=model, tokenizer=tok, prompts=["it"] * 20, max_new_tokens=1,
                            include_prompt=False, top_k=1)
    assert set(only_a) == {"a"}


def test_generate_reproducible_and_batch_invariant(tok, monkeypatch):
    model = tiny_llama(2)
    prompts = ["tower is in", "a b c d e f", "it", "museum near"]
    ref = generate_texts(model=model, tokenizer=tok, prompts=prompts, max_new_tokens=12, seed=3, batch_size=1)
    assert generate_texts(model=model, tokenizer=tok, prompts=prompts, max_new_tokens=12, seed=3, batch_size=4) == ref
    assert generate_texts(model=model, tokenizer=tok, prompts=prompts, max_new_tokens=12, seed=4) != ref
    monkeypatch.setattr(fluency, "cache_argument", lambda m: None)  # no KV cache: full recompute
    assert generate_texts(model=model, tokenizer=tok, prompts=prompts, max_new_tokens=12, seed=3, batch_size=3) == ref
    assert all(t.startswith(p) for t, p in zip(ref, prompts))


def test_fluency_scores_per_case(tok):
    model = BigramLM(CHAIN)
    fact = Fact(prompt="{} b", subject="a", target_new="c")
    with_prompts = EvalCase(case_id=5, kind="counterfact", fact=fact, generation_prompts=("a", "b"))
    without = EvalCase(case_id=6, kind="counterfact", fact=fact)
    r, r_none = fluency_scores(model=model, tokenizer=tok, cases=[with_prompts, without], max_new_tokens=3)
    assert r.texts == ("a b c a", "b c a b")
    assert r.ngram_entropy == pytest.approx(ngram_entropy(["a b c a", "b c a b"]))
    assert r_none.ngram_entropy is None and r_none.texts == ()
    s = summarize_fluency([r, r_none])
    assert s["n_cases"] == 1 and s["n_skipped"] == 1 and s["ngram_entropy"] == r.ngram_entropy


# --------------------------------------------------------------------------- consistency


def rome_case(case_id: int = 0) -> EvalCase:
    fact = Fact(prompt="{} speaks", subject="a", target_new="english", target_true="french")
    return EvalCase(case_id=case_id, kind="counterfact", fact=fact, relation_id="P1", target_new_id="Q1")


def test_consistency_skipped_without_data():
    res = consistency_scores(cases=[rome_case()], generations=[["text"]])
    assert res.skipped and res.mean is None
    assert "attribute_snippets.json" in res.reason and "idf.npy" in res.reason and "tfidf_vocab.json" in res.reason


@pytest.fixture()
def tfidf_files(tmp_path):
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0, 0.5]))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({"english": 0, "french": 1, "language": 2}))
    (tmp_path / "attribute_snippets.json").write_text(json.dumps([
        {"relation_id": "P1", "target_id": "Q1", "samples": [{"name": "x", "text": "English language"},
                                                             {"name": "y", "text": "english, of course"}]}]))
    return dict(attribute_snippets=tmp_path / "attribute_snippets.json", idf=tmp_path / "idf.npy",
                tfidf_vocab=tmp_path / "tfidf_vocab.json")


def test_consistency_exact(tfidf_files):
    other = EvalCase(case_id=1, kind="counterfact", fact=rome_case().fact, relation_id="P9", target_new_id="Q9")
    res = consistency_scores(cases=[rome_case(), other], generations=[["French language", "english"], ["x"]],
                             **tfidf_files)
    # generation: english 1*1, french 1*2, language 1*.5; snippets: english 2*1, language 1*.5 ("of" is not in vocab)
    expected = (1 * 2 + 2 * 0 + 0.5 * 0.5) / (math.sqrt(1 + 4 + 0.25) * math.sqrt(4 + 0.25))
    assert not res.skipped
    assert res.per_case[0] == (0, pytest.approx(expected))
    assert res.per_case[1] == (1, None) and res.n_without_snippets == 1
    assert res.mean == pytest.approx(expected)


def test_consistency_matches_sklearn(tfidf_files):
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    ref = load_tfidf_reference(**tfidf_files)
    vec = sklearn_text.TfidfVectorizer(vocabulary=ref.vocab)
    vec.fit(["english french language"])
    vec.idf_ = ref.idf
    a, b = vec.transform(["French language, English!", "english english language"]).toarray()
    expected = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert consistency.tfidf_similarity("French language, English!", "english english language",
                                        reference=ref) == pytest.approx(expected)


def test_consistency_rejects_pickled_idf_and_missing_file(tfidf_files, tmp_path):
    np.save(tmp_path / "bad.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_tfidf_reference(**{**tfidf_files, "idf": tmp_path / "bad.npy"})
    with pytest.raises(ValueError, match="not a file"):
        consistency_scores(cases=[rome_case()], generations=[["x"]], **{**tfidf_files, "idf": tmp_path / "nope.npy"})


def test_consistency_without_relation_ids_is_skipped(tfidf_files):
    case = EvalCase(case_id=0, kind="counterfact", fact=rome_case().fact)
    res = consistency_scores(cases=[case], generations=[["english"]], **tfidf_files)
    assert res.skipped and "ROME's schema" in res.reason
