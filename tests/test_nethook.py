import pytest
import torch

from neuraldb import StopForward, Trace, TraceDict, resolve_arch


def _ids(tok, text="the eiffel tower is located in the city of"):
    return tok(text, return_tensors="pt").input_ids


def test_trace_retains_input_and_output(tiny):
    model, tok = tiny
    arch = resolve_arch(model)
    with Trace(model, arch.mlp_out_at(1), retain_input=True) as t:
        model(_ids(tok))
    seq = _ids(tok).shape[1]
    assert t.input.shape[:2] == (1, seq) and t.output.shape[:2] == (1, seq)
    assert t.input.shape[-1] == 64 and t.output.shape[-1] == 32  # d_ff, d_model


def test_edit_output_changes_logits_and_hooks_are_removed(tiny):
    model, tok = tiny
    arch = resolve_arch(model)
    base = model(_ids(tok)).logits
    with Trace(model, arch.mlp_out_at(1), edit_output=lambda out, x: out + 1.0):
        edited = model(_ids(tok)).logits
    assert not torch.equal(base, edited)
    assert torch.equal(model(_ids(tok)).logits, base)


def test_hooks_removed_after_exception(tiny_llama):
    model, tok = tiny_llama
    arch = resolve_arch(model)
    base = model(_ids(tok)).logits

    def boom(out, x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with Trace(model, arch.mlp_out_at(0), edit_output=boom):
            model(_ids(tok))
    assert torch.equal(model(_ids(tok)).logits, base)
    assert not model.get_submodule(arch.mlp_out_at(0))._forward_hooks


def test_stop_aborts_forward_and_is_swallowed(tiny_llama):
    model, tok = tiny_llama
    arch = resolve_arch(model)
    seen = []
    with Trace(model, arch.layer(2), retain_output=False, edit_output=lambda o, x: seen.append(1) or o):
        with Trace(model, arch.layer(0), stop=True) as t:
            model(_ids(tok))
    assert t.output is not None and seen == []  # layer 2 never ran
    with pytest.raises(StopForward):
        with Trace(model, arch.layer(0), stop=False):
            with Trace(model, arch.layer(1), stop=True):
                pass
            raise StopForward("not swallowed by a non-stopping trace")


def test_bypass_replaces_forward_and_restores_it(tiny_llama):
    model, tok = tiny_llama
    arch = resolve_arch(model)
    base = model(_ids(tok)).logits
    names = [arch.layer(i) for i in range(3)]
    with TraceDict(model, names, bypass=lambda name: (lambda h, *a, **k: h)) as td:
        skipped = model(_ids(tok)).logits
    assert not torch.equal(base, skipped)
    assert torch.equal(model(_ids(tok)).logits, base)
    assert all("forward" not in model.get_submodule(n).__dict__ for n in names)
    assert list(td) == names


def test_unknown_module_is_a_clear_error(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(LookupError, match="model.layers.99"):
        Trace(model, "model.layers.99.mlp.down_proj")


def test_retain_call_captures_kwargs(tiny_llama):
    model, tok = tiny_llama
    ids = _ids(tok)
    with Trace(model.base_model, "", retain_output=False, retain_call=True) as t:
        model(ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(t.call_kwargs["attention_mask"], torch.ones_like(ids))


def test_layer_input_is_the_traced_input_and_stops_there(tiny):
    from neuraldb.nethook import layer_input

    model, tok = tiny
    name = resolve_arch(model).mlp_out_at(1)
    with Trace(model, name, retain_input=True) as t:
        model(_ids(tok))
    seen = []
    with Trace(model, resolve_arch(model).layer(2), retain_output=False, edit_output=lambda o, x: seen.append(1) or o):
        x = layer_input(model, name, input_ids=_ids(tok))
    assert torch.equal(x, t.input) and seen == []  # the same input; layer 2 never ran
    assert not model.get_submodule(name)._forward_hooks


def test_layer_input_of_a_module_that_never_runs_is_an_error(tiny_llama):
    from neuraldb.nethook import layer_input

    model, tok = tiny_llama
    model.add_module("unused", torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="'unused' of LlamaForCausalLM did not run"):
        layer_input(model, "unused", input_ids=_ids(tok))
    assert not model.unused._forward_hooks


def test_cache_argument_and_cache_of_read_either_name(tiny_llama):
    from types import SimpleNamespace

    from neuraldb.nethook import cache_argument, cache_of

    model, tok = tiny_llama
    name = cache_argument(model)
    assert name in ("cache", "past_key_values")
    out = model(_ids(tok), use_cache=True)
    assert cache_of(out) is getattr(out, name) and cache_of(out).get_seq_length() == _ids(tok).shape[1]
    assert cache_of(model(_ids(tok), use_cache=False)) is None
    assert cache_argument(torch.nn.Linear(2, 2)) is None  # takes neither
    assert cache_of({"past_key_values": 1}) == 1 and cache_of({"cache": None, "past_key_values": 1}) is None
    assert cache_of(SimpleNamespace(past_key_values=2)) == 2 and cache_of(SimpleNamespace()) is None
