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
from attnres_rewrite.onnx.runtime import open_session

ort = pytest.importorskip("onnxruntime")


def _targets() -> list[str]:
    """The function bodies, and the op library's kernels where it builds here."""
    return ["CPUExecutionProvider", *([ort_ops.FUSED_CPU] if ort_ops.available() else [])]


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
    for target in _targets():
        session = open_session(str(path), target)
        feed = {i.name: s.numpy() for i, s in zip(session.get_inputs(), fresh)}
        assert _rel(session.run(None, feed)[0], want) <= tol, target


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
    for target in _targets():
        session = open_session(str(path), target)
        assert _rel(session.run(None, {session.get_inputs()[0].name: fresh.numpy()})[0], want) <= 2e-6, target


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


def test_reciprocal_of_a_root_then_mul_becomes_div():
    model = _graph(
        [
            helper.make_node("Sqrt", ["b"], ["s"]),
            helper.make_node("Reciprocal", ["s"], ["r"]),
            helper.make_node("Mul", ["a", "r"], ["y"]),
        ],
        ["a", "b"],
        ["y"],
    )
    feed = {"a": np.array([1, 2, 3, 4], np.float32), "b": np.array([3, 5, 7, 0.5], np.float32)}
    before = _run_ir(model, feed)
    assert fusions.reciprocal_to_div(model.graph) == 1
    assert [n.op_type for n in model.graph] == ["Sqrt", "Div"]
    assert model.graph.outputs[0].name == "y"
    np.testing.assert_allclose(_run_ir(model, feed)[0], before[0], rtol=1e-7)


def test_a_reciprocal_read_twice_is_kept():
    model = _graph(
        [
            helper.make_node("Sqrt", ["b"], ["s"]),
            helper.make_node("Reciprocal", ["s"], ["r"]),
            helper.make_node("Mul", ["a", "r"], ["y"]),
            helper.make_node("Add", ["r", "a"], ["z"]),
        ],
        ["a", "b"],
        ["y", "z"],
    )
    assert fusions.reciprocal_to_div(model.graph) == 0
    assert [n.op_type for n in model.graph] == ["Sqrt", "Reciprocal", "Mul", "Add"]


def test_a_reciprocal_of_something_else_than_a_root_is_kept():
    """``a / b`` can be finite where ``a * (1 / b)`` overflows: only ``1 / sqrt(.)`` is rewritten."""
    model = _graph(
        [helper.make_node("Reciprocal", ["b"], ["r"]), helper.make_node("Mul", ["a", "r"], ["y"])], ["a", "b"], ["y"]
    )
    assert fusions.reciprocal_to_div(model.graph) == 0


# --------------------------------------------------------------------------------------
# The patterns on hand-built graphs: what fuses, and near misses that must not


def _norm_graph(*, keepdims=1, axis=-1, eps_shape=(), weight_len=8, cast=None, eps_is_input=False) -> ir.Model:
    """``BlockAttnRes(s, q, g)`` read by an RMSNorm as the exporter writes it, with one thing changed."""
    d = 8
    floats = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
              (("s", [3, 2, d]), ("q", [d]), ("g", [d]))}  # fmt: skip
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [axis]),
        helper.make_tensor("eps", TensorProto.FLOAT, list(eps_shape), [1e-5]),
        helper.make_tensor("w", TensorProto.FLOAT, [weight_len], [1.5] * weight_len),
    ]
    x = "h"
    nodes = [helper.make_node("BlockAttnRes", ["s", "q", "g"], ["h"], domain="attnres", eps=1e-6, scale=1.0)]
    if cast is not None:
        nodes.append(helper.make_node("Cast", ["h"], ["hc"], to=cast))
        x = "hc"
    nodes += [
        helper.make_node("Pow", [x, "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=keepdims),
        helper.make_node("Add", ["ms", "eps"], ["v"]),
        helper.make_node("Sqrt", ["v"], ["root"]),
        helper.make_node("Div", [x, "root"], ["n"]),
        helper.make_node("Mul", ["w", "n"], ["y"]),
    ]
    inputs = [floats["s"], floats["q"], floats["g"]]
    if eps_is_input:
        inputs.append(helper.make_tensor_value_info("eps", TensorProto.FLOAT, list(eps_shape)))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    call_out = [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, d])]  # no schema to infer it from
    graph = helper.make_graph(nodes, "g", inputs, [out], initializer=inits, value_info=call_out)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("attnres", 1)]
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=opsets))
    return ir.serde.deserialize_model(model)


def test_the_exporters_rmsnorm_after_an_aggregation_fuses():
    model = _norm_graph()
    assert fusions.fuse_rmsnorm_calls(model.graph) == 1
    (node,) = list(model.graph)
    assert node.op_type == NORM_FUNCTION_NAME and node.attributes["norm_eps"].value == pytest.approx(1e-5)
    assert node.inputs[3].name == "w" and model.graph.outputs[0].name == "y"


@pytest.mark.parametrize(
    "change",
    [
        {"keepdims": 0},  # (*, ) statistics would broadcast differently
        {"axis": 0},  # a mean over another axis
        {"eps_shape": (1, 1, 1)},  # eps that broadcasts the output to a higher rank
        {"eps_is_input": True},  # an initializer the caller can override
        {"weight_len": 1},  # a weight that broadcasts: the kernel takes (d,) only
        {"cast": TensorProto.FLOAT16},  # statistics in another type than fp32
    ],
    ids=["keepdims-0", "axis-0", "eps-rank-3", "eps-graph-input", "weight-broadcast", "cast-fp16"],
)
def test_near_misses_of_the_rmsnorm_pattern_are_left_alone(change):
    model = _norm_graph(**change)
    before = [n.op_type for n in model.graph]
    assert fusions.fuse_rmsnorm_calls(model.graph) == 0
    assert [n.op_type for n in model.graph] == before


def _stack_graph(*, concat_axis=0, unsqueeze_axis=0, shared_first=True) -> ir.Model:
    """Two calls over [a, b] and [a, b, c]; the second can reuse the first's stack of [a, b]."""
    vals = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8]) for n in "abc"]
    gains = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8]) for n in "qg"]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
             helper.make_tensor("axis", TensorProto.INT64, [1], [unsqueeze_axis])]  # fmt: skip
    unsq = [helper.make_node("Unsqueeze", ["a", "zero"], ["ua"]), helper.make_node("Unsqueeze", ["b", "zero"], ["ub"])]
    unsq.append(helper.make_node("Unsqueeze", ["c", "axis"], ["uc"]))
    first = [
        helper.make_node("Concat", ["ua", "ub"], ["ab"], axis=0),
        helper.make_node("BlockAttnRes", ["ab", "q", "g"], ["y1"], domain="attnres", eps=1e-6, scale=1.0),
    ]
    second = [
        helper.make_node("Concat", ["ua", "ub", "uc"], ["abc"], axis=concat_axis),
        helper.make_node("BlockAttnRes", ["abc", "q", "g"], ["y2"], domain="attnres", eps=1e-6, scale=1.0),
    ]
    nodes = unsq + (first + second if shared_first else second + first)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2")]
    graph = helper.make_graph(nodes, "g", vals + gains, outs, initializer=inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("attnres", 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


def test_a_call_reuses_an_earlier_stack_of_its_other_sources():
    model = _stack_graph()
    assert fusions.split_partial_sources(model.graph) == 1
    calls = [n for n in model.graph if n.domain == "attnres"]
    assert [n.op_type for n in calls] == ["BlockAttnRes", PARTIAL_FUNCTION_NAME]
    assert calls[1].inputs[0] is calls[0].inputs[0] and calls[1].inputs[1].name == "c"
    assert [n.op_type for n in model.graph].count("Concat") == 1  # the second stack and c's Unsqueeze are gone


@pytest.mark.parametrize(
    "change",
    [{"concat_axis": 1}, {"unsqueeze_axis": 1}, {"shared_first": False}],
    ids=["concat-axis-1", "unsqueeze-axis-1", "stack-after-the-call"],
)
def test_stacks_that_cannot_be_reused_are_left_alone(change):
    """The second call keeps its own stack (the first, with one other source, may still split)."""
    model = _stack_graph(**change)
    fusions.split_partial_sources(model.graph)
    (second,) = [n for n in model.graph if n.outputs[0].name == "y2"]
    assert second.op_type == "BlockAttnRes" and second.inputs[0].producer().op_type == "Concat"
    assert len(second.inputs[0].producer().inputs) == 3
