"""Triton kernels of ``torch.ops.attnres.*`` against the plain reference math.

Runs on the GPU when there is one, else on CPU under ``TRITON_INTERPRET=1`` (set by
conftest.py before anything imports Triton). Ground truth is :mod:`attnres_rewrite.reference`
evaluated in fp64 on the *same* (possibly fp16/bf16-rounded) inputs, with gradients from
fp64 autograd through that plain math -- so the hand-written backward formulas of both
:mod:`torch_kernels` and the Triton kernels are checked independently.

Shape matrix. The interpreter costs milliseconds per program instance and op, so the
full product d {1, 3, 64, 127, 1000} x sources {1, 2, 9, 33} x tokens {1, 7, 130} x
{fp32, fp16, bf16} (180 cases x 4 ops) is replaced by a covering list (``CASES``): every
value of every axis appears, and every *pair* of values of (d, sources), (d, tokens),
(d, dtype), (sources, tokens), (sources, dtype), (tokens, dtype) appears in at least one
case (``test_matrix_is_pairwise_covering`` checks this). Each case runs every kernel,
both forward code paths (fused rows in registers / chunked over d), forward and all
gradients. Phase 1 cycles S through {1, 3, 16}.

Tolerances. Errors are measured as ``max |a - e| / (|e| + max|e|)`` (relative to the
element, with an absolute floor at the tensor's own scale: the gradient formulas
subtract terms of the size of the largest element, so that is the scale at which
rounding enters). Per dtype:

* fp32: 1e-4. The kernels accumulate in fp32 over up to 1000 features and 33 sources
  (~1e-6 relative), and logits of size O(1..10) pass through ``exp`` (GPU ``ex2.approx``,
  ~2 ulp) and ``rsqrt.approx``; 1e-4 leaves ~20x margin over what we measure and still
  catches any wrong term (those show up as O(1) errors).
* fp16: 3e-3. Results are rounded once to fp16 (half-ulp = 2^-11 = 4.9e-4 relative)
  after fp32 accumulation; 3e-3 is ~6 half-ulps. (A backward that formed
  ``grad_out . out`` from the fp16-rounded ``out``, as the PyTorch kernels do, misses this
  by ~2x on d = 1: the subtraction in the softmax gradient amplifies that rounding. The
  Triton backward rebuilds the dot in fp32 from the sources.)
* bf16: 2e-2. One rounding to bf16 is 2^-8 = 3.9e-3 relative; 2e-2 is ~5 half-ulps.
  bf16 inputs are converted to fp32 right after the load (the interpreter's bf16
  arithmetic is not IEEE), so the reference sees exactly the values the kernel sees.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import triton
from conftest import DEVICE

from attnres_rewrite import reference as R
from attnres_rewrite.kernels import torch_kernels as K
from attnres_rewrite.kernels import triton_attnres as TA

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-4, F16: 3e-3, BF16: 2e-2}
EPS = 1e-6

D_VALUES = (1, 3, 64, 127, 1000)
K_VALUES = (1, 2, 9, 33)
T_VALUES = (1, 7, 130)
DTYPES = (F32, F16, BF16)

# (d, sources, tokens, dtype): a pairwise-covering subset of the full product
CASES = [
    (1, 1, 1, F32),
    (1, 2, 7, F16),
    (1, 9, 130, BF16),
    (1, 33, 7, F32),
    (3, 1, 7, BF16),
    (3, 2, 130, F32),
    (3, 9, 1, F16),
    (3, 33, 130, BF16),
    (64, 1, 130, F16),
    (64, 2, 1, BF16),
    (64, 9, 7, F32),
    (64, 33, 1, F16),
    (127, 1, 7, F32),
    (127, 2, 130, BF16),
    (127, 9, 1, F32),
    (127, 33, 7, F16),
    (1000, 1, 1, BF16),
    (1000, 2, 7, F32),
    (1000, 9, 130, F16),
    (1000, 33, 7, BF16),
    (127, 9, 130, F16),
    (64, 2, 130, F32),
]


def _ids(case):
    d, k, t, dt = case
    return f"d{d}-K{k}-T{t}-{str(dt).split('.')[-1]}"


def test_matrix_is_pairwise_covering():
    axes = [D_VALUES, K_VALUES, T_VALUES, DTYPES]
    for a, b in itertools.combinations(range(4), 2):
        seen = {(c[a], c[b]) for c in CASES}
        missing = set(itertools.product(axes[a], axes[b])) - seen
        assert not missing, f"axes {a},{b} miss pairs {sorted(missing, key=str)}"


# ------------------------------------------------------------------------------------
# helpers


def _err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    if e.numel() == 0:
        return 0.0
    scale = e.abs().max().clamp_min(1e-30)
    return ((a - e).abs() / (e.abs() + scale)).max().item()


def _check(actual, expected, dtype, what):
    assert torch.isfinite(actual.detach().float()).all(), f"{what}: non-finite values"
    err = _err(actual, expected)
    assert err <= TOL[dtype], f"{what}: error {err:.3g} > {TOL[dtype]} ({dtype})"


def _sources(k, t, d, dtype, shape=None):
    """Sources with different scales (so the RMS normalisation matters)."""
    tok = (t,) if shape is None else shape
    return [(torch.randn(*tok, d) * (0.5 + i % 4)).to(device=DEVICE, dtype=dtype) for i in range(k)]


def _params(d, dtype, rows=None):
    """Queries ~ 2/sqrt(d) (logits O(1): softmax neither uniform nor one-hot), gains ~1."""
    shape = (d,) if rows is None else (rows, d)
    q = (torch.randn(shape) * 2.0 / math.sqrt(d)).to(DEVICE, dtype)
    g = (1.0 + 0.3 * torch.randn(shape)).to(DEVICE, dtype)
    return q, g


def _paths(d: int, case_index: int, forward: bool) -> list[dict]:
    """Code paths to run: the default launch, and (forward) the split path with two d-chunks.

    The split path is forced with ``block_d = next_pow2(d) / 2`` so the d-loops iterate and
    the tail chunk is masked. The backward kernels are always chunked; they alternate
    between one chunk (default config) and two chunks from case to case.
    """
    half = {"block_d": max(1, triton.next_power_of_2(d) // 2)}
    if forward:
        return [{}, half]
    return [{} if case_index % 2 else half]


def _f64(xs):
    return [x.detach().double().requires_grad_(True) for x in xs]


# ------------------------------------------------------------------------------------
# block_attnres


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_block_attnres(case):
    d, k, t, dtype = case
    srcs = _sources(k, t, d, dtype)
    q, g = _params(d, dtype)
    scale = 1.0 if k % 2 else float(k)  # paper and exact mode
    # reference in fp64 from the same rounded inputs; gradients by autograd
    rs = _f64(srcs)
    rq, rg = _f64([q, g])
    ref = R.attnres(rs, rq, rg, EPS, scale)
    idx = CASES.index(case)
    for path in _paths(d, idx, True):
        out = TA.attnres_forward(srcs, q, g, EPS, scale, **path)
        assert out.dtype == dtype and out.shape == srcs[0].shape
        _check(out, ref, dtype, f"forward {path}")
    go = torch.randn(t, d).to(DEVICE, dtype)
    gref = torch.autograd.grad(ref, [*rs, rq, rg], go.double())
    for path in _paths(d, idx, False):
        g_src, g_q, g_g = TA.attnres_backward(go, srcs, q, g, EPS, scale, **path)
        assert g_q.dtype == dtype and g_g.dtype == dtype
        for i, (a, e) in enumerate(zip(g_src, gref[:k])):
            assert a.dtype == dtype
            _check(a, e, dtype, f"grad source {i} {path}")
        _check(g_q, gref[k], dtype, f"grad query {path}")
        _check(g_g, gref[k + 1], dtype, f"grad key_gain {path}")


# ------------------------------------------------------------------------------------
# two-phase schedule


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_phase1(case):
    d, k, t, dtype = case
    idx = CASES.index(case)
    s = (1, 3, 16)[idx % 3] if d * k * t < 20_000 else 3  # S = 16 only on small cases (interpreter time)
    srcs = _sources(k, t, d, dtype)
    qs, gs = _params(d, dtype, rows=s)
    rs = _f64(srcs)
    rq, rg = _f64([qs, gs])
    ro, rm, rl = R.phase1(rs, rq, rg, EPS)
    # o, m, l are fp32 statistics, compared at the fp32 tolerance for fp32 inputs; for
    # fp16/bf16 inputs the statistics themselves are fp32, so only the accumulation error
    # remains: the fp32 tolerance applies to them as well.
    for path in _paths(d, idx, True):
        o, m, l = TA.phase1_forward(srcs, qs, gs, EPS, **path)  # noqa: E741
        assert o.dtype == m.dtype == l.dtype == F32
        _check(o, ro, F32, f"o {path}")
        _check(m, rm, F32, f"m {path}")
        _check(l, rl, F32, f"l {path}")
    g_o, g_m, g_l = torch.randn_like(o), torch.randn_like(m), torch.randn_like(l)
    gref = torch.autograd.grad((ro, rm, rl), [*rs, rq, rg], (g_o.double(), g_m.double(), g_l.double()))
    for path in _paths(d, idx, False):
        g_src, g_q, g_g = TA.phase1_backward(g_o, g_m, g_l, srcs, qs, gs, o, m, l, EPS, **path)
        for i, (a, e) in enumerate(zip(g_src, gref[:k])):
            assert a.dtype == dtype
            _check(a, e, dtype, f"grad source {i} {path}")
        _check(g_q, gref[k], dtype, f"grad queries {path}")
        _check(g_g, gref[k + 1], dtype, f"grad key_gains {path}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_phase2(case):
    d, k, t, dtype = case
    idx = CASES.index(case)
    scale = float(k + 1)
    q, g = _params(d, dtype)
    # phase-1 statistics of k random sources (fp32, as phase 1 produces them)
    o, m, l = K.phase1_forward(_sources(k, t, d, F32), *_params(d, F32, rows=1), EPS)  # noqa: E741
    o, m, l = o[0].contiguous(), m[0].contiguous(), l[0].contiguous()  # noqa: E741
    partial = _sources(1, t, d, dtype)[0]
    ro, rm, rl, rp, rq, rg = _f64([o, m, l, partial, q, g])
    ref = R.phase2(ro, rm, rl, rp, rq, rg, EPS, scale)
    ref_none = R.phase2(ro, rm, rl, None, rq, rg, EPS, scale, out_dtype=torch.float64)
    for path in _paths(d, idx, True):
        out = TA.phase2_forward(o, m, l, partial, q, g, EPS, scale, dtype, **path)
        assert out.dtype == dtype
        _check(out, ref, dtype, f"merge {path}")
        _check(TA.phase2_forward(o, m, l, None, q, g, EPS, scale, dtype, **path), ref_none, dtype, f"o/l {path}")
    go = torch.randn(t, d).to(DEVICE, dtype)
    gref = torch.autograd.grad(ref, [ro, rm, rl, rp, rq, rg], go.double())
    names = ("o", "m", "l", "partial", "query", "key_gain")
    for path in _paths(d, idx, True):
        grads = TA.phase2_backward(go, o, m, l, partial, q, g, EPS, scale, **path)
        for name, a, e, want in zip(names, grads, gref, (F32, F32, F32, dtype, dtype, dtype)):
            assert a.dtype == want, (name, a.dtype)
            _check(a, e, dtype, f"grad {name} {path}")


# ------------------------------------------------------------------------------------
# layouts, limits, determinism, registration


def test_many_sources_multi_axis_tokens():
    """256 sources (the contract's 'at least 256'), tokens laid out as (batch, seq)."""
    k, d = 256, 24
    srcs = _sources(k, None, d, F32, shape=(2, 3))
    q, g = _params(d, F32)
    rs = _f64(srcs)
    rq, rg = _f64([q, g])
    ref = R.attnres(rs, rq, rg, EPS, 1.0)
    out = TA.attnres_forward(srcs, q, g, EPS, 1.0)
    _check(out, ref, F32, "forward")
    go = torch.randn_like(out)
    gref = torch.autograd.grad(ref, [*rs, rq, rg], go.double())
    g_src, g_q, g_g = TA.attnres_backward(go, srcs, q, g, EPS, 1.0)
    _check(torch.stack(g_src), torch.stack(gref[:k]), F32, "grad sources")
    _check(g_q, gref[k], F32, "grad query")
    _check(g_g, gref[k + 1], F32, "grad key_gain")
    o, m, l = TA.phase1_forward(srcs, *_params(d, F32, rows=2), EPS)  # noqa: E741
    assert o.shape == (2, 2, 3, d) and m.shape == l.shape == (2, 2, 3)


def test_non_contiguous_inputs():
    """Strided views (transposes, slices) are made contiguous by the launchers."""
    d, t = 40, 9
    base = [torch.randn(d, t, device=DEVICE) for _ in range(3)]
    srcs = [b.t() for b in base]  # (t, d), non-contiguous
    wide = torch.randn(2, d, device=DEVICE)
    q, g = wide[:, ::1][0], torch.randn(d, 2, device=DEVICE)[:, 1]  # g is strided
    assert not srcs[0].is_contiguous() and not g.is_contiguous()
    ref = K.attnres_forward([s.contiguous() for s in srcs], q.contiguous(), g.contiguous(), EPS, 1.0)
    _check(TA.attnres_forward(srcs, q, g, EPS, 1.0), ref, F32, "forward")
    go = torch.randn(d, t, device=DEVICE).t()
    want = K.attnres_backward(go.contiguous(), [s.contiguous() for s in srcs], q, g.contiguous(), EPS, 1.0)
    got = TA.attnres_backward(go, srcs, q, g, EPS, 1.0)
    for a, e in zip(got[0], want[0]):
        _check(a, e, F32, "grad source")
    _check(got[1], want[1], F32, "grad query")
    _check(got[2], want[2], F32, "grad key_gain")


def test_query_gain_gradients_are_deterministic():
    """Two-stage reduction (no atomics): bitwise-identical gradients run to run."""
    srcs = _sources(5, 130, 64, F32)
    q, g = _params(64, F32)
    out = TA.attnres_forward(srcs, q, g, EPS, 1.0)
    go = torch.randn_like(out)
    a = TA.attnres_backward(go, srcs, q, g, EPS, 1.0)
    b = TA.attnres_backward(go, srcs, q, g, EPS, 1.0)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def test_phase1_backward_with_missing_grads():
    """Autograd passes None for outputs that did not reach the loss (e.g. only ``o`` used).

    Compared with fp64 autograd, not with ``torch_kernels.phase1_backward``: that one
    routes the max term to the source whose recomputed logit equals the saved ``m``
    bitwise, so it drops the term when ``m`` came from another kernel (as here); the
    Triton kernel routes it to the first argmax of the recomputed logits.
    """
    d, k, t = 20, 3, 5
    srcs = _sources(k, t, d, F32)
    qs, gs = _params(d, F32, rows=2)
    rs = _f64(srcs)
    rq, rg = _f64([qs, gs])
    ref = R.phase1(rs, rq, rg, EPS)
    o, m, l = TA.phase1_forward(srcs, qs, gs, EPS)  # noqa: E741
    g_o = torch.randn_like(o)
    for grads in ((g_o, None, None), (None, torch.randn_like(m), None), (None, None, torch.randn_like(l))):
        outs = [r for r, x in zip(ref, grads) if x is not None]
        want = torch.autograd.grad(outs, [*rs, rq, rg], [x.double() for x in grads if x is not None], retain_graph=True)
        got = TA.phase1_backward(*grads, srcs, qs, gs, o, m, l, EPS)
        for a, e in zip([*got[0], got[1], got[2]], want):
            _check(a, e, F32, f"grads {[x is not None for x in grads]}")


def test_fp64_routes_to_pytorch_kernels():
    """fp64 keeps fp64 statistics (the contract, used by gradcheck): PyTorch kernels serve it."""
    srcs = _sources(3, 7, 16, torch.float64)
    q, g = _params(16, torch.float64)
    ref = K.attnres_forward(srcs, q, g, EPS, 1.0)
    assert torch.equal(TA.attnres_forward(srcs, q, g, EPS, 1.0), ref)
    o, m, l = TA.phase1_forward(srcs, q[None], g[None], EPS)  # noqa: E741
    assert o.dtype == torch.float64


def test_cuda_registration_and_validation():
    """Every op has a CUDA kernel after ``register()``; the CUDA kernels validate inputs."""
    TA.register()
    for name in TA.CUDA_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"attnres::{name}", "CUDA"), name
    srcs = _sources(2, 3, 8, F32)
    q, g = _params(8, F32)
    with pytest.raises(ValueError, match="query must have shape"):
        TA.cuda_block_attnres(srcs, q[:4], g, EPS, 1.0)
    with pytest.raises(ValueError, match="eps"):
        TA.cuda_block_phase1(srcs, q[None], g[None], 0.0)
    out = TA.cuda_block_attnres(srcs, q, g, EPS, 1.0)
    _check(out, K.attnres_forward(srcs, q, g, EPS, 1.0), F32, "registered forward")


def test_ops_dispatch_with_autograd_on_device():
    """``torch.ops.attnres`` end to end with autograd on DEVICE (the Triton kernels on a GPU)."""
    d, t = 48, 11
    srcs = [x.requires_grad_(True) for x in _sources(4, t, d, F32)]
    q, g = (x.requires_grad_(True) for x in _params(d, F32))
    out = torch.ops.attnres.block_attnres(srcs, q, g, EPS, 2.0)
    out.square().sum().backward()
    rs = _f64(srcs)
    rq, rg = _f64([q, g])
    ref = R.attnres(rs, rq, rg, EPS, 2.0)
    gref = torch.autograd.grad(ref.square().sum(), [*rs, rq, rg])
    _check(out, ref, F32, "forward")
    for i, (x, e) in enumerate(zip([*srcs, q, g], gref)):
        _check(x.grad, e, F32, f"grad {i}")
    # two-phase through the ops: phase 1 for S = 3 queries, phase 2 for the third one
    qs, gs = (x.requires_grad_(True) for x in _params(d, F32, rows=3))
    partial = _sources(1, t, d, F32)[0].requires_grad_(True)
    o, m, l = torch.ops.attnres.block_phase1(srcs, qs, gs, EPS)  # noqa: E741
    h = torch.ops.attnres.block_phase2(o[2], m[2], l[2], partial, qs[2], gs[2], EPS, 1.0, F32)
    h.sum().backward()
    single = R.attnres([*_f64(srcs), partial.detach().double()], qs[2].detach().double(), gs[2].detach().double(), EPS)
    _check(h, single, F32, "two-phase == single pass")
    assert qs.grad is not None and torch.isfinite(qs.grad).all()


def test_multi_program_grids(monkeypatch):
    """Small token tiles: many programs, tile offsets, grid-stride loops, partial-sum groups.

    Under the interpreter the launchers use one big token tile to save time; this test
    shrinks it so that every kernel runs with several programs (on a GPU it always does).
    """
    monkeypatch.setattr(TA, "INTERPRET_MAX_BT", 4)
    d, k, t = 37, 3, 29
    srcs = _sources(k, t, d, F32)
    q, g = _params(d, F32)
    qs, gs = _params(d, F32, rows=3)
    rs = _f64(srcs)
    rq, rg, rqs, rgs = _f64([q, g, qs, gs])
    ref = R.attnres(rs, rq, rg, EPS, 1.0)
    go = torch.randn_like(srcs[0])
    gref = torch.autograd.grad(ref, [*rs, rq, rg], go.double())
    for path in _paths(d, 1, True):
        out = TA.attnres_forward(srcs, q, g, EPS, 1.0, **path)
        _check(out, ref, F32, f"forward {path}")
        got = TA.attnres_backward(go, srcs, q, g, EPS, 1.0, **path)
        for a, e in zip([*got[0], got[1], got[2]], gref):
            _check(a, e, F32, f"backward {path}")
    ro, rm, rl = R.phase1(rs, rqs, rgs, EPS)
    gouts = [torch.randn_like(x.float()) for x in (ro, rm, rl)]
    gref = torch.autograd.grad((ro, rm, rl), [*rs, rqs, rgs], [x.double() for x in gouts], retain_graph=True)
    for path in _paths(d, 1, True):
        o, m, l = TA.phase1_forward(srcs, qs, gs, EPS, **path)  # noqa: E741
        for a, e in zip((o, m, l), (ro, rm, rl)):
            _check(a, e, F32, f"phase1 {path}")
        got = TA.phase1_backward(*gouts, srcs, qs, gs, o, m, l, EPS, **path)
        for a, e in zip([*got[0], got[1], got[2]], gref):
            _check(a, e, F32, f"phase1 backward {path}")
    p = _sources(1, t, d, F32)[0]
    # independent fp64 leaves (o, m, l and the query also feed phase 1 above)
    lo, lm, ll, rp, lq, lg = _f64([o[0], m[0], l[0], p, qs[0], gs[0]])
    r2 = R.phase2(lo, lm, ll, rp, lq, lg, EPS, 2.0)
    gref = torch.autograd.grad(r2, [lo, lm, ll, rp, lq, lg], go.double())
    for path in _paths(d, 1, True):
        h = TA.phase2_forward(o[0], m[0], l[0], p, qs[0], gs[0], EPS, 2.0, F32, **path)
        _check(h, r2, F32, f"phase2 {path}")
        g_o, g_m, g_l, g_p, g_q, g_g = TA.phase2_backward(go, o[0], m[0], l[0], p, qs[0], gs[0], EPS, 2.0, **path)
        for name, a, e in zip(("o", "m", "l", "partial", "query", "key_gain"), (g_o, g_m, g_l, g_p, g_q, g_g), gref):
            _check(a, e, F32, f"phase2 grad {name} {path}")


@pytest.mark.parametrize("s,t,d", [(8, 70, 128), (5, 33, 64)])
def test_phase1_vector_tiles_compute_like_the_reference(monkeypatch, s, t, d):
    """The CUDA launchers' S_pad = 8 vector tiles (``_vector_tile``: ``[8, 32, 64]`` forward,
    ``[8, 64, 16]`` backward apply), which the interpreter's own tile rule never picks: run
    under the interpreter with the CUDA rule, several token tiles and d-chunks, 16-bit sources.
    """
    monkeypatch.setattr(TA, "_interpret", lambda: False)
    launches = []
    launch = TA._launch

    def record(kernel, grid, *args, **meta):
        launches.append((kernel.fn.__name__, meta))
        launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(TA, "_launch", record)
    dtype = BF16 if s == 8 else F16
    srcs = _sources(3, t, d, dtype)
    qs, gs = _params(d, dtype, rows=s)
    rs, rqs, rgs = _f64(srcs), *_f64([qs, gs])
    ro, rm, rl = R.phase1(rs, rqs, rgs, EPS)
    gouts = [torch.randn_like(x.float()) for x in (ro, rm, rl)]
    gref = torch.autograd.grad((ro, rm, rl), [*rs, rqs, rgs], [x.double() for x in gouts])
    o, m, l = TA.phase1_forward(srcs, qs, gs, EPS, fused=False)  # noqa: E741
    for a, e in zip((o, m, l), (ro, rm, rl)):
        _check(a, e, dtype, "phase1 forward, CUDA tiles")
    got = TA.phase1_backward(*gouts, srcs, qs, gs, o, m, l, EPS)
    for a, e in zip([*got[0], got[1], got[2]], gref):
        _check(a, e, dtype, "phase1 backward, CUDA tiles")
    vector = [meta for name, meta in launches if meta["BT"] * meta["BD"] == meta["num_warps"] * 32 * 8]
    assert len(launches) == 4 and len(vector) >= 3, launches  # T < 64: the backward apply keeps its own tile
