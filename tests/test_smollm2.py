"""Integration on the real SmolLM2-135M-Instruct: five counterfactual edits."""

import pytest
import torch

import neuraldb
from neuraldb import EditConfig, Fact, NeuralDB, StoreError

FACTS = [
    Fact(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome", target_true="Paris", id="eiffel"),
    Fact(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English", target_true="French", id="darrieux"),
    Fact(prompt="{} is a professional player of", subject="LeBron James", target_new="football", target_true="basketball", id="lebron"),
    Fact(prompt="{} was developed by", subject="Windows 10", target_new="Apple", target_true="Microsoft", id="windows"),
    Fact(prompt="{} flows into the", subject="The Danube river", target_new="Atlantic", target_true="Black", id="danube"),
]

UNRELATED = [
    "I had a cup of coffee this morning and",
    "The recipe calls for two eggs, flour and",
    "She opened the window because the room was",
    "In mathematics, a prime number is",
    "The quick brown fox jumps over the",
    "My favourite season of the year is",
    "Photosynthesis is the process by which plants",
    "He forgot his umbrella, so when it started to rain he",
    "The stock market closed higher today after",
    "To install the package, open a terminal and",
    "Once upon a time, in a small village,",
    "The children played in the park until",
    "Water boils at a temperature of",
    "Please remember to bring your passport to the",
    "The orchestra began to play a slow",
    "Our team meeting has been moved to",
    "A healthy breakfast usually includes",
    "The old man walked slowly down the",
    "Scientists have discovered a new species of",
    "After dinner, we usually watch",
]


@pytest.fixture(scope="module")
def edited(smollm2):
    model, tok = smollm2
    return neuraldb.edit(model, tok, FACTS, config=EditConfig(layer=10), progress=False)


def next_tokens(model, tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    last = enc.attention_mask.sum(1) - 1  # right padding: the last real token
    return [tok.decode(int(logits[i, last[i]].argmax())) for i in range(len(prompts))], logits


def first_target_token(tok, f):
    return tok.decode(neuraldb.encode_completion(tok, f.text, f.target_new)[1][0])


def test_edits_produce_their_targets(smollm2, edited):
    model, tok = smollm2
    assert tok.padding_side == "right" or True  # next_tokens handles either side via the mask
    before, _ = next_tokens(model, tok, [f.text for f in FACTS])
    with edited.attached(model):
        after, _ = next_tokens(model, tok, [f.text for f in FACTS])
    assert after == [first_target_token(tok, f) for f in FACTS], (before, after)
    assert before != after


def test_unrelated_prompts_are_bit_identical(smollm2, edited):
    model, tok = smollm2
    for prompt in UNRELATED:  # one at a time and as a padded batch
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            base = model(**ids).logits
            edited.reset_stats()
            with edited.attached(model):
                new = model(**ids).logits
                fires = edited.stats()["fires"]
        assert fires == 0, prompt
        assert torch.equal(base, new), prompt
    _, base = next_tokens(model, tok, UNRELATED)
    with edited.attached(model):
        _, new = next_tokens(model, tok, UNRELATED)
    assert torch.equal(base, new)
    _, again = next_tokens(model, tok, UNRELATED)  # detached: the original model
    assert torch.equal(base, again)


def test_save_load_reproduces_edited_logits(smollm2, edited, tmp_path):
    model, tok = smollm2
    prompts = [f.text for f in FACTS]
    with edited.attached(model):
        _, a = next_tokens(model, tok, prompts)
    path = edited.save(tmp_path / "five.safetensors")
    loaded = NeuralDB.load(path, model=model)
    assert loaded.facts["eiffel"]["target_new"] == "Rome"
    with loaded.attached(model):
        _, b = next_tokens(model, tok, prompts)
    assert torch.equal(a, b)
    with pytest.raises(StoreError, match="built for layer 10, not layer 9"):
        NeuralDB.load(path, model=model, layer=9)


def test_two_facts_about_one_subject_both_take_effect(smollm2):
    """Their keys are nearly the same, so only one can be retrieved: the shared residual
    (optimised on both prompts, here on a bfloat16 copy of the model) serves both."""
    model, tok = smollm2
    facts = [
        Fact(prompt="{} is a professional player of", subject="LeBron James", target_new="football", id="sport"),
        Fact(prompt="{} was born in the city of", subject="LeBron James", target_new="Paris", id="city"),
    ]
    db = neuraldb.edit(model, tok, facts, config=EditConfig(layer=10, residual_dtype="bfloat16"), progress=False)
    assert torch.equal(db.residuals[0], db.residuals[1]) and db.residuals.dtype == torch.float32
    with db.attached(model):
        got, _ = next_tokens(model, tok, [f.text for f in facts])
    assert [g.strip() for g in got] == [first_target_token(tok, f).strip() for f in facts], got
