"""The AttnRes aggregation as an ONNX local function in its own domain (``attnres``).

Why a function: a deployment engine (TensorRT plugin, an ORT custom EP, a compiler)
can recognise ``attnres.BlockAttnRes`` by name and swap in a fused kernel, while any
runtime that knows nothing about AttnRes still runs it, because the body uses only
standard ``ai.onnx`` ops.

Why stacked sources: an ONNX function has a fixed list of inputs, but an aggregation
has a variable number ``K`` of sources. Rather than one function per ``K`` (names a
kernel mapper would have to pattern-match), the caller stacks the sources into one
``(K, *tokens, d)`` tensor and a single function serves every ``K``. The stack is a
copy of the sources; the inline translation (``as_function=False``) avoids it.

Semantics (the op contract of docs/architecture.md), per token::

    u = query * key_gain
    z_i = (u . v_i) * rsqrt(mean(v_i^2) + eps)
    out = scale * sum_i softmax_i(z) v_i

Statistics are computed in fp32 (the body casts to FLOAT and back with ``CastLike``),
so fp16/bf16 models keep fp32 logits as docs/spec.md requires.

``attnres.BlockAttnResRMSNorm`` is an aggregation followed by the RMSNorm that reads
it (the next sublayer's input norm, or the model's final norm): in a converted
pre-norm model every aggregation's output feeds exactly one norm and nothing else.
:mod:`.fusions` rewrites such pairs into one call, so a runtime with the fused kernel
(:mod:`.ort_ops`) runs one node where it ran the call plus the norm's six or seven.
Its body calls ``attnres.BlockAttnRes``, then normalises as Hugging Face's RMSNorm
does: in fp32, cast back to the sources' type, times ``weight``::

    h = BlockAttnRes(sources, query, key_gain)
    out = weight * (h * rsqrt(mean(h^2) + norm_eps))

``attnres.BlockAttnResPartial`` and ``attnres.BlockAttnResPartialRMSNorm`` take the
last source apart: ``(sources, partial, ...)`` means the sources
``concat(sources, partial[None])``. Within a block the completed blocks are the same
for every sublayer and only the partial sum changes, so the completed blocks' stack is
built once per block and shared; stacking the partial sum anew for each aggregation
cost an ``Unsqueeze`` and a ``Concat`` per aggregation (:mod:`.fusions` makes these
calls too).
"""

from __future__ import annotations

from typing import TypeVar, Union

import onnxscript
from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16
from onnxscript import opset18 as op

#: ONNX domain of the AttnRes functions, and its version.
DOMAIN = "attnres"
DOMAIN_VERSION = 1
FUNCTION_NAME = "BlockAttnRes"
NORM_FUNCTION_NAME = "BlockAttnResRMSNorm"
PARTIAL_FUNCTION_NAME = "BlockAttnResPartial"
PARTIAL_NORM_FUNCTION_NAME = "BlockAttnResPartialRMSNorm"

attnres_opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

# The exporter derives the function's signature (and its number of outputs) from these
# annotations; without a return annotation it would record a node with no output.
_FloatTypes = Union[FLOAT, FLOAT16, BFLOAT16, DOUBLE]  # noqa: UP007 (onnxscript parses typing.Union)
TFloat = TypeVar("TFloat", bound=_FloatTypes)
TGain = TypeVar("TGain", bound=_FloatTypes)


@onnxscript.script(attnres_opset, default_opset=op)
def BlockAttnRes(sources: TFloat, query: TGain, key_gain: TGain, eps: float, scale: float) -> TFloat:
    """``scale * sum_k softmax_k(query . RMSNorm_gain(sources[k])) sources[k]``.

    ``sources`` is ``(K, *tokens, d)``; ``query`` and ``key_gain`` are ``(d,)``; the
    output is ``(*tokens, d)`` in the dtype of ``sources``.
    """
    x = op.Cast(sources, to=FLOAT.dtype)
    u = op.Cast(query, to=FLOAT.dtype) * op.Cast(key_gain, to=FLOAT.dtype)
    last = op.Constant(value_ints=[-1])
    first = op.Constant(value_ints=[0])
    mean_sq = op.ReduceMean(x * x, last, keepdims=1)
    # (1,), not a scalar: an optimiser that inlines the function would otherwise drop a tiny
    # eps as "+ 0" (see attnres_rewrite.onnx.translations)
    eps_t = op.Unsqueeze(op.Constant(value_float=eps), first)
    logits = op.MatMul(x, op.Unsqueeze(u, last)) / op.Sqrt(mean_sq + eps_t)
    alpha = op.Softmax(logits, axis=0)
    total = op.ReduceSum(alpha * x, first, keepdims=0)
    scale_t = op.Constant(value_float=scale)
    return op.CastLike(total * scale_t, sources)


@onnxscript.script(attnres_opset, default_opset=op)
def BlockAttnResRMSNorm(
    sources: TFloat, query: TGain, key_gain: TGain, weight: TFloat, eps: float, scale: float, norm_eps: float
) -> TFloat:
    """``weight * RMSNorm(BlockAttnRes(sources, query, key_gain))``, the norm in fp32.

    ``weight`` is ``(d,)`` in the dtype of ``sources``; the output is ``(*tokens, d)``.
    """
    h = BlockAttnRes(sources, query, key_gain, eps=eps, scale=scale)
    # written as the exporter writes Hugging Face's RMSNorm (Pow, then x / Sqrt): a runtime that
    # inlines the function fuses it as it fuses the norms of an unconverted model
    x = op.Cast(h, to=FLOAT.dtype)
    mean_sq = op.ReduceMean(op.Pow(x, op.Constant(value_float=2.0)), op.Constant(value_ints=[-1]), keepdims=1)
    eps_t = op.Unsqueeze(op.Constant(value_float=norm_eps), op.Constant(value_ints=[0]))
    y = x / op.Sqrt(mean_sq + eps_t)
    return op.Mul(weight, op.CastLike(y, h))


@onnxscript.script(attnres_opset, default_opset=op)
def BlockAttnResPartial(
    sources: TFloat, partial: TFloat, query: TGain, key_gain: TGain, eps: float, scale: float
) -> TFloat:
    """:func:`BlockAttnRes` over ``sources`` (``(K - 1, *tokens, d)``) and ``partial`` (``(*tokens, d)``)."""
    stacked = op.Concat(sources, op.Unsqueeze(partial, op.Constant(value_ints=[0])), axis=0)
    return BlockAttnRes(stacked, query, key_gain, eps=eps, scale=scale)


@onnxscript.script(attnres_opset, default_opset=op)
def BlockAttnResPartialRMSNorm(
    sources: TFloat,
    partial: TFloat,
    query: TGain,
    key_gain: TGain,
    weight: TFloat,
    eps: float,
    scale: float,
    norm_eps: float,
) -> TFloat:
    """:func:`BlockAttnResRMSNorm` over ``sources`` (``(K - 1, *tokens, d)``) and ``partial`` (``(*tokens, d)``)."""
    stacked = op.Concat(sources, op.Unsqueeze(partial, op.Constant(value_ints=[0])), axis=0)
    return BlockAttnResRMSNorm(stacked, query, key_gain, weight, eps=eps, scale=scale, norm_eps=norm_eps)


_SCRIPTS = {
    FUNCTION_NAME: BlockAttnRes,
    NORM_FUNCTION_NAME: BlockAttnResRMSNorm,
    PARTIAL_FUNCTION_NAME: BlockAttnResPartial,
    PARTIAL_NORM_FUNCTION_NAME: BlockAttnResPartialRMSNorm,
}
#: Every AttnRes function, in an order where each comes after the ones its body calls.
FUNCTION_NAMES = tuple(_SCRIPTS)


def function_proto(name: str = FUNCTION_NAME):
    """The ``onnx.FunctionProto`` of one AttnRes function (for tests and engine authors)."""
    return _SCRIPTS[name].to_function_proto()


def functions_ir(called: set[str]) -> list:
    """The ``onnx_ir.Function``s a graph calling ``called`` needs (with the ones they call)."""
    import onnx_ir as ir

    needed, todo = {}, list(called)
    while todo:  # the called functions, and the ones their bodies call
        name = todo.pop()
        if name not in needed:
            needed[name] = function_proto(name)
            todo.extend(n.op_type for n in needed[name].node if n.domain == DOMAIN)
    return [ir.serde.deserialize_function(needed[name]) for name in FUNCTION_NAMES if name in needed]


def _call_schema():
    """An ``OpSchema`` describing a call of ``attnres.BlockAttnRes`` (inputs, attributes, types).

    The exporter's op recorder needs a schema to emit a node; the schema is used only to
    build that node object and is never registered globally with ``onnx.defs``, so
    importing attnres_rewrite changes nothing in the process-wide ONNX registry.
    """
    from onnx.defs import OpSchema

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    return OpSchema(
        FUNCTION_NAME,
        DOMAIN,
        DOMAIN_VERSION,
        doc="Block AttnRes aggregation over stacked sources (K, *tokens, d); see attnres_rewrite.onnx.function",
        inputs=[
            OpSchema.FormalParameter("sources", "T"),
            OpSchema.FormalParameter("query", "G"),
            OpSchema.FormalParameter("key_gain", "G"),
        ],
        outputs=[OpSchema.FormalParameter("out", "T")],
        type_constraints=[("T", floats, "sources and output"), ("G", floats, "query and key gain")],
        attributes=[
            OpSchema.Attribute("eps", OpSchema.AttrType.FLOAT, "RMSNorm epsilon of the keys"),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "output multiplier (1, or K in exact mode)"),
        ],
    )


_CALL_OP = None


def call_op():
    """An onnxscript op that emits a ``attnres.BlockAttnRes`` node (without inlining its body).

    Why not call the script function directly: the exporter would record the body as a
    model function, and its version-conversion pass inlines every model function. A bare
    node in our domain passes through untouched; ``export_onnx`` attaches the function
    definition afterwards.
    """
    global _CALL_OP
    if _CALL_OP is None:
        _CALL_OP = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION), FUNCTION_NAME, _call_schema())
    return _CALL_OP
