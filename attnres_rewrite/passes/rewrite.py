"""Rewrite: replace each planned residual stream by Block AttnRes aggregations.

For a stream with start ``s_0``, branch outputs ``v_l`` and states ``s_k`` (add outputs)
the graph gets, in stream order:

* per block, partial sums ``b_n^i = b_n^{i-1} + v_l`` (new ``aten.add`` nodes); the
  last one of a block is the completed block ``b_n``; ``b_0 = s_0``;
* per distinct sublayer input, one ``torch.ops.attnres.block_attnres(sources, query,
  key_gain, eps, scale)`` node whose sources are ``[b_0..b_{n-1}]`` or ``[b_0..b_{n-1},
  partial]`` in that order; every former reader of the state (the branch's norm, any
  other consumer) reads the aggregation instead;
* one more aggregation over every completed block (and the last partial sum) that
  replaces the stream output for its consumers (final norm, head, pooling).

The original residual adds become dead and are removed. ``query``/``key_gain`` rows
are selected in the graph (``aten.select``) from ``(A+1, d)`` parameters of the
``attnres`` submodule, so the rewritten module stays a plain trainable GraphModule
that ``torch.export`` can trace again. New nodes carry ``meta["attnres"]`` (stream,
row, role, block) for the compile lowering, and an ``nn_module_stack`` that places them
in the layer they belong to: an input aggregation and a partial sum in the module that
holds the sublayer's residual add, the stream-output aggregation in the module that
holds the whole stream. :mod:`.outline` cuts the graph into per-layer calls by that
metadata, so what crosses a layer boundary is the Block AttnRes state (completed
blocks and the partial sum), and ``torch.export.unflatten`` can do the same.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..reference import mode_scale
from .detect import Detection, Stream
from .plan import ConversionPlan, StreamPlan

aten = torch.ops.aten

__all__ = ["AttnResParameters", "StreamParameters", "make_parameters", "rewrite"]


class StreamParameters(nn.Module):
    """Pseudo-queries and key-norm gains of one stream: row ``r`` feeds aggregation ``r``."""

    def __init__(self, rows: int, dim: int, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(rows, dim, dtype=dtype, device=device))
        self.key_gain = nn.Parameter(torch.ones(rows, dim, dtype=dtype, device=device))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SPEC init: zero queries (uniform depth attention), unit gains."""
        self.query.zero_()
        self.key_gain.fill_(1.0)


class AttnResParameters(nn.Module):
    """The ``attnres`` submodule: one :class:`StreamParameters` child per converted stream.

    It also carries the conversion: ``plan`` (the :class:`~.plan.ConversionPlan`) and
    ``trace_depth`` (how new call signatures are captured), plain attributes that are
    not part of the state dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.plan: ConversionPlan | None = None
        self.trace_depth = "auto"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for child in self.children():
            child.reset_parameters()


class _Cursor:
    """Insert nodes one after another, starting after ``node``; ``stack`` is their ``nn_module_stack``."""

    def __init__(self, graph: torch.fx.Graph, node: Node) -> None:
        self.graph, self.node = graph, node
        self.created: set[Node] = set()
        self.stack: dict | None = None

    def call(self, target, args, meta: dict | None = None, kwargs: dict | None = None) -> Node:
        with self.graph.inserting_after(self.node):
            new = self.graph.call_function(target, args, kwargs)
        self._done(new, meta)
        return new

    def get_attr(self, name: str) -> Node:
        with self.graph.inserting_after(self.node):
            new = self.graph.get_attr(name)
        self._done(new, None)
        return new

    def _done(self, new: Node, meta: dict | None) -> None:
        if meta:
            new.meta.update(meta)
        if self.stack is not None and new.op != "get_attr":
            new.meta["nn_module_stack"] = dict(self.stack)
        self.created.add(new)
        self.node = new


def _insertion_point(node: Node) -> Node:
    """Where to start inserting after ``node`` (placeholders must stay first)."""
    if node.op != "placeholder":
        return node
    last = node
    for n in node.graph.nodes:
        if n.op == "placeholder":
            last = n
    return last


def _aggregate(
    cur: _Cursor,
    sources: list[Node],
    plan: StreamPlan,
    row: int,
    mode: str,
    like: Node,
    info: dict,
    channels_last: dict[Node, Node] | None = None,
) -> Node:
    """One ``block_attnres`` call; channel-first streams aggregate channels-last views.

    ``channels_last`` caches one permuted view per source node, so consecutive calls
    still share their completed-block source nodes (the compile lowering groups on them).
    """
    if plan.feature_axis == 1:
        assert channels_last is not None
        views = []
        for src in sources:
            if src not in channels_last:
                channels_last[src] = cur.call(aten.permute.default, (src, [0, 2, 3, 1]))
            views.append(channels_last[src])
        out = _aggregate(cur, views, dataclasses.replace(plan, feature_axis=-1), row, mode, like, info)
        out.meta.pop("val", None)
        return cur.call(aten.permute.default, (out, [0, 3, 1, 2]))
    q = cur.get_attr(plan.query)
    g = cur.get_attr(plan.key_gain)
    qr = cur.call(aten.select.int, (q, 0, row))
    gr = cur.call(aten.select.int, (g, 0, row))
    meta = {"attnres": dict(info, stream=plan.name, row=row, num_sources=len(sources))}
    if "val" in like.meta:
        meta["val"] = like.meta["val"]
    scale = mode_scale(mode, len(sources))
    return cur.call(torch.ops.attnres.block_attnres.default, (list(sources), qr, gr, float(plan.eps), scale), meta)


def _shape(node: Node) -> tuple[str, ...]:
    return tuple(str(x) for x in node.meta["val"].shape)


def _reshape_like(cur: _Cursor, x: Node, like: Node) -> Node:
    """``x.reshape(like.shape)`` with symbolic sizes read from ``like`` at run time.

    A stream may be flattened to ``(B*T, d)`` around a sublayer and viewed back; all
    sources of one aggregation must share a shape, so values are brought to the
    stream start's shape and aggregations back to each state's shape.
    """
    if _shape(x) == _shape(like):
        return x
    sizes = []
    for i, size in enumerate(like.meta["val"].shape):
        sizes.append(int(size) if not isinstance(size, torch.SymInt) else cur.call(aten.sym_size.int, (like, i)))
    return cur.call(aten.reshape.default, (x, sizes))


def _stack(node: Node) -> dict:
    return dict(node.meta.get("nn_module_stack") or {})


def _common_stack(nodes: list[Node]) -> dict:
    """The module calls every node in ``nodes`` is inside (outermost first)."""
    stacks = [list(_stack(n).items()) for n in nodes]
    common = []
    for entries in zip(*stacks):
        if any(e != entries[0] for e in entries):
            break
        common.append(entries[0])
    return dict(common)


def _rewrite_stream(gm: GraphModule, stream: Stream, plan: StreamPlan, mode: str) -> set[Node]:
    graph = gm.graph
    owner_stack = _common_stack([s.add for s in stream.sublayers])
    states = stream.states
    state_of_add = {n: k for k, n in enumerate(states)}
    added_at: dict[int, list[int]] = {}
    for l, sub in enumerate(stream.sublayers):
        added_at.setdefault(state_of_add[sub.add], []).append(l)
    row_of_state = {sub.reads: plan.inputs[l] for l, sub in enumerate(stream.sublayers)}
    block_of, last_of_block = {}, set()
    for n, (lo, hi) in enumerate(plan.blocks):
        for l in range(lo, hi):
            block_of[l] = n
        last_of_block.add(hi - 1)

    channels_last: dict[Node, Node] = {}
    completed: list[Node] = [stream.start]
    partial: Node | None = None
    created: set[Node] = set()
    readers: dict[int, int] = {}
    for l, sub in enumerate(stream.sublayers):
        readers.setdefault(sub.reads, l)
    for j, state in enumerate(states):
        cur = _Cursor(graph, _insertion_point(state))
        for l in added_at.get(j, []):
            cur.stack = _stack(stream.sublayers[l].add)
            v = stream.sublayers[l].value
            for wrap in stream.sublayers[l].wraps:  # what the model applied to the sum of parallel branches
                meta = {"val": wrap.meta["val"]} if "val" in wrap.meta else None
                v = cur.call(wrap.target, (v, *wrap.args[1:]), meta, kwargs=dict(wrap.kwargs))
            v = _reshape_like(cur, v, stream.start)
            if partial is None:
                partial = v
            else:
                info = {"attnres": {"stream": plan.name, "role": "partial_sum", "block": block_of[l] + 1}}
                if "val" in v.meta:
                    info["val"] = v.meta["val"]
                partial = cur.call(aten.add.Tensor, (partial, v), info)
            if l in last_of_block:
                completed.append(partial)
                partial = None
        aggregations = []
        if j in row_of_state:
            aggregations.append((row_of_state[j], "input"))
        if j == len(states) - 1:
            aggregations.append((plan.output_row, "output"))
        for row, role in aggregations:
            cur.stack = _stack(stream.sublayers[readers[j]].add) if role == "input" else owner_stack
            sources = completed + ([partial] if partial is not None else [])
            info = {"role": role, "block": len(completed)}
            h = _aggregate(cur, sources, plan, row, mode, stream.start, info, channels_last)
            if _shape(state) != _shape(stream.start):
                h = _reshape_like(cur, h, stream.sublayers[added_at[j][-1]].value)
            mine = cur.created
            state.replace_all_uses_with(h, delete_user_cb=lambda user, mine=mine: user not in mine)
        created |= cur.created
    return created


def _remove_dead(graph: torch.fx.Graph, roots: list[Node]) -> None:
    """Erase the replaced adds and whatever only fed them (targeted, not a global DCE)."""
    todo, erased = list(roots), set()
    while todo:
        n = todo.pop()
        if n in erased or n.op in ("placeholder", "output", "get_attr") or n.users or n.is_impure():
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        todo.extend(inputs)


def make_parameters(
    plan: ConversionPlan, detection: Detection | None = None, *, like: torch.Tensor | None = None
) -> AttnResParameters:
    """The ``attnres`` module for ``plan``: per stream, zero queries and unit gains.

    In the dtype and on the device of the stream as ``detection`` traced it, else of
    ``like`` (a parameter of the model, when an adapter is applied without a trace).
    """
    by_name = {s.name: s for s in detection.streams} if detection is not None else {}
    params = AttnResParameters()
    for sp in plan.streams:
        stream = by_name.get(sp.name)
        val = stream.start.meta.get("val") if stream is not None else like
        device = val.device if isinstance(val, torch.Tensor) else None
        dtype = val.dtype if isinstance(val, torch.Tensor) and val.dtype.is_floating_point else torch.float32
        params.add_module(sp.name, StreamParameters(sp.num_rows, sp.dim, dtype, device))
    return params


def rewrite(gm: GraphModule, detection: Detection, plan: ConversionPlan, params: AttnResParameters) -> GraphModule:
    """Apply ``plan`` to ``gm`` (whose graph ``detection`` was computed on), in place; returns ``gm``.

    Original parameters keep their names; the graph reads the AttnRes parameters as
    ``attnres.<stream>.{query,key_gain}`` (``params`` is registered as ``gm.attnres``
    so the graph lints; a converted model resolves those names on its own ``attnres``).
    Only the streams of ``plan`` are rewritten; ``detection`` may hold more.
    """
    by_name = {s.name: s for s in detection.streams}
    gm.add_module("attnres", params)
    dead: list[Node] = []
    for sp in plan.streams:
        stream = by_name[sp.name]
        _rewrite_stream(gm, stream, sp, plan.mode)
        dead.extend(stream.states[1:])
    _remove_dead(gm.graph, dead)
    gm.graph.lint()
    gm.recompile()
    return gm
