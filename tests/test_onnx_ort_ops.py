"""The onnxruntime op library (``attnres_rewrite.onnx.ort_ops``): the fused ``attnres.BlockAttnRes``.

The kernel is checked against the fp64 reference of the SPEC math over a shape matrix
(1 and many sources, odd and power-of-two d, one token, many tokens) in fp32, fp16 and
bf16, on one-node models that nothing but the library can run. Then: in a file with the
function attached, the registered kernel (not the function's body) is what runs; a
node outside its types falls back to the body; bad shapes get onnxruntime errors that
say what is wrong; export verification checks both paths; the library can be written
elsewhere for deployment.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_onnx_export import OneAggregation

from attnres_rewrite import reference as R
from attnres_rewrite.errors import ExportError, OutputError
from attnres_rewrite.kernels import cpu_kernels as C
from attnres_rewrite.onnx import export_onnx, function_proto, ort_ops
from attnres_rewrite.onnx import verify as vf

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(not ort_ops.available(), reason=f"no op library: {ort_ops.unavailable_reason()}")

ONNX_TYPES = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE,
}


def _node_model(dtype=torch.float32, *, eps=1e-6, scale=1.0, with_function=False, gain_dtype=None) -> bytes:
    """One ``attnres.BlockAttnRes`` node fed with fp32 inputs (cast in the graph to ``dtype``) and an fp32 output.

    The casts let the test feed bf16 without ml_dtypes. Without ``with_function`` the
    file has no body to fall back on: only a registered kernel can run it.
    """
    elem, gain_elem = ONNX_TYPES[dtype], ONNX_TYPES[gain_dtype or dtype]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("s", "q", "g")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Cast", ["s"], ["s16"], to=elem),
        helper.make_node("Cast", ["q"], ["q16"], to=gain_elem),
        helper.make_node("Cast", ["g"], ["g16"], to=gain_elem),
        helper.make_node("BlockAttnRes", ["s16", "q16", "g16"], ["y16"], domain="attnres", eps=eps, scale=scale),
        helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "one_aggregation", inputs, [out])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("attnres", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function_proto()] if with_function else [])
    model.ir_version = 10
    return model.SerializeToString()


def _session(model: bytes, fused: bool = True, threads: int = 1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if fused:
        ort_ops.register(options)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _run(session, sources: torch.Tensor, query: torch.Tensor, gain: torch.Tensor) -> np.ndarray:
    feed = {"s": sources.float().numpy(), "q": query.float().numpy(), "g": gain.float().numpy()}
    return session.run(None, feed)[0]


def _inputs(k: int, tokens: tuple[int, ...], d: int, dtype: torch.dtype, seed: int = 0):
    """Sources at different scales (the RMS norm matters), rounded to ``dtype`` as the graph's casts round them."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 3.0, k).view(k, *[1] * (len(tokens) + 1))
    sources = (torch.randn(k, *tokens, d, generator=gen) * scales).to(dtype)
    query = torch.randn(d, generator=gen).to(dtype)
    gain = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype)
    return sources, query, gain


def _reference(sources, query, gain, eps, scale) -> np.ndarray:
    srcs = [s.double() for s in sources]
    return R.attnres(srcs, query.double(), gain.double(), eps, scale).numpy()


def _rel(got, want) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


# one output rounding to the dtype (the interpreter-free CPU kernel rounds to nearest)
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [  # (K, tokens, d)
    (1, (3,), 37),
    (2, (1,), 1),
    (3, (2, 5), 64),
    (5, (1,), 129),
    (9, (300,), 33),
    (4, (2, 3), 256),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    ("k", "tokens", "d"), SHAPES, ids=[f"K{k}-T{'x'.join(map(str, t))}-d{d}" for k, t, d in SHAPES]
)
def test_kernel_matches_fp64_reference(dtype, k, tokens, d):
    sources, query, gain = _inputs(k, tokens, d, dtype)
    session = _session(_node_model(dtype, eps=1e-5, scale=float(k)))
    got = _run(session, sources, query, gain)
    assert got.shape == (*tokens, d)
    assert _rel(got, _reference(sources, query, gain, 1e-5, float(k))) <= TOL[dtype]


def test_registered_kernel_replaces_the_function_body():
    """Bit for bit the CPU kernel PyTorch calls (``cpu_kernels.attnres_forward``), not the inlined body."""
    sources, query, gain = _inputs(5, (4, 7), 48, torch.float32, seed=3)
    model = _node_model(eps=1e-6, scale=1.0, with_function=True)
    fused = _run(_session(model, fused=True), sources, query, gain)
    body = _run(_session(model, fused=False), sources, query, gain)
    kernel = C.attnres_forward(list(sources), query, gain, 1e-6, 1.0).numpy()
    np.testing.assert_array_equal(fused, kernel)
    assert not np.array_equal(body, kernel)  # the two paths are distinguishable, so the check above means something
    assert _rel(body, _reference(sources, query, gain, 1e-6, 1.0)) <= 2e-6


@pytest.mark.parametrize(
    ("dtype", "gain_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float64),
        (torch.float64, torch.float16),
        (torch.bfloat16, torch.float64),
    ],
    ids=["fp16-fp32", "fp32-bf16", "fp64", "fp64-fp16", "bf16-fp64"],
)
def test_every_type_pair_of_the_function_runs(dtype, gain_dtype):
    """Sources and gains of different types (and fp64): a pair without a kernel would fail the whole session."""
    sources, query, gain = _inputs(3, (2, 5), 24, dtype)
    query, gain = query.to(gain_dtype), gain.to(gain_dtype)
    model = _node_model(dtype, gain_dtype=gain_dtype, with_function=True)
    got = _run(_session(model, fused=True), sources, query, gain)
    tol = 1e-12 if dtype == torch.float64 else TOL[dtype]
    assert _rel(got.astype(np.float64), _reference(sources, query, gain, 1e-6, 1.0)) <= max(tol, 2e-6)


@pytest.mark.parametrize(
    ("shape", "d", "message"),
    [
        ((3, 2, 16), 15, "query and key_gain must have d elements"),
        ((0, 2, 16), 16, "no sources"),
        ((16,), 16, "sources must be (K, *tokens, d)"),
    ],
    ids=["query-length", "no-sources", "rank-1"],
)
def test_bad_shapes_raise_clear_errors(shape, d, message):
    session = _session(_node_model())
    with pytest.raises(Exception, match=re.escape(f"attnres.BlockAttnRes: {message}")):
        _run(session, torch.randn(shape), torch.randn(d), torch.randn(d))


def test_registering_twice_is_harmless():
    """onnxruntime refuses options that carry the attnres domain twice; ``register`` adds it once."""
    options = ort.SessionOptions()
    assert ort_ops.register(options) == ort_ops.register(options)
    session = ort.InferenceSession(_node_model(), options, providers=["CPUExecutionProvider"])
    sources, query, gain = _inputs(2, (3,), 8, torch.float32)
    assert _rel(_run(session, sources, query, gain), _reference(sources, query, gain, 1e-6, 1.0)) <= 2e-6


def test_empty_tokens_give_an_empty_output():
    session = _session(_node_model())
    assert _run(session, torch.randn(3, 0, 8), torch.randn(8), torch.randn(8)).shape == (0, 8)


def test_concurrent_runs_of_one_session_agree():
    """onnxruntime lets several threads run one session: the kernel keeps no per-call state."""
    session = _session(_node_model(scale=2.0))
    cases = [_inputs(3, (40,), 31 + i, torch.float32, seed=i) for i in range(6)]
    want = [_run(session, *c) for c in cases]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(20):
            got[i] = _run(session, *cases[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        np.testing.assert_array_equal(got[i], want[i])


def test_function_form_export_is_verified_with_the_kernel_too(tmp_path):
    torch.manual_seed(0)
    sources = tuple(torch.randn(2, 5, 12) for _ in range(3))
    report = export_onnx(OneAggregation(12), sources, tmp_path / "f.onnx", as_function=True)
    assert report.providers == ["CPUExecutionProvider", ort_ops.FUSED_CPU]
    fused = [r for r in report.provider_results if r.provider == ort_ops.FUSED_CPU]
    assert len(fused) == 1 and fused[0].max_rel_diff <= 1e-5
    inline = export_onnx(OneAggregation(12), sources, tmp_path / "i.onnx")
    assert inline.providers == ["CPUExecutionProvider"]  # no attnres nodes: nothing for the kernel to run


def test_verification_says_when_the_kernel_could_not_be_checked(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "f.onnx"
    export_onnx(OneAggregation(8), tuple(torch.randn(2, 3, 8) for _ in range(2)), path, as_function=True, verify=False)
    monkeypatch.setattr(ort_ops, "unavailable_reason", lambda: "no C++ compiler")
    targets, notes = vf.verification_targets([path], ["CPUExecutionProvider"])
    assert targets == ["CPUExecutionProvider"]
    assert notes and "not the fused kernel (no C++ compiler)" in notes[0]
    assert ort_ops.cpu_target(path) == "CPUExecutionProvider"


def test_unavailable_library_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ort_ops, "unavailable_reason", lambda: "no C++ compiler (set $CXX)")
    with pytest.raises(ExportError, match="op library is unavailable: no C"):
        ort_ops.library_path()


def test_written_library_loads_from_its_new_place(tmp_path):
    dest = ort_ops.write_library(tmp_path / "deploy" / "libattnres_ort.so")
    assert [p.name for p in dest.parent.iterdir()] == ["libattnres_ort.so"]  # no temporary left behind
    with pytest.raises(OutputError, match="exists; pass force=True"):
        ort_ops.write_library(dest)
    with pytest.raises(OutputError, match="is a directory"):
        ort_ops.write_library(tmp_path)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(dest))
    session = ort.InferenceSession(_node_model(), options, providers=["CPUExecutionProvider"])
    sources, query, gain = _inputs(3, (4,), 20, torch.float32)
    assert _rel(_run(session, sources, query, gain), _reference(sources, query, gain, 1e-6, 1.0)) <= 2e-6


def test_files_without_attnres_nodes_are_not_targets(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [x])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "plain.onnx")
    assert not ort_ops.has_attnres_nodes(tmp_path / "plain.onnx")
    assert ort_ops.cpu_target(tmp_path / "plain.onnx") == "CPUExecutionProvider"
