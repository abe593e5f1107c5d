"""Input validation shared by every ``attnres`` op (real kernels and fake impls).

Errors say what was wrong and what to pass instead; ``TypeError`` for wrong kinds
of things (dtype, device, not a tensor), ``ValueError`` for wrong values or shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)  # exact types: any subclass may carry a dispatch of its own


def check_eps(eps: float, op: str = "") -> None:
    if not (eps > 0.0) or eps != eps or eps == float("inf"):
        prefix = f"{op}: " if op else ""
        raise ValueError(f"{prefix}eps must be a positive finite number (RMSNorm epsilon), got {eps}")


def check_sources(sources: Sequence[Tensor], op: str) -> Tensor:
    """Validate a source list and return its first tensor (the reference for the rest)."""
    if not isinstance(sources, (list, tuple)):
        raise TypeError(f"{op}: sources must be a list of tensors, got {type(sources).__name__}")
    if len(sources) == 0:
        raise ValueError(f"{op}: the source list is empty; pass at least one tensor (e.g. the embedding)")
    first = sources[0]
    for i, src in enumerate(sources):
        if not isinstance(src, Tensor):
            raise TypeError(f"{op}: source {i} is a {type(src).__name__}, not a tensor")
        if src.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: source {i} has dtype {src.dtype}; use float16, bfloat16, float32 or float64")
        if src.dim() < 1:
            raise ValueError(f"{op}: source {i} is a scalar; sources need a feature (last) axis")
        if src.dtype != first.dtype:
            raise TypeError(
                f"{op}: source {i} has dtype {src.dtype} but source 0 has {first.dtype}; cast them to one dtype"
            )
        if src.device != first.device:
            raise TypeError(
                f"{op}: source {i} is on {src.device} but source 0 is on {first.device}; move them to one device"
            )
        if src.shape != first.shape:
            raise ValueError(
                f"{op}: source {i} has shape {tuple(src.shape)} but source 0 has {tuple(first.shape)}; "
                "all sources of one aggregation must have the same shape"
            )
    return first


def check_vector(t: Tensor, name: str, like: Tensor, op: str, rows: int | None = None) -> None:
    """Check a query/gain: ``(d,)``, or ``(rows, d)`` when ``rows`` is given."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    d = like.shape[-1]
    want = (d,) if rows is None else (rows, d)
    if rows is None and t.dim() != 1 or rows is not None and t.dim() != 2:
        raise ValueError(f"{op}: {name} must have shape {want} (feature size of the sources), got {tuple(t.shape)}")
    if t.shape[-1] != d or (rows is not None and t.shape[0] != rows):
        raise ValueError(f"{op}: {name} must have shape {want} (feature size of the sources), got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; use a floating dtype")
    if t.device != like.device:
        raise TypeError(f"{op}: {name} is on {t.device} but the sources are on {like.device}; move it to one device")


def _well_formed(sources: Sequence[Tensor], query: Tensor, key_gain: Tensor, eps: float) -> bool:
    """The common, valid case in one pass; when it says no, the detailed checks name the problem.

    A decode step calls the op with one token per sequence, where the detailed checks
    (an f-string-ready pass per tensor) would cost as much as the kernel.
    """
    if type(sources) is not list and type(sources) is not tuple or not sources:
        return False
    first = sources[0]
    if not isinstance(first, Tensor) or first.dtype not in FLOAT_DTYPES or first.dim() < 1:
        return False
    dtype, shape, device = first.dtype, first.shape, first.device
    for src in sources:
        if not isinstance(src, Tensor) or src.dtype != dtype or src.shape != shape or src.device != device:
            return False
    d = shape[-1]
    for v in (query, key_gain):
        if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != d or v.dtype not in FLOAT_DTYPES:
            return False
        if v.device != device:
            return False
    return 0.0 < eps < float("inf")


def check_aggregate(sources: Sequence[Tensor], query: Tensor, key_gain: Tensor, eps: float, op: str) -> Tensor:
    if _well_formed(sources, query, key_gain, eps):
        return sources[0]
    first = check_sources(sources, op)
    check_vector(query, "query", first, op)
    check_vector(key_gain, "key_gain", first, op)
    check_eps(eps, op)
    return first


def check_phase1(sources: Sequence[Tensor], queries: Tensor, key_gains: Tensor, eps: float, op: str) -> Tensor:
    first = check_sources(sources, op)
    if not isinstance(queries, Tensor) or queries.dim() != 2 or queries.shape[0] < 1:
        shape = tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__
        raise ValueError(f"{op}: queries must be (S, d) with S >= 1 (one row per sublayer of the block), got {shape}")
    check_vector(queries, "queries", first, op, rows=queries.shape[0])
    check_vector(key_gains, "key_gains", first, op, rows=queries.shape[0])
    check_eps(eps, op)
    return first


def check_phase2(
    o: Tensor, m: Tensor, l: Tensor, partial: Tensor | None, query: Tensor, key_gain: Tensor, eps: float, op: str
) -> None:  # noqa: E741
    for name, t in (("o", o), ("m", m), ("l", l)):
        if not isinstance(t, Tensor) or t.dtype != torch.float32 and t.dtype != torch.float64:
            raise TypeError(
                f"{op}: {name} must be the fp32 phase-1 statistic, got {getattr(t, 'dtype', type(t).__name__)}"
            )
    if o.dim() < 1 or m.shape != o.shape[:-1] or l.shape != o.shape[:-1]:
        raise ValueError(
            f"{op}: o must be (*tokens, d) and m, l (*tokens); got o {tuple(o.shape)}, m {tuple(m.shape)}, l {tuple(l.shape)}. "
            "Pass one query's slice of the phase-1 outputs (o[s], m[s], l[s])"
        )
    # Devices are checked here, not left to the dispatcher: one meta tensor among cpu ones
    # routes the call to the fake impl, which would return an uninitialised cpu tensor.
    for name, t in (("m", m), ("l", l), ("partial sum", partial)):
        if t is not None and isinstance(t, Tensor) and t.device != o.device:
            raise TypeError(f"{op}: {name} is on {t.device} but o is on {o.device}; move them to one device")
    if partial is not None:
        check_sources([partial], op)
        if partial.shape != o.shape:
            raise ValueError(f"{op}: partial sum has shape {tuple(partial.shape)} but o has {tuple(o.shape)}")
    check_vector(query, "query", o, op)
    check_vector(key_gain, "key_gain", o, op)
    check_eps(eps, op)
