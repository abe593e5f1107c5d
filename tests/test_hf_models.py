"""Hugging Face transformers models from tiny configs (random weights, nothing downloaded).

Each model is traced once; the test checks the exact stream and sublayer counts and
exact-mode equivalence on inputs of another batch size and sequence length.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from attnres_rewrite.api import convert_captured, equivalence, inspect_captured
from attnres_rewrite.errors import NotConvertibleError
from attnres_rewrite.passes.capture import capture

T = pytest.importorskip("transformers")

LAYERS = 2


def _ids(batch=2, seq=7, vocab=97):
    return torch.randint(0, vocab, (batch, seq))


def _llama():
    cfg = T.LlamaConfig(
        vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    return T.LlamaForCausalLM(cfg), {"input_ids": _ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def _qwen2():
    cfg = T.Qwen2Config(
        vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    return T.Qwen2ForCausalLM(cfg), {"input_ids": _ids()}


def _gpt2():
    cfg = T.GPT2Config(
        vocab_size=97, n_embd=40, n_layer=LAYERS, n_head=4, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return T.GPT2LMHeadModel(cfg), {"input_ids": _ids()}


def _neox():
    cfg = T.GPTNeoXConfig(
        vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=LAYERS, num_attention_heads=4,
        use_cache=False, use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return T.GPTNeoXForCausalLM(cfg), {"input_ids": _ids()}


def _vit():
    cfg = T.ViTConfig(
        hidden_size=40, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=72, image_size=16,
        patch_size=8,
    )  # fmt: skip
    return T.ViTModel(cfg), {"pixel_values": torch.randn(2, 3, 16, 16)}


def _t5():
    cfg = T.T5Config(
        vocab_size=97, d_model=40, d_kv=10, d_ff=72, num_layers=LAYERS, num_heads=4, use_cache=False,
    )  # fmt: skip
    return T.T5Model(cfg), {"input_ids": _ids(), "decoder_input_ids": _ids(2, 5)}


def _bert():
    cfg = T.BertConfig(
        vocab_size=97, hidden_size=40, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=72,
    )  # fmt: skip
    return T.BertModel(cfg), {"input_ids": _ids()}


# name -> (factory, [(sublayers, parallel inputs?) per stream])
CASES = {
    "llama": (_llama, [2 * LAYERS]),
    "qwen2": (_qwen2, [2 * LAYERS]),
    "gpt2": (_gpt2, [2 * LAYERS]),
    "gpt_neox": (_neox, [2 * LAYERS]),
    "vit": (_vit, [2 * LAYERS]),
    "t5": (_t5, [2 * LAYERS, 3 * LAYERS]),  # encoder (self, ff), decoder (self, cross, ff)
}


@pytest.fixture(scope="module", params=sorted(CASES))
def traced(request):
    factory, counts = CASES[request.param]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = factory()
    model.eval()
    return request.param, model, inputs, capture(model, inputs), counts


def test_streams_and_sublayer_counts(traced):
    name, model, inputs, captured, counts = traced
    report = inspect_captured(captured)
    assert [s.num_sublayers for s in report.streams] == counts
    assert all(s.kind == "prenorm" and s.convertible for s in report.streams)
    if name == "gpt_neox":
        converted = convert_captured(captured)
        (plan,) = converted.attnres_plan.streams
        assert plan.inputs == [0, 0, 1, 1]  # parallel residual: attention and MLP share an input
    if name == "t5":
        assert [s.name for s in report.streams] == ["encoder_block", "decoder_block"]


def test_exact_equivalence_on_fresh_shapes(traced):
    name, model, inputs, captured, counts = traced
    converted = convert_captured(captured, mode="exact", num_blocks=2)
    assert sum(1 for n in converted.graph.nodes if n.target is torch.ops.attnres.block_attnres.default) > 0
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
    model, inputs = _bert()
    captured = capture(model.eval(), inputs)
    report = inspect_captured(captured)
    assert len(report.streams) == 1
    (stream,) = report.streams
    assert stream.kind == "postnorm" and not stream.convertible
    assert "post-norm" in stream.reason
    with pytest.raises(NotConvertibleError, match="post-norm"):
        convert_captured(captured)
