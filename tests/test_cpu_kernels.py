"""Fused CPU kernels of ``block_attnres`` against the fp64 reference (forward and gradients).

Same ground truth and error measure as tests/test_triton_kernels.py: the plain
reference math in fp64 on the same (rounded) inputs, gradients by fp64 autograd,
``max |a - e| / (|e| + max|e|)``. The kernels accumulate in fp32 and round once, so the
tolerances are those of the Triton kernels (fp32 1e-4, fp16 3e-3, bf16 2e-2).
"""

from __future__ import annotations

import math

import pytest
import torch

from attnres_rewrite import reference as R
from attnres_rewrite.kernels import cpu_kernels as C
from attnres_rewrite.kernels import torch_kernels as K

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-4, F16: 3e-3, BF16: 2e-2}
EPS = 1e-6

pytestmark = pytest.mark.skipif(not C.available(), reason="no C++ compiler: the PyTorch kernels serve CPU")

# (d, sources, tokens, dtype): odd sizes, one and many sources, T = 1 and long T
CASES = [
    (1, 1, 1, F32),
    (3, 2, 7, F16),
    (5, 33, 3, BF16),
    (64, 9, 1, F32),
    (127, 9, 130, BF16),
    (127, 1, 7, F16),
    (1000, 3, 2, F32),
    (256, 4, 2048, F32),
    (1000, 2, 5, BF16),
    (64, 17, 64, F16),
]


def _err(actual, expected) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape
    scale = e.abs().max().clamp_min(1e-30)
    return ((a - e).abs() / (e.abs() + scale)).max().item()


def _check(actual, expected, dtype, what):
    assert torch.isfinite(actual.float()).all(), what
    err = _err(actual, expected)
    assert err <= TOL[dtype], f"{what}: error {err:.3g} > {TOL[dtype]}"


def _inputs(d, k, t, dtype, shape=None):
    tok = (t,) if shape is None else shape
    srcs = [(torch.randn(*tok, d) * (0.5 + i % 4)).to(dtype) for i in range(k)]
    q = (torch.randn(d) * 2.0 / math.sqrt(d)).to(dtype)
    g = (1.0 + 0.3 * torch.randn(d)).to(dtype)
    return srcs, q, g


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-K{c[1]}-T{c[2]}-{str(c[3])[6:]}")
def test_forward_and_gradients_match_fp64_reference(case):
    d, k, t, dtype = case
    srcs, q, g = _inputs(d, k, t, dtype)
    scale = 1.0 if k % 2 else float(k)
    rs = [s.double().requires_grad_(True) for s in srcs]
    rq, rg = (x.double().requires_grad_(True) for x in (q, g))
    ref = R.attnres(rs, rq, rg, EPS, scale)
    out = C.attnres_forward(srcs, q, g, EPS, scale)
    assert out.dtype == dtype and out.shape == srcs[0].shape
    _check(out, ref, dtype, "forward")
    go = torch.randn(t, d).to(dtype)
    want = torch.autograd.grad(ref, [*rs, rq, rg], go.double())
    g_src, g_q, g_g = C.attnres_backward(go, srcs, q, g, EPS, scale)
    for i, (a, e) in enumerate(zip(g_src, want[:k])):
        assert a.dtype == dtype
        _check(a, e, dtype, f"grad source {i}")
    if k > 1:  # one source: the softmax is constant, query/gain gradients are exactly zero
        _check(g_q, want[k], dtype, "grad query")
        _check(g_g, want[k + 1], dtype, "grad key_gain")
    else:
        assert not g_q.any() and not g_g.any()


def test_threads_layouts_and_the_op_dispatch():
    """Two threads give the same source gradients (grad u: partials summed in thread order);
    (batch, seq) token axes and non-contiguous sources keep their layout; the op uses the kernel."""
    srcs, q, g = _inputs(48, 5, None, F32, shape=(3, 40))
    srcs[1] = srcs[1].transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    go = torch.randn(3, 40, 48)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.attnres_backward(go, srcs, q, g, EPS, 1.0)
        torch.set_num_threads(2)
        two = C.attnres_backward(go, srcs, q, g, EPS, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one[0], two[0]))
    assert _err(two[1], one[1]) < 1e-5  # grad u: per-thread partial sums, another summation order
    assert one[0][1].stride() == srcs[1].stride()
    want = K.attnres_backward(go, srcs, q, g, EPS, 1.0)
    for a, e in zip([*one[0], one[1], one[2]], [*want[0], want[1], want[2]]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    out = torch.ops.attnres.block_attnres(srcs, q, g, EPS, 1.0)
    assert torch.equal(out, C.attnres_forward(srcs, q, g, EPS, 1.0))
    assert out.stride() == srcs[0].stride()


def test_what_the_kernels_do_not_cover_falls_back():
    srcs, q, g = _inputs(8, 2, 3, torch.float64)
    assert not C.supports(srcs, q, g)  # fp64 keeps fp64 statistics (PyTorch kernels)
    assert not C.supports([torch.empty(0, 8)], q.float(), g.float())
    assert not C.supports([s.to("meta") for s in srcs])
