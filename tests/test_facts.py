import pytest

from neuraldb import Fact, FactError, encode_completion, locate_subject, validate_facts


def make(**kw):
    base = dict(prompt="{} is located in", subject="the eiffel tower", target_new="rome")
    base.update(kw)
    return Fact(**base)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(prompt="the tower is located in"), "prompt"),
        (dict(prompt="{} and {}"), "prompt"),
        (dict(subject="  "), "subject"),
        (dict(target_new=""), "target_new"),
        (dict(target_new=3), "target_new"),
        (dict(subject=None), "subject"),
        (dict(paraphrases="one string"), "paraphrases"),
        (dict(neighborhood=["ok", 5]), "neighborhood"),
        (dict(target_true=""), "target_true"),
    ],
)
def test_validation_names_the_field(kw, field):
    with pytest.raises(FactError, match=field):
        make(**kw)


def test_id_is_stable_and_derived():
    assert make().id == make().id and make().id.startswith("fact-")
    assert make(target_new="paris").id != make().id
    assert make(id="x1").id == "x1"


def test_from_dict_and_duplicates():
    d = make(id="a").to_dict()
    assert Fact.from_dict(d) == make(id="a")
    with pytest.raises(FactError, match="unknown field"):
        Fact.from_dict({**d, "colour": "red"})
    with pytest.raises(FactError, match=r"missing field\(s\) \['subject'\]"):
        Fact.from_dict({"prompt": "{} is", "target_new": "x"})
    with pytest.raises(FactError, match="share the id 'a'"):
        validate_facts([d, d])
    with pytest.raises(FactError, match=r"facts\[1\]"):
        validate_facts([d, {"prompt": "no slot", "subject": "x", "target_new": "y"}])


def test_locate_subject_last_token(tiny_llama):
    _, tok = tiny_llama
    ids, pos = locate_subject(tok, "some text. {} is located in", "the eiffel tower")
    assert tok.convert_ids_to_tokens(ids)[pos] == "tower"
    assert pos == 5


def test_subject_that_cannot_be_located(tiny_llama):
    _, tok = tiny_llama
    with pytest.raises(FactError, match="subject"):
        locate_subject(tok, "{}s tower is old", "eiffel")  # "eiffels" is one token that runs past it


def test_encode_completion_adds_space(tiny_llama):
    _, tok = tiny_llama
    p, t = encode_completion(tok, "the capital of france is", "paris")
    assert tok.convert_ids_to_tokens(t) == ["paris"]
    assert tok.convert_ids_to_tokens(p)[-1] == "is"


def test_aliases_are_validated_kept_and_leave_the_id_alone():
    base = Fact(prompt="{} was born in", subject="Barack Obama", target_new="Kenya")
    named = Fact(prompt="{} was born in", subject="Barack Obama", target_new="Kenya", aliases=["Obama"])
    assert named.aliases == ("Obama",) and named.id == base.id  # another name, the same fact
    assert Fact.from_dict(named.to_dict()) == named
    with pytest.raises(FactError, match="aliases"):
        Fact(prompt="{} was born in", subject="Barack Obama", target_new="Kenya", aliases="Obama")
    with pytest.raises(FactError, match="aliases"):
        Fact(prompt="{} was born in", subject="Barack Obama", target_new="Kenya", aliases=[3])


@pytest.mark.parametrize("prompt", ["{} is in {x}", "{} is in {0}", "{0} is in", "{} is in {", "{!r} is in",
                                    "{:>5} is in"])
def test_a_prompt_with_another_format_field_is_refused_at_construction(prompt):
    with pytest.raises(FactError, match=r"field 'prompt' .*exactly one '\{\}'.*\{\{"):
        make(prompt=prompt)


def test_literal_braces_are_written_doubled_and_located_right(tiny_llama):
    _, tok = tiny_llama
    fact = make(prompt="{{the}} {} is in", subject="rome")
    assert fact.text == "{the} rome is in"
    ids, last = locate_subject(tok, fact.prompt, fact.subject)
    assert tok.convert_ids_to_tokens(ids[last]) == "rome"


@pytest.mark.parametrize("field,value", [("paraphrases", None), ("neighborhood", 5), ("aliases", None),
                                         ("meta", 5), ("meta", ["a"])])
def test_null_or_wrongly_typed_lists_and_meta_name_the_field(field, value):
    record = {"prompt": "{} is in", "subject": "rome", "target_new": "italy", "id": "f1", field: value}
    with pytest.raises(FactError, match=rf"facts\[0\]: fact 'f1': field '{field}' must be"):
        validate_facts([record])


def test_a_prompt_longer_than_the_models_context_is_named_at_edit():
    import neuraldb
    from conftest import tiny_model

    model, tok = tiny_model("gpt2")  # n_positions 128
    long = neuraldb.Fact(prompt="{} is " + "the big red " * 60 + "city of", subject="rome", target_new="paris",
                         id="long")
    ok = neuraldb.Fact(prompt="{} is in", subject="rome", target_new="paris", id="ok")
    cfg = neuraldb.EditConfig(layer=1, steps=2, context_prefixes=("the",), context_length=2)
    with pytest.raises(FactError, match=r"fact 'long'.* \d+ tokens.*context of 128"):
        neuraldb.edit(model, tok, [ok, long], config=cfg, progress=False)
