"""Detect: find residual streams in an exported FX graph by dataflow.

A *residual add* is ``add(s, f(s))``: two same-shape float operands where the root of
one (the stream operand, seen through casts, clones, identity views and dropout) is an
ancestor of the other (the branch). Residual adds are linked into chains when the
stream operand of one is the output of another. Nothing looks at module names or
fixed op patterns to find streams; module metadata is only used to *name* what was
found (the module path of each sublayer) and to recognise hand-written norms.

Cost: one pass over the nodes; the ancestor test of an add only walks the nodes
topologically between the stream value and the branch output (that branch's own
nodes), so the whole detection is linear in graph size for layered models.

Besides chains of ``s + f(s)`` the detector understands:

* parallel branches ``s + (f(s) + g(s))`` (NeoX) and ``(s + f(s)) + g(s)`` (GPT-J,
  where ``g`` reads the state *before* ``f`` was added): separate sublayers with one
  shared input;
* post-norm ``norm(s + f(s))`` and post-activation ``relu(s + f(s))`` links, which
  make a chain not convertible (docs/spec.md section 2).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .norms import find_norms, metadata_only

aten = torch.ops.aten

__all__ = ["Sublayer", "Stream", "Detection", "detect", "stream_owner"]

# Ops that keep the identity of a stream value (same shape; dtype may change).
_SEE_THROUGH = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten.to.other,
    aten._to_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.dropout.default,
    aten.feature_dropout.default,
    aten.alpha_dropout.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.type_as.default,
}
_ADDS = {aten.add.Tensor, aten.add_.Tensor}
_NORM_OPS = {
    aten.layer_norm.default: 4,  # arg index of eps
    aten.native_layer_norm.default: 4,
    aten.rms_norm.default: 3,
    aten._fused_rms_norm.default: 3,
    aten.group_norm.default: 4,
    aten.native_group_norm.default: 7,
    aten.batch_norm.default: 7,
    aten._native_batch_norm_legit_no_training.default: 6,
}
_ACT_OPS = {
    aten.relu.default,
    aten.relu_.default,
    aten.gelu.default,
    aten.silu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.hardtanh.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.mish.default,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
_CONV_OPS = {aten.conv2d.default, aten.convolution.default, aten.conv1d.default, aten.conv3d.default}
_NORM_CLASS = re.compile(r"norm", re.IGNORECASE)
_TRIVIAL_WRAPPERS = ("torch.nn.modules.dropout.", "torch.nn.modules.linear.Identity", "torch.nn.modules.activation.")
_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")


@dataclass
class Sublayer:
    """One residual branch: its raw output ``value`` is added to the stream by ``add``.

    ``wraps``: value-preserving ops (dropout, casts, views) the model applied to a sum
    of parallel branches before adding it; the rewrite applies them to each branch.
    """

    value: Node
    add: Node
    reads: int  # index of the stream state the branch reads (0 = stream start)
    module_path: str
    wraps: list[Node] = field(default_factory=list)


@dataclass
class Stream:
    """A chain of residual adds, with its classification."""

    name: str
    kind: str  # prenorm | additive | postnorm | postact | single | unsupported
    convertible: bool
    reason: str
    start: Node
    states: list[Node]  # states[0] is the start, states[k] the output of the k-th add
    sublayers: list[Sublayer]
    dim: int
    shape: str
    dtype: torch.dtype
    eps: float | None = None
    norm_paths: list[str] = field(default_factory=list)
    feature_axis: int = -1  # 1 for channel-first convolutional streams (B, C, H, W)

    @property
    def output(self) -> Node:
        return self.states[-1]

    @property
    def input_states(self) -> list[int]:
        """Distinct states read by branches, in order: one aggregation (query row) each."""
        return sorted({s.reads for s in self.sublayers})


@dataclass
class Detection:
    streams: list[Stream]
    skipped: list[Stream]  # single residual adds (e.g. x + 0.044715 x^3 inside GELU-tanh)


# --------------------------------------------------------------------------------------
# small node helpers


def _val(node):
    return node.meta.get("val") if isinstance(node, Node) else None


def _shape_key(node) -> tuple | None:
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(str(s) for s in v.shape)


def _hint(size) -> int | None:
    if isinstance(size, int):
        return size
    try:
        return size.node.hint
    except AttributeError:
        return None


def _same_dim(a, b) -> bool:
    """Sizes equal in the traced program: as expressions, or as values >= 2 the trace could only tie by a guard.

    Symbolic sizes can be different expressions that are equal under the trace's guards
    (a branch that pads the sequence to a multiple of 8 and slices it back). Two
    operands of an add that traced are equal wherever neither is 1 (that would
    broadcast), so equal hints >= 2 are equal sizes.
    """
    if str(a) == str(b):
        return True
    ha, hb = _hint(a), _hint(b)
    return ha is not None and ha == hb and ha >= 2


def _same_features_and_numel(x, y) -> bool:
    """The same value viewed another way: (B, T, d) and (B*T, d) keep the feature size and the element count."""
    vx, vy = _val(x), _val(y)
    if not (isinstance(vx, torch.Tensor) and isinstance(vy, torch.Tensor)) or not vx.dim() or not vy.dim():
        return False
    return _same_dim(vx.shape[-1], vy.shape[-1]) and _same_dim(vx.numel(), vy.numel())


def _same_shape(x, y) -> bool:
    vx, vy = _val(x), _val(y)
    if not (isinstance(vx, torch.Tensor) and isinstance(vy, torch.Tensor)) or vx.dim() != vy.dim():
        return False
    return all(_same_dim(a, b) for a, b in zip(vx.shape, vy.shape))


def _module_stack(node: Node) -> list[tuple[str, str]]:
    """``[(path, class qualname), ...]`` outermost first, from ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value[0], value[1]
        cls = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        out.append((path, cls))
    return out


def _innermost(node: Node) -> tuple[str, str] | None:
    stack = _module_stack(node)
    return stack[-1] if stack else None


def _is_norm_module(entry: tuple[str, str] | None) -> bool:
    return entry is not None and bool(_NORM_CLASS.search(entry[1].rsplit(".", 1)[-1]))


def _is_see_through(node: Node) -> bool:
    if node.op != "call_function" or node.target not in _SEE_THROUGH or not node.args:
        return False
    src = node.args[0]
    if not isinstance(src, Node):
        return False
    a, b = _val(src), _val(node)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if node.target in _RESHAPES:  # (B, T, d) <-> (B*T, d): same value, feature axis kept
        return a.dim() >= 1 and b.dim() >= 1 and _same_dim(a.shape[-1], b.shape[-1])
    return _same_shape(src, node)


class _Graph:
    """Per-graph caches: topological index, roots through see-through ops."""

    def __init__(self, gm: GraphModule, model: nn.Module | None) -> None:
        self.gm = gm
        self.model = model
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self._root: dict[Node, Node] = {}

    def root(self, node: Node) -> Node:
        """The value ``node`` is an alias/cast/dropout of (itself if none)."""
        chain = []
        while node not in self._root and _is_see_through(node):
            chain.append(node)
            node = node.args[0]
        r = self._root.get(node, node)
        for n in chain:
            self._root[n] = r
        self._root[node] = r
        return r

    def depends_on(self, target: Node, node: Node) -> bool:
        """Is ``target`` an ancestor of ``node``? Walks only nodes after ``target``."""
        lo = self.index[target]
        if self.index.get(node, -1) <= lo:
            return False
        seen = {node}
        todo = [node]
        while todo:
            n = todo.pop()
            for inp in n.all_input_nodes:
                if inp is target:
                    return True
                if inp not in seen and self.index.get(inp, -1) > lo:
                    seen.add(inp)
                    todo.append(inp)
        return False

    def is_candidate_add(self, node: Node) -> bool:
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) < 2:
            return False
        if node.kwargs.get("alpha", 1) != 1:
            return False
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, Node) and isinstance(b, Node)):
            return False
        out = _val(node)
        if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point or out.dim() < 1:
            return False
        if not (_same_shape(a, node) and _same_shape(b, node)):
            return False
        # a mixed-dtype add (type promotion) would give one aggregation sources of two dtypes
        return _val(a).dtype == out.dtype and _val(b).dtype == out.dtype

    def norm_input(self, node: Node) -> tuple[Node, Node] | None:
        """If ``node`` is a norm's output, return ``(norm input, norm node)``."""
        if node.op != "call_function":
            return None
        if node.target is __import__("operator").getitem and isinstance(node.args[0], Node):
            inner = node.args[0]
            if inner.target in _NORM_OPS:
                return inner.args[0], inner
        if node.target in _NORM_OPS:
            return node.args[0], node
        entry = _innermost(node)
        if not _is_norm_module(entry):
            return None
        # walk back inside this norm module instance; its external inputs are the norm's input
        path = entry[0]
        seen, todo, external = {node}, [node], []
        while todo:
            n = todo.pop()
            for inp in n.all_input_nodes:
                if inp in seen:
                    continue
                seen.add(inp)
                if inp.op == "call_function" and (_innermost(inp) or ("", ""))[0] == path:
                    todo.append(inp)
                elif inp.op in ("call_function", "placeholder") and isinstance(_val(inp), torch.Tensor):
                    if _same_shape(inp, node):
                        external.append(inp)
        roots = {self.root(x) for x in external}
        if len(roots) == 1:
            return next(iter(roots)), node
        return None

    def module_eps(self, path: str) -> float | None:
        if self.model is None:
            return None
        try:
            mod = self.model.get_submodule(path)
        except AttributeError:
            return None
        for attr in _EPS_ATTRS:
            val = getattr(mod, attr, None)
            if isinstance(val, (int, float)) and not isinstance(val, bool) and val > 0:
                return float(val)
        return None


# --------------------------------------------------------------------------------------
# detection


@dataclass
class _Add:
    node: Node
    stream_operand: Node
    stream_root: Node  # the state this add continues
    branches: list[tuple[Node, list[Node]]]  # (value, wraps) per branch
    reads_root: Node  # the value the branches read
    link: str = "plain"  # plain | postnorm | postact | reshape
    link_node: Node | None = None


def _split_parallel(g: _Graph, branch: Node, reads: Node, add: Node) -> list[tuple[Node, list[Node]]]:
    """``f(s) + g(s)`` as one branch operand -> two sublayers (both must read ``s``), with their wraps.

    Parallel branches read the same stream value and are summed in the module that
    holds the residual add; dropout, casts or views around their sum do not change that
    (they become each branch's ``wraps``). A sum computed inside a child module (an MoE
    block's routed + shared experts) is that module's output: one sublayer.
    """
    out, todo = [], [(branch, [])]
    while todo:
        t, wraps = todo.pop()
        inner, around = t, []
        while _is_see_through(inner) and len(inner.users) == 1:
            around.append(inner)
            inner = inner.args[0]
        if g.is_candidate_add(inner) and len(inner.users) == 1 and _same_call(inner, add):
            a, b = inner.args[0], inner.args[1]
            if g.depends_on(reads, a) and g.depends_on(reads, b):
                inner_wraps = [*reversed(around), *wraps]  # innermost first, the way they were applied
                todo.extend([(a, inner_wraps), (b, inner_wraps)])
                continue
        out.append((t, wraps))
    return sorted(out, key=lambda item: g.index[item[0]])


def _same_call(a: Node, b: Node) -> bool:
    """Are ``a`` and ``b`` computed directly in the same module call (not one inside a child module)?"""
    sa, sb = a.meta.get("nn_module_stack") or {}, b.meta.get("nn_module_stack") or {}
    return list(sa) == list(sb)


def _find_adds(g: _Graph) -> dict[Node, _Add]:
    adds: dict[Node, _Add] = {}
    for node in g.nodes:
        if not g.is_candidate_add(node):
            continue
        a, b = node.args[0], node.args[1]
        ra, rb = g.root(a), g.root(b)
        if ra is rb:
            continue
        found = None
        for s, s_root, br, br_root in ((a, ra, b, rb), (b, rb, a, ra)):
            if br_root is s_root:
                continue
            if g.depends_on(s_root, br):
                found = _Add(node, s, s_root, _split_parallel(g, br, s_root, node), s_root)
                break
        if found is None:
            # GPT-J style (s + f(s)) + g(s): g reads the state before f was added
            for s, s_root, br in ((a, ra, b), (b, rb, a)):
                prev = adds.get(s_root)
                if prev is not None and g.depends_on(prev.reads_root, br):
                    found = _Add(node, s, s_root, [(br, [])], prev.reads_root)
                    break
        if found is not None:
            adds[node] = found
    return adds


def _link(g: _Graph, adds: dict[Node, _Add]) -> None:
    """Mark adds whose stream operand is a norm / activation of an earlier residual add."""
    for add in adds.values():
        r = add.stream_root
        if r in adds:
            continue
        ni = g.norm_input(r)
        if ni is not None and g.root(ni[0]) in adds:
            add.link, add.link_node = "postnorm", ni[1]
            continue
        if r.op == "call_function" and r.target in _ACT_OPS and isinstance(r.args[0], Node):
            if g.root(r.args[0]) in adds:
                add.link, add.link_node = "postact", r
                continue
        if r.op == "call_function" and r.target in _RESHAPES and isinstance(r.args[0], Node):
            if g.root(r.args[0]) in adds:
                add.link, add.link_node = "reshape", r


def _predecessor(g: _Graph, add: _Add, adds: dict[Node, _Add]) -> Node | None:
    r = add.stream_root
    if r in adds:
        return r
    if add.link == "postnorm":
        return g.root(g.norm_input(r)[0])
    if add.link in ("postact", "reshape"):
        return g.root(r.args[0])
    return None


def _chains(g: _Graph, adds: dict[Node, _Add]) -> list[list[_Add]]:
    successor: dict[Node, _Add] = {}
    has_pred: set[Node] = set()
    for add in adds.values():  # topological order
        pred = _predecessor(g, add, adds)
        if pred is not None and pred not in successor:
            successor[pred] = add
            has_pred.add(add.node)
    chains = []
    for add in adds.values():
        if add.node in has_pred:
            continue
        chain = [add]
        while chain[-1].node in successor:
            chain.append(successor[chain[-1].node])
        chains.append(chain)
    return chains


def _sublayer_path(value: Node, add: Node) -> str:
    """The module that produced the branch: just below the module holding the add.

    A trivial ``torch.nn`` wrapper (dropout, identity, activation) there means the add's own module is
    the sublayer (T5's ``T5LayerFF`` holds both the norm, the MLP and the add).
    """
    vstack, astack = _module_stack(value), _module_stack(add)
    common = 0
    while common < min(len(vstack), len(astack)) and vstack[common][0] == astack[common][0]:
        common += 1
    owner = astack[common - 1][0] if common else ""
    if common < len(vstack):
        path, cls = vstack[common]
        if not owner or not cls.startswith(_TRIVIAL_WRAPPERS):
            return path
    return owner or (vstack[-1][0] if vstack else value.name)


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    out = []
    for items in zip(*parts):
        if all(x == items[0] for x in items):
            out.append(items[0])
        else:
            break
    return ".".join(out)


def _entry_consumers(g: _Graph, state: Node, skip: set[Node]) -> list[Node]:
    """Non-alias consumers of ``state`` (through see-through ops), except the chain's own adds."""
    out, todo, seen = [], [state], {state}
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen or user in skip:
                continue
            seen.add(user)
            if metadata_only(user, n):
                continue
            if _is_see_through(user):
                todo.append(user)
            else:
                out.append(user)
    return out


# link kind -> reason, up to where the link is (a stream of re-normalised or activated sums)
_NOT_RAW_SUMS = {
    "postnorm": "post-norm: the stream is re-normalised after every add, norm(x + f(x)) (norm at",
    "postact": "post-activation: an activation is applied after every add, act(x + f(x)) (at",
}


def _classify(g: _Graph, chain: list[_Add], index: int) -> Stream:
    start = chain[0].stream_root
    states = [start] + [a.node for a in chain]
    state_index = {s: i for i, s in enumerate(states)}
    sublayers = []
    for k, add in enumerate(chain, start=1):
        reads = state_index.get(add.reads_root, k - 1)
        for br, wraps in add.branches:
            sublayers.append(Sublayer(br, add.node, reads, _sublayer_path(g.root(br), add.node), wraps))
    val = _val(states[-1])
    dim = int(val.shape[-1]) if isinstance(val, torch.Tensor) and not isinstance(val.shape[-1], torch.SymInt) else -1
    paths = [s.module_path for s in sublayers]
    prefix = _common_prefix(paths).split(".") if paths else []
    while prefix and prefix[-1].isdigit():  # a one-layer model must not name its stream "layers_0"
        prefix.pop()
    name = re.sub(r"[^0-9A-Za-z_]", "_", ".".join(prefix)) or f"stream{index}"
    stream = Stream(
        name=name,
        kind="additive",
        convertible=True,
        reason="",
        start=start,
        states=states,
        sublayers=sublayers,
        dim=dim,
        shape=str(tuple(_shape_key(states[-1]) or ())),
        dtype=val.dtype if isinstance(val, torch.Tensor) else torch.float32,
    )
    links = [a for a in chain if a.link != "plain"]
    where = lambda n: (_innermost(n) or (n.name,))[0] or n.name  # noqa: E731
    if links and links[0].link in _NOT_RAW_SUMS:
        stream.kind, stream.convertible = links[0].link, False
        stream.reason = (
            f"{_NOT_RAW_SUMS[links[0].link]} {where(links[0].link_node)}); AttnRes needs a stream of raw sums"
        )
        return stream
    if len(sublayers) < 2:
        stream.kind, stream.convertible = "single", False
        stream.reason = "chain of length 1: a single residual add is not a stream"
        return stream
    conv = isinstance(val, torch.Tensor) and val.dim() == 4 and _has_conv(g, sublayers, states)
    if conv:
        stream.feature_axis = 1
        stream.dim = dim = int(val.shape[1]) if not isinstance(val.shape[1], torch.SymInt) else -1
        if not all(_same_shape(s, states[0]) for s in states):
            stream.kind, stream.convertible = "unsupported", False
            stream.reason = "shape change along a channel-first convolutional stream"
            return stream
    if not all(_same_features_and_numel(s, states[0]) for s in states):
        shapes = {_shape_key(s) for s in states}
        stream.kind, stream.convertible = "unsupported", False
        stream.reason = f"shape change along the stream ({', '.join(sorted(map(str, shapes)))})"
        return stream
    if dim < 1:
        stream.kind, stream.convertible = "unsupported", False
        stream.reason = "the feature axis has a dynamic size"
        return stream
    # prenorm: every branch starts with a norm of the stream it reads
    chain_nodes = {a.node for a in chain}
    eps_values, norm_paths, prenorm = [], [], True
    for reads in stream.input_states:
        state = states[reads]
        consumers = _entry_consumers(g, state, chain_nodes)
        if not consumers:
            prenorm = False
        # a norm is recognised by what it computes (the value over the root of its second moment)
        covered = {n: norm for norm in find_norms(g.root(state), g.root, g.index) for n in norm.region}
        for c in consumers:
            if _is_batch_norm(c):
                prenorm = False  # per-channel affine at inference: not invariant to the 1/K scale of paper mode
                continue
            norm = covered.get(c)
            if norm is not None:
                path = (_innermost(norm.point) or (norm.point.name,))[0]
                eps = norm.eps if norm.eps is not None else g.module_eps(path)
                if eps is not None:
                    eps_values.append(eps)
                norm_paths.append(f"{path} ({norm.kind})")
                continue
            if c.op == "call_function" and c.target in _NORM_OPS:  # group/batch norm ops of conv streams
                idx = _NORM_OPS[c.target]
                eps = c.args[idx] if len(c.args) > idx else None
                if isinstance(eps, (int, float)):
                    eps_values.append(float(eps))
                norm_paths.append((_innermost(c) or (c.name,))[0])
                continue
            entry = _innermost(c)
            if _is_norm_module(entry):  # a module named like a norm whose computation is not one we know
                eps = g.module_eps(entry[0])
                if eps is not None:
                    eps_values.append(eps)
                norm_paths.append(f"{entry[0]} (by name)")
                continue
            prenorm = False
    if prenorm:
        stream.kind = "prenorm"
        stream.eps = Counter(eps_values).most_common(1)[0][0] if eps_values else None
        stream.norm_paths = sorted(set(norm_paths))
    else:
        stream.reason = "branches do not start with a norm of the stream: equivalence only in exact mode"
    return stream


def _is_batch_norm(node: Node) -> bool:
    if node.op == "call_function" and "batch_norm" in str(node.target):
        return True
    entry = _innermost(node)
    return entry is not None and "batchnorm" in entry[1].rsplit(".", 1)[-1].lower()


def _has_conv(g: _Graph, sublayers: list[Sublayer], states: list[Node]) -> bool:
    for s in sublayers:
        lo = g.index[states[s.reads]]
        for n in g.nodes[lo : g.index[s.value] + 1]:
            if n.op == "call_function" and n.target in _CONV_OPS:
                return True
    return False


def stream_owner(stream: Stream) -> str:
    """Path of the innermost module call that holds the whole stream: its start, adds, branches and readers.

    A converted model runs the stream by replacing that module's forward, so every way
    into the stream (a language model's ``model.model``, the ``encoder`` an
    encoder-decoder's ``generate`` calls on its own) goes through the conversion, and
    what lies outside it (a language-model head, a loss) runs as the model wrote it.
    """
    chain = set(stream.states[1:])
    nodes = [*stream.states[1:], *(s.value for s in stream.sublayers)]
    nodes += [u for u in stream.states[-1].users if u not in chain and u.op != "output"]
    if stream.start.op != "placeholder":
        nodes.append(stream.start)
    stacks = [list((n.meta.get("nn_module_stack") or {}).items()) for n in nodes]
    common = []
    for entries in zip(*stacks):
        if any(e != entries[0] for e in entries):
            break
        common.append(entries[0])
    if any(not stack for stack in stacks) or not common:
        return ""
    return common[-1][1][0]


def detect(gm: GraphModule, model: nn.Module | None = None) -> Detection:
    """Find and classify every residual stream of ``gm`` (an exported, unlifted module).

    ``model`` (the original module) is only used to read norm epsilons by module path.
    """
    g = _Graph(gm, model)
    adds = _find_adds(g)
    _link(g, adds)
    streams, skipped, names = [], [], Counter()
    for i, chain in enumerate(_chains(g, adds)):
        stream = _classify(g, chain, i)
        if stream.kind == "single":
            skipped.append(stream)
            continue
        names[stream.name] += 1
        if names[stream.name] > 1:
            stream.name = f"{stream.name}_{names[stream.name] - 1}"
        streams.append(stream)
    return Detection(streams, skipped)
