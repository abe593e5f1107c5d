"""attach_weights: a model converted on ``meta`` gets real weights by name and runs.

The reference is the same model built with real weights and converted directly:
after attaching, the meta-converted model must compute the same outputs, train, and
keep tied weights tied. Bad weights are refused with the names at fault (strictly, as
``load_state_dict(strict=True)`` does), and a refused call changes nothing.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import attnres_rewrite as ar
from attnres_rewrite.api import fresh_inputs, programs
from attnres_rewrite.errors import InvalidInputError

pytest.importorskip("transformers")
import tiny_hf  # noqa: E402  (needs transformers)


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def _gpt2(device=None):
    torch.manual_seed(0)
    model, inputs = tiny_hf.gpt2(4, device)
    return model.eval(), inputs


def _llama(device=None):
    torch.manual_seed(0)
    model, inputs = tiny_hf.llama(4, device, mask=False)
    return model.eval(), inputs


def _convert(model, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ar.convert(model, inputs, num_blocks=2, mode="exact", **kw)


@pytest.fixture(scope="module")
def meta_llama():
    """The tiny Llama converted on meta once; each test attaches weights to its own deep copy."""
    return _convert(_llama("meta")[0], _llama()[1])


@pytest.fixture
def on_meta(meta_llama):
    copied = copy.deepcopy(meta_llama)
    assert all(p.is_meta for p in copied.parameters())
    return copied


def test_gpt2_converted_on_meta_runs_with_real_weights_and_ties_stay_tied():
    real, inputs = _gpt2()
    on_meta = _convert(_gpt2("meta")[0], inputs)
    meta_inputs = {k: v.to("meta") for k, v in inputs.items()}
    assert _call(on_meta, meta_inputs).logits.is_meta  # a program captured on meta (its graph makes meta tensors)
    assert len(programs(on_meta)["transformer"]) == 1
    ar.attach_weights(on_meta, real)
    assert programs(on_meta)["transformer"] == []  # dropped: the next call captures on the weights' device
    reference = _convert(real, inputs, trace_depth="full")
    fresh = fresh_inputs(inputs)
    torch.testing.assert_close(_call(on_meta, fresh).logits, _call(reference, fresh).logits, rtol=0, atol=0)
    params = dict(on_meta.named_parameters(remove_duplicate=False))
    assert params["lm_head.weight"] is params["transformer.wte.weight"]
    (plan,) = on_meta.attnres.plan.streams
    assert torch.equal(on_meta.get_parameter(plan.query), torch.zeros(plan.num_rows, plan.dim))
    assert torch.equal(on_meta.get_parameter(plan.key_gain), torch.ones(plan.num_rows, plan.dim))


def test_attached_model_trains(on_meta):
    real, inputs = _llama()
    on_meta = ar.attach_weights(on_meta, real)
    on_meta.train()
    (plan,) = on_meta.attnres.plan.streams
    query = on_meta.get_parameter(plan.query)
    opt = torch.optim.SGD(on_meta.parameters(), lr=0.1)
    ids = inputs["input_ids"]
    for _ in range(2):
        loss = on_meta(input_ids=ids).logits.float().logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        assert query.grad is not None and query.grad.abs().sum() > 0
        assert on_meta.get_parameter("model.embed_tokens.weight").grad is not None
        opt.step()
    assert query.abs().sum() > 0


def test_state_dict_without_non_persistent_buffers_is_refused_and_nothing_changes(on_meta):
    real, inputs = _llama()
    with pytest.raises(InvalidInputError, match=r"no weights for .*rotary_emb\.inv_freq.*Pass the original model"):
        ar.attach_weights(on_meta, real.state_dict())
    assert all(p.is_meta for p in on_meta.parameters())
    full = dict(real.state_dict())
    full.update(dict(real.named_buffers()))
    ar.attach_weights(on_meta, full)
    assert not any(p.is_meta for p in on_meta.parameters())


def test_bad_weights_are_refused(on_meta):
    real, inputs = _llama()
    state = dict(real.named_parameters())
    state.update(real.named_buffers())
    wrong = dict(state, **{"model.norm.weight": torch.ones(41)})
    with pytest.raises(InvalidInputError, match=r"model\.norm\.weight: the weights have shape \(41,\), .* \(40,\)"):
        ar.attach_weights(on_meta, wrong)
    with pytest.raises(InvalidInputError, match="not meta"):
        ar.attach_weights(on_meta, state, device="meta")
    with pytest.raises(InvalidInputError, match="weights themselves are on the meta device"):
        ar.attach_weights(on_meta, _llama("meta")[0])
    with pytest.raises(InvalidInputError, match="returned by attnres_rewrite.convert"):
        ar.attach_weights(real, state)
    with pytest.raises(InvalidInputError, match="nn.Module or a state dict"):
        ar.attach_weights(on_meta, [1, 2])
    assert all(p.is_meta for p in on_meta.parameters())


def test_weights_are_cast_to_the_converted_dtype(on_meta):
    real, inputs = _llama()
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in real.state_dict().items()}
    half.update(real.named_buffers())
    ar.attach_weights(on_meta, half)
    assert {p.dtype for p in on_meta.parameters()} == {torch.float32}


def test_names_are_strict_like_load_state_dict(on_meta):
    real, inputs = _llama()
    state = dict(real.named_parameters())
    state.update(real.named_buffers())
    extra = dict(state, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(72, 40)})
    with pytest.raises(InvalidInputError, match=r"does not have: model\.layers\.9\.mlp\.up_proj\.weight.*strict=False"):
        ar.attach_weights(on_meta, extra)
    assert all(p.is_meta for p in on_meta.parameters())
    prefixed = {f"module.{k}": v for k, v in state.items()}
    for strict in (True, False):  # nothing matching is refused even when extra names are allowed
        with pytest.raises(InvalidInputError, match=r"none of the \d+ weight names match"):
            ar.attach_weights(on_meta, prefixed, strict=strict)
    ar.attach_weights(on_meta, extra, strict=False)
    assert not any(p.is_meta for p in on_meta.parameters())
    fresh = fresh_inputs(inputs)
    torch.testing.assert_close(_call(on_meta, fresh).logits, _call(real, fresh).logits, rtol=1e-5, atol=1e-5)


def test_integer_weights_are_not_cast_to_float(on_meta):
    real, inputs = _llama()
    state = dict(real.named_parameters())
    state.update(real.named_buffers())
    state["model.norm.weight"] = torch.ones(40, dtype=torch.int64)
    with pytest.raises(InvalidInputError, match=r"model\.norm\.weight: the weights are torch\.int64.*not cast"):
        ar.attach_weights(on_meta, state)
    assert all(p.is_meta for p in on_meta.parameters())
