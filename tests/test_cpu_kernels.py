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
    # widths with every tail: pairs of 16-float vectors, one vector, scalars
    (255, 3, 5, F32),
    (255, 4, 9, F16),
    (47, 5, 11, BF16),
    # pass 1 runs source by source over blocks of tokens: rows of up to 16 KB a token (K rows,
    # K + 1 with grad_out) in blocks of 16 KB (above: 64 x 17 fp16 -> 7 tokens, so T = 64 ends
    # on a partial block), larger ones in blocks of 256 KB; T is not a multiple of the block
    (1000, 5, 70, F32),  # 20 KB a token: blocks of 13 tokens
    (1030, 9, 40, F32),
    (2050, 5, 33, BF16),
    (1600, 6, 21, F16),
    (1000, 3, 9, F32),  # forward 12 KB (one token), backward 16 KB (one token): the boundary
    (1400, 3, 9, BF16),  # forward 8.4 KB (one token), backward 11.2 KB
    (1500, 5, 130, F16),
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


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("d", [255, 1500])  # 1500: token blocks
def test_16bit_results_are_the_fp32_kernel_rounded_once(dtype, d):
    """16-bit rows are converted to fp32 exactly and the results rounded once to nearest even:
    bit for bit the fp32 kernel's results on the same values, rounded by torch (a NaN row too)."""
    srcs, q, g = _inputs(d, 5, 37, dtype)
    srcs[2][3, 7] = float("nan")
    srcs[0] = srcs[0] * 300.0  # large values: fp16 results near overflow
    go = torch.randn(37, d).to(dtype)
    wide = [s.float() for s in srcs]
    exact = dict(rtol=0, atol=0, equal_nan=True)
    out = C.attnres_forward(srcs, q, g, EPS, 3.0)
    torch.testing.assert_close(out, C.attnres_forward(wide, q, g, EPS, 3.0).to(dtype), **exact)
    assert out[3].isnan().all() and not out[:3].isnan().any()
    got, want = C.attnres_backward(go, srcs, q, g, EPS, 3.0), C.attnres_backward(go.float(), wide, q, g, EPS, 3.0)
    for a, e in zip(got[0], want[0]):
        torch.testing.assert_close(a, e.to(dtype), **exact)


@pytest.mark.parametrize("d", [48, 1100])  # 1100: token blocks of 11, split across threads
def test_threads_layouts_and_the_op_dispatch(d):
    """Two threads give the same source gradients (grad u: partials summed in thread order);
    (batch, seq) token axes and non-contiguous sources keep their layout; the op uses the kernel."""
    srcs, q, g = _inputs(d, 5, None, F32, shape=(3, 40))
    srcs[1] = srcs[1].transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    go = torch.randn(3, 40, d)
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
        assert _err(a, e) < 1e-5  # both about 1e-6 from fp64 (other fp32 summation orders)
    out = torch.ops.attnres.block_attnres(srcs, q, g, EPS, 1.0)
    assert torch.equal(out, C.attnres_forward(srcs, q, g, EPS, 1.0))
    assert out.stride() == srcs[0].stride()


@pytest.mark.parametrize("qdtype", [torch.float64, F16, BF16])
def test_query_and_gain_dtypes_and_strides(qdtype):
    """query/gain of another dtype than the sources (or strided) are taken as fp32 (q * g in fp32),
    and their gradients come back in their own dtype."""
    srcs, q, g = _inputs(33, 4, 6, F32)
    q = q.to(qdtype)
    g = torch.stack([g, g], 1)[:, 0]  # strided view, fp32
    assert not g.is_contiguous()
    rs = [s.double().requires_grad_(True) for s in srcs]
    rq, rg = (x.double().requires_grad_(True) for x in (q, g))
    ref = R.attnres(rs, rq, rg, EPS, 1.0)
    _check(C.attnres_forward(srcs, q, g, EPS, 1.0), ref, F32, "forward")
    go = torch.randn(6, 33)
    want = torch.autograd.grad(ref, [rq, rg], go.double())
    _, g_q, g_g = C.attnres_backward(go, srcs, q, g, EPS, 1.0)
    assert g_q.dtype == qdtype and g_g.dtype == F32
    _check(g_q, want[0], qdtype if qdtype != torch.float64 else F32, "grad query")
    _check(g_g, want[1], F32, "grad key_gain")


def test_what_the_kernels_do_not_cover_falls_back():
    srcs, q, g = _inputs(8, 2, 3, torch.float64)
    assert not C.supports(srcs, q, g)  # fp64 keeps fp64 statistics (PyTorch kernels)
    assert not C.supports([torch.empty(0, 8)], q.float(), g.float())
    assert not C.supports([s.to("meta") for s in srcs])
