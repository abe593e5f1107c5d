"""PyTorch kernels behind ``torch.ops.attnres.*`` (the CPU path, and the CUDA fallback).

Forward passes are single-pass online softmax over the source list; backward passes
recompute logits from the sources and per-token statistics instead of keeping
per-source intermediates alive between forward and backward. All statistics are
fp32; gradients come back in each input's dtype.

Notation (per token): ``u = w * g``, ``r_i = rsqrt(mean(v_i^2) + eps)``,
``z_i = r_i * (u . v_i)``, ``alpha = softmax(z)``, ``h = scale * sum alpha_i v_i``.
Then ``dz_i/dv_i = r_i u - z_i r_i^2 v_i / d`` and ``dz_i/du = r_i v_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..reference import acc


def _logit(v: Tensor, u: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Return ``(z, r)`` for one fp32 source: logits and inverse RMS per token."""
    r = torch.rsqrt(v.pow(2).mean(dim=-1) + eps)
    return (v @ u) * r, r


def _logit_grad_to_source(gz: Tensor, z: Tensor, r: Tensor, v: Tensor, u: Tensor) -> Tensor:
    """Chain a logit gradient back to its source (``gz * dz/dv``)."""
    d = v.shape[-1]
    return gz.unsqueeze(-1) * (r.unsqueeze(-1) * u - (z * r * r / d).unsqueeze(-1) * v)


def _flat_sum(x: Tensor) -> Tensor:
    """Sum over every token axis, keeping the feature axis."""
    return x.reshape(-1, x.shape[-1]).sum(dim=0)


# --------------------------------------------------------------------------------------
# Single-pass aggregation


def attnres_forward(sources: Sequence[Tensor], query: Tensor, key_gain: Tensor, eps: float, scale: float) -> Tensor:
    u = acc(query) * acc(key_gain)
    m = l = total = None
    for src in sources:
        v = acc(src)
        z, _ = _logit(v, u, eps)
        if m is None:
            m, l, total = z, torch.ones_like(z), v.clone()
            continue
        m_new = torch.maximum(m, z)
        a, b = torch.exp(m - m_new), torch.exp(z - m_new)
        total = total * a.unsqueeze(-1) + b.unsqueeze(-1) * v
        l = l * a + b
        m = m_new
    return (total * (scale / l).unsqueeze(-1)).to(sources[0].dtype)


def attnres_backward(
    grad_out: Tensor,
    sources: Sequence[Tensor],
    query: Tensor,
    key_gain: Tensor,
    eps: float,
    scale: float,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Gradients of :func:`attnres_forward` w.r.t. sources, query and key gain.

    ``sum_j alpha_j dL/dalpha_j = grad_out . h`` with ``h`` the fp32 aggregate. It is
    rebuilt in the first pass (which recomputes the logits anyway) from per-token
    ``grad_out . v_i`` scalars, not read from ``out``: ``out`` is rounded to the
    sources' dtype, and in bf16 that rounding enters ``gz = alpha (scale go.v - go.h)``
    through a cancellation, costing the fp32 query/gain gradients ~1e-3 relative
    accuracy. So the op does not take (and autograd does not keep alive) the output.
    Nothing per source outlives the call; the second pass produces the gradients.
    """
    u = acc(query) * acc(key_gain)
    go = acc(grad_out)
    logits, rinv, dots = [], [], []
    for src in sources:
        v = acc(src)
        z, r = _logit(v, u, eps)
        logits.append(z)
        rinv.append(r)
        dots.append((go * v).sum(dim=-1))
    z_all = torch.stack(logits)
    alphas = torch.exp(z_all - torch.logsumexp(z_all, dim=0))
    dot_out = scale * (alphas * torch.stack(dots)).sum(dim=0)
    grads, gu = [], torch.zeros_like(u)
    for src, z, r, alpha, dot in zip(sources, logits, rinv, alphas, dots):
        v = acc(src)
        gz = alpha * (scale * dot - dot_out)
        gv = (scale * alpha).unsqueeze(-1) * go + _logit_grad_to_source(gz, z, r, v, u)
        gu = gu + _flat_sum((gz * r).unsqueeze(-1) * v)
        grads.append(gv.to(src.dtype))
    return grads, (gu * acc(key_gain)).to(query.dtype), (gu * acc(query)).to(key_gain.dtype)


# --------------------------------------------------------------------------------------
# Two-phase schedule: phase 1 (S queries over shared completed blocks)


def phase1_forward(
    sources: Sequence[Tensor], queries: Tensor, key_gains: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    u = acc(queries) * acc(key_gains)  # (S, d)
    m = l = o = None
    for src in sources:
        v = acc(src)
        r = torch.rsqrt(v.pow(2).mean(dim=-1) + eps)
        z = torch.movedim(v @ u.T, -1, 0) * r  # (S, *tokens)
        if m is None:
            m, l = z, torch.ones_like(z)
            o = v.unsqueeze(0).expand(u.shape[0], *v.shape).clone()
            continue
        m_new = torch.maximum(m, z)
        a, b = torch.exp(m - m_new), torch.exp(z - m_new)
        o = o * a.unsqueeze(-1) + b.unsqueeze(-1) * v
        l = l * a + b
        m = m_new
    return o.contiguous(), m.contiguous(), l.contiguous()


def phase1_backward(
    grad_o: Tensor | None,
    grad_m: Tensor | None,
    grad_l: Tensor | None,
    sources: Sequence[Tensor],
    queries: Tensor,
    key_gains: Tensor,
    o: Tensor,
    m: Tensor,
    l: Tensor,  # noqa: E741
    eps: float,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Gradients of phase 1, from the saved ``o, m, l`` (no per-source state).

    ``o = sum_i e^{z_i - m} v_i`` and ``l = sum_i e^{z_i - m}`` both depend on ``m =
    max_i z_i``; that dependence routes ``grad_m - grad_o.o - grad_l*l`` to the
    source that attains the max (the first one on ties). When phase 1 feeds the
    phase-2 merge this term cancels mathematically, but it keeps phase 1 correct as
    an op on its own. The max is located by the recomputed logits (a first pass that
    keeps ``K`` scalars per token), not by equality with the saved ``m``: a saved
    ``m`` from another kernel may differ in the last bit, and the term must not
    silently vanish then.
    """
    u = acc(queries) * acc(key_gains)
    go = torch.zeros_like(o) if grad_o is None else acc(grad_o)
    gl = torch.zeros_like(l) if grad_l is None else acc(grad_l)
    g_peak = -(go * o).sum(dim=-1) - gl * l
    if grad_m is not None:
        g_peak = g_peak + acc(grad_m)
    u_tokens = u.view(u.shape[0], *([1] * (m.dim() - 1)), u.shape[1])  # (S, 1.., d)
    logits, rinv = [], []
    for src in sources:
        v = acc(src)
        r = torch.rsqrt(v.pow(2).mean(dim=-1) + eps)
        logits.append(torch.movedim(v @ u.T, -1, 0) * r)
        rinv.append(r)
    peak_index = torch.stack(logits).argmax(dim=0)  # first maximum on ties
    grads, gu = [], torch.zeros_like(u)
    for i, (src, z, r) in enumerate(zip(sources, logits, rinv)):
        v = acc(src)
        p = torch.exp(z - m)
        gz = p * ((go * v).sum(dim=-1) + gl) + torch.where(peak_index == i, g_peak, 0.0)
        gv = (p.unsqueeze(-1) * go).sum(dim=0)
        gv = gv + _logit_grad_to_source(gz, z, r, v, u_tokens).sum(dim=0)
        gu = gu + ((gz * r).unsqueeze(-1) * v).reshape(u.shape[0], -1, v.shape[-1]).sum(dim=1)
        grads.append(gv.to(src.dtype))
    return grads, (gu * acc(key_gains)).to(queries.dtype), (gu * acc(queries)).to(key_gains.dtype)


# --------------------------------------------------------------------------------------
# Two-phase schedule: phase 2 (merge with the intra-block partial sum)


def phase2_forward(
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
    if partial is None:
        return (o * (scale / l).unsqueeze(-1)).to(out_dtype)
    u = acc(query) * acc(key_gain)
    p = acc(partial)
    z2, _ = _logit(p, u, eps)
    peak = torch.maximum(m, z2)
    a1, a2 = torch.exp(m - peak), torch.exp(z2 - peak)
    num = a1.unsqueeze(-1) * o + a2.unsqueeze(-1) * p
    return (num * (scale / (a1 * l + a2)).unsqueeze(-1)).to(out_dtype)


def phase2_backward(
    grad_out: Tensor,
    o: Tensor,
    m: Tensor,
    l: Tensor,  # noqa: E741
    partial: Tensor | None,
    query: Tensor,
    key_gain: Tensor,
    eps: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """Gradients of the merge w.r.t. ``o, m, l, partial, query, key_gain``.

    With ``A = e^{m - m'}``, ``B = e^{z2 - m'}``, ``L = A l + B`` and ``h`` the fp32
    output: ``dh/do = scale A / L``, ``dh/dl = -h A / L``,
    ``dh/dm = A (scale o - h l) / L``, ``dh/dz2 = B (scale p - h) / L``.
    """
    go = acc(grad_out)
    if partial is None:
        h = o * (scale / l).unsqueeze(-1)
        g_o = go * (scale / l).unsqueeze(-1)
        g_l = -(go * h).sum(dim=-1) / l
        zeros = torch.zeros_like(query)
        return g_o, torch.zeros_like(m), g_l, None, zeros, torch.zeros_like(key_gain)
    u = acc(query) * acc(key_gain)
    p = acc(partial)
    z2, r = _logit(p, u, eps)
    peak = torch.maximum(m, z2)
    a1, a2 = torch.exp(m - peak), torch.exp(z2 - peak)
    den = a1 * l + a2
    h = (a1.unsqueeze(-1) * o + a2.unsqueeze(-1) * p) * (scale / den).unsqueeze(-1)
    go_h = (go * h).sum(dim=-1)
    g_o = go * (scale * a1 / den).unsqueeze(-1)
    g_l = -go_h * a1 / den
    g_m = a1 / den * (scale * (go * o).sum(dim=-1) - go_h * l)
    g_z2 = a2 / den * (scale * (go * p).sum(dim=-1) - go_h)
    g_p = go * (scale * a2 / den).unsqueeze(-1) + _logit_grad_to_source(g_z2, z2, r, p, u)
    gu = _flat_sum((g_z2 * r).unsqueeze(-1) * p)
    return (
        g_o,
        g_m,
        g_l,
        g_p.to(partial.dtype),
        (gu * acc(key_gain)).to(query.dtype),
        (gu * acc(query)).to(key_gain.dtype),
    )
