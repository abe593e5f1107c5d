"""Depth-sampled capture: trace three layers of each repeated stack, replicate the rest.

Why: ``torch.export`` spends roughly half a second per decoder layer on symbolic-shape
bookkeeping, so a 7B (32 layers) or 70B (80 layers) model on the ``meta`` device
would take tens of seconds to a few minutes to trace although every layer produces
the same graph. A repeated stack is an ``nn.ModuleList``/``nn.Sequential`` whose
members ``1 .. L-1`` are structurally identical (member 0 may differ: T5 keeps its
relative position bias there). During the trace the model's own loop still calls
every layer, but layers ``2 .. L-2`` compute nothing and hand back layer 1's output,
so the graph holds layers 0, 1 and L-1 wired as consecutive layers; layer 1's nodes
are then copied for layers ``2 .. L-2`` with their own parameters.

What guards the assumption "every middle layer traces like layer 1":

* members ``1 .. L-1`` have the same classes, train/eval flags, parameter and buffer
  shapes/dtypes, plain attributes by value and other attributes (configs, functions,
  hooks, instance ``forward`` overrides) by identity; a layer index such as
  ``layer_idx`` is the only attribute allowed to differ;
* layers 1 and L-1 are traced with their index attributes replaced by a watcher:
  code that computes with the index (``if self.layer_idx == 3``,
  ``config.layer_types[self.layer_idx]``) refuses the sampled trace;
* the loop calls every layer once, in order, and calls layers ``2 .. L-1`` exactly
  as layer 1: the previous layer's output in the same argument positions, the same
  shared objects (masks, rotary tables), the same plain values. A loop index passed
  to a layer, a per-layer mask looked up by position, an early ``break`` or a short
  ``zip`` all fail this; since the loop really runs ``L`` times, ``len()``,
  ``enumerate`` and counters in the parent see the real depth;
* layer ``L-1``'s graph is isomorphic to layer 1's (same ops, same constants, same
  wiring to the layer before it and to shared values), and no value produced inside
  layers 0 or 1 is read outside the stack (per-layer output lists);
* with real weights, the stitched graph must reproduce the model's outputs on the
  example inputs (this also catches state the checks above cannot see, such as a
  global registry keyed by layer).

Not detectable on ``meta`` (no values to compare): layer behaviour driven by global
Python state. That is why capture samples by default only when the weights are on
``meta`` (where the model cannot run anyway) and traces in full otherwise.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import fx, nn

__all__ = ["RepeatedStack", "NotSampleable", "find_repeated_stacks", "sampled_layers", "stitch"]

MIN_DEPTH = 4  # with fewer layers there is nothing to replicate
_INDEX_ATTRS = frozenset(
    {"layer_idx", "layer_id", "layer_index", "layer_number", "layer_num", "idx", "index", "block_idx", "block_id"}
)
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


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


_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"forward"}  # forward: checked separately
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _attr_key(value: Any, depth: int = 0) -> Any:
    """Plain values and containers of them compare by value, tensors by shape, anything else by identity.

    Callables built per layer (``functools.partial(gelu, approximate="tanh")``, a closure,
    a bound method) compare by what they call and with which bound values.
    """
    if depth > 4:
        return ("object", id(value))
    key = partial(_attr_key, depth=depth + 1)
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), key(v)) for k, v in value.items())))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, partial):
        return ("partial", key(value.func), key(value.args), key(value.keywords))
    if isinstance(value, types.MethodType):
        return ("method", id(value.__func__))
    if isinstance(value, types.FunctionType):
        cells = tuple(key(c.cell_contents) for c in value.__closure__ or ())
        return ("function", id(value.__code__), key(value.__defaults__), key(value.__kwdefaults__), cells)
    return ("object", id(value))  # a shared config or module-level function is the same object in every layer


def _signature(layer: nn.Module) -> tuple:
    """Everything about a layer that sampling assumes is the same across the stack."""
    parts = []
    for path, mod in layer.named_modules():
        attrs = tuple(
            sorted((k, _attr_key(v)) for k, v in vars(mod).items() if k not in _MODULE_INTERNALS | _INDEX_ATTRS)
        )
        params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in mod.named_parameters(recurse=False))
        buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in mod.named_buffers(recurse=False))
        hooks = tuple(tuple(id(getattr(h, "__func__", h)) for h in getattr(mod, d).values()) for d in _HOOK_DICTS)
        forward = _forward_key(vars(mod).get("forward"))
        parts.append((path, type(mod), mod.training, attrs, params, buffers, hooks, forward))
    return tuple(parts)


def _forward_key(forward: Any) -> Any:
    """An instance ``forward`` override by identity; a converted model's layer overrides are all alike."""
    if getattr(forward, "is_attnres_forward", False):
        return type(forward).__qualname__
    return id(getattr(forward, "__func__", forward))


def find_repeated_stacks(model: nn.Module, min_depth: int = MIN_DEPTH) -> list[RepeatedStack]:
    """Outermost ``nn.ModuleList``/``nn.Sequential`` stacks whose members ``1..L-1`` are interchangeable."""
    found: list[RepeatedStack] = []
    for path, mod in model.named_modules():
        if type(mod) not in (nn.ModuleList, nn.Sequential) or len(mod) < min_depth:
            continue
        if any(path == s.path or path.startswith(s.path + ".") for s in found):
            continue
        members = list(mod)
        if len({id(m) for m in members}) != len(members):
            continue  # one layer object used twice: its parameters are shared, copies would not be
        first = _signature(members[1])
        if all(_signature(m) == first for m in members[2:]):
            found.append(RepeatedStack(path, len(members)))
    return found


# --------------------------------------------------------------------------------------
# tracing with the middle layers skipped


class _WatchedIndex:
    """Stands in for a layer-index attribute and notes any use: comparing, hashing, indexing, arithmetic.

    Layers 1 and L-1 are traced with their index attributes replaced: code that merely
    stores the index behaves the same in every layer, code that computes with it
    (``if self.layer_idx == 3``, ``config.layer_types[self.layer_idx]``) may not, and
    its use refuses the sampled trace. Not an ``int`` subclass on purpose: CPython
    indexes a list with an int subclass without calling ``__index__``.
    """

    __slots__ = ("_value", "_where", "_used")

    def __init__(self, value: int, where: str, used: list[str]) -> None:
        self._value, self._where, self._used = value, where, used

    def __repr__(self) -> str:
        return repr(self._value)


def _watching(name: str):
    def method(self, *args):
        self._used.append(self._where)
        return getattr(self._value, name)(*args)

    method.__name__ = name
    return method


for _name in (
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__index__", "__int__", "__float__",
    "__bool__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__mod__", "__rmod__",
    "__floordiv__", "__rfloordiv__", "__truediv__", "__rtruediv__", "__pow__", "__neg__", "__and__", "__or__",
    "__format__", "__str__",
):  # fmt: skip
    setattr(_WatchedIndex, _name, _watching(_name))


@dataclass
class _Call:
    """How one layer was called: argument structure, plain values, and the role of each tensor."""

    spec: Any
    roles: list[Any]
    leaves: list[Any]  # kept alive so that ids stay unique while records are compared


class _Recorder:
    """Hooks on every member of the sampled stacks; see :func:`sampled_layers`."""

    def __init__(self) -> None:
        self.order: dict[str, list[int]] = {}
        self.calls: dict[str, dict[int, _Call]] = {}
        self.previous: dict[str, dict[int, int]] = {}  # id of a tensor the last layer returned -> leaf position
        self.template: dict[str, Any] = {}  # layer 1's output, returned by the skipped layers
        self.index_used: list[str] = []

    def before(self, stack: RepeatedStack, j: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if j == 0:  # a new run of the model (export may run it more than once): start over
            self.order[stack.path], self.calls[stack.path], self.previous[stack.path] = [], {}, {}
            self.template.pop(stack.path, None)
        self.order.setdefault(stack.path, []).append(j)
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        previous = self.previous.get(stack.path, {})
        roles = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                roles.append(("previous", previous[id(leaf)]) if id(leaf) in previous else ("object", id(leaf)))
            elif isinstance(leaf, _PLAIN):
                roles.append(("value", type(leaf).__name__, leaf))
            elif isinstance(leaf, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                roles.append(("symbol", str(leaf)))
            else:
                roles.append(("object", id(leaf)))
        self.calls.setdefault(stack.path, {})[j] = _Call(spec, roles, leaves)

    def after(self, stack: RepeatedStack, j: int, module: nn.Module, args: tuple, output: Any) -> None:
        leaves = torch.utils._pytree.tree_leaves(output)
        self.previous[stack.path] = {id(t): k for k, t in enumerate(leaves) if isinstance(t, torch.Tensor)}
        if j == 1:
            self.template[stack.path] = output

    def skip(self, stack: RepeatedStack, j: int, *args: Any, **kwargs: Any) -> Any:
        """The forward of a middle layer: no computation, layer 1's output stands in for it."""
        if stack.path not in self.template:
            raise NotSampleable(f"{stack.layer(j)} ran before {stack.layer(1)}")
        return self.template[stack.path]

    def check(self, stacks: list[RepeatedStack]) -> None:
        """The loop must call every layer once, in order, the middle ones exactly as layer 1."""
        if self.index_used:
            raise NotSampleable(f"{self.index_used[0]} is computed with, so layers may differ by index")
        for stack in stacks:
            order = self.order.get(stack.path, [])
            if order != list(range(stack.depth)):
                shown = order if len(order) <= 12 else [*order[:12], "..."]
                raise NotSampleable(f"the layers of {stack.path} are not each called once, in order (calls: {shown})")
            calls = self.calls[stack.path]
            for j in range(2, stack.depth):
                if calls[j].spec != calls[1].spec or calls[j].roles != calls[1].roles:
                    raise NotSampleable(
                        f"{stack.layer(j)} is called with other arguments than {stack.layer(1)} (by position or type)"
                    )


@contextmanager
def sampled_layers(model: nn.Module, stacks: list[RepeatedStack]) -> Iterator[_Recorder]:
    """Within the block, layers ``2..L-2`` of each stack compute nothing; calls are recorded.

    The model's own loop still walks every layer, so ``len()``, indexing, ``enumerate``
    and counters see the real depth; each skipped layer returns layer 1's output, so
    the trace holds layers 0, 1 and L-1, wired as consecutive layers. The recorder
    then checks that every layer was called once, in order, with the arguments layer 1
    got (the previous layer's output in the same positions, the same shared objects,
    the same plain values), and that layers 1 and L-1 never computed with their index.
    """
    recorder = _Recorder()
    undo: list[Any] = []
    try:
        for stack in stacks:
            members = list(model.get_submodule(stack.path))
            for j, member in enumerate(members):
                undo.append(member.register_forward_pre_hook(partial(recorder.before, stack, j), with_kwargs=True))
                undo.append(member.register_forward_hook(partial(recorder.after, stack, j)))
                if 2 <= j < stack.depth - 1:
                    undo.append(_Patch(member, "forward", partial(recorder.skip, stack, j)))
            for j in (1, stack.depth - 1):
                for path, mod in members[j].named_modules(prefix=stack.layer(j)):
                    for name in _INDEX_ATTRS & vars(mod).keys():
                        value = vars(mod)[name]
                        if isinstance(value, int) and not isinstance(value, bool):
                            watched = _WatchedIndex(value, f"{path}.{name}", recorder.index_used)
                            undo.append(_Patch(mod, name, watched))
        yield recorder
    finally:
        for item in reversed(undo):
            item.remove()


class _Patch:
    """An instance attribute set for the duration of the trace, then put back as it was."""

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name = obj, name
        self.had, self.old = name in vars(obj), vars(obj).get(name)
        object.__setattr__(obj, name, value)

    def remove(self) -> None:
        if self.had:
            object.__setattr__(self.obj, self.name, self.old)
        else:
            object.__delattr__(self.obj, self.name)


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
        for node in list(gm.graph.nodes):
            index = _layer_index(node, stack)
            if index is None:
                continue
            if index not in groups:
                if node.op == "get_attr" and not node.users:  # a skipped layer's weight, lifted but unused
                    gm.graph.erase_node(node)
                    continue
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


def _check_lifted(gm: fx.GraphModule, target: str) -> None:
    """A replicated layer's weight must already be in ``gm``: every layer is called, so export lifted them all."""
    owner_path, _, name = target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path)
    except AttributeError:
        owner = None
    if owner is None or not isinstance(getattr(owner, name, None), torch.Tensor):
        raise NotSampleable(f"{target} is not in the traced module")


def stitch(gm: fx.GraphModule, stacks: list[RepeatedStack]) -> fx.GraphModule:
    """Turn the sampled trace ``gm`` into the full-depth graph, in place; returns ``gm``."""
    for stack in stacks:
        _stitch_one(gm, stack)
    gm.graph.lint()
    gm.recompile()
    return gm


def _stitch_one(gm: fx.GraphModule, stack: RepeatedStack) -> None:
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
                    _check_lifted(gm, target)
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
