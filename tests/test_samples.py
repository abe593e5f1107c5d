"""The sample models build, run, and survive torch.export with dynamic batch/sequence axes.

Every later pass captures these models with ``torch.export.export(strict=False)``;
a sample that only exports at its example shape would hide specialisation bugs, so
the exported program is re-run at a different batch (and sequence) size and compared
with eager.
"""

from __future__ import annotations

import pytest
import torch

from attnres_rewrite import samples
from attnres_rewrite.errors import ModelSourceError

NAMES = list(samples.SAMPLES)


def _shallow(name: str) -> dict[str, int]:
    """One layer: every layer is the same code, and export time grows with graph size."""
    return {"blocks": 1} if name == "resnet" else {"layers": 1}


def _resized(name: str) -> tuple[torch.Tensor, ...]:
    """Inputs with a batch (and for token models, sequence) size unlike the example's."""
    overrides = {"batch": 3, "seed": 5, **_shallow(name)}
    if any(1 in dims for dims in samples.module(name).DYNAMIC_DIMS):
        overrides["seq"] = 11
    return samples.get(name, **overrides)[1]


def test_registry_lists_all_families() -> None:
    assert set(NAMES) == {"llama", "gpt2", "parallel", "vit", "bert", "resnet"}


def test_unknown_sample_names_the_available_ones() -> None:
    with pytest.raises(ModelSourceError, match="available samples: llama, gpt2"):
        samples.get("gpt3")


def test_unknown_override_names_the_valid_keys() -> None:
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['layerz'\].*'layers'"):
        samples.get("llama", layerz=2)


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic_and_in_eval_mode(name: str) -> None:
    model_a, inputs_a = samples.get(name)
    model_b, inputs_b = samples.get(name)
    assert not model_a.training
    assert all(not m.training for m in model_a.modules())
    for a, b in zip(inputs_a, inputs_b):
        assert torch.equal(a, b)
    for (ka, pa), (kb, pb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert ka == kb and torch.equal(pa, pb), ka
    out = model_a(*inputs_a)
    assert out.shape[0] == inputs_a[0].shape[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_build_leaves_global_rng_alone(name: str) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    samples.get(name)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", NAMES)
def test_hidden_size_is_not_a_power_of_two(name: str) -> None:
    model, _ = samples.get(name)
    cfg = samples.module(name).Config()
    width = getattr(cfg, "dim", None) or cfg.channels
    assert width & (width - 1) != 0, width
    assert any(p.shape[-1] == width for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_dropout_is_present_and_configurable(name: str) -> None:
    model, _ = samples.get(name, dropout=0.25)
    probs = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert probs == {0.25}


@pytest.mark.parametrize("name", NAMES)
def test_export_with_dynamic_dims_matches_eager_at_other_sizes(name: str) -> None:
    model, example = samples.get(name, **_shallow(name))
    exported = torch.export.export(model, example, dynamic_shapes=samples.dynamic_shapes(name), strict=False)
    other = _resized(name)
    assert other[0].shape != example[0].shape
    with torch.no_grad():
        expected = model(*other)
        got = exported.module()(*other)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2", "parallel"])
def test_decoders_are_causal(name: str) -> None:
    """A change to the last token must not move earlier logits (the mask is really applied)."""
    model, (ids,) = samples.get(name)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 97
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_parallel_branches_read_the_same_stream_value() -> None:
    """Both branches see the layer input ``x``, not ``x + attn(...)`` (GPT-J/NeoX, not sequential)."""
    model, (ids,) = samples.get("parallel", layers=1, dropout=0.0)
    block = model.layers[0]
    x = model.embed(ids)
    expected = x + block.attn(block.ln_1(x)) + block.mlp(block.ln_2(x))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("rope", [True, False])
def test_llama_rope_switch_changes_the_model(rope: bool) -> None:
    model, (ids,) = samples.get("llama", rope=rope)
    ref, _ = samples.get("llama", rope=not rope)
    with torch.no_grad():
        assert not torch.allclose(model(ids), ref(ids))
