"""The word check (neuraldb.words, EditConfig.word_check): a key fires only where its subject is."""

import pytest
import torch

import neuraldb
from neuraldb import NeuralDB, Trace, resolve_arch
from neuraldb.words import NO_FORM, NO_WORD, WORD_START, WORD_WIDTH, subject_words, token_windows, word_match, word_start_tokens


@pytest.fixture(scope="module")
def smol_tok(smollm2):
    return smollm2[1]


def matches(tok, starts, subject, text):
    """Per position of ``text``: does the window ending there spell ``subject``?"""
    words = subject_words(tok, [subject])  # (1, F, width)
    ids = torch.tensor([tok(text)["input_ids"]])
    win = token_windows(ids)[0]  # (seq, width)
    return word_match(words.expand(win.shape[0], -1, -1), win, starts).tolist()


def test_smollm2_words_tell_apart_names_that_share_a_word_piece(smol_tok):
    tok = smol_tok
    starts = word_start_tokens(tok)
    assert starts.dtype == torch.bool and starts.shape == (len(tok),)
    assert starts[tok(" ")["input_ids"][-1]] and not starts[tok("Stein")["input_ids"][0]]
    # the false fires of the paper's gate on LAMBADA / GLUE (README): same last token, another word
    assert not any(matches(tok, starts, "Brad Silverberg", "House Leader Steinberg"))
    assert not any(matches(tok, starts, "Kim Sun-a", "I convinced Rose-a"))
    assert not any(matches(tok, starts, "TV Week", "BusinessWeek Online has learned"))
    assert not any(matches(tok, starts, "Kelly Marie", "he had told Soren and Ann-Marie"))
    # the subject itself: after a space, at the start of the text, after a quote or a bracket
    m = matches(tok, starts, "Brad Silverberg", "We met Brad Silverberg today")
    assert m == [False, False, False, False, True, False]  # only at "berg" of " Silverberg"
    assert matches(tok, starts, "Turkey", "Turkey is")[1] is True  # "Tur" "key" at the start
    assert matches(tok, starts, "Turkey", '"Turkey is')[2] is True
    assert matches(tok, starts, "TV Week", "(TV Week")[-1] is True
    assert any(matches(tok, starts, "Danielle Darrieux", "Where Danielle Darrieux is from"))
    # the same surname or word of another name, and the last word alone, do not fire
    assert not any(matches(tok, starts, "Richard Sharp", '"Yeah," Aaron Sharp said'))
    assert not any(matches(tok, starts, "Ge You", "I don't eat. You know"))
    assert not any(matches(tok, starts, "Danielle Darrieux", "Where Darrieux is from"))


def rows(w):
    """The forms of one subject's (F, width) block as tuples, padding forms left out."""
    return {tuple(r) for r in w.tolist() if r[-1] != NO_FORM}


def test_subject_words_layout_and_errors(smol_tok):
    w = subject_words(smol_tok, ["Brad  Silverberg", "Paris"], width=6)  # whitespace runs count as one space
    assert w.dim() == 3 and w.shape[:1] == (2,) and w.shape[2] == 6 and w.dtype == torch.long
    spaced, bare = smol_tok(" Brad Silverberg")["input_ids"], smol_tok("Brad Silverberg")["input_ids"]
    # the form after a space needs nothing before it; the form without one must start a word
    assert rows(w[0]) == {tuple([NO_WORD] * (6 - len(spaced)) + spaced),
                          tuple([NO_WORD] * (5 - len(bare)) + [WORD_START] + bare)}
    word = "Supercalifragilisticexpialidocious-Antidisestablishmentarianism"
    long = subject_words(smol_tok, [word], width=4)
    assert tuple([NO_WORD, *smol_tok(" " + word)["input_ids"][-3:]]) in rows(long[0])  # its last 3 tokens
    assert tuple([NO_WORD, *smol_tok(word)["input_ids"][-3:]]) in rows(long[0])  # cut: no word-start marker
    with pytest.raises(ValueError, match="no word"):
        subject_words(smol_tok, ["   "])


def store_with_position_keys(model, tok, text, words, layer=1):
    """A store whose i-th key is position i's own MLP input in ``text`` (so it fires there at gamma < 1)."""
    arch = resolve_arch(model)
    ids = tok(text, return_tensors="pt").input_ids
    with Trace(model, arch.mlp_out_at(layer), retain_input=True) as t:
        model(ids)
    keys = t.input[0]  # (seq, d_ff)
    d_model = model.get_input_embeddings().weight.shape[1]
    db = NeuralDB(layer=layer, d_key=keys.shape[1], d_model=d_model, gamma=0.99, module_template=arch.mlp_out)
    db.add([f"p{i}" for i in range(len(keys))], keys, torch.ones(len(keys), d_model), words=words)
    return db, ids


def test_hook_fires_only_where_the_word_is(tiny_llama):
    model, tok = tiny_llama
    text = "the city of rome is in italy"
    n = len(tok(text)["input_ids"])
    # every key gets the subject "of rome": only position 3 ("rome") may fire, although every key matches its position
    words = subject_words(tok, ["of rome"] * n)
    db, ids = store_with_position_keys(model, tok, text, words)
    base = model(ids).logits
    with db.attached(model):
        out = model(ids).logits
        fired = db.last_fire_mask[0].tolist()
    assert fired == [i == 3 for i in range(n)]
    assert torch.equal(out[:, :3], base[:, :3]) and not torch.equal(out[:, 3:], base[:, 3:])
    # without words (the paper's gate) every position but the sink fires
    plain, _ = store_with_position_keys(model, tok, text, None)
    with plain.attached(model):
        model(ids)
        assert plain.last_fire_mask[0].tolist() == [False] + [True] * (n - 1)
    # a subject that is not in the text (its last word is): nothing fires, the logits are the unedited model's
    absent, _ = store_with_position_keys(model, tok, text, subject_words(tok, ["old rome"] * n))  # not in the text
    with absent.attached(model):
        assert torch.equal(model(ids).logits, base) and absent.stats()["fires"] == 0
    # clear_words (CLI --no-word-check on a saved store): the same keys with the paper's gate
    absent.clear_words()
    assert not absent.word_checked.any()
    with absent.attached(model):
        model(ids)
        assert absent.last_fire_mask[0].tolist() == [False] + [True] * (n - 1)


def test_word_check_sees_tokens_of_earlier_generation_steps(tiny_llama):
    model, tok = tiny_llama
    text = "the city of rome is in italy"
    ids_list = tok(text)["input_ids"]
    n = len(ids_list)
    # a two-token "word" ending at "is" (position 4): "rome" "is"
    two = torch.full((n, 2, WORD_WIDTH), NO_WORD, dtype=torch.long)
    two[:, 0, -2:] = torch.tensor(ids_list[3:5])
    two[:, 1] = two[:, 0]
    db, ids = store_with_position_keys(model, tok, text, two)
    with db.attached(model):
        model(ids)
        whole = db.last_fire_mask[0].tolist()
        # the same text fed as a prompt of 4 tokens, then one token per step with the cache
        out = model(ids[:, :4], use_cache=True)
        steps = db.last_fire_mask[0].tolist()
        cache = out.past_key_values
        for t in range(4, n):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True,
                        attention_mask=torch.ones(1, t + 1, dtype=torch.long))
            cache = out.past_key_values
            steps += db.last_fire_mask[0].tolist()
    assert whole == [i == 4 for i in range(n)]
    assert steps == whole, "a word split across two calls must be checked with the earlier call's tokens"


def test_inputs_embeds_without_ids_never_fire_checked_keys(tiny_llama, caplog):
    model, tok = tiny_llama
    text = "the city of rome is in italy"
    n = len(tok(text)["input_ids"])
    db, ids = store_with_position_keys(model, tok, text, subject_words(tok, ["rome"] * n))
    with db.attached(model), caplog.at_level("WARNING", logger="neuraldb.store"):
        model(inputs_embeds=model.get_input_embeddings()(ids))
        assert db.stats()["fires"] == 0
    assert "needs input_ids" in caplog.text


def test_words_survive_save_load_head_remove_update(tmp_path, tiny_llama):
    model, tok = tiny_llama
    text = "the city of rome is in italy"
    n = len(tok(text)["input_ids"])
    words = subject_words(tok, ["rome"] * (n - 1) + ["italy"])
    db, ids = store_with_position_keys(model, tok, text, words)
    db.word_starts = torch.tensor([True, False, True])
    back = NeuralDB.load(db.save(tmp_path / "s.safetensors"))
    assert torch.equal(back.words, db.words) and torch.equal(back.word_starts, db.word_starts)
    assert torch.equal(db.head(3).words, words[:3]) and torch.equal(db.head(3).word_starts, db.word_starts)
    db.remove("p0")
    assert torch.equal(db.words, words[1:])
    db.update("p1", words=subject_words(tok, ["city"])[0])
    assert torch.equal(db.words[0], subject_words(tok, ["city"])[0])
    with pytest.raises(neuraldb.StoreError, match="subject_words"):
        db.add(["x"], torch.ones(1, db.d_key), torch.ones(1, db.d_model), words=torch.ones(1, 2, 3))
    # a store without words saves no words tensor and loads as the paper's gate
    plain, _ = store_with_position_keys(model, tok, text, None)
    again = NeuralDB.load(plain.save(tmp_path / "p.safetensors"))
    assert not again.word_checked.any() and again.word_starts.numel() == 0


def test_edit_stores_words_unless_word_check_is_off(tiny_llama):
    model, tok = tiny_llama
    facts = [neuraldb.Fact(prompt="{} is in", subject="the city of rome", target_new="paris", id="a")]
    cfg = dict(layer=1, steps=1, context_prefixes=("the",), context_length=2)
    db = neuraldb.edit(model, tok, facts, config=neuraldb.EditConfig(**cfg), progress=False)
    assert db.word_checked.tolist() == [True] and db.word_starts.shape == (len(tok),)
    assert torch.equal(db.words, subject_words(tok, ["the city of rome"]))
    off = neuraldb.edit(model, tok, facts, config=neuraldb.EditConfig(**cfg, word_check=False), progress=False)
    assert off.word_checked.tolist() == [False]


def test_subject_at_the_start_of_a_left_padded_prompt_fires_as_unpadded(smollm2):
    """Generation pads on the left: "Turkey" opening the shorter prompt is the start of its text."""
    model, tok = smollm2
    texts = ["Turkey is a country in", "The capital city of Turkey is, as everyone knows,"]
    arch = resolve_arch(model)
    ids = tok(texts[0], return_tensors="pt").input_ids  # "Tur" "key" ...
    with Trace(model, arch.mlp_out_at(10), retain_input=True) as t:
        model(ids)
    db = NeuralDB(layer=10, d_key=1536, d_model=576, gamma=0.99, module_template=arch.mlp_out)
    db.add(["turkey"], t.input[0, 1:2], torch.zeros(1, 576), words=subject_words(tok, ["Turkey"]))
    db.word_starts = word_start_tokens(tok)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    with db.attached(model):
        model(ids)
        alone = db.last_fire_mask[0].tolist()
        model(**enc)
        padded = db.last_fire_mask
    pad = int((enc["attention_mask"][0] == 0).sum())
    assert pad > 0 and alone == [False, True] + [False] * (len(alone) - 2)
    assert padded[0, pad:].tolist() == alone and not padded[0, :pad].any()


def test_a_new_generation_does_not_inherit_the_previous_ones_tokens(smollm2):
    """``generate`` without an attention mask: the cache already holds this call's tokens when the
    edited layer runs, so the hook must not take the previous generation's last tokens as this
    text's history ("Turkey" opening the second prompt is still the start of a text)."""
    model, tok = smollm2
    arch = resolve_arch(model)
    ids = tok("Turkey is a country in", return_tensors="pt").input_ids
    with Trace(model, arch.mlp_out_at(10), retain_input=True) as t:
        model(ids)
    db = NeuralDB(layer=10, d_key=1536, d_model=576, gamma=0.99, module_template=arch.mlp_out)
    db.add(["turkey"], t.input[0, 1:2], torch.zeros(1, 576), words=subject_words(tok, ["Turkey"]))
    db.word_starts = word_start_tokens(tok)
    other = tok("The capital of France is", return_tensors="pt").input_ids
    with db.attached(model):
        model.generate(input_ids=other, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
        db.reset_stats()
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
        assert db.stats()["fires"] >= 1 and int(db.fires_per_fact[0]) >= 1


def test_a_leading_article_is_optional_only_where_two_words_remain(smol_tok):
    from neuraldb.words import name_variants

    assert name_variants("The Eiffel Tower") == ["The Eiffel Tower", "the Eiffel Tower", "Eiffel Tower"]
    assert name_variants("an  Apple") == ["an Apple", "An Apple"]  # one word: the article stays
    assert name_variants("The Who") == ["The Who", "the Who"]
    assert name_variants("Barack Obama") == ["Barack Obama"]
    starts = word_start_tokens(smol_tok)
    assert not any(matches(smol_tok, starts, "The Who", "Who is there? I asked."))
    assert not any(matches(smol_tok, starts, "The Nanny", ", mum,' he said to Nanny"))  # LAMBADA passage
    assert any(matches(smol_tok, starts, "The Who", "I saw the Who play live."))
    assert any(matches(smol_tok, starts, "The Eiffel Tower", "Eiffel Tower tickets"))
