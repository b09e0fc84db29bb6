"""The strategies keep their promises (cheap; no model)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evals.firing.measure import generated_facts, generated_name
from neuraldb import Fact, locate_subject

from .conftest import examples
from .strategies import KEY_STRUCTURES, _mentions, fact_sets, key_sets, names, relations, unrelated_prompts


@settings(max_examples=examples("store", 3))
@given(facts=fact_sets(min_size=1, max_size=12))
def test_fact_sets_have_unique_unnested_subjects(facts):
    subjects = [f.subject.lower() for f in facts]
    assert len(set(subjects)) == len(subjects)
    assert not any(a != b and a in b for a in subjects for b in subjects)
    assert len({f.id for f in facts}) == len(facts)
    for f in facts:
        assert isinstance(f, Fact) and f.target_new != f.target_true
        assert all(f.subject in p for p in f.paraphrases)


@settings(max_examples=examples("store", 3))
@given(facts=fact_sets(min_size=1, max_size=5), data=st.data())
def test_unrelated_prompts_mention_no_subject(facts, data):
    subjects = [f.subject for f in facts]
    corpus = ["It was a dark night and the rain fell on the old house.", "\"Come here,\" she said."]
    texts = data.draw(unrelated_prompts(subjects=subjects, corpus=corpus))
    assert texts and all(not _mentions(t, subjects) for t in texts)


def test_generated_subjects_are_keyable_and_unique():
    facts = generated_facts(300, seed=3)
    assert len({f.subject for f in facts}) == 300
    spread = range(0, 48**5, 48**5 // 5000)
    assert len({generated_name(i) for i in spread}) == len(spread)


def test_keyable_with_a_real_tokenizer(smollm2):
    _, tok = smollm2
    for f in generated_facts(50):
        ids, pos = locate_subject(tok, f.prompt, f.subject)
        assert tok.decode(ids[: pos + 1]).strip().endswith(f.subject.split()[-1][-2:])


@settings(max_examples=examples("store"))
@given(ks=key_sets(min_size=1, max_size=50, dim=16, d_model=3))
def test_key_sets_shapes_and_distinct_rows(ks):
    assert ks.keys.shape == (len(ks), 16) and ks.residuals.shape == (len(ks), 3)
    assert ks.keys.dtype == torch.float32 and torch.isfinite(ks.keys).all()
    if len(ks) > 1:
        k = ks.keys / ks.keys.norm(dim=1, keepdim=True)
        s = k @ k.T - 2 * torch.eye(len(ks))
        assert float(s.max()) < 1 - 1e-4, "two keys point the same way"


@pytest.mark.parametrize(
    "make",
    [
        lambda: fact_sets(min_size=0),
        lambda: fact_sets(min_size=3, max_size=2),
        lambda: fact_sets(id_prefix=""),
        lambda: unrelated_prompts(min_words=0),
        lambda: unrelated_prompts(corpus=["   "]),
        lambda: key_sets(size=0),
        lambda: key_sets(dim=1),
        lambda: key_sets(structures=("nope",)),
        lambda: names(min_words=0),
        lambda: relations(subject_first="yes"),
    ],
)
def test_bad_options_fail_up_front(make):
    with pytest.raises(ValueError):
        make()


def test_structures_listed():
    assert set(KEY_STRUCTURES) == {"gaussian", "anisotropic", "clustered", "near_duplicates"}
