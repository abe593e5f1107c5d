"""Depth-sampled capture: three traced layers plus replicas must equal a full trace.

The reference is the full ``torch.export`` trace of the same model: the stitched graph
must hold the same operations, detect the same streams, and the converted models must
compute the same outputs. The fallback cases check that a model which reads its
layer list's length, indexes it, returns per-layer values or special-cases one depth
is traced in full instead of being silently mis-stitched.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import asdict

import pytest
import torch
from torch import nn

import attnres_rewrite as ar
from attnres_rewrite.api import convert_captured, fresh_inputs, inspect_captured
from attnres_rewrite.errors import InvalidInputError
from attnres_rewrite.passes.capture import capture
from attnres_rewrite.passes.sampled_trace import RepeatedStack, find_repeated_stacks
from attnres_rewrite.samples import get as sample

T = pytest.importorskip("transformers")
import tiny_hf  # noqa: E402  (needs transformers)

SAMPLED = "sampled trace: traced layers 0, 1 and the last"


def _ops(gm: torch.fx.GraphModule) -> Counter:
    return Counter((n.op, "attr" if n.op == "get_attr" else str(n.target)) for n in gm.graph.nodes)


def _streams(captured) -> list[dict]:
    return [asdict(s) for s in inspect_captured(captured).streams]


def _tensors(out) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


# --------------------------------------------------------------------------------------
# models


class Block(nn.Module):
    def __init__(self, d: int, index: int = 0, special: int = -1) -> None:
        super().__init__()
        self.layer_idx = index  # allowed to differ between layers
        self.special = special  # the layer index whose forward differs (code, not attributes)
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Linear(d, d)

    def forward(self, x):
        y = self.ff(self.norm(x))
        if self.special >= 0 and self.layer_idx == self.special:
            y = 2 * y
        return x + y


class Toy(nn.Module):
    """A pre-norm stack; ``style`` picks how the forward walks the layers."""

    def __init__(self, layers: int = 6, d: int = 12, style: str = "iterate", container=nn.ModuleList) -> None:
        super().__init__()
        self.style = style
        self.embed = nn.Embedding(50, d)
        special = layers - 2 if style == "index_branch" else -1
        blocks = [Block(d, i, special) for i in range(layers)]
        self.layers = nn.Sequential(*blocks) if container is nn.Sequential else nn.ModuleList(blocks)
        self.head = nn.Linear(d, 5)

    def forward(self, ids):
        x = self.embed(ids)
        if self.style == "sequential":
            x = self.layers(x)
        elif self.style == "len":
            for i in range(len(self.layers)):
                x = self.layers[i](x)
        elif self.style == "scaled_by_depth":
            count = 0
            for layer in self.layers:
                x = layer(x)
                count += 1
            x = x / count
        elif self.style == "collect":
            outs = []
            for layer in self.layers:
                x = layer(x)
                outs.append(x)
            x = torch.stack(outs).sum(0)
        elif self.style == "enumerate_branch":
            for i, layer in enumerate(self.layers):
                x = layer(2 * x) if i == 3 else layer(x)
        elif self.style == "early_exit":
            for i, layer in enumerate(self.layers):
                if i == 4:
                    break
                x = layer(x)
        else:
            for layer in self.layers[:]:
                x = layer(x)
        return self.head(x)


def _toy(style="iterate", layers=6, container=nn.ModuleList):
    torch.manual_seed(0)
    return Toy(layers, style=style, container=container).eval(), (torch.randint(0, 50, (2, 7)),)


# --------------------------------------------------------------------------------------
# sampled == full


# (NeoX's parallel branches: the "parallel" sample below; its stack is a plain ModuleList like llama's)
HF = {"llama": tiny_hf.llama, "gpt2": tiny_hf.gpt2, "t5": tiny_hf.t5, "vit": tiny_hf.vit}


@pytest.mark.parametrize("name", sorted(HF))
def test_sampled_trace_equals_full_trace_on_hf_models(name):
    torch.manual_seed(0)
    # four layers are the fewest that sample (first, second and last traced, the third
    # replicated); T5 has two stacks and two owners to capture, so it gets only that
    model, inputs = HF[name](4 if name == "t5" else 5)
    model.eval()
    full = capture(model, inputs, trace_depth="full")
    sampled = capture(model, inputs, trace_depth="sampled")
    assert any(n.startswith(SAMPLED) for n in sampled.notes), sampled.notes
    assert _ops(sampled.module) == _ops(full.module)
    assert _streams(sampled) == _streams(full)
    a = convert_captured(full, mode="exact", num_blocks=3)
    b = convert_captured(sampled, mode="exact", num_blocks=3)
    assert [asdict(s) for s in a.attnres.plan.streams] == [asdict(s) for s in b.attnres.plan.streams]
    assert sorted(a.state_dict()) == sorted(b.state_dict())
    fresh = fresh_inputs(inputs, seq_delta=0 if name == "vit" else 3)
    for x, y in zip(_tensors(_call(a, fresh)), _tensors(_call(b, fresh)), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2", "parallel", "vit"])
def test_sampled_trace_equals_full_trace_on_samples(name):
    model, inputs = sample(name, layers=5)
    full = capture(model, inputs, trace_depth="full")
    sampled = capture(model, inputs, trace_depth="sampled")
    assert any(n.startswith(SAMPLED) for n in sampled.notes), sampled.notes
    assert _ops(sampled.module) == _ops(full.module)
    assert _streams(sampled) == _streams(full)
    fresh = fresh_inputs(inputs, seq_delta=0 if name == "vit" else 2)
    torch.testing.assert_close(_call(sampled.module, fresh), _call(model, fresh), rtol=0, atol=0)


def test_sequential_stack_is_sampled():
    model, inputs = _toy("sequential", container=nn.Sequential)
    captured = capture(model, inputs, trace_depth="sampled")
    assert any(n.startswith(SAMPLED) for n in captured.notes)
    converted = convert_captured(captured, mode="exact")
    assert converted.attnres.plan.streams[0].num_sublayers == 6
    ids = torch.randint(0, 50, (3, 4))
    torch.testing.assert_close(_call(converted, (ids,)), _call(model, (ids,)), rtol=1e-5, atol=1e-5)


def test_every_take_of_the_module_is_stitched():
    """convert_captured twice on one capture: the second graph is rebuilt from the program and stitched again."""
    model, inputs = _toy()
    captured = capture(model, inputs, trace_depth="sampled")
    first = convert_captured(captured, mode="exact", num_blocks=2)
    second = convert_captured(captured, mode="exact", num_blocks=3)
    assert first.attnres.plan.streams[0].num_sublayers == second.attnres.plan.streams[0].num_sublayers == 6
    ids = torch.randint(0, 50, (1, 9))
    torch.testing.assert_close(_call(second, (ids,)), _call(model, (ids,)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["len", "scaled_by_depth"])
def test_loops_that_read_the_depth_see_the_real_depth(style):
    """The model's own loop walks every layer (the middle ones compute nothing), so len() and counters are right."""
    with torch.device("meta"):
        meta = Toy(6, style=style).eval()
    inputs = (torch.randint(0, 50, (2, 7)),)
    captured = capture(meta, inputs)
    assert any(n.startswith(SAMPLED) for n in captured.notes), captured.notes
    real, _ = _toy(style)
    captured.module.load_state_dict(real.state_dict(), assign=True)
    ids = torch.randint(0, 50, (3, 5))
    torch.testing.assert_close(_call(captured.module, (ids,)), _call(real, (ids,)), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# fallbacks: traced in full, with a note saying why


@pytest.mark.parametrize(
    ("style", "why"),
    [
        ("collect", "outside the stack reads a value of layers.0"),
        ("index_branch", "layers.1.layer_idx is computed with"),
        ("enumerate_branch", "layers.3 is called with other arguments than layers.1"),
        ("early_exit", "not each called once, in order (calls: [0, 1, 2, 3])"),
    ],
)
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_depth_dependent_models_are_traced_in_full(style, why, device):
    """On meta only the structural checks stand between sampling and a wrong graph; they must refuse."""
    with torch.device(device):
        model = Toy(6, style=style).eval()
    inputs = (torch.randint(0, 50, (2, 7)),)
    captured = capture(model, inputs, trace_depth="sampled")
    assert not any(n.startswith(SAMPLED) for n in captured.notes)
    (note,) = [n for n in captured.notes if n.startswith("sampled trace of layers (6 layers) not used")]
    assert why in note
    assert not captured.sampled
    if device == "cpu":
        ids = torch.randint(0, 50, (3, 5))
        torch.testing.assert_close(_call(captured.module, (ids,)), _call(model, (ids,)), rtol=0, atol=0)


def test_outputs_are_checked_when_the_weights_are_real(monkeypatch):
    """A difference no structural check sees (global state) is caught by running both on the example."""
    model, inputs = _toy()
    special = {id(model.layers[3])}  # a registry outside the model: invisible to the structural checks

    def registry_forward(self, x):
        y = self.ff(self.norm(x))
        return x + (2 * y if id(self) in special else y)

    monkeypatch.setattr(Block, "forward", registry_forward)
    captured = capture(model, inputs, trace_depth="sampled")
    assert any("outputs differ from the model's on the example inputs" in n for n in captured.notes), captured.notes


def test_layers_that_differ_are_not_a_repeated_stack():
    model, _ = _toy()
    assert find_repeated_stacks(model) == [RepeatedStack("layers", 6)]
    model.layers[3].norm.eps = 1e-3
    assert find_repeated_stacks(model) == []
    model, _ = _toy()
    model.layers[0].norm = nn.RMSNorm(12)  # member 0 may differ (T5 keeps its position bias there)
    assert find_repeated_stacks(model) == [RepeatedStack("layers", 6)]
    model.layers[4].ff = nn.Linear(12, 12, bias=False)
    assert find_repeated_stacks(model) == []
    assert find_repeated_stacks(_toy(layers=3)[0]) == []


def test_hooks_and_patches_are_removed_after_tracing():
    model, inputs = _toy("index_branch")
    capture(model, inputs, trace_depth="sampled")
    for member in model.layers:
        assert not member._forward_hooks and not member._forward_pre_hooks
        assert "forward" not in vars(member)
        assert type(member.layer_idx) is int
    assert find_repeated_stacks(model) == [RepeatedStack("layers", 6)]


def test_bad_trace_depth_is_rejected():
    model, inputs = _toy()
    with pytest.raises(InvalidInputError, match="trace_depth must be one of auto, full, sampled, got 'half'"):
        capture(model, inputs, trace_depth="half")


# --------------------------------------------------------------------------------------
# meta device: sampled by default, real weights attached by name afterwards


def test_auto_samples_meta_models_and_traces_real_ones_in_full():
    model, inputs = _toy()
    assert not any(n.startswith(SAMPLED) for n in capture(model, inputs).notes)
    with torch.device("meta"):
        meta = Toy(6, style="iterate").eval()
    assert any(n.startswith(SAMPLED) for n in capture(meta, inputs).notes)


def test_meta_conversion_then_real_weights_equals_converting_the_real_model():
    torch.manual_seed(0)
    real, inputs = tiny_hf.llama(6)
    real.eval()
    with torch.device("meta"):
        meta = T.LlamaForCausalLM(real.config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_meta = ar.convert(meta, inputs, num_blocks=3, mode="exact")
        reference = ar.convert(real, inputs, num_blocks=3, mode="exact", trace_depth="full")
    assert any(n.startswith(SAMPLED) for n in on_meta.attnres.plan.notes)
    assert all(p.device.type == "meta" for p in on_meta.parameters())
    ar.attach_weights(on_meta, real)
    assert not any(t.device.type == "meta" for t in (*on_meta.parameters(), *on_meta.buffers()))
    fresh = fresh_inputs(inputs)
    torch.testing.assert_close(_call(on_meta, fresh).logits, _call(reference, fresh).logits, rtol=0, atol=0)
