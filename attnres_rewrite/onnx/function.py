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
    inv_rms = op.Reciprocal(op.Sqrt(mean_sq + eps_t))
    logits = op.MatMul(x, op.Unsqueeze(u, last)) * inv_rms
    alpha = op.Softmax(logits, axis=0)
    total = op.ReduceSum(alpha * x, first, keepdims=0)
    scale_t = op.Constant(value_float=scale)
    return op.CastLike(total * scale_t, sources)


def function_proto():
    """The ``onnx.FunctionProto`` of :func:`BlockAttnRes` (for tests and engine authors)."""
    return BlockAttnRes.to_function_proto()


def function_ir():
    """The function as an ``onnx_ir.Function``, ready to add to an exported model."""
    import onnx_ir as ir

    return ir.serde.deserialize_function(function_proto())


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
