"""The store as a database: one fact per (subject, prompt), upsert, forget (issue 15)."""

import copy
import json
import logging

import pytest
import torch

import neuraldb
from neuraldb import EditConfig, Fact, FactConflictError, NeuralDB, StoreError

# tiny models: prompts end on the subject (see test_edit.py); no explicit ids, so ids hash the target
CFG = EditConfig(
    layer=1, steps=80, lr=0.5, clamp_norm_factor=8.0, context_prefixes=("the", "i"), context_length=3, batch_size=2
)
SPORT = Fact(prompt="the sport of {}", subject="lebron james", target_new="tennis")
COUNTRY = Fact(prompt="the country of {}", subject="lebron james", target_new="france")
TOWER = Fact(prompt="the city of {}", subject="the eiffel tower", target_new="rome")


def logits_at(model, tok, text):
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0, -1]


def next_token(model, tok, text):
    return tok.convert_ids_to_tokens(int(logits_at(model, tok, text).argmax()))


def with_target(fact, target):
    return Fact(prompt=fact.prompt, subject=fact.subject, target_new=target)


def test_upsert_replaces_the_stored_fact_and_reports_the_old_target(tmp_path, tiny_llama, caplog):
    model, tok = tiny_llama
    db = neuraldb.edit(model, tok, [SPORT, TOWER], config=CFG, progress=False)
    db = NeuralDB.load(db.save(tmp_path / "s.safetensors"), model=model)  # a saved store upserts too
    football = with_target(SPORT, "football")
    with caplog.at_level(logging.INFO, logger="neuraldb.editor"):
        db = neuraldb.edit(model, tok, [football], config=CFG, db=db, progress=False)
    assert football.id != SPORT.id and db.ids == [TOWER.id, football.id]  # one row, the new target's id
    assert db.find(subject=SPORT.subject, prompt=SPORT.prompt) == football.id
    (r,) = db.last_edit.replaced
    assert (r.old_id, r.old_target, r.new_id, r.new_target) == (SPORT.id, "tennis", football.id, "football")
    assert db.last_edit.added == (football.id,) and db.last_edit.removed == (SPORT.id,)
    assert "'tennis' -> 'football'" in caplog.text
    with db.attached(model):
        assert next_token(model, tok, SPORT.text) == "football"

    before = db.residuals.clone()
    again = neuraldb.edit(model, tok, [football], config=CFG, db=db, progress=False)  # the same fact: a no-op
    assert again is db and torch.equal(db.residuals, before) and db.ids == [TOWER.id, football.id]
    assert db.last_edit.unchanged == (football.id,) and db.last_edit.added == ()


def test_upsert_refits_the_subject_as_if_the_old_fact_was_never_edited(tiny_llama):
    model, tok = tiny_llama
    db = neuraldb.edit(model, tok, [SPORT, COUNTRY], config=CFG, progress=False)
    football = with_target(SPORT, "football")
    db = neuraldb.edit(model, tok, [football], config=CFG, db=db, progress=False)
    assert db.last_edit.refit == (COUNTRY.id,)
    fresh = neuraldb.edit(model, tok, [football, COUNTRY], config=CFG, progress=False)
    res, want = dict(zip(db.ids, db.residuals)), dict(zip(fresh.ids, fresh.residuals))
    assert torch.equal(res[COUNTRY.id], want[COUNTRY.id]) and torch.equal(res[football.id], want[football.id])


def test_conflicting_facts_in_one_call_are_an_error_naming_both(tiny_llama):
    model, tok = tiny_llama
    football = with_target(SPORT, "football")
    with pytest.raises(FactConflictError, match=rf"{football.id}.*{SPORT.id}") as err:
        neuraldb.edit(model, tok, [SPORT, TOWER, football], config=CFG, progress=False)
    assert isinstance(err.value, ValueError) and "'football'" in str(err.value) and "'tennis'" in str(err.value)
    twice = Fact(prompt=SPORT.prompt, subject=SPORT.subject, target_new="tennis", id="mine")
    with pytest.raises(FactConflictError, match="same fact under two ids"):
        neuraldb.edit(model, tok, [SPORT, twice], config=CFG, progress=False)


def test_forget_refits_the_sibling_as_a_fresh_edit_of_it_alone(tiny_llama):
    model, tok = tiny_llama
    db = neuraldb.edit(model, tok, [SPORT, COUNTRY, TOWER], config=CFG, progress=False)
    plain = copy.deepcopy(db)
    with pytest.raises(StoreError, match="neuraldb.forget"):
        plain.remove(SPORT.id)  # its sibling still carries 'tennis'
    assert len(plain) == 3
    held = copy.deepcopy(db)
    report = neuraldb.forget(model, tok, db, [SPORT.id], restore=False)
    assert report.removed == (SPORT.id,) and report.refit == (COUNTRY.id,) and db.last_edit is report
    assert db.ids == [COUNTRY.id, TOWER.id]
    alone = neuraldb.edit(model, tok, [COUNTRY], config=CFG, progress=False)
    assert torch.equal(db.residuals[0], alone.residuals[0])
    # the default also holds the forgotten prompt to the unedited answer (on the tiny model both
    # prompts end on the subject, so one residual cannot also keep 'france': see the SmolLM2 test)
    unedited = next_token(model, tok, SPORT.text)
    neuraldb.forget(model, tok, held, [SPORT.id])
    assert held.ids == db.ids and not torch.equal(held.residuals[0], db.residuals[0])
    with held.attached(model):
        assert next_token(model, tok, SPORT.text) == unedited
    assert torch.equal(db.residuals[1], plain.residuals[2])  # another subject is untouched
    with db.attached(model):
        assert next_token(model, tok, COUNTRY.text) == "france"
    # removing every fact of a subject at once leaves nothing to re-fit
    plain.remove([SPORT.id, COUNTRY.id])
    assert plain.ids == [TOWER.id]


def test_a_forgotten_fact_without_siblings_leaves_the_model_bit_identical(tiny_llama):
    model, tok = tiny_llama
    base = logits_at(model, tok, TOWER.text)
    db = neuraldb.edit(model, tok, [SPORT, TOWER], config=CFG, progress=False)
    with db.attached(model):
        assert not torch.equal(logits_at(model, tok, TOWER.text), base)
    report = neuraldb.forget(model, tok, db, TOWER.id)
    assert report.refit == () and db.ids == [SPORT.id]
    with db.attached(model):
        assert torch.equal(logits_at(model, tok, TOWER.text), base)
    db.remove(SPORT.id)  # no sibling: db.remove is as it was
    assert len(db) == 0


def test_cli_edit_upserts_and_rejects_conflicts(tmp_path, tiny_llama, monkeypatch, capsys):
    from neuraldb import cli, models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: tiny_llama)
    facts, out = tmp_path / "facts.json", tmp_path / "store.safetensors"
    run = ["edit", "--facts", str(facts), "--out", str(out), "--layer", "1"]
    facts.write_text(json.dumps([TOWER.to_dict()]))
    assert cli.main(run) == 0
    rome = NeuralDB.load(out).ids
    facts.write_text(json.dumps([with_target(TOWER, "paris").to_dict()]))
    assert cli.main([*run, "--append"]) == 0
    assert "'rome' -> 'paris'" in capsys.readouterr().out
    db = NeuralDB.load(out)
    assert db.ids == [with_target(TOWER, "paris").id] != rome
    facts.write_text(json.dumps([TOWER.to_dict(), with_target(TOWER, "paris").to_dict()]))
    assert cli.main([*run, "--append"]) == 2
    assert "facts[1]" in capsys.readouterr().err


def test_evaluation_cases_leave_out_a_second_fact_of_one_identity():
    from conftest import word_tokenizer
    from evals.cases import EvalCase
    from evals.datasets import editable_cases

    cases = [EvalCase(case_id=i, kind="counterfact", fact=f)
             for i, f in enumerate([SPORT, TOWER, with_target(SPORT, "football")])]
    keep, notes = editable_cases(cases, word_tokenizer(), EditConfig(context_prefixes=("the",)))
    assert [c.case_id for c in keep] == [0, 1] and SPORT.id in notes[0]


@pytest.mark.slow
def test_smollm2_forget_and_upsert(smollm2):
    """Two facts about LeBron James: forget one (its prompt answers as the unedited model,
    " baseball", and the removed target is no likelier than before the edit; the sibling keeps its target), then give the sibling a new target (the new target wins,
    the old one falls below the true one)."""
    from evals.metrics.tokens import score_targets

    model, tok = smollm2
    sport = Fact(prompt="{} plays the sport of", subject="LeBron James", target_new="football",
                 target_true="basketball")
    citizen = Fact(prompt="{} is a citizen of", subject="LeBron James", target_new="Japan",
                   target_true="the United States")
    cfg = EditConfig(layer=10)

    def greedy(text):
        with torch.no_grad():
            return int(model(**tok(text, return_tensors="pt")).logits[0, -1].argmax())

    def nll(text, targets):
        return [s.mean_nll for s in score_targets(model=model, tokenizer=tok, pairs=[(text, t) for t in targets])]

    unedited, (football_unedited,) = greedy(sport.text), nll(sport.text, ["football"])
    db = neuraldb.edit(model, tok, [sport, citizen], config=cfg, progress=False)
    neuraldb.forget(model, tok, db, [sport.id])
    with db.attached(model):
        assert greedy(sport.text) == unedited
        (removed,) = nll(sport.text, ["football"])
        new, true_citizen = nll(citizen.text, ["Japan", "the United States"])
    assert removed >= football_unedited and new < true_citizen  # no likelier than before the edit
    canada = Fact(prompt=citizen.prompt, subject=citizen.subject, target_new="Canada", target_true=citizen.target_true)
    db = neuraldb.edit(model, tok, [canada], config=cfg, db=db, progress=False)
    assert db.ids == [canada.id] and db.last_edit.replaced[0].old_target == "Japan"
    with db.attached(model):
        new, old, true = nll(citizen.text, ["Canada", "Japan", "the United States"])
    assert new < true and true < old, (new, old, true)
