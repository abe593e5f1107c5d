"""ONNX export of AttnRes models: translations, the ``attnres`` function, verification, errors.

The references are independent of the export code: ``attnres_rewrite.reference``
(the SPEC math) for the op translations and the function body, and each test runs
onnxruntime itself on fresh shapes rather than trusting ``ExportReport``'s numbers.
Models are hand-written and tiny (ops called directly), so this file runs without the
rewrite; tests on converted samples and Hugging Face models live in
``test_onnx_models.py``.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import attnres_rewrite
from attnres_rewrite import reference as R
from attnres_rewrite.errors import AttnResError, ExportError, NotExportableError
from attnres_rewrite.onnx import DEFAULT_OPSET, export_onnx, function_proto, max_opset
from attnres_rewrite.onnx import runtime as rt
from attnres_rewrite.onnx import verify as vf

ort = pytest.importorskip("onnxruntime")


# --------------------------------------------------------------------------------------
# Hand-written models calling torch.ops.attnres.* directly


class TinyStream(nn.Module):
    """A Block AttnRes stream like ``reference.block_attnres_stream``, through the custom op.

    Random (non-zero) queries and gains so the softmax weights are far from uniform and
    a wrong source order or axis in the translation shows up in the output.
    """

    def __init__(self, dim=16, layers=4, block_size=2, mode="paper", vocab=50, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.queries = nn.Parameter(torch.randn(layers + 1, dim))
        self.gains = nn.Parameter(1 + 0.2 * torch.randn(layers + 1, dim))
        self.block_size, self.mode = block_size, mode
        self.to(dtype)

    def sublayer(self, i):
        return lambda h: torch.tanh(self.layers[i](h))

    def forward(self, ids):
        x = self.embed(ids)
        subs = [self.sublayer(i) for i in range(len(self.layers))]
        params = R.StreamParams(self.queries, self.gains)
        return _op_stream(x, subs, params, self.block_size, self.mode)


def _op_stream(embedding, sublayers, params, block_size, mode, eps=1e-6):
    """``reference.block_attnres_stream`` with every aggregation done by the custom op."""
    completed = [embedding]
    for block in R.block_partition(len(sublayers), block_size=block_size):
        partial = None
        for layer in block:
            sources = completed if partial is None else [*completed, partial]
            h = torch.ops.attnres.block_attnres(
                sources, params.queries[layer], params.key_gains[layer], eps, R.mode_scale(mode, len(sources))
            )
            v = sublayers[layer](h)
            partial = v if partial is None else partial + v
        completed.append(partial)
    last = len(sublayers)
    return torch.ops.attnres.block_attnres(
        completed, params.queries[last], params.key_gains[last], eps, R.mode_scale(mode, len(completed))
    )


class OneAggregation(nn.Module):
    """A single ``block_attnres`` over ``k`` float inputs (to test the translation alone)."""

    def __init__(self, dim, eps=1e-6, scale=1.0):
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim))
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(dim))
        self.eps, self.scale = eps, scale

    def forward(self, *sources):
        return torch.ops.attnres.block_attnres(list(sources), self.query, self.gain, self.eps, self.scale)


class TwoPhase(nn.Module):
    """Phase 1 over shared sources for S queries, then phase 2 with and without a partial sum."""

    def __init__(self, dim, s=3, eps=1e-6):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(s, dim))
        self.gains = nn.Parameter(1 + 0.3 * torch.randn(s, dim))
        self.eps = eps

    def forward(self, a, b, partial):
        o, m, l = torch.ops.attnres.block_phase1([a, b], self.queries, self.gains, self.eps)
        first = torch.ops.attnres.block_phase2(
            o[0], m[0], l[0], None, self.queries[0], self.gains[0], self.eps, 1.0, a.dtype
        )
        merged = torch.ops.attnres.block_phase2(
            o[1], m[1], l[1], partial, self.queries[1], self.gains[1], self.eps, 3.0, a.dtype
        )
        return o, m, l, first, merged


def _ort_run(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {meta.name: t.detach().numpy() for meta, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def _rel(got, want) -> float:
    want = want.detach().double().numpy()
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def stream_exports(tmp_path_factory):
    """One TinyStream exported inline and as a function (shared: exports cost seconds)."""
    torch.manual_seed(0)
    model = TinyStream().eval()
    ids = torch.randint(0, 50, (2, 9))
    out = {}
    for as_function in (False, True):
        path = tmp_path_factory.mktemp("stream") / "model.onnx"
        report = export_onnx(model, (ids,), path, as_function=as_function)
        out[as_function] = (path, report)
    return model, out


# --------------------------------------------------------------------------------------
# Export + verification of a stream, both forms


@pytest.mark.parametrize("as_function", [False, True], ids=["inline", "function"])
def test_stream_export_matches_pytorch_on_new_shapes(stream_exports, as_function):
    model, exports = stream_exports
    path, report = exports[as_function]
    onnx.checker.check_model(str(path), full_check=True)
    assert report.checker_passed and report.verified
    assert report.attnres_ops == 5  # 4 sublayers + the stream output
    assert report.max_rel_diff <= 1e-4
    assert report.verify_input_shapes["ids"] != [2, 9]
    # independent check at two more shapes, neither of them the export example's
    for shape in [(1, 4), (4, 13)]:
        ids = torch.randint(0, 50, shape)
        (got,) = _ort_run(path, ids)
        assert _rel(got, model(ids)) <= 1e-4, shape


def test_stream_export_has_named_dynamic_axes(stream_exports):
    _, exports = stream_exports
    for path, report in exports.values():
        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "seq"]
        assert report.input_shapes == {"ids": ["batch", "seq"]}
        assert report.output_names == ["output"]


def test_function_form_uses_attnres_domain_with_standard_body(stream_exports):
    _, exports = stream_exports
    path, report = exports[True]
    model = onnx.load(str(path))
    # the calls whose other sources are stacked already take the last one apart (test_onnx_fusions.py)
    assert report.onnx_functions == ["attnres.BlockAttnRes", "attnres.BlockAttnResPartial"]
    functions = {f.name: f for f in model.functions}
    assert {f.domain for f in model.functions} == {"attnres"}
    assert {node.domain for node in functions["BlockAttnRes"].node} == {""}  # only standard ops inside
    assert {(n.domain, n.op_type) for n in functions["BlockAttnResPartial"].node if n.domain} == {
        ("attnres", "BlockAttnRes")
    }
    calls = [n for n in model.graph.node if n.domain == "attnres"]
    assert len(calls) == 5 and {n.op_type for n in calls} == {"BlockAttnRes", "BlockAttnResPartial"}
    imports = {o.domain: o.version for o in model.opset_import}
    assert imports[""] == DEFAULT_OPSET and imports["attnres"] == 1
    assert all({o.domain: o.version for o in f.opset_import}[""] == DEFAULT_OPSET for f in model.functions)


def test_inline_form_has_no_custom_domain(stream_exports):
    _, exports = stream_exports
    path, report = exports[False]
    model = onnx.load(str(path))
    assert not model.functions and report.onnx_functions == []
    assert {node.domain for node in model.graph.node} == {""}
    assert any(node.op_type == "Softmax" for node in model.graph.node)


def test_report_is_json_serialisable(stream_exports):
    _, exports = stream_exports
    _, report = exports[False]
    data = json.loads(report.to_json())
    assert data["opset"] == DEFAULT_OPSET
    assert data["ir_version"] == onnx.load(str(exports[False][0])).ir_version <= 10  # onnxruntime >= 1.18 reads it
    assert data["providers"][0] == "CPUExecutionProvider"
    assert data["max_abs_diff"] == report.max_abs_diff
    assert data["provider_results"][0]["outputs"][0]["shape"] == report.provider_results[0].outputs[0].shape


# --------------------------------------------------------------------------------------
# The translations against the SPEC reference, one op at a time


@pytest.mark.parametrize(
    ("k", "scale", "as_function"),
    [(1, 1.0, False), (3, 3.0, False), (5, 1.0, True), (1, 1.0, True)],
    ids=["k1-inline", "k3-exact-inline", "k5-function", "k1-function"],
)
def test_single_aggregation_matches_reference(tmp_path, k, scale, as_function):
    """1..many sources (the ``Tensor[]`` input arrives as a list of ONNX values)."""
    dim = 12
    model = OneAggregation(dim, eps=1e-5, scale=scale)
    sources = [torch.randn(2, 5, dim) * (i + 1) for i in range(k)]
    path = tmp_path / "agg.onnx"
    export_onnx(model, tuple(sources), path, as_function=as_function)
    fresh = [torch.randn(3, 4, dim) * (2 - 0.3 * i) for i in range(k)]
    (got,) = _ort_run(path, *fresh)
    want = R.attnres(fresh, model.query.detach(), model.gain.detach(), 1e-5, scale)
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("as_function", [False, True], ids=["inline", "function"])
def test_tiny_eps_survives_the_optimiser_so_zero_rows_stay_finite(tmp_path, as_function):
    """Regression: onnxscript's optimiser drops ``x + c`` for a scalar ``|c| <= 1e-8`` (as ``+ 0``).

    With ViT/DeiT/BEiT's eps of 1e-12 gone, a zero source row (DeiT's zero-initialised
    class and distillation tokens plus zero position embeddings) gave ``1 / sqrt(0)``
    and NaN everywhere downstream. The function form is checked after the optimiser
    inlines it, as a user re-optimising the file would.
    """
    import onnxscript

    dim = 8
    model = OneAggregation(dim, eps=1e-12)
    sources = [torch.randn(2, 5, dim) for _ in range(3)]
    for s in sources:
        s[:, 0] = 0.0  # one all-zero token in every source
    path = tmp_path / "zero_rows.onnx"
    export_onnx(model, tuple(sources), path, as_function=as_function)  # verification would refuse NaN
    if as_function:
        proto = onnxscript.optimizer.optimize(onnx.load(str(path)))
        assert not proto.functions
        onnx.save(proto, str(path))
    fresh = [torch.randn(3, 4, dim) for _ in range(3)]
    for s in fresh:
        s[:, 1] = 0.0
    (got,) = _ort_run(path, *fresh)
    want = R.attnres(fresh, model.query.detach(), model.gain.detach(), 1e-12, 1.0)
    assert np.isfinite(got).all() and _rel(got, want) <= 1e-5


def test_two_phase_ops_match_reference(tmp_path):
    dim = 10
    model = TwoPhase(dim)
    a, b, partial = (torch.randn(2, 5, dim) for _ in range(3))
    path = tmp_path / "phases.onnx"
    report = export_onnx(model, (a, b, partial), path)
    assert report.attnres_ops == 3
    a, b, partial = (torch.randn(3, 7, dim) * 2 for _ in range(3))
    o, m, l, first, merged = _ort_run(path, a, b, partial)
    q, g = model.queries.detach(), model.gains.detach()
    ro, rm, rl = R.phase1([a, b], q, g, 1e-6)
    for got, want in [(o, ro), (m, rm), (l, rl)]:
        assert got.shape == tuple(want.shape)
        assert _rel(got, want) <= 1e-5
    assert _rel(first, R.attnres([a, b], q[0], g[0], 1e-6)) <= 1e-5
    assert _rel(merged, R.attnres([a, b, partial], q[1], g[1], 1e-6, 3.0)) <= 1e-5


def test_function_body_alone_matches_reference_in_onnxruntime(tmp_path):
    """The ``attnres.BlockAttnRes`` function, in a model of its own, against ``reference.attnres``."""
    from onnx import TensorProto, helper

    node = helper.make_node(
        "BlockAttnRes", ["sources", "query", "key_gain"], ["out"], domain="attnres", eps=1e-6, scale=2.0
    )
    graph = helper.make_graph(
        [node],
        "attnres_function_alone",
        [
            helper.make_tensor_value_info("sources", TensorProto.FLOAT, ["k", "b", "t", "d"]),
            helper.make_tensor_value_info("query", TensorProto.FLOAT, ["d"]),
            helper.make_tensor_value_info("key_gain", TensorProto.FLOAT, ["d"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "t", "d"])],
    )
    model = helper.make_model(
        graph,
        functions=[function_proto()],
        opset_imports=[helper.make_opsetid("", DEFAULT_OPSET), helper.make_opsetid("attnres", 1)],
    )
    model.ir_version = 8  # readable by every onnxruntime 1.2x
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "function.onnx"
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(3)
    for k, d in [(1, 8), (4, 16), (7, 5)]:
        sources = torch.randn(k, 2, 3, d, generator=gen) * torch.linspace(0.1, 4, k).view(k, 1, 1, 1)
        query, gain = torch.randn(d, generator=gen), 1 + 0.3 * torch.randn(d, generator=gen)
        (got,) = session.run(None, {"sources": sources.numpy(), "query": query.numpy(), "key_gain": gain.numpy()})
        want = R.attnres(list(sources), query, gain, 1e-6, 2.0)
        assert _rel(got, want) <= 1e-5, (k, d)


def test_fp16_model_keeps_fp16_io_and_fp32_statistics(tmp_path):
    model = OneAggregation(8).half()
    sources = [torch.randn(2, 5, 8).half() * 30 for _ in range(3)]
    path = tmp_path / "half.onnx"
    report = export_onnx(model, tuple(sources), path, as_function=True)
    graph = onnx.load(str(path)).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert report.rtol == pytest.approx(2e-2) and report.max_rel_diff <= 1e-2
    fresh = [torch.randn(3, 4, 8).half() * 30 for _ in range(3)]
    (got,) = _ort_run(path, *fresh)
    want = R.attnres([s.float() for s in fresh], model.query.float(), model.gain.float(), 1e-6)
    assert _rel(got, want) <= 2e-3  # one fp16 rounding of the output, not fp16 statistics


# --------------------------------------------------------------------------------------
# Opsets, external data, atomic write


def test_newer_opset_exports_and_runs(tmp_path):
    model = TinyStream(layers=2).eval()
    ids = torch.randint(0, 50, (2, 6))
    opset = min(max_opset(), 21)
    report = export_onnx(model, (ids,), tmp_path / "m.onnx", opset=opset, as_function=True)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    assert {o.domain: o.version for o in proto.functions[0].opset_import}[""] == opset
    assert report.max_rel_diff <= 1e-4


def test_external_data_is_written_beside_the_model(tmp_path):
    model = TinyStream(layers=2).eval()
    ids = torch.randint(0, 50, (2, 6))
    path = tmp_path / "big.onnx"
    report = export_onnx(model, (ids,), path, external_data=True)
    data = tmp_path / "big.onnx.data"
    assert report.external_data == str(data) and data.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no temp dir left
    umask = os.umask(0)
    os.umask(umask)
    for name in ("big.onnx", "big.onnx.data"):  # the umask's usual modes, not the staging directory's 0700
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    proto = onnx.load(str(path), load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    (got,) = _ort_run(path, ids)
    assert _rel(got, model(ids)) <= 1e-4


def test_static_export_when_dynamic_is_off(tmp_path):
    model = TinyStream(layers=2).eval()
    ids = torch.randint(0, 50, (2, 6))
    report = export_onnx(model, (ids,), tmp_path / "s.onnx", dynamic=False)
    assert report.input_shapes == {"ids": [2, 6]}
    assert report.verify_input_shapes == {"ids": [2, 6]}


def test_overwrites_an_existing_file_atomically(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    model = OneAggregation(8)
    export_onnx(model, (torch.randn(2, 3, 8),), path)
    onnx.checker.check_model(str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# --------------------------------------------------------------------------------------
# Bad input: clear errors, nothing left behind


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("opset", [17, 9, 99, "18", 18.0, True])
def test_unsupported_opset_is_refused_before_exporting(tmp_path, opset):
    with pytest.raises(ExportError, match="opset"):
        export_onnx(OneAggregation(4), (torch.randn(2, 3, 4),), tmp_path / "m.onnx", opset=opset)
    assert _listing(tmp_path) == []


def test_unwritable_destination_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError, match="a_file"):
        export_onnx(OneAggregation(4), (torch.randn(2, 3, 4),), blocker / "m.onnx")
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(OneAggregation(4), (torch.randn(2, 3, 4),), tmp_path)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(OneAggregation(4), (torch.randn(2, 3, 4),), tmp_path / "missing" / "m.onnx")
    assert _listing(tmp_path) == ["a_file"]


def test_verification_failure_raises_with_numbers_and_leaves_no_file(tmp_path, monkeypatch):
    real = vf.run_onnx

    def perturbed(path, provider, feeds):
        names, outs = real(path, provider, feeds)
        return names, [o + 0.05 for o in outs]

    monkeypatch.setattr(vf, "run_onnx", perturbed)
    with pytest.raises(ExportError, match=r"max abs diff 0\.05.*max rel diff .*No file was written") as info:
        export_onnx(OneAggregation(4), (torch.randn(2, 3, 4),), tmp_path / "m.onnx")
    assert "rtol=0.0001" in str(info.value)
    assert _listing(tmp_path) == []


def test_unconverted_model_exports_plain_with_a_note(tmp_path):
    model = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 3))
    report = export_onnx(model, (torch.randn(2, 6),), tmp_path / "plain.onnx")
    assert report.attnres_ops == 0
    assert any("no AttnRes op" in note for note in report.notes)
    assert report.max_rel_diff <= 1e-4


def test_unconverted_model_is_refused_when_attnres_is_required(tmp_path):
    model = nn.Sequential(nn.Linear(6, 6), nn.GELU())
    with pytest.raises(ExportError, match="no AttnRes op.*convert it first"):
        export_onnx(model, (torch.randn(2, 6),), tmp_path / "plain.onnx", require_attnres=True)
    assert _listing(tmp_path) == []


def test_model_that_fails_in_export_gives_the_root_cause_briefly(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("this model refuses to be traced")

    with pytest.raises(ExportError, match="Broken fails on the example inputs.*refuses to be traced") as info:
        export_onnx(Broken(), (torch.randn(4),), tmp_path / "m.onnx")
    assert not isinstance(info.value, NotExportableError)  # the user's model is broken: exit code 2
    assert len(str(info.value)) < 1000
    assert _listing(tmp_path) == []


def test_model_that_runs_but_cannot_be_captured_is_not_exportable(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[: int(x.sum() > 0) + 1] * 2  # a size from the values: not capturable with dynamic shapes

    with pytest.raises(NotExportableError, match="DataDependent is not exportable to ONNX because torch.export"):
        export_onnx(DataDependent(), (torch.randn(4, 3),), tmp_path / "m.onnx")
    assert _listing(tmp_path) == []


def test_report_gives_each_outputs_reference_magnitude_and_flags_an_all_zero_one(tmp_path):
    """Issue 15 item 6: a check against an all-zero output passes vacuously; the report must show it."""

    class HalfDead(nn.Module):
        def forward(self, x):
            return x * 3, x * 0

    x = torch.randn(2, 5)
    report = export_onnx(HalfDead(), (x,), tmp_path / "m.onnx", require_attnres=False)
    by_name = {o["name"]: o for o in report.outputs}
    assert set(by_name) == set(report.output_names) and len(by_name) == 2
    live, dead = (by_name[n] for n in report.output_names)
    assert live["reference_max_abs"] > 0 and live["ok"] and live["max_abs_diff"] <= 1e-6 * live["reference_max_abs"]
    assert dead["reference_max_abs"] == 0
    assert [n for n in report.notes if "all zeros in PyTorch" in n and repr(dead["name"]) in n]
    assert "reference_max_abs" in json.dumps(report.to_dict())


@torch.library.custom_op("attnres_test::double_it", mutates_args=())
def _double_it(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double_it.register_fake
def _(x):
    return torch.empty_like(x)


def test_op_without_onnx_translation_is_not_exportable_and_named(tmp_path):
    """Like ``transformers::grouped_mm_fallback``: the message names the op, the error is not a user mistake."""

    class CustomOp(nn.Module):
        def forward(self, x):
            return _double_it(x) + 1

    assert torch.equal(CustomOp()(torch.ones(2, 3)), torch.full((2, 3), 3.0))  # it runs in PyTorch
    with pytest.raises(NotExportableError, match="CustomOp is not exportable to ONNX because it calls the op "
                       "attnres_test.double_it"):  # fmt: skip
        export_onnx(CustomOp(), (torch.randn(2, 3),), tmp_path / "m.onnx", require_attnres=False)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("bad", [None, 3, "text", [1, 2]], ids=["none", "int", "str", "ints"])
def test_bad_example_inputs(tmp_path, bad):
    with pytest.raises(AttnResError):
        export_onnx(OneAggregation(4), bad, tmp_path / "m.onnx")


def test_not_a_module_is_refused(tmp_path):
    with pytest.raises(ExportError, match="torch.nn.Module"):
        export_onnx(lambda x: x, (torch.randn(2),), tmp_path / "m.onnx")


def test_both_runtime_distributions_are_refused():
    with pytest.raises(ExportError, match="both onnxruntime and onnxruntime-gpu"):
        rt.find_runtime(["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(ExportError, match="needs onnxruntime"):
        rt.find_runtime([])
    runtime = rt.find_runtime()
    assert runtime.distribution in rt.RUNTIME_DISTRIBUTIONS
    assert runtime.providers[0] == "CPUExecutionProvider"


def test_export_refuses_when_both_runtimes_are_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "installed_runtime_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(ExportError, match="both onnxruntime and onnxruntime-gpu"):
        export_onnx(OneAggregation(4), (torch.randn(2, 3, 4),), tmp_path / "m.onnx")
    assert _listing(tmp_path) == []


def test_advertised_but_unloadable_cuda_is_not_reported_as_verified(tmp_path, monkeypatch):
    """onnxruntime-gpu without CUDA libraries lists CUDA yet runs on CPU: the report must not claim CUDA."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    rt.provider_loads.cache_clear()
    try:
        report = export_onnx(OneAggregation(4), (torch.randn(2, 3, 4),), tmp_path / "m.onnx")
    finally:
        rt.provider_loads.cache_clear()
    assert report.providers == ["CPUExecutionProvider"]
    assert [r.provider for r in report.provider_results] == ["CPUExecutionProvider"]
    assert any("advertises CUDAExecutionProvider but it could not be loaded" in n for n in report.notes)


def test_training_mode_is_restored(tmp_path):
    model = TinyStream(layers=2)
    model.train()
    export_onnx(model, (torch.randint(0, 50, (2, 6)),), tmp_path / "m.onnx", verify=False)
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------------------
# Plumbing


def test_public_name_and_subpackage_do_not_shadow_onnx():
    import attnres_rewrite.onnx as ours

    assert attnres_rewrite.export_onnx is ours.export_onnx
    assert onnx.__name__ == "onnx" and hasattr(onnx, "checker")
    assert ours.__name__ == "attnres_rewrite.onnx"


def test_verify_inputs_resize_only_symbolic_axes():
    ids = torch.tensor([[5, 7, 9, 11, 13, 15]])
    mask = torch.ones(1, 6, dtype=torch.long)
    feats = torch.randn(1, 6, 4)
    args, kwargs = vf.make_verify_inputs(
        (ids,), {"mask": mask, "feats": feats}, [["b", "s"], ["b", "s"], ["b", "s", 4]]
    )
    new_ids, new_mask, new_feats = args[0], kwargs["mask"], kwargs["feats"]
    assert new_ids.shape == new_mask.shape == (2, 3) and new_feats.shape == (2, 3, 4)
    assert set(new_ids.flatten().tolist()) <= set(ids.flatten().tolist())  # valid token ids only
    assert bool((new_mask == 1).all())  # a mask of ones stays a mask of ones
    static = vf.make_verify_inputs((ids,), {}, [[1, 6]])[0][0]
    assert static.shape == ids.shape


def test_compare_outputs_flags_nan_and_shape_mismatch():
    want = torch.tensor([1.0, 2.0, float("nan")])
    (same,) = vf.compare_outputs(["y"], [np.array([1.0, 2.0, np.nan])], [want])
    assert same.max_abs_diff == 0.0
    (bad,) = vf.compare_outputs(["y"], [np.array([np.nan, 2.0, np.nan])], [want])
    assert np.isnan(bad.max_abs_diff)
    with pytest.raises(ExportError, match="shape"):
        vf.compare_outputs(["y"], [np.zeros(2)], [want])


def test_export_does_not_leave_temporaries_on_success(tmp_path):
    steps = []
    export_onnx(OneAggregation(4), (torch.randn(2, 3, 4),), tmp_path / "m.onnx", progress=steps.append)
    assert steps == ["capture", "translate", "save", "check", "verify"]
    assert _listing(tmp_path) == ["m.onnx"]
    assert not any(name.startswith(".attnres") for name in os.listdir(tmp_path))


def test_public_exporter_path_gives_the_same_model(tmp_path, monkeypatch):
    """Without the cached registry (private torch API drifted) the public torch.onnx.export is used."""
    from attnres_rewrite.onnx import export as export_module

    monkeypatch.setattr(export_module, "_cached_registry", lambda opset: None)
    model = OneAggregation(8)
    sources = (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    report = export_onnx(model, sources, tmp_path / "m.onnx", as_function=True)
    assert report.onnx_functions == ["attnres.BlockAttnRes", "attnres.BlockAttnResPartial"]
    assert report.max_rel_diff <= 1e-4
    fresh = [torch.randn(4, 6, 8) for _ in range(2)]
    (got,) = _ort_run(tmp_path / "m.onnx", *fresh)
    assert _rel(got, R.attnres(fresh, model.query.detach(), model.gain.detach())) <= 1e-5


# --------------------------------------------------------------------------------------
# The shared verification (export_onnx and `attnres verify --onnx` both call verify_file)


def test_tolerance_is_atol_plus_rtol_times_each_outputs_magnitude():
    # neither abs (1.5e-5 > 1e-5) nor rel (1.5e-4 > 1e-4) alone is within; their sum is
    assert vf.within_tolerance(1.5e-5, 0.1, rtol=1e-4, atol=1e-5)
    assert not vf.within_tolerance(2.5e-5, 0.1, rtol=1e-4, atol=1e-5)
    assert not vf.within_tolerance(float("nan"), 0.1, rtol=1.0, atol=1.0)
    small = vf.OutputDiff("small", [2], 1.5e-5, 1.5e-4, 0.1)
    big = vf.OutputDiff("big", [2], 3e-5, 3e-6, 10.0)  # rel far within, abs beyond atol: within by the sum
    result = vf.Verification(1e-4, 1e-5, "onnxruntime test", ["CPU"], [[2]], [vf.ProviderResult("CPU", 3e-5, 1.5e-4)])
    result.results[0].outputs = [small, big]
    assert result.ok and result.failures == []
    result.results[0].outputs = [vf.OutputDiff("small", [2], 2.5e-5, 2.5e-4, 0.1), big]
    (failure,) = result.failures
    assert failure.startswith("CPU output 'small': max abs diff 2.5e-05")


class PinnedSeq(nn.Module):
    """Runs only at sequence length 6 (and batch 2 when ``pin_batch``): an axis the graph may claim is free."""

    def __init__(self, pin_batch=False):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.pin_batch = pin_batch

    def forward(self, x):
        if x.shape[1] != 6 or (self.pin_batch and x.shape[0] != 2):
            raise ValueError(f"expected (2, 6, 4), got {tuple(x.shape)}")
        return self.proj(x)


def test_reference_run_backs_off_to_the_batch_then_to_the_example_shapes():
    x = torch.randn(2, 6, 4)
    dims = [["batch", "seq", 4]]
    _, _, out, notes = vf.reference_run(PinnedSeq(), (x,), {}, dims)
    assert out.shape == (3, 6, 4)
    (note,) = notes
    assert "verified with the batch axis only" in note and "expected (2, 6, 4)" in note
    _, _, out, notes = vf.reference_run(PinnedSeq(pin_batch=True), (x,), {}, dims)
    assert out.shape == (2, 6, 4) and "verified with the example's shapes" in notes[0]
    _, _, out, notes = vf.reference_run(nn.Linear(4, 4), (x,), {}, dims)
    assert out.shape == (3, 3, 4) and notes == []
    with pytest.raises(ExportError, match="failed on every verification input"):
        vf.reference_run(PinnedSeq(), (torch.randn(2, 7, 4),), {}, dims)


def test_verify_file_reproduces_the_exporters_figures(tmp_path):
    """What `attnres verify --onnx` runs on a written file gives what export_onnx reported for it."""
    model = TinyStream(layers=2).eval()
    ids = torch.randint(0, 50, (2, 6))
    path = tmp_path / "m.onnx"
    report = export_onnx(model, (ids,), path, seed=3)
    dims = vf.input_dims(onnx.load(str(path), load_external_data=False))
    again = vf.verify_file(
        str(path), model, (ids,), {}, dims, rt.find_runtime(), rtol=report.rtol, atol=report.atol, seed=3
    )
    assert again.ok
    assert (again.max_abs_diff, again.max_rel_diff) == (report.max_abs_diff, report.max_rel_diff)
    assert again.input_shapes == list(report.verify_input_shapes.values()) == [[3, 3]]
    assert again.providers == report.providers and again.runtime == report.runtime
