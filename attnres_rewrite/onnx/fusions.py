"""Rewrites of the exported ONNX graph that leave a runtime fewer nodes per token.

At a small model's decode step onnxruntime spends its time dispatching nodes (about
1.7 us each on the CPU provider at d = 64), not computing them, so nodes are the cost.
The rewrites run after the onnxscript optimiser and keep the numbers to rounding
(every export is verified in onnxruntime afterwards):

* :func:`reciprocal_to_div`: ``Mul(a, Reciprocal(Sqrt(b)))`` becomes ``Div(a, Sqrt(b))``. The
  exporter writes ``torch.rsqrt`` as ``Reciprocal(Sqrt(.))``, and onnxruntime's
  RMSNorm fusion (``SimplifiedLayerNormalization``) matches only ``x / Sqrt(.)``: on
  Llama-style models every norm stayed six nodes. This applies to any model, converted
  or not.
* :func:`fuse_rmsnorm_calls`: an ``attnres.BlockAttnRes`` call whose output only feeds
  an RMSNorm becomes one ``attnres.BlockAttnResRMSNorm`` call (see :mod:`.function`).
  In a converted pre-norm model that is every aggregation. Without the op library the
  runtime inlines the function and runs the same ops as before.
* :func:`split_partial_sources`: a call whose sources but the last are stacked for
  another call already (the completed blocks, shared by a block's sublayers) takes
  that stack and its last source (the partial sum) apart, as
  ``attnres.BlockAttnResPartial[RMSNorm]``: no ``Unsqueeze`` and ``Concat`` per call.

Each matches an exact pattern and leaves anything else alone: a value read elsewhere
(or a graph output) keeps the nodes that compute it, and a constant must be one (an
initializer that is also a graph input can be overridden at run time). :func:`run`
applies all three in the order they need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .function import (
    DOMAIN,
    FUNCTION_NAME,
    NORM_FUNCTION_NAME,
    PARTIAL_FUNCTION_NAME,
    PARTIAL_NORM_FUNCTION_NAME,
)

_FLOAT = 1  # onnx TensorProto.FLOAT
#: each function and its form with the last source passed apart
_PARTIAL = {FUNCTION_NAME: PARTIAL_FUNCTION_NAME, NORM_FUNCTION_NAME: PARTIAL_NORM_FUNCTION_NAME}


def run(graph) -> None:
    """All three rewrites: the norms join their calls before the calls split off their last source
    (which maps both call names), and ``reciprocal_to_div`` takes the norms left over."""
    fuse_rmsnorm_calls(graph)
    split_partial_sources(graph)
    reciprocal_to_div(graph)


def _only_consumer(value):
    """The single node reading ``value``, or None (several readers, none, or a graph output)."""
    if value is None or value.is_graph_output():
        return None
    consumers = {use.node for use in value.uses()}
    return consumers.pop() if len(consumers) == 1 else None


def _const(value) -> list[float] | None:
    """The elements of a constant input (initializer or folded constant), or None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    try:
        return [float(x) for x in value.const_value.numpy().reshape(-1)]
    except Exception:  # a tensor type numpy cannot hold
        return None


def _other(node, value):
    """The input of a binary ``node`` that is not ``value`` (None when both are)."""
    a, b = node.inputs[0], node.inputs[1]
    if a is value and b is not value:
        return b
    if b is value and a is not value:
        return a
    return None


def reciprocal_to_div(graph) -> int:
    """Rewrite ``Mul(a, Reciprocal(Sqrt(b)))`` into ``Div(a, Sqrt(b))`` where the reciprocal has no other reader.

    Returns the number of rewrites. ``a / s`` and ``a * (1 / s)`` differ by at most an
    ulp while ``1 / s`` is finite, which a square root keeps it (``1 / s`` overflows
    only for ``s`` below 1e-38, a square root of 1e-76; ``s = 0`` gives inf or NaN both
    ways). Other reciprocals are left alone: there ``a / b`` can be finite where
    ``a * (1 / b)`` is not.
    """
    import onnx_ir as ir

    count = 0
    for node in list(graph):
        if node.op_type != "Reciprocal" or node.domain != "":
            continue
        root = node.inputs[0].producer() if node.inputs[0] is not None else None
        if root is None or root.op_type != "Sqrt" or root.domain != "":
            continue
        mul = _only_consumer(node.outputs[0])
        if mul is None or mul.op_type != "Mul" or mul.domain != "":
            continue
        numerator = _other(mul, node.outputs[0])
        if numerator is None:
            continue
        div = ir.Node("", "Div", [numerator, node.inputs[0]], name=f"{mul.name or 'mul'}_div")
        graph.insert_before(mul, div)
        _take_over(mul.outputs[0], div.outputs[0])
        graph.remove([mul, node], safe=True)
        count += 1
    return count


def _take_over(old, new) -> None:
    """Make ``new`` stand for ``old``: its readers, its name, its type and shape, its graph-output slot."""
    new.type, new.shape = old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name = old.name
    old.name = None
    new.name = name


@dataclass
class _RMSNorm:
    """What :func:`_match_rmsnorm` found: the norm's epsilon and weight, its output and its nodes."""

    eps: float
    weight: object
    output: object
    nodes: list


def _match_rmsnorm(h) -> _RMSNorm | None:
    """The RMSNorm that alone reads ``h``, as the exporter writes Hugging Face's ``RMSNorm``.

    ``[Cast(h, FLOAT)] -> {Pow(x, 2) | Mul(x, x)} -> ReduceMean(-1, keepdims) -> Add(eps)
    -> Sqrt -> {Div(x, .) | Mul(x, Reciprocal(.))} -> [Cast(., type of h)] -> Mul(weight, .)``;
    the two casts appear together or not at all (fp16/bf16 models; fp32 ones have none).
    """
    if h.dtype is None:
        return None
    cast = _only_consumer(h)
    if cast is None or cast.op_type != "Cast":
        cast = None
        if h.dtype != _FLOAT:  # a norm computing in fp16/bf16/fp64 itself: the fused one would use fp32
            return None
    elif cast.attributes.get_int("to") != _FLOAT:
        return None
    x = h if cast is None else cast.outputs[0]
    normalised = _normalise(x)
    if normalised is None:
        return None
    eps, nodes = normalised
    nodes = ([] if cast is None else [cast]) + nodes
    y = nodes[-1].outputs[0]
    if cast is not None:  # back to h's type
        back = _only_consumer(y)
        if back is None or back.op_type != "Cast" or back.attributes.get_int("to") != h.dtype:
            return None
        nodes.append(back)
        y = back.outputs[0]
    scale = _only_consumer(y)
    if scale is None or scale.op_type != "Mul":
        return None
    weight = _other(scale, y)
    if weight is None or weight.dtype != h.dtype or not _is_row(weight, h):
        return None
    nodes.append(scale)
    if any(n.domain != "" for n in nodes):
        return None
    return _RMSNorm(eps=eps, weight=weight, output=scale.outputs[0], nodes=nodes)


def _normalise(x) -> tuple[float, list] | None:
    """``x / sqrt(mean(x^2, -1) + eps)`` read from the nodes that alone read ``x``: (eps, nodes in order)."""
    if x.is_graph_output():
        return None
    readers = {use.node for use in x.uses()}
    square = next((n for n in readers if _is_square(n, x)), None)
    if square is None or len(readers) != 2:
        return None
    (normalise,) = readers - {square}
    mean = _only_consumer(square.outputs[0])
    if mean is None or mean.op_type != "ReduceMean" or mean.attributes.get_int("keepdims", 1) != 1:
        return None
    axes = _const(mean.inputs[1]) if len(mean.inputs) > 1 else None
    rank = len(x.shape) if x.shape is not None else None
    if axes is None or len(axes) != 1 or axes[0] not in (-1, (rank or 0) - 1):
        return None
    add = _only_consumer(mean.outputs[0])
    if add is None or add.op_type != "Add":
        return None
    eps_value = _other(add, mean.outputs[0])
    eps = _const(eps_value)
    if eps is None or len(eps) != 1 or len(eps_value.const_value.shape) > 1:  # a scalar or (1,): no broadcast
        return None
    if not (math.isfinite(eps[0]) and eps[0] >= 0):
        return None
    sqrt = _only_consumer(add.outputs[0])
    if sqrt is None or sqrt.op_type != "Sqrt":
        return None
    nodes = [square, mean, add, sqrt]
    divisor = _only_consumer(sqrt.outputs[0])
    if divisor is normalise and normalise.op_type == "Div" and normalise.inputs[0] is x:
        return eps[0], [*nodes, normalise]
    if divisor is None or divisor.op_type != "Reciprocal" or _only_consumer(divisor.outputs[0]) is not normalise:
        return None
    if normalise.op_type != "Mul" or _other(normalise, divisor.outputs[0]) is not x:
        return None
    return eps[0], [*nodes, divisor, normalise]


def _is_row(weight, h) -> bool:
    """Whether ``weight`` is known to be ``(d,)`` for ``h``'s last dim ``d`` (the fused kernel takes no broadcast)."""
    if weight.shape is None or h.shape is None or len(weight.shape) != 1 or len(h.shape) < 1:
        return False
    n, d = weight.shape[0], h.shape[-1]
    return isinstance(d, int) and n == d


def _is_square(node, x) -> bool:
    if node.domain != "":
        return False
    if node.op_type == "Mul":
        return node.inputs[0] is x and node.inputs[1] is x
    if node.op_type == "Pow":
        return node.inputs[0] is x and _const(node.inputs[1]) == [2.0]
    return False


def fuse_rmsnorm_calls(graph) -> int:
    """Replace each ``attnres.BlockAttnRes`` call + the RMSNorm reading it by one ``BlockAttnResRMSNorm`` call.

    Returns the number of fused calls. The new node takes the place of the norm's last
    node, so the weight (which may be computed after the call) is defined before it.
    """
    import onnx_ir as ir

    count = 0
    for call in list(graph):
        if call.domain != DOMAIN or call.op_type != FUNCTION_NAME:
            continue
        norm = _match_rmsnorm(call.outputs[0])
        if norm is None:
            continue
        attributes = [*_copied_attributes(call), ir.AttrFloat32("norm_eps", norm.eps)]
        fused = ir.Node(
            DOMAIN,
            NORM_FUNCTION_NAME,
            [*call.inputs, norm.weight],
            attributes,
            name=f"{call.name or 'attnres'}_rmsnorm",
        )
        graph.insert_before(norm.nodes[-1], fused)
        _take_over(norm.output, fused.outputs[0])
        graph.remove([*reversed(norm.nodes), call], safe=True)
        count += 1
    return count


def _copied_attributes(node) -> list:
    import onnx_ir as ir

    return [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]


def _stacking(node) -> bool:
    return node is not None and node.op_type == "Concat" and node.domain == "" and node.attributes.get_int("axis") == 0


def _split_candidate(call):
    """``(concat, unsqueeze)`` when ``call`` stacks its sources as ``Concat(..., Unsqueeze(v, [0]))``, else None."""
    if call.domain != DOMAIN or call.op_type not in _PARTIAL:
        return None
    concat = call.inputs[0].producer()
    if not _stacking(concat) or len(concat.inputs) < 2:
        return None
    last = concat.inputs[-1].producer()
    if last is None or last.op_type != "Unsqueeze" or last.domain != "" or _const(last.inputs[1]) != [0.0]:
        return None
    return concat, last


def split_partial_sources(graph) -> int:
    """Call ``attnres.BlockAttnResPartial[RMSNorm]`` where the stack of all sources but the last exists.

    A call's sources are ``Concat(Unsqueeze(v_1), ..., Unsqueeze(v_K))``. Where the
    first ``K - 1`` of them are one value, or are stacked by an earlier ``Concat`` of the
    same inputs (the stack of the completed blocks that the block's first sublayer
    reads), the call takes that stack and ``v_K`` instead; its own ``Concat`` and the
    ``Unsqueeze`` of ``v_K`` go when nothing else reads them. A call whose stack is
    such a shared stack for another keeps it. Returns the number of calls rewritten.
    """
    import onnx_ir as ir

    position = {node: i for i, node in enumerate(graph)}
    candidates = [(call, *found) for call in graph if (found := _split_candidate(call)) is not None]
    stacks = {tuple(map(id, n.inputs)): n for n in reversed(list(graph)) if _stacking(n)}  # the first of equals
    shared = {tuple(map(id, concat.inputs[:-1])) for _, concat, _ in candidates if len(concat.inputs) > 2}
    count = 0
    for call, concat, last in candidates:
        if tuple(map(id, concat.inputs)) in shared:  # another call reads this stack: keep it whole
            continue
        rest = concat.inputs[:-1]
        stack = stacks.get(tuple(map(id, rest)))
        if len(rest) == 1:
            value = rest[0]
        elif stack is not None and position[stack] < position[call]:
            value = stack.outputs[0]
        else:
            continue
        inputs = [value, last.inputs[0], *call.inputs[1:]]
        split = ir.Node(DOMAIN, _PARTIAL[call.op_type], inputs, _copied_attributes(call), name=call.name)
        graph.insert_before(call, split)
        _take_over(call.outputs[0], split.outputs[0])
        graph.remove(call, safe=True)
        for node in (concat, last):  # no longer read, unless by another node
            if not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
                graph.remove(node, safe=True)
        count += 1
    return count
