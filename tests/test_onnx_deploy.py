"""ONNX export of model kinds that failed before issue 15 (tiny configs, random weights, nothing downloaded).

- T5-style attention: ``Cannot view a tensor with shape ... and strides ...`` when the
  exporter re-decomposed a ``reshape`` of a transposed attention output;
- mixture-of-experts decoders: ``No ONNX function found for transformers.grouped_mm_fallback``.

(ViT-family encoders returned NaN because the optimiser dropped the key-norm ``+ eps`` of
1e-12 and a zero token gave ``1 / sqrt(0)``; ``test_onnx_export.py::
test_tiny_eps_survives_the_optimiser_so_zero_rows_stay_finite`` reproduces that in one
second, so no DeiT export, ~25 s, is spent here.)

Every model is converted in ``exact`` mode, so the ONNX file must also reproduce the
*original* model (zero queries make AttnRes the residual sum): that is the reference
here, run in PyTorch on new input shapes, independent of the export's own verification.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnres_rewrite
from attnres_rewrite.onnx import export_onnx
from attnres_rewrite.onnx.verify import tensor_leaves

ort = pytest.importorskip("onnxruntime")
T = pytest.importorskip("transformers")


def _t5_encoder():
    cfg = T.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, use_cache=False)
    model = T.T5EncoderModel(cfg)
    return model, {"input_ids": torch.randint(0, 32, (2, 7))}, {"input_ids": torch.randint(0, 32, (3, 5))}


def _moe():
    cfg = T.Qwen3MoeConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        use_cache=False,
    )  # fmt: skip
    model = T.Qwen3MoeForCausalLM(cfg)
    return model, {"input_ids": torch.randint(0, 32, (2, 7))}, {"input_ids": torch.randint(0, 32, (3, 5))}


def _export_and_compare(tmp_path, build):
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    model, example, fresh = build()
    model.eval()
    with torch.no_grad():
        want = [t.double().numpy() for t in tensor_leaves(model(**fresh))]
    converted = attnres_rewrite.convert(model, example, mode="exact")
    path = tmp_path / "model.onnx"
    report = export_onnx(converted, example, path, verify=False)  # checked here, against the original
    assert report.attnres_ops > 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: fresh[i.name].numpy() for i in session.get_inputs()})
    assert np.isfinite(got[0]).all()
    scale = np.abs(want[0]).max()
    assert scale > 0 and np.abs(got[0] - want[0]).max() <= 1e-4 * scale
    return converted, report


@pytest.mark.slow
def test_t5_style_attention_exports_converted(tmp_path):
    _export_and_compare(tmp_path, _t5_encoder)


@pytest.mark.slow
def test_moe_decoder_exports_with_traceable_experts_and_keeps_its_setting(tmp_path):
    model, report = _export_and_compare(tmp_path, _moe)
    assert any("batched_mm" in n for n in report.notes)
    assert model.get_experts_implementation()[""] == "grouped_mm"  # the model's own setting is back
