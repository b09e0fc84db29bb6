"""The chat evaluation (evals/metrics/chat.py): the question rule, the judge's normalisation,
greedy batched generation, skipped-with-reason without a chat template, pre/post in the report."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import neuraldb
from evals import report as rep
from evals.cases import EvalCase
from evals.metrics import chat
from neuraldb import EditConfig, Fact

from conftest import tiny_model

log = logging.getLogger(__name__)

TEMPLATE = ("{% for m in messages %}[BOS] {{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
            "{% if add_generation_prompt %}[BOS] assistant :{% endif %}")
FACTS = [
    Fact(prompt="the city of {}", subject="the eiffel tower", target_new="rome", target_true="paris", id="c1",
         paraphrases=("the eiffel tower", "a city of the eiffel tower")),
    Fact(prompt="the sport of {}", subject="lebron james", target_new="tennis", target_true="football", id="c2",
         paraphrases=("lebron james",)),
]
CASES = [EvalCase(case_id=i, kind="counterfact", fact=f) for i, f in enumerate(FACTS)]
CFG = EditConfig(layer=1, steps=80, lr=0.5, clamp_norm_factor=8.0, context_prefixes=("the", "i"), context_length=3,
                 batch_size=2)
METRICS = ["efficacy", "generalization", "chat_efficacy", "chat_generalization"]


@pytest.fixture(scope="module")
def edited():
    model, tok = tiny_model("llama")
    db = neuraldb.edit(model, tok, FACTS, config=CFG, progress=False)
    return model, tok, db


def with_template(tok):
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("answer, target, expected", [
    ("Football.", "football", True),
    ("He plays FOOTBALL, mostly", "football", True),
    ("a footballer", "football", False),  # whole words only: a longer word is another word
    ("foot ball", "football", False),
    ("Rolls-Royce makes cars", "Rolls Royce", True),  # punctuation is a word break on both sides
    ("It is in Zürich", "Zurich", True),  # accents are dropped
    ("new york city", "New York", True),
    ("york", "New York", False),
    ("", "Rome", False),
])
def test_contains_is_normalised_whole_word(answer, target, expected):
    assert chat.contains(answer, target) is expected


def test_judge_verdicts_and_nested_targets():
    assert chat.judge(answer="It's in Rome.", target_new="Rome", target_true="Paris") == "new"
    assert chat.judge(answer="Paris!", target_new="Rome", target_true="Paris") == "true"
    assert chat.judge(answer="Paris, not Rome", target_new="Rome", target_true="Paris") == "both"
    assert chat.judge(answer="I'm not sure", target_new="Rome", target_true="Paris") == "neither"
    # one target inside the other: the shorter counts only outside the longer's matches
    assert chat.judge(answer="North Korea", target_new="North Korea", target_true="Korea") == "new"
    assert chat.judge(answer="South Korea", target_new="North Korea", target_true="Korea") == "true"
    assert chat.judge(answer="Korea", target_new="Korea", target_true="North Korea") == "new"
    assert chat.normalize("Ça va, LeBron's!") == ("ca", "va", "lebron", "s")


def test_question_rule_and_prompt():
    assert chat.chat_question("The Eiffel Tower is located in ") == (
        "Complete the sentence in a few words: The Eiffel Tower is located in...")
    _, tok = tiny_model("llama")
    assert "chat template" in chat.missing_chat_template(tok)
    with pytest.raises(ValueError, match="chat template"):
        chat.chat_scores(model=None, tokenizer=tok, cases=CASES)
    ids = chat.chat_prompt_ids(with_template(tok), "the city of the eiffel tower")
    words = tok.convert_ids_to_tokens(ids)
    assert words[-3:] == ["[BOS]", "[UNK]", "[UNK]"] and words.count("[BOS]") == 2  # "assistant :" is not in WORDS
    assert words[words.index("tower") + 1:][:2] == [".", "."] and "[EOS]" in words  # "tower..." then the turn end
    assert chat.missing_chat_template(tok) is None


def test_generation_is_greedy_deterministic_and_batch_independent():
    model, tok = tiny_model("llama")
    prompts = [chat.chat_prompt_ids(with_template(tok), t) for t in
               ("the city of the eiffel tower", "lebron james", "the sport of lebron james is a big one")]
    one = chat.generate_answers(model=model, tokenizer=tok, prompts=prompts, max_new_tokens=6, batch_size=1)
    many = chat.generate_answers(model=model, tokenizer=tok, prompts=prompts, max_new_tokens=6, batch_size=3)
    assert one == many == chat.generate_answers(model=model, tokenizer=tok, prompts=prompts, max_new_tokens=6)
    assert all(0 < len(a.split()) <= 6 for a in one)


class Scripted(nn.Module):
    """A 'model' whose generate appends fixed tokens: checks the cut at EOS and left padding."""

    def __init__(self, new_tokens):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.new_tokens = new_tokens
        self.seen = []

    def generate(self, *, input_ids, attention_mask, max_new_tokens, **kw):
        self.seen.append((input_ids.clone(), attention_mask.clone()))
        new = torch.tensor([self.new_tokens[:max_new_tokens]] * input_ids.shape[0])
        return torch.cat([input_ids, new], dim=1)


def test_answers_stop_at_eos_and_prompts_are_left_padded():
    _, tok = tiny_model("llama")
    rome, paris, eos = (tok.convert_tokens_to_ids(w) for w in ("rome", "paris", "[EOS]"))
    model = Scripted([rome, eos, paris, paris])
    answers = chat.generate_answers(model=model, tokenizer=tok, prompts=[[5, 6, 7], [8]], max_new_tokens=4)
    assert answers == ["rome", "rome"]
    ids, mask = model.seen[0]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]] and ids[1, -1] == 8


def test_without_chat_template_the_metrics_are_skipped_with_the_reason(edited, tmp_path):
    model, _, db = edited
    _, tok = tiny_model("llama")  # no chat template
    r = neuraldb.evaluate(model, db, tokenizer=tok, dataset=CASES, metrics=METRICS, batch_size=2, progress=False,
                          output_dir=tmp_path)
    for name in ("chat_efficacy", "chat_generalization"):
        assert r["metrics"][name]["skipped"] and "chat template" in r["metrics"][name]["reason"]
    assert r["metrics"]["efficacy"]["post"]["mean"] == 100.0
    md = (tmp_path / "report.md").read_text()
    assert "Chat metrics skipped: " in md and "| chat_efficacy (%) | skipped (see notes)" in md


def test_pre_post_report_round_trip(edited, tmp_path):
    model, tok, db = edited
    r = neuraldb.evaluate(model, db, tokenizer=with_template(tok), dataset=CASES, metrics=METRICS, batch_size=2,
                          progress=False, output_dir=tmp_path)
    eff, gen = r["metrics"]["chat_efficacy"], r["metrics"]["chat_generalization"]
    assert eff["kind"] == "proportion" and eff["pre"]["n"] == eff["post"]["n"] == 2 and eff["post"]["ci"]
    assert gen["kind"] == "mean" and gen["pre"]["mean"] is not None
    assert sum(eff["verdicts"]["post"].values()) == 2 and sum(gen["verdicts"]["pre"].values()) == 3
    assert eff["question"] == chat.QUESTION and eff["max_new_tokens"] == 16 and len(eff["examples"]) == 2
    rows = r["cases"][0]["detail"]["post"]["chat"]
    assert [g for g, _, _ in rows] == ["edit", "paraphrase", "paraphrase"]
    assert all(v in chat.VERDICTS for _, _, v in rows)
    saved = rep.load_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Teacher-forced vs generated (chat)" in md and "| efficacy / chat_efficacy |" in md
    assert "| generalization / chat_generalization |" in md and rep.render_markdown(saved) == md


def test_judged_answers_reach_the_report(edited, monkeypatch):
    model, tok, db = edited

    def scripted(*, model, tokenizer, prompts, max_new_tokens, batch_size):  # "post": the store is attached
        return ["Rome." if db.is_attached else "Paris, of course"] * len(prompts)

    monkeypatch.setattr(chat, "generate_answers", scripted)
    r = neuraldb.evaluate(model, db, tokenizer=with_template(tok), dataset=CASES[:1], metrics=["chat_efficacy"],
                          batch_size=2, progress=False)
    eff = r["metrics"]["chat_efficacy"]
    assert eff["pre"]["mean"] == 0.0 and eff["post"]["mean"] == 100.0
    assert eff["verdicts"] == {"pre": {"new": 0, "true": 1, "both": 0, "neither": 0},
                               "post": {"new": 1, "true": 0, "both": 0, "neither": 0}}


@pytest.mark.slow
def test_smollm2_chat(smollm2, shared_data):
    from evals.datasets import editable_cases, load_counterfact

    model, tok = smollm2
    assert chat.missing_chat_template(tok) is None
    cases, _ = editable_cases(load_counterfact(data_dir=shared_data, limit=8), tok)
    db = neuraldb.edit(model, tok, [c.fact for c in cases], progress=False)
    r = neuraldb.evaluate(model, db, tokenizer=tok, dataset=cases, metrics=METRICS, batch_size=8, progress=False)
    m = r["metrics"]
    log.warning("SmolLM2 %d cases: ES %.1f -> %.1f, chat_efficacy %.1f -> %.1f, PS %.1f -> %.1f, "
                "chat_generalization %.1f -> %.1f; post verdicts %s; examples %s", len(cases),
                m["efficacy"]["pre"]["mean"], m["efficacy"]["post"]["mean"], m["chat_efficacy"]["pre"]["mean"],
                m["chat_efficacy"]["post"]["mean"], m["generalization"]["pre"]["mean"],
                m["generalization"]["post"]["mean"], m["chat_generalization"]["pre"]["mean"],
                m["chat_generalization"]["post"]["mean"], m["chat_efficacy"]["verdicts"]["post"],
                m["chat_efficacy"]["examples"])
    assert m["chat_efficacy"]["pre"]["n"] == len(cases) and m["chat_efficacy"]["post"]["mean"] is not None
    answers = [a for c in r["cases"] for _, a, _ in c["detail"]["post"]["chat"]]
    assert answers and all(isinstance(a, str) for a in answers) and any(answers)
