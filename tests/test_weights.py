"""attach_weights: a model converted on ``meta`` gets real weights by name and runs.

The reference is the same model built with real weights and converted directly:
after attaching, the meta-converted model must compute the same outputs, train, and
keep tied weights tied. Bad weights are refused with the names at fault, and a
refused call changes nothing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import attnres_rewrite as ar
from attnres_rewrite.api import fresh_inputs
from attnres_rewrite.errors import InvalidInputError
from attnres_rewrite.weights import retarget_devices

pytest.importorskip("transformers")
import tiny_hf  # noqa: E402  (needs transformers)


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def _devices_in_graph(gm: torch.fx.GraphModule) -> set[str]:
    found = set()
    for node in gm.graph.nodes:
        for a in (*node.args, *node.kwargs.values()):
            if isinstance(a, torch.device):
                found.add(a.type)
    return found


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


def test_gpt2_converted_on_meta_runs_with_real_weights_and_ties_stay_tied():
    real, inputs = _gpt2()
    on_meta = _convert(_gpt2("meta")[0], inputs)
    assert _devices_in_graph(on_meta) == {"meta"}  # the trace baked the meta device into the graph
    ar.attach_weights(on_meta, real)
    assert "meta" not in _devices_in_graph(on_meta)
    reference = _convert(real, inputs, trace_depth="full")
    fresh = fresh_inputs(inputs)
    torch.testing.assert_close(_call(on_meta, fresh).logits, _call(reference, fresh).logits, rtol=0, atol=0)
    params = dict(on_meta.named_parameters(remove_duplicate=False))
    assert params["lm_head.weight"] is params["transformer.wte.weight"]
    (plan,) = on_meta.attnres_plan.streams
    assert torch.equal(on_meta.get_parameter(plan.query), torch.zeros(plan.num_rows, plan.dim))
    assert torch.equal(on_meta.get_parameter(plan.key_gain), torch.ones(plan.num_rows, plan.dim))


def test_attached_model_trains():
    real, inputs = _llama()
    on_meta = ar.attach_weights(_convert(_llama("meta")[0], inputs), real)
    on_meta.train()
    (plan,) = on_meta.attnres_plan.streams
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


def test_state_dict_without_non_persistent_buffers_is_refused_and_nothing_changes():
    real, inputs = _llama()
    on_meta = _convert(_llama("meta")[0], inputs)
    with pytest.raises(InvalidInputError, match=r"no weights for .*rotary_emb\.inv_freq.*Pass the original model"):
        ar.attach_weights(on_meta, real.state_dict())
    assert all(p.is_meta for p in on_meta.parameters())
    full = dict(real.state_dict())
    full.update(dict(real.named_buffers()))
    ar.attach_weights(on_meta, full)
    assert not any(p.is_meta for p in on_meta.parameters())


def test_bad_weights_are_refused():
    real, inputs = _llama()
    on_meta = _convert(_llama("meta")[0], inputs)
    state = dict(real.named_parameters())
    state.update(real.named_buffers())
    wrong = dict(state, **{"model.norm.weight": torch.ones(41)})
    with pytest.raises(InvalidInputError, match=r"model\.norm\.weight: the weights have shape \(41,\), .* \(40,\)"):
        ar.attach_weights(on_meta, wrong)
    with pytest.raises(InvalidInputError, match="not meta"):
        ar.attach_weights(on_meta, state, device="meta")
    with pytest.raises(InvalidInputError, match="weights themselves are on the meta device"):
        ar.attach_weights(on_meta, _llama("meta")[0])
    with pytest.raises(InvalidInputError, match="GraphModule convert"):
        ar.attach_weights(real, state)
    with pytest.raises(InvalidInputError, match="nn.Module or a state dict"):
        ar.attach_weights(on_meta, [1, 2])
    assert all(p.is_meta for p in on_meta.parameters())


def test_weights_are_cast_to_the_converted_dtype():
    """The graph bakes in the dtype it was traced with, so weights follow the converted model's dtype."""
    real, inputs = _llama()
    on_meta = _convert(_llama("meta")[0], inputs)
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in real.state_dict().items()}
    half.update(real.named_buffers())
    ar.attach_weights(on_meta, half)
    assert {p.dtype for p in on_meta.parameters()} == {torch.float32}


def test_retarget_devices_rewrites_device_constants():
    class Arange(nn.Module):
        def forward(self, x):
            return x + torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)

    x = torch.randn(2, 5, device="meta")
    gm = torch.export.export(Arange(), (x,), strict=False).module()
    assert _devices_in_graph(gm) == {"meta"}
    assert retarget_devices(gm, torch.device("cpu")) >= 1
    assert _devices_in_graph(gm) == {"cpu"}
    y = torch.randn(2, 5)
    torch.testing.assert_close(gm(y), y + torch.arange(5.0))
