"""Hugging Face transformers models from tiny configs (random weights, nothing downloaded).

Each model is traced once; the test checks the exact stream and sublayer counts and
exact-mode equivalence on inputs of another batch size and sequence length.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from attnres_rewrite.api import convert_captured, equivalence, inspect_captured, rewritten_graphs
from attnres_rewrite.errors import NotConvertibleError
from attnres_rewrite.passes.capture import capture

pytest.importorskip("transformers")
import tiny_hf  # noqa: E402  (needs transformers)

LAYERS = 2


# name -> (factory, [(sublayers, parallel inputs?) per stream])
CASES = {
    "llama": (tiny_hf.llama, [2 * LAYERS]),
    "qwen2": (tiny_hf.qwen2, [2 * LAYERS]),
    "gpt2": (tiny_hf.gpt2, [2 * LAYERS]),
    "gpt_neox": (tiny_hf.neox, [2 * LAYERS]),
    "vit": (tiny_hf.vit, [2 * LAYERS]),
    "t5": (tiny_hf.t5, [2 * LAYERS, 3 * LAYERS]),  # encoder (self, ff), decoder (self, cross, ff)
}


@pytest.fixture(scope="module", params=sorted(CASES))
def traced(request):
    factory, counts = CASES[request.param]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = factory(LAYERS)
    model.eval()
    return request.param, model, inputs, capture(model, inputs), counts


def test_streams_and_sublayer_counts(traced):
    name, model, inputs, captured, counts = traced
    report = inspect_captured(captured)
    assert [s.num_sublayers for s in report.streams] == counts
    assert all(s.kind == "prenorm" and s.convertible for s in report.streams)
    if name == "gpt_neox":
        converted = convert_captured(captured)
        (plan,) = converted.attnres.plan.streams
        assert plan.inputs == [0, 0, 1, 1]  # parallel residual: attention and MLP share an input
    if name == "t5":
        assert [s.name for s in report.streams] == ["encoder_block", "decoder_block"]


def test_exact_equivalence_on_fresh_shapes(traced):
    name, model, inputs, captured, counts = traced
    converted = convert_captured(captured, mode="exact", num_blocks=2)
    graphs = rewritten_graphs(converted, inputs).values()
    assert sum(1 for g in graphs for n in g.graph.nodes if n.target is torch.ops.attnres.block_attnres.default) > 0
    report = equivalence(model, converted, inputs)
    assert report.finite
    assert report.max_abs <= 1e-5 * report.max_ref, report
    assert report.input_shapes[0][0] == 3  # another batch size
    if name != "vit":
        assert report.input_shapes[0][1] == 10  # another sequence length


def test_paper_mode_difference_reported(traced):
    name, model, inputs, captured, counts = traced
    converted = convert_captured(captured, mode="paper")
    report = equivalence(model, converted, inputs)
    assert report.finite and report.max_rel < 0.5


def test_bert_is_post_norm():
    torch.manual_seed(0)
    model, inputs = tiny_hf.bert(LAYERS)
    captured = capture(model.eval(), inputs)
    report = inspect_captured(captured)
    assert len(report.streams) == 1
    (stream,) = report.streams
    assert stream.kind == "postnorm" and not stream.convertible
    assert "post-norm" in stream.reason
    with pytest.raises(NotConvertibleError, match="post-norm"):
        convert_captured(captured)
