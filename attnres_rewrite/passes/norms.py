"""Recognising a normalisation of a value by what the graph computes, not by op or class names.

A pre-norm branch reads the stream only through a norm: RMSNorm
``x * rsqrt(mean(x^2) + eps) * g`` or LayerNorm ``(x - mean(x)) * rsqrt(var(x) + eps) * g
+ b``, written with any casts around it (``x.float()`` ... ``.type_as(x)``), as one ATen op
(``layer_norm``, ``rms_norm``) or as the ops themselves, in a module called anything.
:func:`find_norms` looks downstream of a value for the node that divides it (or it minus
its mean) by the root of its second moment over the feature axis, and returns the nodes
between the value and that point: if every reader of the value is among them, the value
is read only through a norm.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import Node

aten = torch.ops.aten

__all__ = ["ComputedNorm", "find_norms", "METADATA_READERS", "metadata_only"]

#: Ops that read a tensor's metadata (shape, dtype), not its values: not consumers of a stream.
METADATA_READERS = {
    aten.sym_size.int,
    aten.sym_size.default,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten.sym_storage_offset.default,
    aten._assert_tensor_metadata.default,
}

_MEANS = {aten.mean.dim, aten.mean.default}
_SQUARES = {aten.pow.Tensor_Scalar, aten.square.default}
_ADDS = {aten.add.Tensor, aten.add.Scalar}
_SUBS = {aten.sub.Tensor}
_MULS = {aten.mul.Tensor}
_DIVS = {aten.div.Tensor}
_RSQRT = {aten.rsqrt.default}
_SQRT = {aten.sqrt.default}
_VARS = {aten.var.correction, aten.var.dim, aten.var_mean.correction}
_FUSED = {
    aten.layer_norm.default: ("layer", 4),  # op -> (kind, index of eps)
    aten.native_layer_norm.default: ("layer", 4),
    aten.rms_norm.default: ("rms", 3),
    aten._fused_rms_norm.default: ("rms", 3),
}

#: How many users deep the search for a normalisation point goes (a norm is a handful of ops).
SEARCH_DEPTH = 8


_LIKE = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default}


def metadata_only(user: Node, value: Node) -> bool:
    """Does ``user`` read only ``value``'s shape, dtype or device (not its values)?

    Shape queries export hoists onto a placeholder, its input guards, metadata asserts,
    ``*_like`` factories and the dtype reference of ``type_as`` / ``to(other)``.
    """
    if user.op == "call_module" and str(user.target) == "_guards_fn":
        return True
    if user.op != "call_function":
        return False
    if user.target in METADATA_READERS or user.target in _LIKE:
        return True
    if user.target in (aten.type_as.default, aten.to.other):
        return len(user.args) > 1 and user.args[1] is value and user.args[0] is not value
    return False


@dataclass
class ComputedNorm:
    """A normalisation of a value: the node where it is normalised, its kind, eps, and the nodes in between."""

    point: Node
    kind: str  # rms | layer
    eps: float | None
    region: set[Node] = field(default_factory=set)


def _is_node(x) -> bool:
    return isinstance(x, Node) and x.op == "call_function"


def _last_axis(node: Node) -> bool:
    """A reduction over the last axis only, keeping it (``mean(x, [-1], keepdim=True)``)."""
    if node.target is aten.mean.default:
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    val = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    rank = val.dim() if isinstance(val, torch.Tensor) else None
    if not keep or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return False
    return dims[0] == -1 or (rank is not None and dims[0] == rank - 1)


class _Matcher:
    """Pattern predicates over nodes, relative to the set of aliases of one value."""

    def __init__(self, value: Node, root: Callable[[Node], Node]) -> None:
        self.value, self.root = value, root

    def is_value(self, x) -> bool:
        return isinstance(x, Node) and self.root(x) is self.value

    def mean_of_value(self, x) -> bool:
        return _is_node(x) and x.target in _MEANS and _last_axis(x) and self.is_value(x.args[0])

    def centred(self, x) -> bool:
        """``value - mean(value)`` over the feature axis."""
        if not (_is_node(x) and x.target in _SUBS):
            return False
        a, b = x.args[0], x.args[1]
        return self.is_value(a) and self.mean_of_value(b)

    def base(self, x) -> bool:
        return self.is_value(x) or self.centred(x)

    def squared_base(self, x) -> bool:
        if not _is_node(x):
            return False
        if x.target in _SQUARES and self.base(x.args[0]):
            return x.target is aten.square.default or x.args[1] == 2
        if x.target in _MULS and isinstance(x.args[0], Node) and x.args[0] is x.args[1]:
            return self.base(x.args[0])
        return False

    def second_moment(self, x) -> bool:
        if not _is_node(x):
            return False
        if x.target in _MEANS and _last_axis(x) and self.squared_base(x.args[0]):
            return True
        if x.target in _VARS and self.is_value(x.args[0]):
            return True
        return x.target is operator.getitem and _is_node(x.args[0]) and x.args[0].target in _VARS

    def plus_eps(self, x) -> tuple[bool, float | None]:
        if self.second_moment(x):
            return True, None
        if _is_node(x) and x.target in _ADDS:
            a, b = x.args[0], x.args[1]
            for moment, eps in ((a, b), (b, a)):
                if self.second_moment(moment) and isinstance(eps, (int, float)):
                    return True, float(eps)
        return False, None

    def inverse_scale(self, x) -> tuple[bool, float | None]:
        """``rsqrt(moment + eps)`` (or ``1 / sqrt(...)``)."""
        if _is_node(x) and x.target in _RSQRT:
            return self.plus_eps(x.args[0])
        if _is_node(x) and x.target in _DIVS and x.args[0] == 1 and _is_node(x.args[1]) and x.args[1].target in _SQRT:
            return self.plus_eps(x.args[1].args[0])
        return False, None

    def normalised(self, x) -> tuple[str, float | None] | None:
        """The kind and eps when ``x`` is the value normalised by its second moment."""
        if not _is_node(x):
            return None
        if x.target in _FUSED and self.is_value(x.args[0]):
            kind, at = _FUSED[x.target]
            eps = x.args[at] if len(x.args) > at else None
            return kind, float(eps) if isinstance(eps, (int, float)) else None
        if x.target in _MULS:
            a, b = x.args[0], x.args[1]
            for base, scale in ((a, b), (b, a)):
                ok, eps = self.inverse_scale(scale)
                if ok and self.base(base):
                    return ("layer" if self.centred(base) else "rms"), eps
        if x.target in _DIVS:
            a, b = x.args[0], x.args[1]
            if self.base(a) and _is_node(b) and b.target in _SQRT:
                ok, eps = self.plus_eps(b.args[0])
                if ok:
                    return ("layer" if self.centred(a) else "rms"), eps
        return None


def find_norms(value: Node, root: Callable[[Node], Node], order: dict[Node, int]) -> list[ComputedNorm]:
    """Every point near ``value`` where it is normalised over its feature axis (parallel branches have one each).

    ``root`` maps a node to the value it aliases (through casts, views, dropout);
    ``order`` is the graph's topological index. A norm is a handful of ops, so the search
    goes ``SEARCH_DEPTH`` users deep. Each norm's region is every node on a path from
    ``value`` to its point: a value read only through norms has all its readers inside.
    """
    match = _Matcher(value, root)
    seen, frontier = {value}, [value]
    for _ in range(SEARCH_DEPTH):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user not in seen:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    found = []
    for node in sorted(seen - {value}, key=order.__getitem__):
        hit = match.normalised(node)
        if hit is not None:
            found.append(ComputedNorm(node, hit[0], hit[1], _between(value, node, seen)))
    return found


def _between(value: Node, point: Node, reachable: set[Node]) -> set[Node]:
    """Nodes on a path from ``value`` to ``point`` (``point`` included): ancestors of ``point`` reachable from ``value``."""
    region, todo = {point}, [point]
    while todo:
        n = todo.pop()
        for inp in n.all_input_nodes:
            if inp in reachable and inp not in region and inp is not value:
                region.add(inp)
                todo.append(inp)
    return region
