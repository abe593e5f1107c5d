"""The ``torch.ops.attnres`` custom ops: registration, gradients, numerics, errors, tracing.

Forward results are compared with a naive fp64 implementation written here (stack the
sources, ``torch.softmax``) and with :mod:`attnres_rewrite.reference`; gradients with
autograd through the naive implementation. Those two are independent of the
hand-written online-softmax kernels and backward formulas under test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor
from torch.export import Dim

import attnres_rewrite.kernels  # noqa: F401  (registers torch.ops.attnres.*)
from attnres_rewrite import reference as R

OPS = torch.ops.attnres
F64 = torch.float64
EPS = 1e-6

# Forward tolerances against the fp64 naive result on the *same* (already rounded)
# inputs. The kernels keep fp32 statistics and round once at the end, so the error is
# at most half an ulp of the output dtype plus the fp32 reduction error; rtol is one
# full ulp (2^-10 for fp16, 2^-7 relative spacing /2 = 2^-8 for bf16), and atol covers
# the fp32 error of sums over up to 33 sources x 4096 features (~1e-6 of the inputs).
FWD_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2**-10, atol=2e-5),
    torch.bfloat16: dict(rtol=2**-8, atol=2e-5),
    F64: dict(rtol=1e-10, atol=1e-10),
}


def fwd_tol(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """``scale`` (exact mode) multiplies the result and with it the absolute fp32 error."""
    tol = FWD_TOL[dtype]
    return dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale))


# --------------------------------------------------------------------------------------
# The independent implementation


def naive_logits(sources: Sequence[Tensor], queries: Tensor, gains: Tensor, eps: float = EPS) -> Tensor:
    """``z[k, s, *tokens]`` for S query rows, fp64, differentiable."""
    v = torch.stack([s.to(F64) for s in sources])
    keys = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return torch.einsum("k...d,sd->ks...", keys, queries.to(F64) * gains.to(F64))


def naive_attnres(sources, query, gain, eps=EPS, scale=1.0) -> Tensor:
    alpha = torch.softmax(naive_logits(sources, query[None], gain[None], eps)[:, 0], dim=0)
    return scale * (alpha.unsqueeze(-1) * torch.stack([s.to(F64) for s in sources])).sum(0)


def naive_phase1(sources, queries, gains, eps=EPS) -> tuple[Tensor, Tensor, Tensor]:
    z = naive_logits(sources, queries, gains, eps)  # (K, S, *tokens)
    m = z.max(dim=0).values
    p = torch.exp(z - m)
    v = torch.stack([s.to(F64) for s in sources]).unsqueeze(1)  # (K, 1, *tokens, d)
    return (p.unsqueeze(-1) * v).sum(0), m, p.sum(0)


def naive_phase2(o, m, l, partial, query, gain, eps=EPS, scale=1.0) -> Tensor:
    if partial is None:
        return scale * o.to(F64) / l.to(F64).unsqueeze(-1)
    z2 = naive_logits([partial], query[None], gain[None], eps)[0, 0]
    peak = torch.maximum(m.to(F64), z2)
    a1, a2 = torch.exp(m.to(F64) - peak), torch.exp(z2 - peak)
    num = a1.unsqueeze(-1) * o.to(F64) + a2.unsqueeze(-1) * partial.to(F64)
    return scale * num / (a1 * l.to(F64) + a2).unsqueeze(-1)


# --------------------------------------------------------------------------------------
# Inputs


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, grad: bool = False):
    t = (torch.randn(*shape, generator=gen(seed), dtype=F64) * scale).to(dtype)
    return t.requires_grad_(grad)


def agg_inputs(tokens, d, k, dtype=torch.float32, grad=False, seed=0):
    """Sources of different magnitudes and a query scaled so logits are O(1..3) at any d."""
    sources = [randn(*tokens, d, seed=seed + i, dtype=dtype, scale=0.5 + i % 4, grad=grad) for i in range(k)]
    query = randn(d, seed=seed + 100, dtype=dtype, scale=2.0 / math.sqrt(d), grad=grad)
    gain = (1.0 + randn(d, seed=seed + 101, dtype=F64, scale=0.3)).to(dtype).requires_grad_(grad)
    return sources, query, gain


def phase1_inputs(tokens, d, k, s, dtype=torch.float32, grad=False, seed=0):
    sources, _, _ = agg_inputs(tokens, d, k, dtype, grad, seed)
    queries = randn(s, d, seed=seed + 200, dtype=dtype, scale=2.0 / math.sqrt(d), grad=grad)
    gains = (1.0 + randn(s, d, seed=seed + 201, dtype=F64, scale=0.3)).to(dtype).requires_grad_(grad)
    return sources, queries, gains


def phase2_inputs(tokens, d, dtype=torch.float32, grad=False, seed=0, with_partial=True):
    """Consistent (o, m, l) statistics of a random phase 1, plus a partial sum."""
    sources, queries, gains = phase1_inputs(tokens, d, 3, 1, F64, seed=seed)
    o, m, l = (t[0].to(torch.float32 if dtype != F64 else F64) for t in naive_phase1(sources, queries, gains))
    o, m, l = (t.detach().requires_grad_(grad) for t in (o, m, l))
    partial = randn(*tokens, d, seed=seed + 300, dtype=dtype, scale=2.0, grad=grad) if with_partial else None
    query = randn(d, seed=seed + 301, dtype=dtype, scale=2.0 / math.sqrt(d), grad=grad)
    gain = (1.0 + randn(d, seed=seed + 302, dtype=F64, scale=0.3)).to(dtype).requires_grad_(grad)
    return o, m, l, partial, query, gain


# --------------------------------------------------------------------------------------
# Registration: opcheck (schema, autograd registration, fake tensor, AOT dispatch)


OPCHECK_CASES = {
    "block_attnres": lambda: (OPS.block_attnres.default, (*agg_inputs((2, 3), 5, 3, grad=True), EPS, 1.0)),
    "block_attnres_exact_1src": lambda: (OPS.block_attnres.default, (*agg_inputs((4,), 3, 1, grad=True), EPS, 1.0)),
    "block_phase1": lambda: (OPS.block_phase1.default, (*phase1_inputs((2, 3), 5, 3, 2, grad=True), EPS)),
    "block_phase2": lambda: (
        OPS.block_phase2.default,
        (*phase2_inputs((2, 3), 5, grad=True), EPS, 3.0, torch.float32),
    ),
    "block_phase2_no_partial": lambda: (
        OPS.block_phase2.default,
        (*phase2_inputs((2, 3), 5, grad=True, with_partial=False), EPS, 1.0, torch.float32),
    ),
    "block_phase2_bf16_out": lambda: (
        OPS.block_phase2.default,
        (*phase2_inputs((3,), 4, dtype=torch.bfloat16, grad=True), EPS, 2.0, torch.bfloat16),
    ),
    "block_attnres_mixed_dtype": lambda: (  # bf16 activations, fp32 parameters (autocast training)
        OPS.block_attnres.default,
        (
            [randn(2, 3, 5, seed=i, dtype=torch.bfloat16, grad=True) for i in range(3)],
            *agg_inputs((), 5, 0, grad=True)[1:],
            EPS,
            1.0,
        ),
    ),
    "block_attnres_non_contiguous": lambda: (
        OPS.block_attnres.default,
        (
            [randn(5, 4, 2, seed=i).permute(2, 1, 0).requires_grad_() for i in range(2)],
            *agg_inputs((), 5, 0, grad=True)[1:],
            EPS,
            2.0,
        ),
    ),
    "block_attnres_backward": lambda: (
        OPS.block_attnres_backward.default,
        (randn(2, 5, seed=9), *agg_inputs((2,), 5, 3), EPS, 2.0),
    ),
    "block_phase1_backward": lambda: _phase1_backward_args(),
    "block_phase2_backward": lambda: (
        OPS.block_phase2_backward.default,
        (randn(2, 5, seed=9), *phase2_inputs((2,), 5), EPS, 2.0),
    ),
}


def _phase1_backward_args():
    sources, queries, gains = phase1_inputs((2,), 5, 3, 2)
    o, m, l = OPS.block_phase1(sources, queries, gains, EPS)
    grads = (randn(*o.shape, seed=1), None, randn(*l.shape, seed=2))
    return OPS.block_phase1_backward.default, (*grads, sources, queries, gains, o, m, l, EPS)


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case: str) -> None:
    op, args = OPCHECK_CASES[case]()
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------------------
# Gradients: gradcheck in fp64 (tiny shapes: gradcheck is O(numel^2))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_gradcheck_block_attnres(k: int, scale: float) -> None:
    sources, query, gain = agg_inputs((2,), 3, k, dtype=F64, grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: OPS.block_attnres(list(t[:-2]), t[-2], t[-1], EPS, scale), (*sources, query, gain)
    )


@pytest.mark.parametrize("k", [1, 3])
def test_gradcheck_block_phase1(k: int) -> None:
    sources, queries, gains = phase1_inputs((2,), 3, k, 2, dtype=F64, grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: OPS.block_phase1(list(t[:-2]), t[-2], t[-1], EPS), (*sources, queries, gains)
    )


@pytest.mark.parametrize("with_partial", [True, False])
def test_gradcheck_block_phase2(with_partial: bool) -> None:
    o, m, l, partial, query, gain = phase2_inputs((2,), 3, dtype=F64, grad=True, with_partial=with_partial)
    if with_partial:
        fn = lambda o, m, l, p, q, g: OPS.block_phase2(o, m, l, p, q, g, EPS, 2.0, F64)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (o, m, l, partial, query, gain))
    else:
        fn = lambda o, m, l, q, g: OPS.block_phase2(o, m, l, None, q, g, EPS, 2.0, F64)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (o, m, l, query, gain))


# --------------------------------------------------------------------------------------
# Forward against the naive reference over a shape matrix

# (B, T, d, K): every d in {1, 3, 127, 4096} meets every K in {1, 2, 9, 33} at least once
# across the rows (a full cross product at d=4096 costs seconds on a shared CPU for no
# extra coverage: the kernels loop over sources and vectorise over d independently).
SHAPES = [
    (2, 7, 1, 1),
    (2, 7, 1, 2),
    (2, 7, 1, 33),
    (2, 7, 3, 1),
    (2, 7, 3, 9),
    (2, 7, 3, 33),
    (2, 7, 127, 2),
    (2, 7, 127, 9),
    (2, 7, 127, 33),
    (2, 7, 4096, 1),
    (1, 3, 4096, 2),
    (1, 3, 4096, 9),
    (1, 1, 4096, 33),
    (1, 1, 5, 4),
    (3, 1, 127, 9),
    (2, 1024, 3, 5),
    (1, 1024, 1, 2),
]


def _shape_id(shape: tuple[int, int, int, int]) -> str:
    b, t, d, k = shape
    return f"B{b}-T{t}-d{d}-K{k}"


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_block_attnres_forward_matches_naive(shape: tuple[int, int, int, int]) -> None:
    b, t, d, k = shape
    sources, query, gain = agg_inputs((b, t), d, k)
    for scale in (1.0, float(k)):
        got = OPS.block_attnres(sources, query, gain, EPS, scale)
        assert got.shape == (b, t, d) and got.dtype == torch.float32
        want = naive_attnres(sources, query, gain, EPS, scale)
        torch.testing.assert_close(got.double(), want, **fwd_tol(torch.float32, scale))
        # the reference sums in a different order (two passes, not online): fp32 rounding only
        torch.testing.assert_close(got, R.attnres(sources, query, gain, EPS, scale), **fwd_tol(torch.float32, scale))


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_two_phase_forward_matches_naive(shape: tuple[int, int, int, int]) -> None:
    """phase1 over K sources for S=2 queries, then phase2 with and without a partial sum."""
    b, t, d, k = shape
    sources, queries, gains = phase1_inputs((b, t), d, k, 2)
    o, m, l = OPS.block_phase1(sources, queries, gains, EPS)
    assert o.shape == (2, b, t, d) and m.shape == l.shape == (2, b, t)
    assert o.dtype == m.dtype == l.dtype == torch.float32
    no, nm, nl = naive_phase1(sources, queries, gains)
    torch.testing.assert_close(m.double(), nm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l.double(), nl, rtol=1e-5, atol=1e-5)
    # o is an unnormalised sum of up to 33 sources of size ~3: absolute fp32 error grows with it
    torch.testing.assert_close(o.double(), no, rtol=1e-5, atol=1e-6 * k * 3)
    partial = randn(b, t, d, seed=77, scale=2.0)
    for s in range(2):
        first = OPS.block_phase2(o[s], m[s], l[s], None, queries[s], gains[s], EPS, 1.0, torch.float32)
        torch.testing.assert_close(
            first.double(), naive_attnres(sources, queries[s], gains[s]), **FWD_TOL[torch.float32]
        )
        scale = float(k + 1)
        merged = OPS.block_phase2(o[s], m[s], l[s], partial, queries[s], gains[s], EPS, scale, torch.float32)
        want = naive_attnres([*sources, partial], queries[s], gains[s], EPS, scale)
        torch.testing.assert_close(merged.double(), want, **fwd_tol(torch.float32, scale))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 7, 127, 9), (1, 3, 4096, 2), (2, 5, 3, 33)], ids=_shape_id)
def test_low_precision_forward(dtype: torch.dtype, shape: tuple[int, int, int, int]) -> None:
    b, t, d, k = shape
    sources, query, gain = agg_inputs((b, t), d, k, dtype=dtype)
    got = OPS.block_attnres(sources, query, gain, EPS, 1.0)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), naive_attnres(sources, query, gain), **FWD_TOL[dtype])

    queries, gains = torch.stack([query, query * 0.5]), torch.stack([gain, gain])
    o, m, l = OPS.block_phase1(sources[:-1], queries, gains, EPS)
    assert o.dtype == torch.float32  # statistics stay fp32
    merged = OPS.block_phase2(o[0], m[0], l[0], sources[-1], query, gain, EPS, 1.0, dtype)
    assert merged.dtype == dtype
    if k > 1:
        torch.testing.assert_close(merged.double(), naive_attnres(sources, query, gain), **FWD_TOL[dtype])


def test_low_precision_sources_with_fp32_parameters() -> None:
    """Under autocast the sources are bf16 while queries/gains stay fp32 parameters."""
    sources = [randn(2, 7, 60, seed=i, dtype=torch.bfloat16, scale=1 + i, grad=True) for i in range(5)]
    _, query, gain = agg_inputs((), 60, 0, grad=True)
    out = OPS.block_attnres(sources, query, gain, EPS, 1.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), naive_attnres(sources, query, gain), **FWD_TOL[torch.bfloat16])
    grads = torch.autograd.grad(out.float().sum(), [*sources, query, gain])
    assert [g.dtype for g in grads] == [torch.bfloat16] * 5 + [torch.float32] * 2
    exact = [x.detach().double().requires_grad_() for x in [*sources, query, gain]]
    want = torch.autograd.grad(naive_attnres(exact[:5], exact[5], exact[6]).sum(), exact)
    # Parameter gradients are fp32 sums over the (exact) bf16 inputs: fp32 accuracy, not
    # bf16's. A backward that took ``go . out`` from the bf16-rounded output got ~5e-2 here.
    for g, w in zip(grads[5:], want[5:]):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
    for g, w in zip(grads[:5], want[:5]):  # source gradients are rounded once to bf16
        torch.testing.assert_close(g.double(), w, rtol=2**-8, atol=1e-5)


# --------------------------------------------------------------------------------------
# Gradients against autograd through the naive fp64 implementation

GRAD_SHAPES = [(2, 3, 1, 1), (2, 3, 5, 4), (1, 4, 127, 9), (2, 2, 3, 33)]


def _grads(out: Tensor, inputs: Sequence[Tensor], seed: int = 7) -> tuple[Tensor, ...]:
    go = randn(*out.shape, seed=seed, dtype=out.dtype)
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, present, go)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=_shape_id)
def test_block_attnres_gradients_match_naive(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    b, t, d, k = shape
    sources, query, gain = agg_inputs((b, t), d, k, dtype=dtype, grad=True)
    got = _grads(OPS.block_attnres(sources, query, gain, EPS, 1.5), [*sources, query, gain])
    want = _grads(naive_attnres(sources, query, gain, EPS, 1.5).to(dtype), [*sources, query, gain])
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=_shape_id)
def test_block_phase1_gradients_match_naive(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    """All three outputs carry gradient (m too: phase 1 must be correct as an op on its own)."""
    b, t, d, k = shape
    sources, queries, gains = phase1_inputs((b, t), d, k, 3, dtype=dtype, grad=True)
    inputs = [*sources, queries, gains]
    o, m, l = OPS.block_phase1(sources, queries, gains, EPS)
    no, nm, nl = naive_phase1(sources, queries, gains)
    gos = [randn(*x.shape, seed=i, dtype=x.dtype) for i, x in enumerate((o, m, l))]
    got = torch.autograd.grad((o, m, l), inputs, gos)
    want = torch.autograd.grad((no, nm, nl), inputs, [g.to(F64) for g in gos])
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(dtype), **tol)


@pytest.mark.parametrize("with_partial", [True, False])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=_shape_id)
def test_block_phase2_gradients_match_naive(shape, dtype: torch.dtype, with_partial: bool) -> None:
    b, t, d, _ = shape
    o, m, l, partial, query, gain = phase2_inputs((b, t), d, dtype=dtype, grad=True, with_partial=with_partial)
    inputs = [o, m, l, partial, query, gain]
    present = [x for x in inputs if x is not None]
    out = OPS.block_phase2(o, m, l, partial, query, gain, EPS, 2.0, dtype)
    go = randn(*out.shape, seed=3, dtype=dtype)
    got = torch.autograd.grad(out, present, go, allow_unused=True)
    want = torch.autograd.grad(
        naive_phase2(o, m, l, partial, query, gain, EPS, 2.0), present, go.to(F64), allow_unused=True
    )
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
    for g, w, x in zip(got, want, present):
        w = torch.zeros_like(x) if w is None else w  # m, query, gain do not matter without a partial
        torch.testing.assert_close(g, w.to(g.dtype), **tol)


def test_two_phase_gradients_equal_single_pass_gradients() -> None:
    """Gradients flowing through phase1 -> phase2 (where the m term cancels) == block_attnres's."""
    sources, queries, gains = phase1_inputs((2, 3), 6, 3, 2, dtype=F64, grad=True)
    partial = randn(2, 3, 6, seed=55, dtype=F64, grad=True)
    o, m, l = OPS.block_phase1(sources, queries, gains, EPS)
    two = OPS.block_phase2(o[1], m[1], l[1], partial, queries[1], gains[1], EPS, 4.0, F64)
    one = OPS.block_attnres([*sources, partial], queries[1], gains[1], EPS, 4.0)
    torch.testing.assert_close(two, one)
    inputs = [*sources, partial, queries, gains]
    for g2, g1 in zip(_grads(two, inputs), _grads(one, inputs)):
        torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------
# Empty batch


def test_batch_zero_gives_empty_outputs_and_zero_parameter_grads() -> None:
    sources, query, gain = agg_inputs((0, 5), 3, 4, grad=True)
    out = OPS.block_attnres(sources, query, gain, EPS, 1.0)
    assert out.shape == (0, 5, 3)
    out.sum().backward()
    assert all(s.grad.shape == (0, 5, 3) for s in sources)
    assert torch.equal(query.grad, torch.zeros(3)) and torch.equal(gain.grad, torch.zeros(3))

    sources, queries, gains = phase1_inputs((0, 5), 3, 2, 2, grad=True)
    partial = randn(0, 5, 3, seed=1, grad=True)
    o, m, l = OPS.block_phase1(sources, queries, gains, EPS)
    assert o.shape == (2, 0, 5, 3) and m.shape == l.shape == (2, 0, 5)
    h = OPS.block_phase2(o[0], m[0], l[0], partial, queries[0], gains[0], EPS, 1.0, torch.float32)
    assert h.shape == (0, 5, 3)
    h.sum().backward()
    assert torch.equal(queries.grad, torch.zeros(2, 3)) and torch.equal(gains.grad, torch.zeros(2, 3))
    assert partial.grad.shape == (0, 5, 3)


# --------------------------------------------------------------------------------------
# Numerical safety


def assert_finite_where_representable(got: Tensor, want: Tensor) -> None:
    """Finite (no inf, no nan) wherever the fp64 answer fits in ``got``'s dtype.

    "Where the fp32 reference has none": a true value above the dtype's max cannot be
    stored in it at all (an fp16 parameter gradient of 4e6, say), so only
    representable entries are held to it.
    """
    fits = want.abs() <= torch.finfo(got.dtype).max
    assert torch.isfinite(got[fits]).all()


def _extreme_inputs(magnitude: float, dtype: torch.dtype, k: int = 4):
    """Sources up to ``6 * magnitude`` (still inside fp16's range for 1e4)."""
    sources = [
        (torch.randn(2, 5, 9, generator=gen(i), dtype=F64).clamp(-3, 3) * magnitude * (1 + i % 2))
        .to(dtype)
        .requires_grad_()
        for i in range(k)
    ]
    query = randn(9, seed=50, dtype=dtype, scale=0.7, grad=True)
    gain = (1 + randn(9, seed=51, scale=0.2)).to(dtype).requires_grad_()
    return sources, query, gain


@pytest.mark.parametrize("magnitude", [1e4, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_magnitudes_stay_finite(magnitude: float, dtype: torch.dtype) -> None:
    """RMS of 1e4-sized values squares to 1e8 (fp16 max 65504); 1e-6 values sit below eps."""
    sources, query, gain = _extreme_inputs(magnitude, dtype)
    inputs = [*sources, query, gain]
    exact = [x.detach().double().requires_grad_() for x in inputs]  # fp64 leaves: exact gradients
    want = naive_attnres(exact[:-2], exact[-2], exact[-1])
    assert torch.isfinite(R.attnres([s.float() for s in sources], query.float(), gain.float())).all()
    out = OPS.block_attnres(sources, query, gain, EPS, 1.0)
    assert torch.isfinite(out).all()
    # one rounding to dtype (rtol); fp16 1e-6 values are subnormal, spaced 2^-24 apart (atol)
    tol = dict(rtol=FWD_TOL[dtype]["rtol"], atol=2**-24 + magnitude * 1e-6)
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    go = torch.ones(out.shape, dtype=F64) / max(1.0, magnitude)  # loss scaling keeps true grads in range
    want_grads = torch.autograd.grad(want, exact, go)
    for g, w in zip(torch.autograd.grad(out, inputs, go.to(dtype)), want_grads):
        assert_finite_where_representable(g, w)

    queries, gains = torch.stack([query, -query]), torch.stack([gain, gain])
    o, m, l = OPS.block_phase1(sources[:3], queries, gains, EPS)
    h = OPS.block_phase2(o[0], m[0], l[0], sources[3], query, gain, EPS, 1.0, dtype)
    torch.testing.assert_close(h.double(), want.detach(), **tol)
    for g, w in zip(torch.autograd.grad(h, inputs, go.to(dtype)), want_grads):
        assert_finite_where_representable(g, w)


def test_fp16_sum_that_overflows_fp16_midway_stays_finite() -> None:
    """exact mode over [4e4, 4e4, -4.8e4, 8e3] (all exact in fp16): partial sums (8e4) overflow fp16, the result (4e4) fits.

    A kernel that accumulated in fp16, or squared fp16 values for the RMS (4e4^2 >> 65504),
    would produce inf/nan here. The query gradient (~4e6) truly exceeds fp16 and may be inf.
    """
    values = [4.0e4, 4.0e4, -4.8e4, 8.0e3]
    sources = [torch.full((2, 3, 6), v, dtype=torch.float16, requires_grad=True) for v in values]
    query = torch.zeros(6, dtype=torch.float16, requires_grad=True)
    gain = torch.ones(6, dtype=torch.float16, requires_grad=True)
    inputs = [*sources, query, gain]
    exact = [x.detach().double().requires_grad_() for x in inputs]
    want = naive_attnres(exact[:4], exact[4], exact[5], EPS, 4.0)
    torch.testing.assert_close(want, torch.full_like(want, 4.0e4))
    out = OPS.block_attnres(sources, query, gain, EPS, 4.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want.detach(), rtol=2**-10, atol=0)
    want_grads = torch.autograd.grad(want.sum(), exact)
    for g, w in zip(torch.autograd.grad(out.sum(), inputs), want_grads):
        assert_finite_where_representable(g, w)

    o, m, l = OPS.block_phase1(sources[:3], query[None], gain[None], EPS)
    h = OPS.block_phase2(o[0], m[0], l[0], sources[3], query, gain, EPS, 4.0, torch.float16)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h.double(), want.detach(), rtol=2**-10, atol=0)
    for g, w in zip(torch.autograd.grad(h.sum(), inputs), want_grads):
        assert_finite_where_representable(g, w)


def test_fp16_result_beyond_fp16_range_saturates_like_the_reference() -> None:
    """A true result above 65504 cannot be represented in fp16: inf like the reference, never nan."""
    sources = [torch.full((2, 6), 4.0e4, dtype=torch.float16) for _ in range(3)]
    query, gain = torch.zeros(6, dtype=torch.float16), torch.ones(6, dtype=torch.float16)
    out = OPS.block_attnres(sources, query, gain, EPS, 3.0)
    assert not torch.isnan(out).any()
    assert torch.equal(out, R.attnres(sources, query, gain, EPS, 3.0))


# --------------------------------------------------------------------------------------
# Bad input: the error type and a message naming the problem

X = torch.randn(2, 3)
Q = torch.randn(3)
G = torch.ones(3)

BAD_AGGREGATE = [
    ((([X, torch.randn(2, 4)], Q, G)), ValueError, r"source 1 has shape \(2, 4\) but source 0 has \(2, 3\)"),
    ((([X, X.double()], Q, G)), TypeError, "source 1 has dtype torch.float64 but source 0 has torch.float32"),
    ((([X, torch.empty(2, 3, device="meta")], Q, G)), TypeError, "source 1 is on meta but source 0 is on cpu"),
    ((([X], Q.to("meta"), G)), TypeError, "query is on meta but the sources are on cpu"),
    ((([X], torch.randn(4), G)), ValueError, r"query must have shape \(3,\).*got \(4,\)"),
    ((([X], torch.randn(1, 3), G)), ValueError, r"query must have shape \(3,\).*got \(1, 3\)"),
    ((([X], Q, torch.ones(5))), ValueError, r"key_gain must have shape \(3,\).*got \(5,\)"),
    ((([], Q, G)), ValueError, "source list is empty"),
    ((([X.int()], Q, G)), TypeError, "source 0 has dtype torch.int32; use float16"),
    ((([X], Q.long(), G)), TypeError, "query has dtype torch.int64; use a floating dtype"),
    ((([torch.tensor(1.0)], Q, G)), ValueError, "source 0 is a scalar"),
]


@pytest.mark.parametrize(("args", "error", "message"), BAD_AGGREGATE)
def test_block_attnres_rejects_bad_input(args, error, message) -> None:
    with pytest.raises(error, match=message):
        OPS.block_attnres(*args, EPS, 1.0)


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf")])
def test_bad_eps_is_rejected_by_every_op(eps: float) -> None:
    o, m, l = OPS.block_phase1([X], Q[None], G[None], EPS)
    calls = {
        "block_attnres": lambda: OPS.block_attnres([X], Q, G, eps, 1.0),
        "block_phase1": lambda: OPS.block_phase1([X], Q[None], G[None], eps),
        "block_phase2": lambda: OPS.block_phase2(o[0], m[0], l[0], X, Q, G, eps, 1.0, torch.float32),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"attnres.{name}: eps must be a positive finite number.*got {eps}"):
            call()


BAD_PHASE1 = [
    (([X], Q, G[None]), ValueError, r"queries must be \(S, d\).*got \(3,\)"),
    (([X], torch.randn(2, 4), torch.ones(2, 4)), ValueError, r"queries must have shape \(2, 3\)"),
    (([X], torch.randn(2, 3), torch.ones(3, 3)), ValueError, r"key_gains must have shape \(2, 3\).*got \(3, 3\)"),
    (([X], torch.randn(0, 3), torch.ones(0, 3)), ValueError, "S >= 1"),
    (([], torch.randn(2, 3), torch.ones(2, 3)), ValueError, "source list is empty"),
    (([X, X[:1]], torch.randn(2, 3), torch.ones(2, 3)), ValueError, "source 1 has shape"),
]


@pytest.mark.parametrize(("args", "error", "message"), BAD_PHASE1)
def test_block_phase1_rejects_bad_input(args, error, message) -> None:
    with pytest.raises(error, match=message):
        OPS.block_phase1(*args, EPS)


def _stats():
    o, m, l = OPS.block_phase1([X], Q[None], G[None], EPS)
    return o[0], m[0], l[0]


BAD_PHASE2 = [
    (lambda o, m, l: (o, m[:1], l, X), ValueError, r"m, l \(\*tokens\)"),
    (lambda o, m, l: (o, m, l[None], X), ValueError, r"m, l \(\*tokens\)"),
    (lambda o, m, l: (o, m, l, torch.randn(3, 3)), ValueError, r"partial sum has shape \(3, 3\) but o has \(2, 3\)"),
    (lambda o, m, l: (o, m, l, X.int()), TypeError, "dtype torch.int32"),
    (lambda o, m, l: (o.int(), m, l, X), TypeError, "o must be the fp32 phase-1 statistic, got torch.int32"),
    (lambda o, m, l: (o, m.half(), l, X), TypeError, "m must be the fp32 phase-1 statistic, got torch.float16"),
    (lambda o, m, l: (o, m, l, X.to("meta")), TypeError, "partial sum is on meta but o is on cpu"),
    (lambda o, m, l: (o, m, l.to("meta"), X), TypeError, "l is on meta but o is on cpu"),
    (lambda o, m, l: (o, m.to("meta"), l, None), TypeError, "m is on meta but o is on cpu"),
]


@pytest.mark.parametrize(("make", "error", "message"), BAD_PHASE2)
def test_block_phase2_rejects_bad_input(make, error, message) -> None:
    with pytest.raises(error, match=message):
        OPS.block_phase2(*make(*_stats()), Q, G, EPS, 1.0, torch.float32)


def test_block_phase2_rejects_wrong_query_size() -> None:
    o, m, l = _stats()
    with pytest.raises(ValueError, match=r"query must have shape \(3,\)"):
        OPS.block_phase2(o, m, l, X, torch.randn(7), G, EPS, 1.0, torch.float32)


# --------------------------------------------------------------------------------------
# Tracing: torch.export with dynamic dims, torch.compile (eager / aot_eager) with backward


class TwoPhaseBlock(torch.nn.Module):
    """One block of two sublayers written with the ops, as the lowering pass emits them."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(3, d, generator=gen(1)))
        self.gains = torch.nn.Parameter(1 + 0.1 * torch.randn(3, d, generator=gen(2)))
        self.proj = torch.nn.Linear(d, d)

    def forward(self, emb: Tensor, prev: Tensor) -> Tensor:
        completed = [emb, prev]
        o, m, l = OPS.block_phase1(completed, self.queries[:2], self.gains[:2], EPS)
        h1 = OPS.block_phase2(o[0], m[0], l[0], None, self.queries[0], self.gains[0], EPS, 1.0, emb.dtype)
        v1 = torch.tanh(self.proj(h1))
        h2 = OPS.block_phase2(o[1], m[1], l[1], v1, self.queries[1], self.gains[1], EPS, 3.0, emb.dtype)
        v2 = torch.tanh(self.proj(h2))
        return OPS.block_attnres([emb, prev, v1 + v2], self.queries[2], self.gains[2], EPS, 1.0)


def _block_inputs(b: int, t: int, d: int = 6) -> tuple[Tensor, Tensor]:
    return randn(b, t, d, seed=b * 100 + t), randn(b, t, d, seed=b * 100 + t + 1, scale=2.0)


def test_ops_export_with_dynamic_batch_and_sequence() -> None:
    model = TwoPhaseBlock(6)
    dims = ({0: Dim.AUTO, 1: Dim.AUTO},) * 2
    exported = torch.export.export(model, _block_inputs(2, 5), dynamic_shapes=dims, strict=False)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"attnres.block_phase1.default", "attnres.block_phase2.default", "attnres.block_attnres.default"} <= targets
    for b, t in [(3, 11), (1, 1)]:
        inputs = _block_inputs(b, t)
        torch.testing.assert_close(exported.module()(*inputs), model(*inputs))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_ops_under_torch_compile_with_backward(backend: str) -> None:
    torch._dynamo.reset()
    model = TwoPhaseBlock(6)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    for b, t in [(2, 5), (3, 7)]:
        emb, prev = (x.requires_grad_() for x in _block_inputs(b, t))
        out = compiled(emb, prev)
        want = model(emb, prev)
        torch.testing.assert_close(out, want)
        go = randn(*out.shape, seed=4)
        got_grads = torch.autograd.grad(out, [emb, prev, *model.parameters()], go)
        want_grads = torch.autograd.grad(want, [emb, prev, *model.parameters()], go)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w)


def test_phase1_backward_finds_the_max_without_bitwise_equal_saved_m():
    """The max term must reach the arg-max source even if the saved ``m`` differs in the last bit.

    A saved ``m`` produced by another kernel (Triton forward, CPU backward in a mixed
    setting) need not equal the recomputed logit bit for bit; the gradient w.r.t. the
    sources must still match autograd through the reference.
    """
    from attnres_rewrite import reference as R

    gen = torch.Generator().manual_seed(7)
    sources = [torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3)]
    queries = torch.randn(2, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    gains = torch.randn(2, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    o, m, l = R.phase1(sources, queries, gains, 1e-6)
    grad_o = torch.randn(o.shape, dtype=torch.float64, generator=gen)
    want = torch.autograd.grad(o, [*sources, queries, gains], grad_o)
    m_other_kernel = torch.nextafter(m.detach(), torch.full_like(m, float("inf")))
    g_src, g_q, g_g = torch.ops.attnres.block_phase1_backward(
        grad_o,
        None,
        None,
        [s.detach() for s in sources],
        queries.detach(),
        gains.detach(),
        o.detach(),
        m_other_kernel,
        l.detach(),
        1e-6,
    )
    for got, ref in zip([*g_src, g_q, g_g], want):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
