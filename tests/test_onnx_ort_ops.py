"""The onnxruntime op library (``attnres_rewrite.onnx.ort_ops``): the fused ``attnres.BlockAttnRes``.

The kernel is checked against the fp64 reference of the SPEC math over a shape matrix
(1 and many sources, odd and power-of-two d, one token, many tokens) in fp32, fp16 and
bf16, on one-node models that nothing but the library can run; so are
``attnres.BlockAttnResRMSNorm`` (the aggregation and the RMSNorm reading it) and the
``Partial`` forms (the last source passed apart). Then: in a file with the
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
from attnres_rewrite.onnx.function import FUNCTION_NAMES, NORM_FUNCTION_NAME, PARTIAL_FUNCTION_NAME

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(not ort_ops.available(), reason=f"no op library: {ort_ops.unavailable_reason()}")

ONNX_TYPES = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE,
}


def _node_model(
    dtype=torch.float32, *, eps=1e-6, scale=1.0, with_function=False, gain_dtype=None, norm_eps=None, partial=False
) -> bytes:
    """One ``attnres`` node fed with fp32 inputs (cast in the graph to ``dtype``) and an fp32 output.

    The casts let the test feed bf16 without ml_dtypes. Without ``with_function`` the
    file has no body to fall back on: only a registered kernel can run it. With
    ``norm_eps`` the node normalises its output (``...RMSNorm``, a last input ``w``);
    with ``partial`` the last source is an input ``p`` of its own (``...Partial...``).
    """
    elem, gain_elem = ONNX_TYPES[dtype], ONNX_TYPES[gain_dtype or dtype]
    names = ["s", "p", "q", "g", "w"]
    names = [n for n in names if (n != "p" or partial) and (n != "w" or norm_eps is not None)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    casts = [helper.make_node("Cast", [n], [n + "16"], to=gain_elem if n in "qg" else elem) for n in names]
    attributes = (
        {"eps": eps, "scale": scale} if norm_eps is None else {"eps": eps, "scale": scale, "norm_eps": norm_eps}
    )
    op = "BlockAttnRes" + ("Partial" if partial else "") + ("RMSNorm" if norm_eps is not None else "")
    call = helper.make_node(op, [n + "16" for n in names], ["y16"], domain="attnres", **attributes)
    nodes = [*casts, call, helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "one_aggregation", inputs, [out])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("attnres", 1)]
    functions = [function_proto(name) for name in FUNCTION_NAMES] if with_function else []
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = 10
    return model.SerializeToString()


def _session(model: bytes, fused: bool = True, threads: int = 1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if fused:
        ort_ops.register(options)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _run(session, sources, query, gain, weight=None, partial: bool = False) -> np.ndarray:
    """Run with ``sources`` stacked; ``partial`` feeds the last one as the input ``p``."""
    feed = {"s": sources.float().numpy(), "q": query.float().numpy(), "g": gain.float().numpy()}
    if partial:
        feed["s"], feed["p"] = feed["s"][:-1], feed["s"][-1]
    if weight is not None:
        feed["w"] = weight.float().numpy()
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


def _norm_reference(sources, query, gain, weight, eps, scale, norm_eps) -> np.ndarray:
    """The aggregation rounded to the sources' dtype (the op's output type), then Hugging Face's RMSNorm in fp64."""
    h = torch.from_numpy(_reference(sources, query, gain, eps, scale)).to(sources.dtype).double()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps)
    return (weight.double() * y).numpy()


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


NORM_SHAPES = SHAPES[:1] + SHAPES[2:]  # d = 1 normalises every row to its sign: nothing left to check


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    ("k", "tokens", "d"), NORM_SHAPES, ids=[f"K{k}-T{'x'.join(map(str, t))}-d{d}" for k, t, d in NORM_SHAPES]
)
def test_fused_norm_kernel_matches_fp64_reference(dtype, k, tokens, d):
    """``BlockAttnResRMSNorm``: two more roundings than the aggregation (the normalised row, then the product)."""
    sources, query, gain = _inputs(k, tokens, d, dtype)
    weight = (0.5 + torch.rand(d, generator=torch.Generator().manual_seed(7))).to(dtype)
    session = _session(_node_model(dtype, eps=1e-5, scale=float(k), norm_eps=1e-6))
    got = _run(session, sources, query, gain, weight)
    assert got.shape == (*tokens, d)
    want = _norm_reference(sources, query, gain, weight, 1e-5, float(k), 1e-6)
    assert _rel(got, want) <= 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["fp32", "fp16", "fp64"])
def test_fused_norm_kernel_agrees_with_its_body(dtype):
    """The kernel and the function's body (what runs without the library) give the same numbers to rounding."""
    sources, query, gain = _inputs(4, (3, 5), 40, dtype, seed=2)
    weight = (0.5 + torch.rand(40, generator=torch.Generator().manual_seed(1))).to(dtype)
    model = _node_model(dtype, eps=1e-6, scale=2.0, norm_eps=1e-5, with_function=True)
    fused = _run(_session(model, fused=True), sources, query, gain, weight)
    body = _run(_session(model, fused=False), sources, query, gain, weight)
    want = _norm_reference(sources, query, gain, weight, 1e-6, 2.0, 1e-5)
    tol = 2 * TOL.get(dtype, 2e-6)
    assert _rel(fused, want) <= tol and _rel(body, want) <= tol
    if dtype == torch.float32:  # the two paths are distinguishable, so both were checked above
        assert not np.array_equal(fused, body)


PARTIAL_SHAPES = [(1, (3,), 37), (3, (2, 5), 64), (9, (300,), 33)]


@pytest.mark.parametrize("norm", [False, True], ids=["aggregate", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    ("k", "tokens", "d"), PARTIAL_SHAPES, ids=[f"K{k}-T{'x'.join(map(str, t))}-d{d}" for k, t, d in PARTIAL_SHAPES]
)
def test_partial_forms_match_fp64_reference(norm, dtype, k, tokens, d):
    """``BlockAttnResPartial[RMSNorm]``: the last source as an input of its own (K = 1: an empty stack)."""
    sources, query, gain = _inputs(k, tokens, d, dtype)
    weight = (0.5 + torch.rand(d, generator=torch.Generator().manual_seed(7))).to(dtype) if norm else None
    model = _node_model(dtype, eps=1e-5, scale=float(k), norm_eps=1e-6 if norm else None, partial=True)
    got = _run(_session(model), sources, query, gain, weight, partial=True)
    assert got.shape == (*tokens, d)
    if norm:
        want, tol = _norm_reference(sources, query, gain, weight, 1e-5, float(k), 1e-6), 2 * TOL[dtype]
    else:
        want, tol = _reference(sources, query, gain, 1e-5, float(k)), TOL[dtype]
    assert _rel(got, want) <= tol


@pytest.mark.parametrize("norm", [False, True], ids=["aggregate", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_partial_forms_agree_with_their_bodies(norm, dtype):
    sources, query, gain = _inputs(4, (3, 5), 40, dtype, seed=4)
    weight = (0.5 + torch.rand(40, generator=torch.Generator().manual_seed(1))).to(dtype) if norm else None
    model = _node_model(dtype, eps=1e-6, scale=2.0, norm_eps=1e-5 if norm else None, partial=True, with_function=True)
    fused = _run(_session(model, fused=True), sources, query, gain, weight, partial=True)
    body = _run(_session(model, fused=False), sources, query, gain, weight, partial=True)
    if norm:
        want = _norm_reference(sources, query, gain, weight, 1e-6, 2.0, 1e-5)
    else:
        want = _reference(sources, query, gain, 1e-6, 2.0)
    assert _rel(fused, want) <= 4e-6 and _rel(body, want) <= 4e-6
    if dtype == torch.float32:  # the two paths are distinguishable, so both were checked above
        assert not np.array_equal(fused, body)


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
        ((3, 2, 16), 15, "query must have d elements"),
        ((3, 2, 16), 16, "weight must have d elements"),
        ((3, 2, 16), 16, "partial must have the shape of one source"),
        ((0, 2, 16), 16, "no sources"),
        ((16,), 16, "sources must be (K, *tokens, d)"),
    ],
    ids=["query-length", "weight-length", "partial-shape", "no-sources", "rank-1"],
)
def test_bad_shapes_raise_clear_errors(shape, d, message):
    norm, partial = "weight" in message, "partial" in message
    session = _session(_node_model(norm_eps=1e-6 if norm else None, partial=partial))
    op = NORM_FUNCTION_NAME if norm else PARTIAL_FUNCTION_NAME if partial else "BlockAttnRes"
    feed = {"s": np.random.randn(*shape).astype(np.float32), "q": np.ones(d, np.float32), "g": np.ones(d, np.float32)}
    if norm:
        feed["w"] = np.ones(d - 1, np.float32)
    if partial:
        feed["p"] = np.ones((3, d), np.float32)  # a source is (2, 16)
    with pytest.raises(Exception, match=re.escape(f"attnres.{op}: {message}")):
        session.run(None, feed)


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
    assert notes and "not the fused kernels (no C++ compiler)" in notes[0]
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
