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
