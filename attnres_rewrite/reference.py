"""The AttnRes math of docs/spec.md section 1, written plainly in PyTorch.

This module is the contract every kernel, pass and export is tested against. It
favours obviousness over speed: per-source Python loops, fp32 statistics, no fused
tricks. It never concatenates the sources (a list of ``L`` tensors stays a list), so
it also serves as a memory-honest eager fallback.

Conventions used throughout the project:

* the feature axis is the last axis of every source;
* ``scale`` multiplies the aggregate: ``1.0`` in ``paper`` mode, the number of
  sources in ``exact`` mode (see :func:`mode_scale`);
* phase-1 statistics are ``o`` (unnormalised weighted sum, fp32, shape
  ``(S, *tokens, d)``), ``m`` (running max of the logits, fp32, ``(S, *tokens)``)
  and ``l`` (softmax normaliser, fp32, ``(S, *tokens)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_EPS = 1e-6
MODES = ("paper", "exact")


def acc(x: Tensor) -> Tensor:
    """Promote to the statistics dtype: fp32, or fp64 when the input already is."""
    return x if x.dtype == torch.float64 else x.float()


def mode_scale(mode: str, num_sources: int) -> float:
    """Return the constant the aggregate is multiplied by.

    ``exact`` multiplies by the number of sources so that zero queries (uniform
    weights) reproduce the standard residual sum exactly for any additive stream.
    """
    if mode == "paper":
        return 1.0
    if mode == "exact":
        return float(num_sources)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def key_logits(source: Tensor, query: Tensor, key_gain: Tensor, eps: float) -> Tensor:
    """``w . RMSNorm(v)`` per token, in fp32 (shape ``source.shape[:-1]``)."""
    v = acc(source)
    rms_inv = torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps)
    key = v * rms_inv * acc(key_gain)
    return (key * acc(query)).sum(dim=-1)


def attnres(
    sources: Sequence[Tensor],
    query: Tensor,
    key_gain: Tensor,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
) -> Tensor:
    """One AttnRes aggregation: ``scale * sum_i softmax_i(w . RMSNorm(v_i)) v_i``.

    Two passes over the list (logits, then the weighted sum) with a stable softmax;
    the output has the dtype of the sources.
    """
    if len(sources) == 0:
        raise ValueError("attnres needs at least one source")
    logits = [key_logits(v, query, key_gain, eps) for v in sources]
    peak = logits[0]
    for z in logits[1:]:
        peak = torch.maximum(peak, z)
    weights = [torch.exp(z - peak) for z in logits]
    total = weights[0]
    for w in weights[1:]:
        total = total + w
    out = torch.zeros_like(acc(sources[0]))
    for w, v in zip(weights, sources):
        out = out + (w / total).unsqueeze(-1) * acc(v)
    return (out * scale).to(sources[0].dtype)


def attnres_weights(sources: Sequence[Tensor], query: Tensor, key_gain: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """The depth-attention weights ``alpha`` of one aggregation, shape ``(K, *tokens)``.

    Used for analysis and plots, not on the hot path (it stacks ``K`` scalars per token).
    """
    logits = torch.stack([key_logits(v, query, key_gain, eps) for v in sources])
    return torch.softmax(logits, dim=0)


# --------------------------------------------------------------------------------------
# Two-phase schedule


def phase1(
    sources: Sequence[Tensor], queries: Tensor, key_gains: Tensor, eps: float = DEFAULT_EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """Attend ``S`` queries to shared sources; return online-softmax statistics.

    ``queries`` and ``key_gains`` are ``(S, d)``. Returns ``o (S, *tokens, d)``,
    ``m (S, *tokens)``, ``l (S, *tokens)``, all fp32, such that the aggregate over
    these sources alone is ``o / l``.
    """
    if len(sources) == 0:
        raise ValueError("phase1 needs at least one source")
    outs, maxes, norms = [], [], []
    for s in range(queries.shape[0]):
        logits = [key_logits(v, queries[s], key_gains[s], eps) for v in sources]
        peak = logits[0]
        for z in logits[1:]:
            peak = torch.maximum(peak, z)
        o = torch.zeros_like(acc(sources[0]))
        norm = torch.zeros_like(peak)
        for z, v in zip(logits, sources):
            p = torch.exp(z - peak)
            norm = norm + p
            o = o + p.unsqueeze(-1) * acc(v)
        outs.append(o)
        maxes.append(peak)
        norms.append(norm)
    return torch.stack(outs), torch.stack(maxes), torch.stack(norms)


def phase2(
    o: Tensor,
    m: Tensor,
    l: Tensor,  # noqa: E741 - docs/spec.md's name for the normaliser
    partial: Tensor | None,
    query: Tensor,
    key_gain: Tensor,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Merge one query's phase-1 statistics with its intra-block partial sum.

    ``o, m, l`` are that query's slices (``(*tokens, d)``, ``(*tokens)``,
    ``(*tokens)``). Without a partial sum (first sublayer of a block) the result is
    ``o / l``. The output dtype is the partial sum's, else ``out_dtype``.
    """
    if partial is None:
        if out_dtype is None:
            raise ValueError("phase2 without a partial sum needs out_dtype")
        return (o / l.unsqueeze(-1) * scale).to(out_dtype)
    z2 = key_logits(partial, query, key_gain, eps)
    peak = torch.maximum(m, z2)
    a1 = torch.exp(m - peak)
    a2 = torch.exp(z2 - peak)
    num = a1.unsqueeze(-1) * o + a2.unsqueeze(-1) * acc(partial)
    den = a1 * l + a2
    return (num / den.unsqueeze(-1) * scale).to(partial.dtype)


# --------------------------------------------------------------------------------------
# Block partition and whole-stream references


def block_partition(num_sublayers: int, num_blocks: int | None = None, block_size: int | None = None) -> list[range]:
    """Split ``L`` sublayers into blocks of ``S = ceil(L / N)`` consecutive sublayers.

    Exactly one of ``num_blocks`` / ``block_size`` may be given (neither: 8 blocks,
    capped at ``L``). The last block may be shorter; with ``S = ceil(L/N)`` the
    number of blocks actually produced can be smaller than ``N`` (e.g. L=9, N=4 gives
    S=3 and 3 blocks), which is what docs/spec.md's definition implies.
    """
    if num_sublayers < 1:
        raise ValueError(f"a stream needs at least one sublayer, got {num_sublayers}")
    if num_blocks is not None and block_size is not None:
        raise ValueError("give num_blocks or block_size, not both")
    if block_size is None:
        n = min(8, num_sublayers) if num_blocks is None else num_blocks
        if n < 1 or n > num_sublayers:
            raise ValueError(f"num_blocks must be between 1 and the stream's {num_sublayers} sublayers, got {n}")
        block_size = math.ceil(num_sublayers / n)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return [range(start, min(start + block_size, num_sublayers)) for start in range(0, num_sublayers, block_size)]


@dataclass
class StreamParams:
    """Queries and key gains of one stream: one row per sublayer plus the output row."""

    queries: Tensor  # (L + 1, d); row L is the stream-output aggregation
    key_gains: Tensor  # (L + 1, d)

    @classmethod
    def init(cls, num_sublayers: int, dim: int, dtype=torch.float32, device=None) -> StreamParams:
        """docs/spec.md init: zero queries (uniform weights), unit gains."""
        shape = (num_sublayers + 1, dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.ones(shape, dtype=dtype, device=device),
        )


Sublayer = Callable[[Tensor], Tensor]


def standard_stream(embedding: Tensor, sublayers: Sequence[Sublayer]) -> Tensor:
    """``h_{l+1} = h_l + f_l(h_l)``: the stream AttnRes replaces."""
    h = embedding
    for f in sublayers:
        h = h + f(h)
    return h


def block_attnres_stream(
    embedding: Tensor,
    sublayers: Sequence[Sublayer],
    params: StreamParams,
    num_blocks: int | None = None,
    block_size: int | None = None,
    eps: float = DEFAULT_EPS,
    mode: str = "paper",
    two_phase: bool = False,
) -> Tensor:
    """Run a stream of sublayers with Block AttnRes and return the stream output.

    ``two_phase=True`` computes every sublayer input with :func:`phase1` (once per
    block, all its queries) and :func:`phase2`; it must equal the single pass.
    """
    blocks = block_partition(len(sublayers), num_blocks, block_size)
    completed: list[Tensor] = [embedding]  # b_0 .. b_{n-1}
    for block in blocks:
        stats = None
        if two_phase:
            rows = list(block)
            stats = phase1(completed, params.queries[rows], params.key_gains[rows], eps)
        partial: Tensor | None = None
        for i, layer in enumerate(block):
            sources = completed if partial is None else [*completed, partial]
            scale = mode_scale(mode, len(sources))
            w, g = params.queries[layer], params.key_gains[layer]
            if stats is None:
                h = attnres(sources, w, g, eps, scale)
            else:
                o, m, l = (t[i] for t in stats)
                h = phase2(o, m, l, partial, w, g, eps, scale, out_dtype=embedding.dtype)
            v = sublayers[layer](h)
            partial = v if partial is None else partial + v
        completed.append(partial)
    final = len(sublayers)
    return attnres(
        completed,
        params.queries[final],
        params.key_gains[final],
        eps,
        mode_scale(mode, len(completed)),
    )


def full_attnres_stream(
    embedding: Tensor,
    sublayers: Sequence[Sublayer],
    params: StreamParams,
    eps: float = DEFAULT_EPS,
    mode: str = "paper",
) -> Tensor:
    """Full AttnRes: every sublayer attends to the embedding and every earlier output."""
    values = [embedding]
    for layer, f in enumerate(sublayers):
        scale = mode_scale(mode, len(values))
        h = attnres(values, params.queries[layer], params.key_gains[layer], eps, scale)
        values.append(f(h))
    final = len(sublayers)
    scale = mode_scale(mode, len(values))
    return attnres(values, params.queries[final], params.key_gains[final], eps, scale)
