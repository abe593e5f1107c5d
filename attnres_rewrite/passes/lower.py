"""Two-phase lowering of ``attnres.block_attnres`` calls in a captured FX graph.

Where this pass runs, and why: on the Dynamo-level graph, *before* AOTAutograd. The
pass replaces, per block, the ``S`` aggregations that share the completed blocks
``b_0..b_{n-1}`` by one ``block_phase1`` call (all ``S`` queries at once) and one
``block_phase2`` merge per sublayer. Because this happens before autograd, AOTAutograd
then differentiates ``block_phase1`` / ``block_phase2`` through their registered
autograd formulas, so the forward *and* the backward graph Inductor receives follow
the two-phase schedule (``block_phase1_backward`` once per block), and the backward
is correct by construction rather than by a second hand-written graph surgery.
The price is memory: autograd keeps phase 1's ``o`` (``S x tokens x d``, fp32) for the
backward, one fp32 activation per sublayer that the single-pass op does not save.

Grouping rule. Every call has a source tuple ``t``. A tuple that is the sources of
one call *and* the prefix of another call's sources is a *block key* (the completed
blocks of a block): a call whose sources equal a key is that block's first sublayer
(``partial=None``); a call whose sources are a key plus one more node is a later
sublayer (or the stream output) whose last source is the intra-block partial sum.
Any such split is exact (online softmax), so a wrong guess would cost speed, never
correctness. Groups of a single call are left as ``block_attnres``: phase 1 would
save nothing there and would keep ``o`` alive for the backward.

Dataflow. Phase 1 is inserted right before the group's first call: its sources are
arguments of that call, hence already defined. The queries and gains of later
sublayers are usually row selections of the ``attnres.<stream>.query`` parameter
(``query[l]``) emitted next to each call; they are re-read as one slice of the
parameter (or stacked after hoisting when they are not plain rows). Phase 2 of
sublayer ``i`` replaces the call in place, because its partial sum depends on the
outputs of the earlier sublayers.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx

from .. import kernels  # noqa: F401  (registers torch.ops.attnres.*)
from ..reference import acc

_ARG_NAMES = ("sources", "query", "key_gain", "eps", "scale")


def _attnres_targets() -> tuple:
    ops = torch.ops.attnres
    return (ops.block_attnres, ops.block_attnres.default)


def is_block_attnres(node: fx.Node) -> bool:
    """True for a call of ``torch.ops.attnres.block_attnres`` (packet or overload)."""
    return node.op == "call_function" and node.target in _attnres_targets()


def op_name(node: fx.Node) -> str:
    """``namespace::name`` of an op call (overload or packet), ``""`` for anything else."""
    if node.op != "call_function":
        return ""
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.name()
    if isinstance(node.target, torch._ops.OpOverloadPacket):
        return node.target._qualified_op_name
    return ""


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    """Count ``attnres::*`` calls per op name (``block_phase1``, ``block_phase1_backward``...).

    Used by the backend's report and by tests: the schedule is checked on the graph,
    not inferred from kernel launches.
    """
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        name = op_name(node)
        if name.startswith("attnres::"):
            short = name.split("::", 1)[1].split(".", 1)[0]
            counts[short] = counts.get(short, 0) + 1
    return counts


@dataclass
class _Call:
    """One ``block_attnres`` node with its arguments by name."""

    node: fx.Node
    sources: tuple[fx.Node, ...]
    query: fx.Node
    key_gain: fx.Node
    eps: float
    scale: float

    @classmethod
    def parse(cls, node: fx.Node) -> _Call | None:
        bound = dict(zip(_ARG_NAMES, node.args))
        bound.update(node.kwargs)
        sources = bound.get("sources")
        if not isinstance(sources, (list, tuple)) or not all(isinstance(s, fx.Node) for s in sources):
            return None
        if not all(isinstance(bound.get(k), fx.Node) for k in ("query", "key_gain")):
            return None
        if not all(isinstance(bound.get(k), (int, float)) for k in ("eps", "scale")):
            return None
        return cls(node, tuple(sources), bound["query"], bound["key_gain"], float(bound["eps"]), float(bound["scale"]))


@dataclass
class BlockGroup:
    """The calls of one block: ``first`` has no partial sum, ``rest`` end with one."""

    completed: tuple[fx.Node, ...]
    eps: float
    calls: list[_Call] = field(default_factory=list)

    def partial_of(self, call: _Call) -> fx.Node | None:
        return None if len(call.sources) == len(self.completed) else call.sources[-1]


@dataclass
class LoweringReport:
    """What the pass found and did; handed to the backend's ``report_hook``.

    ``graph_module`` is the graph after the pass (before AOTAutograd);
    ``inductor_config`` holds the Inductor config patches the backend applied and
    ``aot_graphs`` is filled by the backend with the ``attnres`` op counts of every
    graph Inductor compiles (``forward``, ``backward`` or ``inference``).
    """

    attnres_nodes: int = 0
    groups: list[tuple[int, int]] = field(default_factory=list)  # (completed sources, sublayers) per block
    left_alone: int = 0
    two_phase: bool = True
    lowering: str = "two_phase"  # or "decompose" (CPU default), "single" (calls left as they are)
    decomposed: int = 0
    graph_module: fx.GraphModule | None = None
    inductor_config: dict = field(default_factory=dict)
    aot_graphs: list[tuple[str, dict[str, int]]] = field(default_factory=list)

    @property
    def phase1_calls(self) -> int:
        return len(self.groups)


def find_groups(calls: Iterable[_Call], min_group: int = 2) -> list[BlockGroup]:
    """Group calls by shared completed-block sources (see the module docstring)."""
    calls = list(calls)
    tuples = {(c.sources, c.eps) for c in calls}
    keys = {(t[:-1], eps) for t, eps in tuples if len(t) > 1 and (t[:-1], eps) in tuples}
    groups: dict[tuple, BlockGroup] = {}
    for call in calls:
        if (call.sources, call.eps) in keys:
            key = (call.sources, call.eps)
        elif (call.sources[:-1], call.eps) in keys:
            key = (call.sources[:-1], call.eps)
        else:
            continue
        groups.setdefault(key, BlockGroup(key[0], call.eps)).calls.append(call)
    return [g for g in groups.values() if len(g.calls) >= min_group]


# --------------------------------------------------------------------------------------
# Graph editing helpers


def _annotate(node: fx.Node) -> None:
    """Give a new node the ``example_value`` Dynamo's other nodes carry.

    Inductor's pre-grad passes read that metadata; the value is computed on the
    inputs' fake tensors, so symbolic shapes stay those of the traced graph.
    """

    def value(a):
        return a.meta.get("example_value") if isinstance(a, fx.Node) else a

    inputs = node.all_input_nodes
    if any("example_value" not in a.meta for a in inputs):
        return
    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    mode = next((v.fake_mode for v in map(value, inputs) if hasattr(v, "fake_mode")), None)
    if mode is None:
        return
    with mode:
        node.meta["example_value"] = node.target(*args, **kwargs)


def _emit(graph: fx.Graph, before: fx.Node, target, args: tuple) -> fx.Node:
    with graph.inserting_before(before):
        node = graph.call_function(target, args)
    _annotate(node)
    return node


def _row(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(base, i)`` when ``node`` selects row ``i`` of a 2-D tensor ``base``."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.target is operator.getitem and len(node.args) == 2 and isinstance(node.args[1], int):
        return node.args[0], node.args[1]
    selects = (torch.ops.aten.select.int, torch.select)
    if node.target in selects and len(node.args) == 3 and node.args[1] == 0 and isinstance(node.args[2], int):
        return node.args[0], node.args[2]
    return None


def _is_before(a: fx.Node, b: fx.Node, order: dict[fx.Node, float]) -> bool:
    return order.get(a, float("inf")) < order[b]


def _is_attnres_op(node: fx.Node) -> bool:
    return op_name(node).startswith("attnres::")


def _hoist(node: fx.Node, point: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Move ``node`` (and its late inputs) before ``point``; False when that is unsafe.

    Only pure calls move, never an AttnRes call: a value that depends on a block's
    own sublayers cannot be needed before that block starts.
    """
    if _is_before(node, point, order):
        return True
    if node.op != "call_function" or node not in order or _is_attnres_op(node) or node.is_impure():
        return False
    inputs = node.all_input_nodes
    if not all(_hoist(a, point, order) for a in inputs):
        return False
    point.prepend(node)
    order[node] = order[point] - 0.5  # stays before point for later checks
    return True


def _stacked(graph: fx.Graph, nodes: list[fx.Node], point: fx.Node, order: dict) -> fx.Node | None:
    """An ``(S, d)`` node holding ``nodes`` as rows, available before ``point``.

    Consecutive rows of one parameter become a slice (a view: no copy, and its
    backward is a cheap scatter into the parameter's gradient).
    """
    rows = [_row(n) for n in nodes]
    if all(rows) and len({r[0] for r in rows}) == 1:
        base, first = rows[0]
        if [r[1] for r in rows] == list(range(first, first + len(rows))) and first >= 0:
            return _emit(graph, point, torch.ops.aten.slice.Tensor, (base, 0, first, first + len(rows)))
    if not all(_hoist(n, point, order) for n in nodes):
        return None
    return _emit(graph, point, torch.stack, (list(nodes),))


def _lower_group(graph: fx.Graph, group: BlockGroup, order: dict) -> bool:
    """Rewrite one block into phase 1 + per-sublayer phase 2; False leaves it untouched."""
    calls = sorted(group.calls, key=lambda c: order[c.node])
    dtypes = [_out_dtype(c) for c in calls]
    if None in dtypes:  # phase 2 needs the output dtype as a constant; do not guess it
        return False
    point = calls[0].node
    queries = _stacked(graph, [c.query for c in calls], point, order)
    gains = _stacked(graph, [c.key_gain for c in calls], point, order) if queries is not None else None
    if gains is None:
        if queries is not None:
            graph.erase_node(queries)
        return False
    stats = _emit(
        graph, point, torch.ops.attnres.block_phase1.default, (list(group.completed), queries, gains, group.eps)
    )
    o, m, l = (_emit(graph, point, operator.getitem, (stats, k)) for k in range(3))
    # One ``unbind`` per statistic, not a ``select`` per query: the backward of S selects
    # zero-fills a full (S, tokens, d) fp32 gradient S times and adds them up (S - 1
    # more passes), where unbind's backward stacks the S slices once.
    rows = [_emit(graph, point, torch.ops.aten.unbind.int, (t, 0)) for t in (o, m, l)]
    for s, (call, dtype) in enumerate(zip(calls, dtypes)):
        o_s, m_s, l_s = (_emit(graph, call.node, operator.getitem, (r, s)) for r in rows)
        args = (o_s, m_s, l_s, group.partial_of(call), call.query, call.key_gain, group.eps, call.scale, dtype)
        merged = _emit(graph, call.node, torch.ops.attnres.block_phase2.default, args)
        call.node.replace_all_uses_with(merged)
        graph.erase_node(call.node)
    return True


def _out_dtype(call: _Call) -> torch.dtype | None:
    """The aggregate's dtype (that of its sources), from Dynamo's or export's metadata."""
    for node in (call.node, call.sources[0]):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor):
            return value.dtype
    return None


# --------------------------------------------------------------------------------------
# CPU: a decomposition Inductor can fuse


def attnres_decomposed(
    sources: list[torch.Tensor], query: torch.Tensor, key_gain: torch.Tensor, eps: float, scale: float
):
    """``block_attnres`` in plain differentiable ATen ops (fp32 statistics; fp64 for fp64), for Inductor.

    On CPU the custom op is opaque to Inductor (an external call per sublayer, never
    fused with its neighbours); written out, Inductor fuses the K RMS/logit reductions
    into one loop over the sources and the weighted sum into its consumer, and
    AOTAutograd derives the backward (fp32, so ``grad_out . h`` stays exact in fp32).
    The same math as :func:`attnres_rewrite.reference.attnres`.
    """
    u = acc(query) * acc(key_gain)
    logits = []
    for v in sources:
        vf = acc(v)
        logits.append((vf * u).sum(-1) * torch.rsqrt(vf.square().mean(-1) + eps))
    alpha = torch.softmax(torch.stack(logits), dim=0) * scale
    out = alpha[0].unsqueeze(-1) * acc(sources[0])
    for i in range(1, len(sources)):
        out = out + alpha[i].unsqueeze(-1) * acc(sources[i])
    return out.to(sources[0].dtype)


def decompose(gm: fx.GraphModule) -> LoweringReport:
    """Replace every ``block_attnres`` call by :func:`attnres_decomposed` (in place)."""
    nodes = [n for n in gm.graph.nodes if is_block_attnres(n)]
    report = LoweringReport(attnres_nodes=len(nodes), two_phase=False, graph_module=gm, lowering="decompose")
    for node in nodes:
        node.target = attnres_decomposed
    report.decomposed = len(nodes)
    if nodes:
        gm.graph.lint()
        gm.recompile()
    return report


def lower_two_phase(gm: fx.GraphModule, two_phase: bool = True, min_group: int = 2) -> LoweringReport:
    """Apply the two-phase schedule to ``gm`` in place and report what was done.

    With ``two_phase=False`` the graph is only inspected (the report still counts the
    AttnRes calls), so the backend can compare both schedules on one model.
    """
    nodes = [n for n in gm.graph.nodes if is_block_attnres(n)]
    report = LoweringReport(
        attnres_nodes=len(nodes), two_phase=two_phase, graph_module=gm, lowering="two_phase" if two_phase else "single"
    )
    calls = [c for c in map(_Call.parse, nodes) if c is not None]
    if not two_phase or not calls:
        report.left_alone = len(nodes)
        return report
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    lowered = 0
    for group in find_groups(calls, min_group):
        if _lower_group(gm.graph, group, order):
            report.groups.append((len(group.completed), len(group.calls)))
            lowered += len(group.calls)
    report.left_alone = len(nodes) - lowered
    if lowered:
        gm.graph.lint()
        gm.recompile()
    return report
