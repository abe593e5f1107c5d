"""How a converted model's programs run eagerly: the AttnRes op without the dispatcher, ATen without Python frames.

``attnres_rewrite.kernels.eager.block_attnres`` must give what the op gives (checked
against the naive fp64 implementation of test_ops and bit for bit against the op) and
must call the op whenever something the dispatcher provides is needed: autograd,
dispatch and function modes, fake tensors, Dynamo, the profiler, dtypes the fused
kernel does not cover. ``passes.simplify`` may only drop nodes that cannot change a
result.
"""

from __future__ import annotations

import pytest
import torch
from test_ops import BAD_AGGREGATE, EPS, FWD_TOL, agg_inputs, naive_attnres
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import attnres_rewrite as ar
from attnres_rewrite import samples
from attnres_rewrite.kernels import cpu_kernels, eager
from attnres_rewrite.passes.simplify import drop_trace_assertions

OPS = torch.ops.attnres

needs_cpu_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason="no C++ compiler: the fused CPU kernels are off, so is the direct call"
)


@pytest.fixture
def op_calls(monkeypatch: pytest.MonkeyPatch):
    """How many calls of ``attnres::block_attnres`` went through its overload (and with it the dispatcher)."""
    names = _OverloadCalls(monkeypatch).names
    return lambda: names.count("attnres.block_attnres.default")


class _OverloadCalls:
    """Counts ``OpOverload.__call__`` (the Python frame the eager code skips), by overload."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real = torch._ops.OpOverload.__call__

        def counting(op, /, *args, **kwargs):
            self.names.append(str(op))
            return real(op, *args, **kwargs)

        monkeypatch.setattr(torch._ops.OpOverload, "__call__", counting)


SHAPES = [(1, 1, 1, 1), (1, 1, 64, 2), (2, 1, 127, 9), (2, 7, 3, 33), (3, 5, 256, 4), (1, 300, 33, 3)]


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-d{}-K{}".format(*s))
def test_direct_call_gives_the_ops_result(shape, dtype, op_calls) -> None:
    b, t, d, k = shape
    sources, query, gain = agg_inputs((b, t), d, k, dtype=dtype)
    scale = float(k)
    with torch.no_grad():
        assert eager.runs_direct(sources, query, gain)
        got = eager.block_attnres(sources, query, gain, EPS, scale)
    assert op_calls() == 0
    assert got.dtype == dtype and got.shape == (b, t, d)
    assert torch.equal(got, torch.ops.attnres.block_attnres(sources, query, gain, EPS, scale))
    tol = FWD_TOL[dtype]
    torch.testing.assert_close(
        got.double(), naive_attnres(sources, query, gain, EPS, scale), rtol=tol["rtol"], atol=tol["atol"] * scale
    )


@needs_cpu_kernels
def test_grad_mode_without_anything_to_record_calls_directly(op_calls) -> None:
    sources, query, gain = agg_inputs((2, 3), 5, 3)
    query, gain = nn.Parameter(query, requires_grad=False), nn.Parameter(gain, requires_grad=False)
    got = eager.block_attnres(sources, query, gain, EPS, 1.0)
    assert op_calls() == 0 and not got.requires_grad
    torch.testing.assert_close(got.double(), naive_attnres(sources, query, gain), **FWD_TOL[torch.float32])


@pytest.mark.parametrize("which", ["query", "gain", "source"])
def test_inputs_that_require_grad_go_through_the_op_and_get_gradients(which: str, op_calls) -> None:
    sources, query, gain = agg_inputs((2, 3), 5, 3)
    leaf = {"query": query, "gain": gain, "source": sources[1]}[which].requires_grad_()
    out = eager.block_attnres(sources, query, gain, EPS, 2.0)
    assert op_calls() == 1
    go = torch.randn(out.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad(out, leaf, go.float())
    (want,) = torch.autograd.grad(naive_attnres(sources, query, gain, EPS, 2.0), leaf, go)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_op(op_calls) -> None:
    sources, query, gain = agg_inputs((2, 3), 5, 3)
    with torch.no_grad(), _Recorder() as mode:
        got = eager.block_attnres(sources, query, gain, EPS, 1.0)
    assert op_calls() >= 1 and "attnres.block_attnres.default" in mode.ops  # (the mode calls the overload again)
    torch.testing.assert_close(got.double(), naive_attnres(sources, query, gain), **FWD_TOL[torch.float32])


def test_fake_tensors_go_through_the_op(op_calls) -> None:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode() as mode, torch.no_grad():
        sources = [mode.from_tensor(s) for s in agg_inputs((2, 3), 5, 3)[0]]
        out = eager.block_attnres(sources, torch.ones(5), torch.ones(5), EPS, 1.0)
    assert op_calls() >= 1 and isinstance(out, FakeTensor) and out.shape == (2, 3, 5)


def test_the_profiler_shows_the_op(op_calls) -> None:
    sources, query, gain = agg_inputs((2, 3), 5, 3)
    with torch.no_grad(), torch.profiler.profile() as prof:
        eager.block_attnres(sources, query, gain, EPS, 1.0)
    assert op_calls() == 1
    assert any(e.name == "attnres::block_attnres" for e in prof.events())


def test_jit_trace_records_the_op(op_calls) -> None:
    """A direct call is invisible to ``torch.jit.trace``: the trace would replay a constant."""
    sources, query, gain = agg_inputs((2, 3), 5, 3)
    with torch.no_grad():
        traced = torch.jit.trace(lambda a, b: eager.block_attnres([a, b], query, gain, EPS, 1.0), tuple(sources[:2]))
        assert "attnres::block_attnres" in str(traced.graph)
        fresh = agg_inputs((2, 3), 5, 3, seed=5)[0][:2]
        torch.testing.assert_close(traced(*fresh), OPS.block_attnres(fresh, query, gain, EPS, 1.0))


def test_dynamo_traces_the_op() -> None:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    sources, query, gain = agg_inputs((2, 3), 5, 3)
    fn = torch.compile(lambda s, q, g: eager.block_attnres(s, q, g, EPS, 1.0), backend=backend, fullgraph=True)
    with torch.no_grad():
        got = fn(sources, query, gain)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.attnres.block_attnres.default in targets
    torch.testing.assert_close(got.double(), naive_attnres(sources, query, gain), **FWD_TOL[torch.float32])


def test_fp64_takes_the_op_and_keeps_fp64_statistics(op_calls) -> None:
    sources, query, gain = agg_inputs((2, 3), 5, 3, dtype=torch.float64)
    with torch.no_grad():
        got = eager.block_attnres(sources, query, gain, EPS, 1.0)
    assert op_calls() == 1
    torch.testing.assert_close(got, naive_attnres(sources, query, gain), **FWD_TOL[torch.float64])


@pytest.mark.parametrize(
    ("args", "error", "message"), [case for case in BAD_AGGREGATE if "dtype torch.float64 but" not in case[2]]
)
def test_bad_input_gets_the_ops_errors(args, error, message) -> None:
    with torch.no_grad(), pytest.raises(error, match=message):
        eager.block_attnres(list(args[0]), *args[1:], EPS, 1.0)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_mixed_dtypes_are_promoted_as_the_residual_add_was(low: torch.dtype) -> None:
    """Under autocast a branch output is bf16/fp16 and the stream fp32: ``h + f(h)`` was fp32."""
    sources, query, gain = agg_inputs((2, 3), 5, 3)
    sources[1] = sources[1].to(low).requires_grad_()
    out = eager.block_attnres(sources, query, gain, EPS, 2.0)
    assert out.dtype == torch.float32
    want = naive_attnres([s.float() for s in sources], query, gain, EPS, 2.0)
    torch.testing.assert_close(out.double(), want, **FWD_TOL[torch.float32])
    out.sum().backward()
    assert sources[1].grad.dtype == low and torch.isfinite(sources[1].grad.float()).all()


# --------------------------------------------------------------------------------------
# A converted model's generated code


@needs_cpu_kernels
def test_converted_model_runs_its_program_without_overload_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = samples.get("llama", layers=2, dropout=0.0)
    converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
    model.eval(), converted.eval()
    with torch.no_grad():
        want = model(*inputs)
        converted(*inputs)  # the first call of this signature captures (and traces: overload calls)
        calls = _OverloadCalls(monkeypatch)
        got = converted(*inputs)
        assert calls.names == []
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    program = ar.api.programs(converted)[""][-1]
    aggregations = sum(
        n.target is torch.ops.attnres.block_attnres.default for n in program.flat.graph.nodes if n.op == "call_function"
    )
    assert aggregations >= 4
    # grad mode on (parameters require grad): only the AttnRes op goes through its overload, for its autograd
    calls.names.clear()
    got = converted(*inputs)
    assert calls.names == ["attnres.block_attnres.default"] * aggregations
    got.float().pow(2).sum().backward()
    assert all(p.grad is not None for p in converted.attnres.parameters())
    assert "torch.ops.aten." in program.layers[0].source  # what tracebacks and readers see


# --------------------------------------------------------------------------------------
# passes.simplify


class _Casts(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        same = x.to(torch.float32) * 2  # a cast that looks like a no-op: real under autocast
        wide = x.to(torch.float64).sum(-1, keepdim=True)
        return same + wide.to(torch.float32)


def test_simplify_drops_the_assertions_and_keeps_every_cast() -> None:
    x = torch.randn(3, 4)
    gm = torch.export.export(_Casts(), (x,), strict=False).module()
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    asserts = calls.count(torch.ops.aten._assert_tensor_metadata.default)
    assert asserts >= 3
    assert drop_trace_assertions(gm) == asserts
    after = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert after == [t for t in calls if t is not torch.ops.aten._assert_tensor_metadata.default]
    assert after.count(torch.ops.aten.to.dtype) == 3
    torch.testing.assert_close(gm(x), _Casts()(x))
