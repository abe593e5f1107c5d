"""The reference math (``attnres_rewrite.reference``) against the SPEC, independently.

The reference is the contract every kernel is compared with, so it is itself checked
against a second implementation written here the naive way (stack the sources, call
``torch.softmax``, fp64, rebuild every block sum from scratch) and against the
identities the SPEC promises: N=L is Full AttnRes, zero queries are uniform, the
two-phase schedule is exact, and ``exact`` mode reproduces the standard stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

from attnres_rewrite import reference as R

F64 = torch.float64
EPS = 1e-6


# --------------------------------------------------------------------------------------
# The second implementation


def naive_attnres(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float = EPS, scale: float = 1.0):
    """SPEC formula with the sources stacked on a depth axis, in fp64."""
    v = torch.stack([s.to(F64) for s in sources])  # (K, *tokens, d)
    keys = v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * gain.to(F64)
    alpha = torch.softmax((keys * query.to(F64)).sum(-1), dim=0)
    return scale * (alpha.unsqueeze(-1) * v).sum(0)


def naive_logits(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float = EPS) -> Tensor:
    v = torch.stack([s.to(F64) for s in sources])
    keys = v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * gain.to(F64)
    return (keys * query.to(F64)).sum(-1)


def naive_block_stream(
    embedding: Tensor,
    sublayers: Sequence[Callable[[Tensor], Tensor]],
    queries: Tensor,
    gains: Tensor,
    block_size: int,
    mode: str = "paper",
    eps: float = EPS,
) -> Tensor:
    """Block AttnRes straight from SPEC section 1, recomputing every block sum from the values."""
    values = [embedding]  # v_0, v_1, ... (raw branch outputs)

    def block_sum(first: int, stop: int) -> Tensor:
        return sum(values[1 + j] for j in range(first, stop))

    def aggregate(sources: list[Tensor], row: int) -> Tensor:
        scale = len(sources) if mode == "exact" else 1.0
        return naive_attnres(sources, queries[row], gains[row], eps, scale)

    for layer, f in enumerate(sublayers):
        n, i = divmod(layer, block_size)
        sources = [embedding] + [block_sum(k * block_size, (k + 1) * block_size) for k in range(n)]
        if i > 0:
            sources.append(block_sum(n * block_size, layer))
        values.append(f(aggregate(sources, layer)))
    num = len(sublayers)
    blocks = [block_sum(k, min(k + block_size, num)) for k in range(0, num, block_size)]
    return aggregate([embedding, *blocks], num)


# --------------------------------------------------------------------------------------
# Fixtures: random sources, parameters and sublayers


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, generator=gen(seed), dtype=F64) * scale).to(dtype)


def random_params(num_sublayers: int, dim: int, seed: int = 1) -> R.StreamParams:
    """Non-zero queries and non-unit gains, so the softmax is far from uniform."""
    return R.StreamParams(
        randn(num_sublayers + 1, dim, seed=seed, scale=1.5),
        1.0 + randn(num_sublayers + 1, dim, seed=seed + 1, scale=0.3),
    )


class Sublayer:
    """A non-linear branch without a pre-norm that records the inputs it was called with."""

    def __init__(self, dim: int, seed: int) -> None:
        self.weight = randn(dim, dim, seed=seed, scale=1.0 / math.sqrt(dim))
        self.bias = randn(dim, seed=seed + 1000, scale=0.5)
        self.inputs: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.inputs.append(x)
        return torch.tanh(x @ self.weight + self.bias) * 2.0


def sublayers(num: int, dim: int, seed: int = 10) -> list[Sublayer]:
    return [Sublayer(dim, seed + 7 * k) for k in range(num)]


# --------------------------------------------------------------------------------------
# One aggregation


@pytest.mark.parametrize("dim", [1, 3, 17])
@pytest.mark.parametrize("num_sources", [1, 2, 5, 9])
@pytest.mark.parametrize("tokens", [(), (4,), (2, 3)])
def test_attnres_matches_naive_fp64(dim: int, num_sources: int, tokens: tuple[int, ...]) -> None:
    sources = [randn(*tokens, dim, seed=k, scale=1 + k) for k in range(num_sources)]
    query, gain = randn(dim, seed=50, scale=2.0), randn(dim, seed=51)
    for scale in (1.0, float(num_sources)):
        got = R.attnres(sources, query, gain, EPS, scale)
        assert got.dtype == F64 and got.shape == (*tokens, dim)
        torch.testing.assert_close(got, naive_attnres(sources, query, gain, EPS, scale), rtol=1e-12, atol=1e-12)
    weights = R.attnres_weights(sources, query, gain, EPS)
    torch.testing.assert_close(weights, torch.softmax(naive_logits(sources, query, gain), 0), rtol=1e-12, atol=1e-12)


def test_key_logits_use_rms_and_gain_but_not_sqrt_d() -> None:
    """Hand computed: v = (3, 4), RMS = sqrt(12.5), no 1/sqrt(d) temperature."""
    v = torch.tensor([3.0, 4.0], dtype=F64)
    w, g = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([2.0, 0.5], dtype=F64)
    expected = (3 * 2 * 1 + 4 * 0.5 * 2) / math.sqrt(12.5 + 0.25)
    torch.testing.assert_close(R.key_logits(v, w, g, 0.25), torch.tensor(expected, dtype=F64))


def test_values_are_raw_not_normalised() -> None:
    """Keys are normalised, values are not: a single source comes back unchanged, any scale."""
    v = randn(3, 5, scale=1e3)
    torch.testing.assert_close(R.attnres([v], randn(5, seed=2), randn(5, seed=3)), v, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_output_keeps_dtype_and_rounds_once(dtype: torch.dtype) -> None:
    """fp32 statistics: the result is the fp64 answer on the same inputs, rounded to ``dtype``."""
    sources = [randn(4, 23, seed=k, dtype=dtype) for k in range(5)]
    query, gain = randn(23, seed=8, dtype=dtype), randn(23, seed=9, dtype=dtype)
    got = R.attnres(sources, query, gain)
    assert got.dtype == dtype
    # fp32 accumulation error is ~1e-6 relative; the final cast adds half an ulp of dtype.
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.to(F64), naive_attnres(sources, query, gain), rtol=tol, atol=tol)


def test_fp16_statistics_do_not_overflow() -> None:
    """``v^2`` of 3e4 overflows fp16 (max 65504); the statistics must be computed in fp32."""
    sources = [torch.full((2, 8), 3e4, dtype=torch.float16), torch.full((2, 8), -2e4, dtype=torch.float16)]
    query, gain = torch.ones(8, dtype=torch.float16), torch.ones(8, dtype=torch.float16)
    got = R.attnres(sources, query, gain, scale=2.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), naive_attnres(sources, query, gain, scale=2.0), rtol=1e-3, atol=1)


@pytest.mark.parametrize("num_sources", [1, 2, 7])
def test_zero_query_gives_uniform_weights(num_sources: int) -> None:
    sources = [randn(3, 6, seed=k, scale=10.0**k) for k in range(num_sources)]
    zero, gain = torch.zeros(6, dtype=F64), randn(6, seed=99)
    weights = R.attnres_weights(sources, zero, gain)
    assert torch.equal(weights, torch.full_like(weights, 1.0 / num_sources))
    mean = torch.stack(sources).mean(0)
    torch.testing.assert_close(R.attnres(sources, zero, gain), mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(R.attnres(sources, zero, gain, scale=num_sources), sum(sources), rtol=1e-14, atol=1e-12)


def test_attnres_rejects_empty_source_list() -> None:
    with pytest.raises(ValueError, match="at least one source"):
        R.attnres([], torch.zeros(3), torch.ones(3))


def test_mode_scale() -> None:
    assert R.mode_scale("paper", 5) == 1.0
    assert R.mode_scale("exact", 5) == 5.0
    with pytest.raises(ValueError, match="mode must be one of.*'fast'"):
        R.mode_scale("fast", 2)


# --------------------------------------------------------------------------------------
# Two-phase schedule


@pytest.mark.parametrize("num_completed", [1, 2, 5])
@pytest.mark.parametrize("dim", [1, 7])
def test_phase1_statistics_match_naive(num_completed: int, dim: int) -> None:
    sources = [randn(2, 3, dim, seed=k, scale=2.0) for k in range(num_completed)]
    queries, gains = randn(4, dim, seed=20, scale=2.0), randn(4, dim, seed=21)
    o, m, l = R.phase1(sources, queries, gains)
    assert o.shape == (4, 2, 3, dim) and m.shape == l.shape == (4, 2, 3)
    for s in range(4):
        z = naive_logits(sources, queries[s], gains[s])
        torch.testing.assert_close(m[s], z.max(0).values, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(l[s], torch.exp(z - z.max(0).values).sum(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(o[s] / l[s].unsqueeze(-1), naive_attnres(sources, queries[s], gains[s]))


@pytest.mark.parametrize("num_completed", [1, 3])
@pytest.mark.parametrize("mode", R.MODES)
def test_phase2_merge_equals_single_pass_per_sublayer(num_completed: int, mode: str) -> None:
    """Each of S queries: phase1 over completed blocks + phase2 with its partial == one attnres."""
    dim, size = 5, 4
    completed = [randn(3, dim, seed=k, scale=3.0) for k in range(num_completed)]
    queries, gains = randn(size, dim, seed=30, scale=3.0), randn(size, dim, seed=31)
    o, m, l = R.phase1(completed, queries, gains)
    for s in range(size):
        partial = None if s == 0 else randn(3, dim, seed=40 + s, scale=4.0)
        sources = completed if partial is None else [*completed, partial]
        scale = R.mode_scale(mode, len(sources))
        got = R.phase2(o[s], m[s], l[s], partial, queries[s], gains[s], EPS, scale, out_dtype=F64)
        want = R.attnres(sources, queries[s], gains[s], EPS, scale)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, naive_attnres(sources, queries[s], gains[s], EPS, scale))


def test_phase2_merge_survives_far_apart_logits() -> None:
    """Online-softmax merge with a partial whose logit is ~1e3 above phase 1's max (no overflow)."""
    dim = 4
    completed = [randn(2, dim, seed=1)]
    query, gain = torch.full((1, dim), 500.0, dtype=F64), torch.ones(1, dim, dtype=F64)
    partial = torch.ones(2, dim, dtype=F64)
    o, m, l = R.phase1([-c.abs() for c in completed], query, gain)
    got = R.phase2(o[0], m[0], l[0], partial, query[0], gain[0])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, partial)


def test_phase2_without_partial_needs_out_dtype() -> None:
    o, m, l = R.phase1([randn(2, 3)], randn(1, 3), randn(1, 3))
    with pytest.raises(ValueError, match="needs out_dtype"):
        R.phase2(o[0], m[0], l[0], None, randn(3), randn(3))
    got = R.phase2(o[0], m[0], l[0], None, randn(3), randn(3), out_dtype=torch.float32)
    assert got.dtype == torch.float32


STREAM_CASES = [(1, 1), (4, 1), (4, 2), (5, 2), (6, 3), (7, 7), (9, 4), (10, None)]


@pytest.mark.parametrize(("num_sublayers", "num_blocks"), STREAM_CASES)
def test_two_phase_stream_equals_single_pass_for_every_sublayer(num_sublayers: int, num_blocks: int | None) -> None:
    dim = 6
    emb, params = randn(2, 3, dim, seed=3), random_params(num_sublayers, dim)
    single, two = sublayers(num_sublayers, dim), sublayers(num_sublayers, dim)
    out_single = R.block_attnres_stream(emb, single, params, num_blocks, two_phase=False)
    out_two = R.block_attnres_stream(emb, two, params, num_blocks, two_phase=True)
    for a, b in zip(single, two):
        assert len(a.inputs) == len(b.inputs) == 1
        torch.testing.assert_close(b.inputs[0], a.inputs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_two, out_single, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# Whole streams


@pytest.mark.parametrize(("num_sublayers", "num_blocks"), STREAM_CASES)
@pytest.mark.parametrize("mode", R.MODES)
def test_block_stream_matches_naive(num_sublayers: int, num_blocks: int | None, mode: str) -> None:
    dim = 5
    emb, params = randn(3, dim, seed=4), random_params(num_sublayers, dim)
    size = R.block_partition(num_sublayers, num_blocks)[0].stop
    got = R.block_attnres_stream(emb, sublayers(num_sublayers, dim), params, num_blocks, mode=mode)
    want = naive_block_stream(emb, sublayers(num_sublayers, dim), params.queries, params.key_gains, size, mode)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_sublayers", [1, 2, 5])
@pytest.mark.parametrize("mode", R.MODES)
def test_block_with_one_sublayer_per_block_is_full_attnres(num_sublayers: int, mode: str) -> None:
    dim = 7
    emb, params = randn(2, dim, seed=5), random_params(num_sublayers, dim)
    block = sublayers(num_sublayers, dim)
    full = sublayers(num_sublayers, dim)
    got = R.block_attnres_stream(emb, block, params, num_blocks=num_sublayers, mode=mode)
    want = R.full_attnres_stream(emb, full, params, mode=mode)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(block, full):
        torch.testing.assert_close(a.inputs[0], b.inputs[0], rtol=1e-12, atol=1e-12)


def test_one_block_isolates_the_embedding() -> None:
    """N=1: the embedding stays a source of its own next to the running sum of the branches.

    With one block, sublayer 1 sees ``[v_0]`` and sublayer i > 1 sees exactly two
    sources, ``[v_0, v_1 + ... + v_{i-1}]``: the standard residual stream
    ``h_i = v_0 + (v_1 + ... + v_{i-1})`` split into the embedding and everything the
    branches added. So with zero queries, paper mode feeds sublayer i the average
    ``h_i / 2`` (``h_1`` itself for i = 1) and exact mode feeds ``h_i``; with learned
    queries the two parts are weighted by a 2-way softmax. The stream output likewise
    aggregates ``[v_0, v_1 + ... + v_L]``.
    """
    num, dim = 5, 6
    emb = randn(2, 3, dim, seed=6)
    zero = R.StreamParams.init(num, dim, dtype=F64)

    paper = sublayers(num, dim)
    out = R.block_attnres_stream(emb, paper, zero, num_blocks=1, mode="paper")
    branch_sum = torch.zeros_like(emb)
    for i, f in enumerate(paper):
        standard = emb + branch_sum
        torch.testing.assert_close(f.inputs[0], standard if i == 0 else standard / 2, rtol=1e-14, atol=1e-14)
        branch_sum = branch_sum + f(f.inputs[0])
    torch.testing.assert_close(out, (emb + branch_sum) / 2, rtol=1e-14, atol=1e-14)

    exact = sublayers(num, dim)
    out = R.block_attnres_stream(emb, exact, zero, num_blocks=1, mode="exact")
    torch.testing.assert_close(out, R.standard_stream(emb, sublayers(num, dim)), rtol=1e-12, atol=1e-12)
    standard = sublayers(num, dim)
    R.standard_stream(emb, standard)
    for a, b in zip(exact, standard):
        torch.testing.assert_close(a.inputs[0], b.inputs[0], rtol=1e-12, atol=1e-12)

    learned = random_params(num, dim)
    weighted = sublayers(num, dim)
    R.block_attnres_stream(emb, weighted, learned, num_blocks=1)
    branch_sum = weighted[0](emb)
    for i in range(1, num):
        want = naive_attnres([emb, branch_sum], learned.queries[i], learned.key_gains[i])
        torch.testing.assert_close(weighted[i].inputs[0], want, rtol=1e-12, atol=1e-12)
        branch_sum = branch_sum + weighted[i](want)


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 6])
def test_exact_mode_reproduces_the_standard_stream(num_blocks: int) -> None:
    """Zero queries + ``exact`` scaling == ``h + f(h)`` chain for branches with no pre-norm."""
    num, dim = 6, 9
    emb = randn(4, dim, seed=7, scale=3.0)
    converted, original = sublayers(num, dim), sublayers(num, dim)
    got = R.block_attnres_stream(emb, converted, R.StreamParams.init(num, dim, dtype=F64), num_blocks, mode="exact")
    want = R.standard_stream(emb, original)
    assert not torch.allclose(want, emb)  # the branches really contribute
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    for a, b in zip(converted, original):
        torch.testing.assert_close(a.inputs[0], b.inputs[0], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_paper_mode_equals_prenorm_model_up_to_eps(num_blocks: int) -> None:
    """Uniform weights divide the stream by the source count, which a scale-invariant norm undoes."""
    num, dim, eps = 6, 8, 1e-6

    def rms(x: Tensor) -> Tensor:
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)

    branches = sublayers(num, dim)
    prenorm = [lambda x, f=f: f(rms(x)) for f in branches]
    emb = randn(3, dim, seed=8)
    got = rms(R.block_attnres_stream(emb, prenorm, R.StreamParams.init(num, dim, dtype=F64), num_blocks))
    want = rms(R.standard_stream(emb, prenorm))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, want, rtol=0, atol=1e-15)  # only equal up to the norm's eps


def test_stream_params_init_is_zero_queries_unit_gains() -> None:
    params = R.StreamParams.init(4, 6)
    assert params.queries.shape == params.key_gains.shape == (5, 6)
    assert not params.queries.any() and bool((params.key_gains == 1).all())


# --------------------------------------------------------------------------------------
# Block partition


@pytest.mark.parametrize(
    ("num_sublayers", "num_blocks", "block_size", "sizes"),
    [
        (1, None, None, [1]),
        (1, 1, None, [1]),
        (8, None, None, [1] * 8),
        (10, None, None, [2] * 5),  # default 8 blocks -> S = ceil(10/8) = 2 -> 5 blocks
        (16, None, None, [2] * 8),
        (9, 4, None, [3, 3, 3]),  # S = ceil(9/4) = 3 gives fewer blocks than asked
        (10, 4, None, [3, 3, 3, 1]),  # the last block is shorter
        (7, 7, None, [1] * 7),
        (7, 1, None, [7]),
        (7, None, 3, [3, 3, 1]),
        (7, None, 7, [7]),
        (7, None, 100, [7]),
    ],
)
def test_block_partition(num_sublayers: int, num_blocks: int | None, block_size: int | None, sizes: list[int]) -> None:
    blocks = R.block_partition(num_sublayers, num_blocks, block_size)
    assert [len(b) for b in blocks] == sizes
    assert [i for b in blocks for i in b] == list(range(num_sublayers))  # consecutive, complete


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0,), "at least one sublayer, got 0"),
        ((4, 2, 2), "not both"),
        ((4, 0), "between 1 and the stream's 4 sublayers, got 0"),
        ((4, 5), "between 1 and the stream's 4 sublayers, got 5"),
        ((4, None, 0), "block_size must be >= 1, got 0"),
        ((4, None, -3), "block_size must be >= 1, got -3"),
    ],
)
def test_block_partition_errors(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        R.block_partition(*args)
