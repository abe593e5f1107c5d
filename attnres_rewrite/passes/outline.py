"""Outline: cut a rewritten flat graph back into calls of the model's own layer modules.

``torch.export`` inlines every module, so a rewritten graph reads each layer's weights
without ever calling the layer: per-layer hooks never fire, ``fully_shard(layer)`` never
gathers, ``checkpoint_wrapper(layer)`` never recomputes. This pass finds each call of a
*layer* (a member of an outermost ``nn.ModuleList``/``nn.Sequential`` of the module the
graph was traced from) by its nodes' ``nn_module_stack``, moves those nodes into a graph
of their own, and leaves in the top graph one call of the real module (whatever sits
at that path when the program runs, so a wrapper installed later is called too). What
crosses a layer boundary is whatever the layer reads from outside and what the outside
reads from it; after the AttnRes rewrite that is the Block AttnRes state (completed
blocks, the partial sum) plus the model's own extras (masks, rotary tables, caches).

A layer whose nodes cannot be made contiguous (a value computed outside between two
of its nodes that both depends on it and feeds it) stays inline, with a note.

Attribute reads are split three ways, because the graph runs against the live model:
the model's own parameters and buffers stay attribute reads (of the layer, inside a
layer graph, so FSDP's unsharded views are what is read), ``attnres.*`` is read from
the AttnRes module passed in, and export's lifted constants (and higher-order-op
subgraphs) are passed in as a tuple.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

__all__ = ["LayerGraph", "Outline", "outline", "layer_paths", "call_layer", "read_attribute"]

ATTNRES_PREFIX = "attnres."


@dataclass
class LayerGraph:
    """One call of a layer: ``path`` relative to the traced module; the graph returns a tuple."""

    path: str
    graph: fx.Graph
    num_inputs: int
    num_outputs: int


@dataclass
class Outline:
    """The top graph (placeholders ``attnres, layer_programs, constants, *tensors``) and its layer calls."""

    top: fx.Graph
    layers: list[LayerGraph]
    constants: list[Any]
    notes: list[str] = field(default_factory=list)


def call_layer(module: nn.Module, program: Any, *inputs: Any) -> Any:
    """Call ``module`` (hooks, wrappers and all) with a layer program as its first argument."""
    return module(program, *inputs)


def read_attribute(obj: Any, dotted: str) -> Any:
    """``obj.a.b.c`` for ``dotted = "a.b.c"``, resolved when the graph runs."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def layer_paths(module: nn.Module) -> set[str]:
    """Members of the outermost ``nn.ModuleList``/``nn.Sequential`` containers below ``module``."""
    found: set[str] = set()
    containers: list[str] = []
    for path, mod in module.named_modules():
        if not path or not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        if any(path.startswith(c + ".") for c in containers) or any(path.startswith(p + ".") for p in found):
            continue
        containers.append(path)
        for name, _ in mod.named_children():
            found.add(f"{path}.{name}")
    return found


def _resolve(root: Any, dotted: str) -> Any:
    try:
        return read_attribute(root, dotted)
    except AttributeError:
        return None


def _relative(path: str, prefix: str) -> str | None:
    """``path`` (relative to the whole model) relative to the traced module at ``prefix``."""
    if not prefix:
        return path
    if path == prefix:
        return ""
    if path.startswith(prefix + "."):
        return path[len(prefix) + 1 :]
    return None


def _group_of(node: fx.Node, layers: set[str], prefix: str) -> tuple[str, str] | None:
    """``(layer path, call key)`` of the outermost layer call ``node`` belongs to."""
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        rel = _relative(value[0], prefix)
        if rel is not None and rel in layers:
            return rel, key
    return None


def _insert_placeholders(graph: fx.Graph, names: list[str]) -> list[fx.Node]:
    first = next(iter(graph.nodes))
    out = []
    with graph.inserting_before(first):
        for name in names:
            out.append(graph.placeholder(name))
    return out


def _externalise_attributes(gm: fx.GraphModule, traced_module: nn.Module, attnres: fx.Node, consts: fx.Node) -> list:
    """Turn ``attnres.*`` reads and reads of export's own constants into top-level nodes."""
    graph = gm.graph
    constants: list[Any] = []
    index: dict[str, int] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        target = str(node.target)
        if target.startswith(ATTNRES_PREFIX):
            with graph.inserting_before(node):
                new = graph.call_function(read_attribute, (attnres, target[len(ATTNRES_PREFIX) :]))
        elif _resolve(traced_module, target) is None:
            if target not in index:
                index[target] = len(constants)
                constants.append(read_attribute(gm, target))
            with graph.inserting_before(node):
                new = graph.call_function(operator.getitem, (consts, index[target]))
        else:
            continue
        new.meta = dict(node.meta)
        new.meta.pop("nn_module_stack", None)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    return constants


def _assign_groups(graph: fx.Graph, layers: set[str], prefix: str) -> dict[tuple[str, str], list[fx.Node]]:
    groups: dict[tuple[str, str], list[fx.Node]] = {}
    member: dict[fx.Node, tuple[str, str]] = {}
    for node in graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            key = _group_of(node, layers, prefix)
            if key is not None:
                groups.setdefault(key, []).append(node)
                member[node] = key
    for node in graph.nodes:  # a layer's own weights move in with it when only that call reads them
        if node.op != "get_attr":
            continue
        target = str(node.target)
        owners = {member.get(u) for u in node.users}
        if len(owners) != 1:
            continue
        key = next(iter(owners))
        if key is not None and target.startswith(key[0] + "."):
            groups[key].insert(0, node)
            member[node] = key
    return groups


def _make_contiguous(graph: fx.Graph, group: list[fx.Node]) -> str | None:
    """Reorder so ``group`` is one run of nodes; the reason when that is impossible."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    inside = set(group)
    body = [n for n in group if n.op != "get_attr"]
    lo, hi = order[body[0]], order[body[-1]]
    window = [n for n in graph.nodes if lo < order[n] < hi and n not in inside]
    if not window:
        return None
    depends: set[fx.Node] = set()  # computed from the group
    for n in window:
        if any(i in inside or i in depends for i in n.all_input_nodes):
            depends.add(n)
    needed: set[fx.Node] = set()  # read by the group
    for n in reversed(window):
        if any(u in inside or u in needed for u in n.users):
            needed.add(n)
    both = depends & needed
    if both:
        return f"{next(iter(both)).name} is computed from the layer and read by it"
    first, last = body[0], body[-1]
    for n in window:
        if n not in depends:
            first.prepend(n)
    for n in reversed(window):
        if n in depends:
            last.append(n)
    for n in group:  # the layer's weights sit at the top of the graph: bring them next to their users
        if n.op == "get_attr":
            first.prepend(n)
    return None


def _extract(graph: fx.Graph, group: list[fx.Node], path: str, index: int, programs: fx.Node) -> LayerGraph:
    inside = set(group)
    inputs: list[fx.Node] = []
    for n in group:
        for i in n.all_input_nodes:
            if i not in inside and i not in inputs:
                inputs.append(i)
    outputs = [n for n in group if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, x in enumerate(inputs):
        env[x] = sub.placeholder(f"in{i}_{x.name}")
        env[x].meta = dict(x.meta)
    for n in group:
        if n.op == "get_attr":
            env[n] = sub.get_attr(str(n.target)[len(path) + 1 :])
            env[n].meta = dict(n.meta)
        else:
            env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    body = [n for n in group if n.op != "get_attr"]
    with graph.inserting_before(body[0]):
        module = graph.get_attr(path)
        program = graph.call_function(operator.getitem, (programs, index))
        call = graph.call_function(call_layer, (module, program, *inputs))
        results = [graph.call_function(operator.getitem, (call, k)) for k in range(len(outputs))]
    for old, new in zip(outputs, results):
        new.meta = {k: v for k, v in old.meta.items() if k in ("val", "tensor_meta")}
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
    for n in reversed(group):
        graph.erase_node(n)
    return LayerGraph(path, sub, len(inputs), len(outputs))


def outline(gm: fx.GraphModule, traced_module: nn.Module, prefix: str = "") -> Outline:
    """Split ``gm`` (an unlifted export of ``traced_module``, rewritten) into a top graph and layer calls.

    ``prefix`` is the path of ``traced_module`` in the whole model: the graph's
    ``nn_module_stack`` paths carry it (see :func:`~.capture.prefix_module_paths`),
    its attribute reads do not. ``gm``'s graph is consumed.
    """
    graph = gm.graph
    for node in list(graph.nodes):  # export's input guards are checked before a program runs, not in it
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    attnres, programs, consts = _insert_placeholders(graph, ["attnres", "layer_programs", "constants"])
    constants = _externalise_attributes(gm, traced_module, attnres, consts)
    layers = layer_paths(traced_module)
    groups = _assign_groups(graph, layers, prefix) if layers else {}
    notes: list[str] = []
    outlined: list[LayerGraph] = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for (path, _key), group in sorted(groups.items(), key=lambda kv: min(order[n] for n in kv[1])):
        if all(n.op == "get_attr" for n in group):
            continue
        reason = _make_contiguous(graph, group)
        if reason is not None:
            notes.append(f"{path} runs inline (its hooks and wrappers are not called): {reason}")
            continue
        outlined.append(_extract(graph, group, path, len(outlined), programs))
    graph.lint()
    return Outline(graph, outlined, constants, notes)


def strip_pytree_codegen(graph: fx.Graph) -> None:
    """Generate plain ``forward(self, *placeholders)`` code (inputs and outputs flat)."""
    graph._codegen = fx.graph.CodeGen()
