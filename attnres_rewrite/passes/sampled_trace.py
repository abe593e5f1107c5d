"""Depth-sampled capture: trace three layers of each repeated stack, replicate the rest.

Why: ``torch.export`` spends roughly half a second per decoder layer on symbolic-shape
bookkeeping, so a 7B (32 layers) or 70B (80 layers) model on the ``meta`` device
would take tens of seconds to a few minutes to trace although every layer produces
the same graph. A repeated stack is an ``nn.ModuleList`` whose members ``1 .. L-1``
(or ``nn.Sequential``) are structurally identical (member 0 may differ: T5 keeps its relative position bias
there). We trace the model with the list temporarily holding only members
``0, 1, L-1`` (keeping their original names, so parameter FQNs and module paths are
the real ones), check that layer ``L-1`` traced to the same graph as layer 1 up to
renaming, and insert copies of layer 1's graph for layers ``2 .. L-2`` with their own
parameters.

What guards the assumption "every middle layer traces like layer 1":

* members ``1 .. L-1`` have the same classes, parameter and buffer shapes/dtypes, and
  the same plain attributes (numbers, strings, flags; a per-layer index such as
  ``layer_idx`` is the only attribute allowed to differ);
* the model never asks the list for its length or for one member by index (the
  stand-in list refuses, and capture falls back to a full trace): code that loops
  ``range(len(layers))`` or special-cases one depth is traced in full;
* layer ``L-1``'s graph is isomorphic to layer 1's (same ops, same constants, same
  wiring to the layer before it and to shared values such as masks);
* no value produced inside layers 0 or 1 is read outside the stack (a per-layer
  output list such as ``output_hidden_states`` would change with depth).

Anything else (layer behaviour that depends on the index through code that is not
visible in the first, second or last layer) is the one thing sampling cannot see;
that is why capture only samples by default when the weights are on ``meta`` (the
model cannot be run anyway) and traces in full otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["RepeatedStack", "NotSampleable", "find_repeated_stacks", "sampled_layers", "stitch"]

MIN_DEPTH = 4  # with fewer layers there is nothing to replicate
_INDEX_ATTRS = frozenset(
    {"layer_idx", "layer_id", "layer_index", "layer_number", "layer_num", "idx", "index", "block_idx", "block_id"}
)
_PLAIN = (bool, int, float, str, type(None), torch.dtype)


class NotSampleable(Exception):
    """The sampled trace cannot stand for the full one; capture traces in full (the message says why)."""


@dataclass(frozen=True)
class RepeatedStack:
    """An ``nn.ModuleList`` of ``depth`` layers, sampled at members ``0, 1, depth-1``."""

    path: str
    depth: int

    @property
    def kept(self) -> tuple[int, int, int]:
        return (0, 1, self.depth - 1)

    def layer(self, index: int) -> str:
        return f"{self.path}.{index}" if self.path else str(index)


# --------------------------------------------------------------------------------------
# finding repeated stacks


def _attr_key(value: Any) -> Any:
    """Plain values compare by value; anything else by type (configs, callables, tensors)."""
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return (type(value).__name__, tuple(value))
    return ("type", type(value).__qualname__)


def _signature(layer: nn.Module) -> tuple:
    """Everything about a layer that sampling assumes is the same across the stack."""
    parts = []
    for path, mod in layer.named_modules():
        attrs = tuple(
            sorted(
                (k, _attr_key(v))
                for k, v in vars(mod).items()
                if not k.startswith("_") and k != "training" and k not in _INDEX_ATTRS
            )
        )
        params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in mod.named_parameters(recurse=False))
        buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in mod.named_buffers(recurse=False))
        hooks = (len(mod._forward_hooks), len(mod._forward_pre_hooks))
        parts.append((path, type(mod), attrs, params, buffers, hooks))
    return tuple(parts)


def find_repeated_stacks(model: nn.Module, min_depth: int = MIN_DEPTH) -> list[RepeatedStack]:
    """Outermost ``nn.ModuleList``/``nn.Sequential`` stacks whose members ``1..L-1`` are interchangeable."""
    found: list[RepeatedStack] = []
    for path, mod in model.named_modules():
        if type(mod) not in _STAND_INS or len(mod) < min_depth:
            continue
        if any(path == s.path or path.startswith(s.path + ".") for s in found):
            continue
        members = list(mod)
        first = _signature(members[1])
        if all(_signature(m) == first for m in members[2:]):
            found.append(RepeatedStack(path, len(members)))
    return found


# --------------------------------------------------------------------------------------
# tracing with the stand-in list


class _Sampled:
    """Members ``0, 1, L-1`` of a stack under their original names; refuses depth queries.

    Iteration and a slice covering the whole stack (``layers[:num_hidden_layers]``)
    are what a depth-independent forward does; ``len()`` or a single index means the
    traced graph could depend on the depth, so the sampled trace is abandoned.
    """

    def _fill(self, original: nn.Module, kept: tuple[int, ...]) -> None:
        members = list(original._modules.values())
        for i in kept:
            self._modules[str(i)] = members[i]
        self._full_depth = len(members)
        self.refused: str | None = None

    def _refuse(self, what: str) -> None:
        self.refused = what
        raise NotSampleable(f"the model reads {what} of the layer list")

    def __len__(self) -> int:
        self._refuse("the length")
        return 0  # unreachable

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, slice) and idx.start in (None, 0) and idx.step in (None, 1):
            if idx.stop is None or (isinstance(idx.stop, int) and idx.stop >= self._full_depth):
                return self
        self._refuse(f"item [{idx!r}]")


class _SampledList(_Sampled, nn.ModuleList):
    def __init__(self, original: nn.ModuleList, kept: tuple[int, ...]) -> None:
        nn.Module.__init__(self)
        self._fill(original, kept)


class _SampledSequential(_Sampled, nn.Sequential):
    def __init__(self, original: nn.Sequential, kept: tuple[int, ...]) -> None:
        nn.Module.__init__(self)
        self._fill(original, kept)


_STAND_INS: dict[type, type] = {nn.ModuleList: _SampledList, nn.Sequential: _SampledSequential}


@contextmanager
def sampled_layers(model: nn.Module, stacks: list[RepeatedStack]) -> Iterator[list[_Sampled]]:
    """Swap each stack for its three-member stand-in for the duration of the block."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    stand_ins: list[_Sampled] = []
    try:
        for stack in stacks:
            parent_path, _, name = stack.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            original = parent._modules[name]
            stand_in = _STAND_INS[type(original)](original, stack.kept)
            parent._modules[name] = stand_in
            swapped.append((parent, name, original))
            stand_ins.append(stand_in)
        yield stand_ins
    finally:
        for parent, name, original in reversed(swapped):
            parent._modules[name] = original


# --------------------------------------------------------------------------------------
# stitching the graph


def _layer_index(node: fx.Node, stack: RepeatedStack) -> int | None:
    prefix = stack.path + "."
    if node.op == "get_attr":
        target = str(node.target)
        if target.startswith(prefix):
            head = target[len(prefix) :].split(".", 1)[0]
            return int(head) if head.isdigit() else None
        return None
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = value[0]
        if path.startswith(prefix):
            head = path[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def _rename(text: str, old: str, new: str) -> str:
    if text == old:
        return new
    if text.startswith(old + "."):
        return new + text[len(old) :]
    return text


def _renamed_meta(meta: dict, old: str, new: str) -> dict:
    out = {k: v for k, v in meta.items() if k != "from_node"}
    stack = meta.get("nn_module_stack")
    if stack:
        out["nn_module_stack"] = {
            key.replace(value[0], _rename(value[0], old, new), 1): (_rename(value[0], old, new), *value[1:])
            for key, value in stack.items()
        }
    return out


class _Layers:
    """The traced graph split into layer 0, layer 1, layer L-1 and everything else."""

    def __init__(self, gm: fx.GraphModule, stack: RepeatedStack) -> None:
        self.stack = stack
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.member: dict[fx.Node, int] = {}
        groups: dict[int, list[fx.Node]] = {i: [] for i in stack.kept}
        for node in gm.graph.nodes:
            index = _layer_index(node, stack)
            if index is None:
                continue
            if index not in groups:
                raise NotSampleable(f"a node of {stack.layer(index)} appeared, which was not traced")
            groups[index].append(node)
            self.member[node] = index
        self.first, self.second, self.last = (groups[i] for i in stack.kept)
        if not self.second or not self.last:
            raise NotSampleable(f"{stack.layer(1)} left no nodes in the graph")
        self.position = {n: i for i, n in enumerate(self.second)}
        self.last_position = {n: i for i, n in enumerate(self.last)}

    def check_order(self) -> None:
        """Layer regions must follow one another: 0, then 1, then L-1."""

        def span(nodes: list[fx.Node]) -> tuple[int, int] | None:
            pos = [self.order[n] for n in nodes if n.op != "get_attr"]
            return (min(pos), max(pos)) if pos else None

        spans = [span(g) for g in (self.first, self.second, self.last)]
        for a, b in zip(spans, spans[1:]):
            if a is not None and b is not None and a[1] >= b[0]:
                raise NotSampleable(f"the layers of {self.stack.path} interleave in the traced graph")

    def check_escapes(self) -> None:
        """Values of layers 0 and 1 may only feed the next sampled layer."""
        allowed = {0: {0, 1, self.stack.depth - 1}, 1: {1, self.stack.depth - 1}}
        for node, index in self.member.items():
            if index not in allowed:
                continue
            for user in node.users:
                if self.member.get(user) not in allowed[index]:
                    raise NotSampleable(
                        f"{user.name} outside the stack reads a value of {self.stack.layer(index)} "
                        "(per-layer outputs depend on the depth)"
                    )

    def correspondence(self) -> dict[fx.Node, fx.Node]:
        """Match layer L-1 against layer 1; return psi: layer-0 value -> what plays its role for the next layer."""
        if len(self.second) != len(self.last):
            raise NotSampleable(
                f"{self.stack.layer(self.stack.depth - 1)} traced to {len(self.last)} nodes, "
                f"{self.stack.layer(1)} to {len(self.second)}"
            )
        old, new = self.stack.layer(1), self.stack.layer(self.stack.depth - 1)
        psi: dict[fx.Node, fx.Node] = {}

        def same(a: Any, b: Any, where: fx.Node) -> None:
            if isinstance(a, fx.Node) or isinstance(b, fx.Node):
                if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                    raise NotSampleable(f"{where.name}: a value in one layer is a constant in the other")
                ia, ib = self.member.get(a), self.member.get(b)
                if ia == 1:
                    ok = ib == self.stack.depth - 1 and self.last_position[b] == self.position[a]
                elif ia == 0:  # the previous layer's value: layer L-1 reads layer 1's counterpart (or the same)
                    ok = (ib == 1 or b is a) and psi.setdefault(a, b) is b
                else:  # a shared value (mask, rotary tables, an input)
                    ok = a is b
                if not ok:
                    raise NotSampleable(f"{where.name}: wired differently in {old} and {new}")
                return
            if type(a) is not type(b):
                raise NotSampleable(f"{where.name}: argument types differ between layers")
            if isinstance(a, (tuple, list)):
                if len(a) != len(b):
                    raise NotSampleable(f"{where.name}: argument lengths differ between layers")
                for x, y in zip(a, b):
                    same(x, y, where)
            elif isinstance(a, dict):
                if a.keys() != b.keys():
                    raise NotSampleable(f"{where.name}: keyword arguments differ between layers")
                for k in a:
                    same(a[k], b[k], where)
            elif not _same_constant(a, b):
                raise NotSampleable(f"{where.name}: constant {a!r} in {old} is {b!r} in {new}")

        for a, b in zip(self.second, self.last):
            target = _rename(str(a.target), old, new) if a.op == "get_attr" else a.target
            if a.op != b.op or target != b.target:
                raise NotSampleable(f"{b.name}: {new} runs {b.target} where {old} runs {a.target}")
            same(a.args, b.args, b)
            same(a.kwargs, b.kwargs, b)
        return psi


def _same_constant(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - tensors and other values without a plain equality
        return False


def _attach(gm: fx.GraphModule, model: nn.Module, target: str) -> None:
    """Give ``gm`` the attribute ``target`` of ``model`` (a parameter or buffer of a replicated layer)."""
    owner_path, _, name = target.rpartition(".")
    source = model.get_submodule(owner_path)
    value = getattr(source, name)
    owner: nn.Module = gm
    for part in owner_path.split(".") if owner_path else []:
        if part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = owner._modules[part]
    if isinstance(value, nn.Parameter):
        owner.register_parameter(name, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(name, value, persistent=name not in source._non_persistent_buffers_set)
    else:
        raise NotSampleable(f"{target} is not a parameter or buffer")


def stitch(gm: fx.GraphModule, model: nn.Module, stacks: list[RepeatedStack]) -> fx.GraphModule:
    """Turn the sampled trace ``gm`` into the full-depth graph, in place; returns ``gm``."""
    for stack in stacks:
        _stitch_one(gm, model, stack)
    gm.graph.lint()
    gm.recompile()
    return gm


def _stitch_one(gm: fx.GraphModule, model: nn.Module, stack: RepeatedStack) -> None:
    layers = _Layers(gm, stack)
    layers.check_order()
    layers.check_escapes()
    psi = layers.correspondence()
    graph = gm.graph
    anchor = next(n for n in layers.last if n.op != "get_attr")
    template = stack.layer(1)
    previous: dict[fx.Node, fx.Node] = {n: n for n in layers.second}
    for j in range(2, stack.depth - 1):
        name = stack.layer(j)
        current: dict[fx.Node, fx.Node] = {}

        def remap(a: fx.Node, current=current, previous=previous) -> fx.Node:
            if a in current:
                return current[a]
            if layers.member.get(a) == 0:
                role = psi[a]
                return previous[role] if layers.member.get(role) == 1 else role
            return a

        with graph.inserting_before(anchor):
            for node in layers.second:
                if node.op == "get_attr":
                    target = _rename(str(node.target), template, name)
                    _attach(gm, model, target)
                    copy = graph.get_attr(target)
                else:
                    copy = graph.create_node(
                        node.op, node.target, fx.map_arg(node.args, remap), fx.map_arg(node.kwargs, remap)
                    )
                copy.meta = _renamed_meta(node.meta, template, name)
                current[node] = copy
        previous = current
    if stack.depth > 3:
        for node in layers.last:
            for a in list(node.all_input_nodes):
                if layers.member.get(a) == 1:
                    node.replace_input_with(a, previous[a])
