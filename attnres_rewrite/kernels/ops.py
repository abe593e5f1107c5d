"""The ``torch.ops.attnres`` operators: schema, fake impls and autograd.

Every op is a ``torch.library.custom_op`` whose default kernel is the PyTorch code
in :mod:`.torch_kernels` (used on CPU and, until a device registers something
faster, on every other device). The Triton module registers CUDA kernels on top of
these with ``register_kernel("cuda")``. Backward passes are ops of their own so that
each device can supply a fused kernel and so that AOTAutograd sees them as single
nodes.

Public ops (what the rewrite emits and the exporters translate):

* ``attnres::block_attnres(Tensor[] sources, Tensor query, Tensor key_gain, float eps, float scale) -> Tensor``
* ``attnres::block_phase1(Tensor[] sources, Tensor queries, Tensor key_gains, float eps) -> (Tensor o, Tensor m, Tensor l)``
* ``attnres::block_phase2(Tensor o, Tensor m, Tensor l, Tensor? partial, Tensor query, Tensor key_gain, float eps, float scale, ScalarType out_dtype) -> Tensor``
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import acc
from . import cpu_kernels as C
from . import torch_kernels as K
from .checks import check_aggregate, check_phase1, check_phase2

# --------------------------------------------------------------------------------------
# block_attnres: one aggregation over a list of sources


@torch.library.custom_op("attnres::block_attnres", mutates_args=())
def block_attnres(sources: list[Tensor], query: Tensor, key_gain: Tensor, eps: float, scale: float) -> Tensor:
    """``scale * sum_i softmax_i(query . RMSNorm_gain(v_i)) v_i`` over the feature (last) axis."""
    check_aggregate(sources, query, key_gain, eps, "attnres.block_attnres")
    if C.supports(sources, query, key_gain):  # fused CPU kernel: one read per source
        return C.attnres_forward(sources, query, key_gain, eps, scale)
    return K.attnres_forward(sources, query, key_gain, eps, scale)


@block_attnres.register_fake
def _(sources, query, key_gain, eps, scale):
    first = check_aggregate(sources, query, key_gain, eps, "attnres.block_attnres")
    return torch.empty_like(first)


@torch.library.custom_op("attnres::block_attnres_backward", mutates_args=())
def block_attnres_backward(
    grad_out: Tensor, sources: list[Tensor], query: Tensor, key_gain: Tensor, eps: float, scale: float
) -> tuple[list[Tensor], Tensor, Tensor]:
    if C.supports(sources, grad_out, query, key_gain):
        return C.attnres_backward(grad_out, sources, query, key_gain, eps, scale)
    return K.attnres_backward(grad_out, sources, query, key_gain, eps, scale)


@block_attnres_backward.register_fake
def _(grad_out, sources, query, key_gain, eps, scale):
    return [torch.empty_like(s) for s in sources], torch.empty_like(query), torch.empty_like(key_gain)


def _block_attnres_setup(ctx, inputs, output):
    sources, query, key_gain, eps, scale = inputs
    ctx.num_sources = len(sources)
    ctx.eps, ctx.scale = eps, scale
    ctx.save_for_backward(*sources, query, key_gain)


def _block_attnres_grad(ctx, grad_out):
    *sources, query, key_gain = ctx.saved_tensors
    g_src, g_q, g_g = torch.ops.attnres.block_attnres_backward(
        grad_out.contiguous(), sources, query, key_gain, ctx.eps, ctx.scale
    )
    return list(g_src), g_q, g_g, None, None


block_attnres.register_autograd(_block_attnres_grad, setup_context=_block_attnres_setup)


# --------------------------------------------------------------------------------------
# Two-phase schedule, phase 1: S queries over the shared completed blocks


@torch.library.custom_op("attnres::block_phase1", mutates_args=())
def block_phase1(
    sources: list[Tensor], queries: Tensor, key_gains: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Online-softmax statistics ``o (S,*,d), m (S,*), l (S,*)`` of S queries.

    Statistics are fp32 (fp64 for fp64 sources, so gradcheck can run in double).
    """
    check_phase1(sources, queries, key_gains, eps, "attnres.block_phase1")
    return K.phase1_forward(sources, queries, key_gains, eps)


@block_phase1.register_fake
def _(sources, queries, key_gains, eps):
    first = check_phase1(sources, queries, key_gains, eps, "attnres.block_phase1")
    s = queries.shape[0]
    stats = torch.float64 if first.dtype == torch.float64 else torch.float32
    o = first.new_empty((s, *first.shape), dtype=stats)
    m = first.new_empty((s, *first.shape[:-1]), dtype=stats)
    return o, m, torch.empty_like(m)


@torch.library.custom_op("attnres::block_phase1_backward", mutates_args=())
def block_phase1_backward(
    grad_o: Tensor | None,
    grad_m: Tensor | None,
    grad_l: Tensor | None,
    sources: list[Tensor],
    queries: Tensor,
    key_gains: Tensor,
    o: Tensor,
    m: Tensor,
    l: Tensor,  # noqa: E741
    eps: float,
) -> tuple[list[Tensor], Tensor, Tensor]:
    return K.phase1_backward(grad_o, grad_m, grad_l, sources, queries, key_gains, o, m, l, eps)


@block_phase1_backward.register_fake
def _(grad_o, grad_m, grad_l, sources, queries, key_gains, o, m, l, eps):  # noqa: E741
    return [torch.empty_like(s) for s in sources], torch.empty_like(queries), torch.empty_like(key_gains)


def _phase1_setup(ctx, inputs, output):
    sources, queries, key_gains, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(*sources, queries, key_gains, *output)


def _phase1_grad(ctx, grad_o, grad_m, grad_l):
    *sources, queries, key_gains, o, m, l = ctx.saved_tensors
    g_src, g_q, g_g = torch.ops.attnres.block_phase1_backward(
        grad_o, grad_m, grad_l, sources, queries, key_gains, o, m, l, ctx.eps
    )
    return list(g_src), g_q, g_g, None


block_phase1.register_autograd(_phase1_grad, setup_context=_phase1_setup)


# --------------------------------------------------------------------------------------
# Two-phase schedule, phase 2: merge one query's statistics with its partial sum


@torch.library.custom_op("attnres::block_phase2", mutates_args=())
def block_phase2(
    o: Tensor,
    m: Tensor,
    l: Tensor,  # noqa: E741
    partial: Tensor | None,
    query: Tensor,
    key_gain: Tensor,
    eps: float,
    scale: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """Online-softmax merge of phase-1 statistics with the intra-block partial sum."""
    check_phase2(o, m, l, partial, query, key_gain, eps, "attnres.block_phase2")
    return K.phase2_forward(o, m, l, partial, query, key_gain, eps, scale, out_dtype)


@block_phase2.register_fake
def _(o, m, l, partial, query, key_gain, eps, scale, out_dtype):  # noqa: E741
    check_phase2(o, m, l, partial, query, key_gain, eps, "attnres.block_phase2")
    return torch.empty_like(o, dtype=out_dtype)


@torch.library.custom_op("attnres::block_phase2_backward", mutates_args=())
def block_phase2_backward(
    grad_out: Tensor,
    o: Tensor,
    m: Tensor,
    l: Tensor,  # noqa: E741
    partial: Tensor,
    query: Tensor,
    key_gain: Tensor,
    eps: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    g_o, g_m, g_l, g_p, g_q, g_g = K.phase2_backward(grad_out, o, m, l, partial, query, key_gain, eps, scale)
    return g_o, g_m, g_l, g_p, g_q, g_g


@block_phase2_backward.register_fake
def _(grad_out, o, m, l, partial, query, key_gain, eps, scale):  # noqa: E741
    return (
        torch.empty_like(o),
        torch.empty_like(m),
        torch.empty_like(l),
        torch.empty_like(partial),
        torch.empty_like(query),
        torch.empty_like(key_gain),
    )


def _phase2_setup(ctx, inputs, output):
    o, m, l, partial, query, key_gain, eps, scale, _ = inputs  # noqa: E741
    ctx.eps, ctx.scale = eps, scale
    ctx.has_partial = partial is not None
    ctx.save_for_backward(o, m, l, partial, query, key_gain)


def _phase2_grad(ctx, grad_out):
    o, m, l, partial, query, key_gain = ctx.saved_tensors  # noqa: E741
    if not ctx.has_partial:
        # h = scale * o / l: two elementwise ops, left to the compiler to fuse.
        inv = (ctx.scale / l).unsqueeze(-1)
        g_o = acc(grad_out) * inv  # fp64 stays fp64 (gradcheck); everything else fp32
        g_l = -(g_o * o).sum(dim=-1) / l
        return (
            g_o,
            torch.zeros_like(m),
            g_l,
            None,
            torch.zeros_like(query),
            torch.zeros_like(key_gain),
            None,
            None,
            None,
        )
    g_o, g_m, g_l, g_p, g_q, g_g = torch.ops.attnres.block_phase2_backward(
        grad_out.contiguous(), o, m, l, partial, query, key_gain, ctx.eps, ctx.scale
    )
    return g_o, g_m, g_l, g_p, g_q, g_g, None, None, None


block_phase2.register_autograd(_phase2_grad, setup_context=_phase2_setup)
