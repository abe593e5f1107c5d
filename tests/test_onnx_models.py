"""ONNX export of converted models: the sample models and tiny Hugging Face models.

Each test converts a model, exports it with ``export_onnx`` (verification on), then
checks the file itself: ``onnx.checker``, named dynamic axes, the AttnRes form asked
for, and onnxruntime against the converted PyTorch model on inputs of a batch and
sequence length unlike the export example's (run here, not taken from the report).
For ``exact`` mode the ONNX model must also equal the *original* model (zero queries
make AttnRes reproduce the residual sum), which ties the export back to the SPEC.

Coverage is one axis at a time, not the cartesian product: each of Block/Full,
paper/exact and inline/function appears on several models. Hugging Face models are
built from tiny configs with random weights (no download, no remote code) and are
marked ``slow``. Whisper is the encoder-decoder here; T5-style attention (which failed
with ``Cannot view a tensor ...`` before issue 15, converted or not) is covered by
``test_onnx_deploy.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from test_backend import _randomize_attnres

import attnres_rewrite
from attnres_rewrite import samples
from attnres_rewrite.api import rewritten_graphs
from attnres_rewrite.onnx import export_onnx
from attnres_rewrite.onnx.verify import tensor_leaves

ort = pytest.importorskip("onnxruntime")


def _fresh(example, batch=3, seq=5, seed=11):
    """Inputs like ``example`` with another batch (and, for token ids, sequence) size."""
    gen = torch.Generator().manual_seed(seed)

    def make(t):
        shape = list(t.shape)
        shape[0] = batch
        if t.is_floating_point():
            return torch.randn(shape, generator=gen) * float(t.std())
        if t.dim() == 2:
            shape[1] = seq
        return torch.randint(0, int(t.max()) + 1, shape, generator=gen, dtype=t.dtype)

    if isinstance(example, dict):
        return {k: make(v) for k, v in example.items()}
    return tuple(make(t) for t in example)


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _count_attnres(converted, example) -> int:
    graphs = rewritten_graphs(converted, example).values()
    return sum(1 for g in graphs for n in g.graph.nodes if n.op == "call_function" and "attnres" in str(n.target))


def _check_export(path, report, converted, example, *, as_function, original=None, rel=1e-4, seq=5):
    """The assertions every converted model gets (see the module docstring)."""
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert report.verified and report.max_rel_diff <= rel
    assert report.attnres_ops == _count_attnres(converted, example) > 0
    calls = [n for n in proto.graph.node if n.domain == "attnres"]
    if as_function:
        # BlockAttnRes, and the forms the fusions make (with the norm, the last source apart)
        assert {f.domain for f in proto.functions} == {"attnres"}
        assert {n.op_type for n in calls} <= {f.name for f in proto.functions}
        assert "attnres.BlockAttnRes" in report.onnx_functions
        assert len(calls) == report.attnres_ops
    else:
        assert not calls and not proto.functions
    first_input = proto.graph.input[0].type.tensor_type.shape.dim
    assert first_input[0].dim_param == "batch"

    inputs = _fresh(example, seq=seq)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = tensor_leaves(inputs)
    got = session.run(None, {m.name: t.numpy() for m, t in zip(session.get_inputs(), feeds)})
    for reference, tol in [(converted, rel), (original, 1e-5)]:
        if reference is None:
            continue
        want = tensor_leaves(_call(reference, inputs))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            w = w.double().numpy()
            assert g.shape == w.shape
            assert np.abs(g - w).max() <= tol * np.abs(w).max(), type(reference).__name__


# --------------------------------------------------------------------------------------
# Sample models


SAMPLE_CASES = [
    # name, convert options, as_function
    ("llama", {"num_blocks": 2, "mode": "paper"}, False),
    ("gpt2", {"full": True, "mode": "exact"}, True),
    ("parallel", {"block_size": 2, "mode": "exact"}, False),
    ("vit", {"num_blocks": 2, "mode": "paper"}, True),
]


@pytest.mark.parametrize(("name", "options", "as_function"), SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_converted_sample_exports_and_matches(tmp_path, name, options, as_function):
    model, example = samples.get(name)
    converted = attnres_rewrite.convert(model, example, **options)
    if options["mode"] == "paper":
        _randomize_attnres(converted)  # as after fine-tuning (zero queries make every logit 0)
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(converted, example, path, as_function=as_function)
    token_model = not example[0].is_floating_point()
    if token_model:
        assert report.input_shapes[report.input_names[0]] == ["batch", "seq"]
    original = model if options["mode"] == "exact" else None
    _check_export(path, report, converted, example, as_function=as_function, original=original)


def test_unconvertible_sample_exports_plain_with_a_note(tmp_path):
    """BERT is post-norm, so convert refuses it (test_convert.py); exporting it as is says so in the report.

    (``require_attnres=True`` refusing such a model is test_onnx_export.py's, on a model that traces in
    milliseconds: repeating it here cost a second BERT trace.)
    """
    model, example = samples.get("bert")
    report = export_onnx(model, example, tmp_path / "bert.onnx")
    assert report.attnres_ops == 0 and any("no AttnRes op" in n for n in report.notes)
    assert report.max_rel_diff <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.onnx"]


# --------------------------------------------------------------------------------------
# Hugging Face models (tiny configs, random weights)


def _hf_model(kind):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    T = transformers
    torch.manual_seed(0)
    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=64,
        use_cache=False,
    )
    ids = {"input_ids": torch.randint(0, 64, (2, 8))}
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **small)).eval(), ids
    if kind == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, use_cache=False)
        return T.GPT2LMHeadModel(cfg).eval(), ids
    if kind == "vit":
        cfg = T.ViTConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        )
        return T.ViTModel(cfg, add_pooling_layer=False).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}
    if kind == "whisper":
        cfg = T.WhisperConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            vocab_size=64,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=32,
            use_cache=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
        example = {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": torch.randint(0, 64, (2, 6))}
        return T.WhisperModel(cfg).eval(), example
    raise ValueError(kind)


HF_CASES = [  # (qwen2 is llama's architecture plus biases: its detection is in test_hf_models, not here)
    ("llama", {"num_blocks": 2, "mode": "paper"}, True),
    ("gpt2", {"num_blocks": 2, "mode": "exact"}, False),
    ("vit", {"full": True, "mode": "paper"}, True),
    ("whisper", {"num_blocks": 2, "mode": "exact"}, False),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "options", "as_function"), HF_CASES, ids=[c[0] for c in HF_CASES])
def test_converted_hf_model_exports_and_matches(tmp_path, kind, options, as_function):
    model, example = _hf_model(kind)
    converted = attnres_rewrite.convert(model, example, **options)
    if options["mode"] == "paper":
        _randomize_attnres(converted)  # as after fine-tuning (zero queries make every logit 0)
    path = tmp_path / f"{kind}.onnx"
    report = export_onnx(converted, example, path, as_function=as_function)
    if "input_ids" in example:
        assert report.input_shapes["input_ids"] == ["batch", "seq"]
    if kind == "whisper":
        assert len(converted.attnres.plan.streams) == 2  # encoder and decoder streams
        assert report.output_names == ["last_hidden_state", "encoder_last_hidden_state"]
        assert report.input_shapes["input_features"] == ["batch", 8, 32]  # mel bins and frames are fixed
        assert not report.notes
    if kind in ("llama", "gpt2"):
        assert report.output_names == ["logits"]
    original = model if options["mode"] == "exact" else None
    _check_export(path, report, converted, example, as_function=as_function, original=original)
