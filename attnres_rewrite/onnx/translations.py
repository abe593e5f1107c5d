"""onnxscript translations of ``torch.ops.attnres.*`` into standard ONNX ops.

The dynamo exporter calls a translation with the FX node's arguments converted to ONNX
values: a ``Tensor[]`` argument arrives as a Python list of values (one per source,
``1..K``), floats as Python floats and a ``ScalarType`` as an ONNX dtype code. The
functions run under the exporter's op recorder, so each ``op.X(...)`` call appends a
node to the graph being built.

Two forms of ``block_attnres``:

* inline (default): per-source logits ``(*, 1)`` are concatenated into ``(*, K)``, a
  ``Softmax`` runs over that source axis, and the weighted sum is accumulated source by
  source. The ``d``-wide sources are never stacked, so no ``K x`` activation copy.
* function (``as_function=True``): the sources are stacked to ``(K, *, d)`` and the
  aggregation is one call of the local function ``attnres.BlockAttnRes``
  (:mod:`.function`), which engines can map to a fused kernel.

Statistics (RMS, logits, softmax, phase-1 ``o/m/l``) are fp32, or fp64 for fp64
sources, as the op contract requires; results are cast back to the sources' dtype.
The phase-1/phase-2 ops only appear in graphs produced by the compile lowering, but
they are translated too so that such a graph also exports.

The key-norm epsilon is a one-element 1-D constant, never a scalar: onnxscript's
optimiser (which ``export_onnx`` runs, and which users run on exported files) removes
``x + c`` as a no-op whenever the scalar ``c`` is within 1e-8 of zero
(``add_0_rule``), so a scalar ``eps = 1e-12`` (the LayerNorm eps of ViT, DeiT, BEiT)
disappeared, and a source row of zeros (a zero-initialised class or distillation token
plus a zero position embedding) gave ``Reciprocal(Sqrt(0))`` = inf and NaN outputs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import onnx_ir as ir
from onnxscript import opset18 as op

from .function import call_op


def _stat_dtype(value: Any) -> ir.DataType:
    """fp64 statistics for fp64 values, fp32 for everything else (fp16, bf16, fp32)."""
    dtype = getattr(value, "dtype", None)
    return ir.DataType.DOUBLE if dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def _to(value: Any, dtype: ir.DataType) -> Any:
    """Cast unless the value already has ``dtype`` (keeps fp32 graphs free of no-op Casts)."""
    if getattr(value, "dtype", None) == dtype:
        return value
    return op.Cast(value, to=dtype)


def _rank(value: Any, what: str) -> int:
    shape = getattr(value, "shape", None)
    if shape is None:
        raise ValueError(f"attnres ONNX translation: the rank of {what} is unknown; export needs static ranks")
    return len(shape)


def _scalar(x: float, dtype: ir.DataType) -> Any:
    return op.Constant(value=ir.tensor(x, dtype=dtype))


def _epsilon(eps: float, dtype: ir.DataType) -> Any:
    """``eps`` as a shape-(1,) constant, which no optimiser mistakes for ``+ 0`` (module docstring)."""
    return op.Constant(value=ir.tensor([eps], dtype=dtype))


def _key_logits(source: Any, u_col: Any, eps: float, stat: ir.DataType) -> tuple[Any, Any]:
    """``(v_f, z)``: the source in the statistics dtype and its logits ``(*, S)``.

    ``u_col`` is ``(d, S)`` (one column per query); ``z = (v . u) * rsqrt(mean(v^2) + eps)``.
    """
    v = _to(source, stat)
    return v, op.Mul(op.MatMul(v, u_col), _inv_rms(v, eps, stat))


def _inv_rms(v: Any, eps: float, stat: ir.DataType) -> Any:
    """``rsqrt(mean(v^2) + eps)`` as ``(*, 1)``.

    ``mean(v^2)`` keeps its last axis (size 1), so adding the ``(1,)`` epsilon keeps its shape.
    """
    mean_sq = op.ReduceMean(op.Mul(v, v), op.Constant(value_ints=[-1]), keepdims=1)
    return op.Reciprocal(op.Sqrt(op.Add(mean_sq, _epsilon(eps, stat))))


def _query_column(query: Any, key_gain: Any, stat: ir.DataType) -> Any:
    """``(query * key_gain)`` as a ``(d, 1)`` column, in the statistics dtype."""
    u = op.Mul(_to(query, stat), _to(key_gain, stat))
    return op.Unsqueeze(u, op.Constant(value_ints=[-1]))


def _normalized_key(source: Any, eps: float, stat: ir.DataType) -> tuple[Any, Any]:
    """``(v_f, v_f * rsqrt(mean(v_f^2) + eps))``: the source in the statistics dtype and its RMS-normalised key.

    Built from the source alone, so every aggregation that reads the same source builds
    the same nodes and the optimiser's common-subexpression pass keeps one copy: a
    source is normalised once per graph, not once per sublayer that reads it, and each
    aggregation adds one ``MatMul`` per source for its logit.
    """
    v = _to(source, stat)
    return v, op.Mul(v, _inv_rms(v, eps, stat))


def block_attnres_inline(sources: Sequence[Any], query: Any, key_gain: Any, eps: float, scale: float) -> Any:
    """``attnres::block_attnres`` with a Softmax over the concatenated per-source logits.

    Per aggregation of ``K`` sources: ``K`` logit ``MatMul``s against the shared
    normalised keys, ``Concat``, ``Softmax``, one ``Split`` and ``K`` multiply-adds. At
    a decode step a node costs more than its arithmetic, so the node count is the cost
    (benchmarks/onnx.py); the sources are never stacked, so a prefill pays no ``K x d``
    copy either.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("attnres.block_attnres has an empty source list; nothing to export")
    stat = _stat_dtype(sources[0])
    if len(sources) == 1:
        # softmax over one source is 1: the aggregate is the source itself (times scale).
        # Identity gives the op a node of its own: the exporter names the op's output, and
        # returning the input value unchanged would hand it an existing graph value.
        total = op.Identity(_to(sources[0], stat))
    else:
        u_col = _query_column(query, key_gain, stat)
        values, keys = zip(*(_normalized_key(s, eps, stat) for s in sources))
        logits = op.Concat(*(op.MatMul(k, u_col) for k in keys), axis=-1)  # (*, K)
        weights = op.Split(op.Softmax(logits, axis=-1), axis=-1, num_outputs=len(values))
        total = None
        for weight, v in zip(weights, values):
            term = op.Mul(weight, v)
            total = term if total is None else op.Add(total, term)
    if scale != 1.0:
        total = op.Mul(total, _scalar(scale, stat))
    return _to(total, sources[0].dtype) if sources[0].dtype is not None else op.CastLike(total, sources[0])


def block_attnres_function(sources: Sequence[Any], query: Any, key_gain: Any, eps: float, scale: float) -> Any:
    """``attnres::block_attnres`` as a call of the local function ``attnres.BlockAttnRes``.

    Emits the call node only; :func:`attnres_rewrite.onnx.export.export_onnx` adds the
    function body to the model after the exporter's passes (see :func:`.function.call_op`).

    fp64 sources keep the inline form: the function's statistics are fp32, and the op
    contract wants fp64 statistics for fp64 inputs.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("attnres.block_attnres has an empty source list; nothing to export")
    if sources[0].dtype == ir.DataType.DOUBLE:
        return block_attnres_inline(sources, query, key_gain, eps, scale)
    axis0 = op.Constant(value_ints=[0])
    stacked = op.Concat(*(op.Unsqueeze(s, axis0) for s in sources), axis=0)
    return call_op()(stacked, query, key_gain, eps=float(eps), scale=float(scale))


def block_phase1(sources: Sequence[Any], queries: Any, key_gains: Any, eps: float) -> tuple[Any, Any, Any]:
    """``attnres::block_phase1``: online-softmax statistics ``o (S,*,d), m (S,*), l (S,*)``.

    All ``S`` queries are handled by one ``MatMul`` per source (``v @ U^T``, ``(*, S)``);
    the token-major results are transposed to the op's query-major layout at the end.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("attnres.block_phase1 has an empty source list; nothing to export")
    stat = _stat_dtype(sources[0])
    rank = _rank(sources[0], "a phase-1 source")
    u = op.Transpose(op.Mul(_to(queries, stat), _to(key_gains, stat)), perm=[1, 0])  # (d, S)
    values, logits = zip(*(_key_logits(s, u, eps, stat) for s in sources))
    peak = logits[0] if len(logits) == 1 else op.Max(*logits)
    last = op.Constant(value_ints=[-1])
    second_last = op.Constant(value_ints=[-2])
    norm = o = None
    for v, z in zip(values, logits):
        p = op.Exp(op.Sub(z, peak))  # (*, S)
        term = op.Mul(op.Unsqueeze(p, last), op.Unsqueeze(v, second_last))  # (*, S, d)
        norm = p if norm is None else op.Add(norm, p)
        o = term if o is None else op.Add(o, term)
    # token axes are 0..rank-2, S is rank-1, d is rank (in o)
    tokens = list(range(rank - 1))
    o = op.Transpose(o, perm=[rank - 1, *tokens, rank])
    m = op.Transpose(peak, perm=[rank - 1, *tokens])
    l = op.Transpose(norm, perm=[rank - 1, *tokens])
    return o, m, l


def block_phase2(
    o: Any,
    m: Any,
    l: Any,
    partial: Any | None,
    query: Any,
    key_gain: Any,
    eps: float,
    scale: float,
    out_dtype: int,
) -> Any:
    """``attnres::block_phase2``: merge one query's phase-1 statistics with the partial sum."""
    stat = _stat_dtype(o)
    last = op.Constant(value_ints=[-1])
    if partial is None:
        out = op.Div(o, op.Unsqueeze(l, last))
        if scale != 1.0:
            out = op.Mul(out, _scalar(scale, stat))
        return _to(out, ir.DataType(out_dtype))
    u_col = _query_column(query, key_gain, stat)
    p, z2 = _key_logits(partial, u_col, eps, stat)
    z2 = op.Squeeze(z2, last)
    peak = op.Max(m, z2)
    a1 = op.Exp(op.Sub(m, peak))
    a2 = op.Exp(op.Sub(z2, peak))
    num = op.Add(op.Mul(op.Unsqueeze(a1, last), o), op.Mul(op.Unsqueeze(a2, last), p))
    den = op.Add(op.Mul(a1, l), a2)
    out = op.Div(num, op.Unsqueeze(den, last))
    if scale != 1.0:
        out = op.Mul(out, _scalar(scale, stat))
    return _to(out, partial.dtype)


_AS_FUNCTION: contextvars.ContextVar[bool] = contextvars.ContextVar("attnres_onnx_as_function", default=False)


@contextlib.contextmanager
def function_mode(as_function: bool) -> Iterator[None]:
    """Choose the form :func:`block_attnres_selected` emits, for the duration of one export."""
    token = _AS_FUNCTION.set(as_function)
    try:
        yield
    finally:
        _AS_FUNCTION.reset(token)


def block_attnres_selected(sources: Sequence[Any], query: Any, key_gain: Any, eps: float, scale: float) -> Any:
    """The form chosen by :func:`function_mode`; lets one cached exporter registry serve both."""
    form = block_attnres_function if _AS_FUNCTION.get() else block_attnres_inline
    return form(sources, query, key_gain, eps, scale)


def translation_table(as_function: bool | None = False) -> dict[Callable, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``.

    ``as_function=None`` registers :func:`block_attnres_selected`, whose form follows
    :func:`function_mode` at export time. With ``as_function=True`` the model also needs
    the function definition attached after export (``export_onnx`` does it).
    """
    import torch

    from .. import kernels  # noqa: F401  (make sure torch.ops.attnres.* is registered)

    ops = torch.ops.attnres
    if as_function is None:
        aggregate = block_attnres_selected
    else:
        aggregate = block_attnres_function if as_function else block_attnres_inline
    return {
        ops.block_attnres.default: aggregate,
        ops.block_phase1.default: block_phase1,
        ops.block_phase2.default: block_phase2,
    }
