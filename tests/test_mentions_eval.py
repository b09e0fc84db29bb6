"""The mentions evaluation (evals/metrics/mentions.py): deterministic variants that spell the
subject in the stated form, ES pre/post and gate recall, the report round trip; SmolLM2 (slow)."""

from __future__ import annotations

import json
import logging

import pytest

import neuraldb
from evals import report as rep
from evals.cases import EvalCase
from evals.metrics import mentions as mm
from evals.metrics.specs import select_metrics
from neuraldb import EditConfig, Fact

from conftest import tiny_model

log = logging.getLogger(__name__)

EIFFEL = Fact(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome",
              target_true="Paris", paraphrases=("Some text. The Eiffel Tower is in",
                                                "I said that The Eiffel Tower is in", "No subject here"))
# tiny-model facts end on the subject (see test_evaluate.py): the residual decides the next token
FACTS = [
    Fact(prompt="the city of {}", subject="The Eiffel Tower", target_new="rome", target_true="paris", id="m1",
         paraphrases=("the eiffel tower", "a city of The Eiffel Tower")),
    Fact(prompt="the mother tongue of {}", subject="danielle darrieux", target_new="english", target_true="french",
         id="m2", paraphrases=("danielle darrieux",)),
]
CASES = [EvalCase(case_id=i, kind="counterfact", fact=f) for i, f in enumerate(FACTS)]
CFG = EditConfig(layer=1, steps=80, lr=0.5, clamp_norm_factor=8.0, context_prefixes=("the", "i"), context_length=3,
                 batch_size=2)


@pytest.fixture(scope="module")
def edited():
    model, tok = tiny_model("llama")
    db = neuraldb.edit(model, tok, FACTS, config=CFG, progress=False)
    return model, tok, db


def by_kind(variants):
    out = {}
    for v in variants:
        out.setdefault(v.kind, []).append(v)
    return out


def test_variants_are_deterministic_and_spell_the_subject():
    first, again = mm.mention_variants(fact=EIFFEL), mm.mention_variants(fact=EIFFEL)
    assert first == again
    for v in first:
        a, b = v.span
        assert v.text[a:b] == v.mention
    kinds = by_kind(first)
    assert [v.source for v in kinds["exact"]] == [0, 1, 2]  # the third paraphrase lacks the subject
    texts = {k: [v.text for v in vs] for k, vs in kinds.items()}
    assert texts["lower_article"][0] == "the Eiffel Tower is located in the city of"
    assert texts["article_dropped"][0] == "Eiffel Tower is located in the city of"
    assert texts["quoted"][0] == '"The Eiffel Tower" is located in the city of'
    assert texts["question"][0] == "Question: The Eiffel Tower is located in the city of? Answer:"
    assert texts["mid_sentence"] == ["As everyone knows, The Eiffel Tower is located in the city of",
                                     "Some text. As everyone knows, The Eiffel Tower is in"]  # not paraphrase 2
    assert [v.mention for v in kinds["lower_article"]] == ["the Eiffel Tower"] * 3
    assert [v.mention for v in kinds["article_dropped"]] == ["Eiffel Tower"] * 3
    assert "possessive" not in kinds  # "{} is located in" has no deterministic possessive


def test_possessive_and_article_rules():
    fact = Fact(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                paraphrases=("Intro. The language used by Danielle Darrieux is",))
    kinds = by_kind(mm.mention_variants(fact=fact))
    assert [v.text for v in kinds["possessive"]] == ["Danielle Darrieux's mother tongue is",
                                                     "Intro. Danielle Darrieux's language is"]
    assert "lower_article" not in kinds and "article_dropped" not in kinds  # no leading article
    assert "mid_sentence" not in kinds  # the subject is already mid-sentence in both
    own = Fact(prompt="{}'s profession is an", subject="Apple", target_new="actor")
    assert [v.text for v in mm.mention_variants(fact=own, kinds=["possessive"])] == ["Apple's profession is an"]
    then = Fact(prompt="{} is", subject="Then", target_new="x")
    assert mm.mention_variants(fact=then, kinds=["article_dropped", "article_dropped_one_word"]) == []
    # one word left: its own kind, which the word check does not count as a mention by design
    show = Fact(prompt="{} premiered on", subject="The Honeymooners", target_new="NBC")
    assert [v.text for v in mm.mention_variants(fact=show, kinds=["article_dropped", "article_dropped_one_word"])
            ] == ["Honeymooners premiered on"]
    assert mm.mention_variants(fact=show, kinds=["article_dropped"]) == []
    assert "article_dropped_one_word" not in by_kind(mm.mention_variants(fact=EIFFEL))
    with pytest.raises(ValueError, match="unknown mention kind"):
        mm.mention_variants(fact=own, kinds=["bogus"])


def test_subject_last_token_of_each_variant():
    _, tok = tiny_model("llama")
    for v in mm.mention_variants(fact=EIFFEL):
        ids, last = mm.subject_last_token(tok, v)
        want = "tower" if v.mention.endswith("Tower") else None
        assert tok.convert_ids_to_tokens(ids[last]) == want, v.text


def test_scores_pre_post_and_gate_recall(edited):
    model, tok, db = edited
    db.detach()
    pre = mm.mention_scores(model=model, tokenizer=tok, cases=CASES, batch_size=3)
    with pytest.raises(ValueError, match="attached"):
        mm.mention_gate(model=model, tokenizer=tok, db=db, cases=CASES)
    with db.attached(model):
        post = mm.mention_scores(model=model, tokenizer=tok, cases=CASES, batch_size=3)
        fired = mm.mention_gate(model=model, tokenizer=tok, db=db, cases=CASES, batch_size=3)
    assert not db.is_attached
    for p, q, f in zip(pre, post, fired):
        assert set(p) == set(q) == set(f) == set(mm.KINDS)
        for kind in mm.KINDS:
            assert p[kind]["prompts"] == q[kind]["prompts"] == len(q[kind]["wins"]) == len(f[kind]["fired_own"])
            assert all(o <= a for o, a in zip(f[kind]["fired_own"], f[kind]["fired_any"]))
    # the edit prompt (source 0, exact form) ends on the edited subject: the store retrieves its fact there
    assert fired[0]["exact"]["fired_own"][0] == 1 and fired[1]["exact"]["fired_own"][0] == 1
    assert post[0]["exact"]["wins"][0] == 1 and post[1]["exact"]["wins"][0] == 1
    # the word tokenizer lower-cases, so "the Eiffel Tower" is the stored token form
    assert fired[0]["lower_article"]["fired_own"][0] == 1
    assert pre[1]["lower_article"] == {"prompts": 0, "not_applicable": 2, "wins": []}
    summary = mm.summarize_mentions(pre=pre, post=post, gate=fired)
    exact = summary["kinds"]["exact"]
    # m1's paraphrase "the eiffel tower" does not spell the subject verbatim: 2 + 2 sources
    assert exact["prompts"] == 4 and exact["es"]["kind"] == "mean" and exact["gate_recall"]["n"] == 4
    assert summary["kinds"]["lower_article"]["es"]["kind"] == "mean"  # case m1: 2 sources, m2: none
    assert summary["post"]["n"] == 2 and summary["pre"]["mean"] is not None


def test_evaluate_report_round_trip(edited, tmp_path):
    model, tok, db = edited
    r = neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, metrics=["efficacy", "generalization", "mentions"],
                          batch_size=2, progress=False, output_dir=tmp_path)
    assert list(r["metrics"]) == ["efficacy", "generalization", "mentions"]
    m = r["metrics"]["mentions"]
    assert m["unit"] == "%" and m["pre"]["mean"] is not None and m["post"]["mean"] is not None
    assert set(m["kinds"]) == set(mm.KINDS)
    exact = m["kinds"]["exact"]
    assert exact["es"]["pre"]["n"] == 2 and exact["es"]["post"]["ci"] is not None
    assert exact["gate_recall"]["mean"] is not None and "gate_recall" not in exact["es"]["pre"]
    case = r["cases"][0]
    assert "fired_own" in case["post"]["mentions"]["exact"] and "fired_own" not in case["pre"]["mentions"]["exact"]
    saved = rep.load_report(tmp_path)
    assert saved["metrics"]["mentions"] == json.loads(json.dumps(m))
    md = (tmp_path / "report.md").read_text()
    assert "## Mention variants" in md and "| quoted |" in md and "| possessive |" in md
    assert rep.render_markdown(saved) == md
    assert "mentions" in rep.render_text(saved)


def test_mentions_is_opt_in_and_counterfact_only(edited):
    assert "mentions" not in select_metrics("counterfact", None)
    assert select_metrics("counterfact", "mentions efficacy") == ["efficacy", "mentions"]
    with pytest.raises(ValueError, match="unknown zsre"):
        select_metrics("zsre", ["mentions"])
    import argparse

    from evals import cli

    args = argparse.Namespace(n=3, metrics=["efficacy", "mentions", "bogus"], dataset="counterfact")
    with pytest.raises(ValueError, match=r"\['bogus'\]; choose from .*'mentions', 'chat_efficacy'"):
        cli.run_evaluate(args)  # the CLI knows the opt-in names; it fails on 'bogus' alone, before any loading


@pytest.mark.slow
def test_smollm2_mentions(smollm2, shared_data):
    from evals.datasets import editable_cases, load_counterfact

    model, tok = smollm2
    cases, _ = editable_cases(load_counterfact(data_dir=shared_data, limit=40), tok)
    picked = [c for c in cases if mm._article(c.fact.subject)][:3]
    picked += [c for c in cases if c not in picked][: 8 - len(picked)]
    db = neuraldb.edit(model, tok, [c.fact for c in picked], progress=False)
    r = neuraldb.evaluate(model, db, tokenizer=tok, dataset=picked, metrics=["efficacy", "generalization", "mentions"],
                          batch_size=8, progress=False)
    kinds = r["metrics"]["mentions"]["kinds"]
    for kind, k in kinds.items():
        if k["prompts"]:
            log.warning("SmolLM2 mentions %s: n=%d ES pre %.1f post %.1f, gate recall %.1f", kind, k["prompts"],
                        k["es"]["pre"]["mean"], k["es"]["post"]["mean"], k["gate_recall"]["mean"])
    assert kinds["exact"]["gate_recall"]["mean"] >= 50 and kinds["exact"]["es"]["post"]["mean"] >= 50
    assert kinds["quoted"]["prompts"] > 0 and kinds["question"]["prompts"] > 0
