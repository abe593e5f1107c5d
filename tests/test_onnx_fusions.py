"""Graph rewrites of the exported ONNX model (``attnres_rewrite.onnx.fusions``).

What matters to a user is what the runtime then runs: a function-form export runs an
aggregation and the Hugging Face RMSNorm reading it as one ``BlockAttnResRMSNorm``
call, whose numbers match PyTorch with and without the op library; values read
elsewhere, and norms of other shapes, are left as they were. On whole models
(onnxruntime fusing every norm of a converted Llama, inline and function form) see
``test_onnx_decoder.py``.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from test_onnx_export import OneAggregation, TinyStream
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from attnres_rewrite import reference as R
from attnres_rewrite.onnx import export_onnx, fusions, ort_ops
from attnres_rewrite.onnx.function import NORM_FUNCTION_NAME, PARTIAL_FUNCTION_NAME

ort = pytest.importorskip("onnxruntime")


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


class AggregationThenNorm(nn.Module):
    """One aggregation read by Hugging Face's RMSNorm (optionally also returned, so it is read twice)."""

    def __init__(self, dim: int, norm: nn.Module | None = None, return_aggregation: bool = False):
        super().__init__()
        self.aggregate = OneAggregation(dim, eps=1e-6, scale=2.0)
        self.norm = norm if norm is not None else LlamaRMSNorm(dim, eps=1e-5)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
        self.return_aggregation = return_aggregation

    def forward(self, *sources):
        h = self.aggregate(*sources)
        return (self.norm(h), h) if self.return_aggregation else self.norm(h)


def _reference(model: AggregationThenNorm, sources) -> torch.Tensor:
    """fp64: the SPEC aggregation rounded to the model's dtype, then the RMSNorm of Hugging Face."""
    agg = model.aggregate
    h = R.attnres([s.double() for s in sources], agg.query.double(), agg.gain.double(), agg.eps, agg.scale)
    h = h.to(sources[0].dtype).double()
    return model.norm.weight.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + model.norm.variance_epsilon))


def _rel(got, want: torch.Tensor) -> float:
    want = want.detach().double().numpy()
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_aggregation_and_its_rmsnorm_export_as_one_call(tmp_path, dtype):
    """The pair is one node (fp16: with the norm's casts), verified with the kernel and with the body."""
    torch.manual_seed(0)
    model = AggregationThenNorm(24).to(dtype)
    sources = tuple(torch.randn(2, 5, 24).to(dtype) * s for s in (0.5, 1.0, 3.0))
    path = tmp_path / "m.onnx"
    report = export_onnx(model, sources, path, as_function=True)
    ops = _ops(path)
    assert ops[NORM_FUNCTION_NAME] == 1 and ops["BlockAttnRes"] == 0
    assert not {"ReduceMean", "Sqrt", "Reciprocal", "Pow"} & set(ops)
    assert sorted(report.onnx_functions) == ["attnres.BlockAttnRes", f"attnres.{NORM_FUNCTION_NAME}"]
    if ort_ops.available():
        assert report.providers == ["CPUExecutionProvider", ort_ops.FUSED_CPU]
    fresh = [torch.randn(3, 4, 24).to(dtype) * s for s in (0.5, 1.0, 3.0)]
    want = _reference(model, fresh)
    tol = 2e-6 if dtype == torch.float32 else 2e-3
    for fused in (False, True) if ort_ops.available() else (False,):
        options = ort.SessionOptions()
        if fused:
            ort_ops.register(options)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {i.name: s.numpy() for i, s in zip(session.get_inputs(), fresh)}
        assert _rel(session.run(None, feed)[0], want) <= tol, fused


def test_an_aggregation_read_elsewhere_is_not_fused(tmp_path):
    torch.manual_seed(0)
    model = AggregationThenNorm(16, return_aggregation=True)
    path = tmp_path / "m.onnx"
    export_onnx(model, tuple(torch.randn(2, 3, 16) for _ in range(3)), path, as_function=True)
    ops = _ops(path)
    assert ops["BlockAttnRes"] == 1 and ops[NORM_FUNCTION_NAME] == 0 and ops["ReduceMean"] == 1


def test_a_layernorm_is_left_alone(tmp_path):
    torch.manual_seed(0)
    model = AggregationThenNorm(16, norm=nn.LayerNorm(16))
    path = tmp_path / "m.onnx"
    export_onnx(model, tuple(torch.randn(2, 3, 16) for _ in range(3)), path, as_function=True)
    ops = _ops(path)
    assert ops["BlockAttnRes"] == 1 and ops["LayerNormalization"] == 1 and ops[NORM_FUNCTION_NAME] == 0


def test_a_blocks_completed_sources_are_stacked_once(tmp_path):
    """4 sublayers in blocks of 2: the stack [embedding, block 1] is built once and shared.

    Aggregations: [e], [e, v0], [e, b1], [e, b1, v2], [e, b1, b2]. The second, fourth and
    last take their last source apart (the first's stack is one value; the others reuse
    the third's stack): one ``Concat`` and two ``Unsqueeze`` in all, where each call
    stacked its own sources before (four ``Concat``, five ``Unsqueeze``).
    """
    torch.manual_seed(0)
    model = TinyStream(dim=16, layers=4, block_size=2).eval()
    ids = torch.randint(0, 50, (2, 9))
    path = tmp_path / "stream.onnx"
    report = export_onnx(model, (ids,), path, as_function=True)
    ops = _ops(path)
    assert (ops["BlockAttnRes"], ops[PARTIAL_FUNCTION_NAME], ops["Concat"], ops["Unsqueeze"]) == (2, 3, 1, 2)
    if ort_ops.available():
        assert ort_ops.FUSED_CPU in report.providers
    fresh = torch.randint(0, 50, (3, 5))
    want = model(fresh)
    for fused in (False, True) if ort_ops.available() else (False,):
        options = ort.SessionOptions()
        if fused:
            ort_ops.register(options)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        assert _rel(session.run(None, {session.get_inputs()[0].name: fresh.numpy()})[0], want) <= 2e-6, fused


def _graph(nodes, inputs, outputs) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in outputs],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _run_ir(model: ir.Model, feed: dict) -> list:
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_reciprocal_then_mul_becomes_div():
    model = _graph(
        [helper.make_node("Reciprocal", ["b"], ["r"]), helper.make_node("Mul", ["a", "r"], ["y"])], ["a", "b"], ["y"]
    )
    feed = {"a": np.array([1, 2, 3, 4], np.float32), "b": np.array([3, 5, 7, 0.5], np.float32)}
    before = _run_ir(model, feed)
    assert fusions.reciprocal_to_div(model.graph) == 1
    assert [n.op_type for n in model.graph] == ["Div"]
    assert model.graph.outputs[0].name == "y"
    np.testing.assert_allclose(_run_ir(model, feed)[0], before[0], rtol=1e-7)


def test_a_reciprocal_read_twice_is_kept():
    model = _graph(
        [
            helper.make_node("Reciprocal", ["b"], ["r"]),
            helper.make_node("Mul", ["a", "r"], ["y"]),
            helper.make_node("Add", ["r", "a"], ["z"]),
        ],
        ["a", "b"],
        ["y", "z"],
    )
    assert fusions.reciprocal_to_div(model.graph) == 0
    assert [n.op_type for n in model.graph] == ["Reciprocal", "Mul", "Add"]
