"""Pipeline stages of a converted model for ``torch.distributed.pipelining``, cut at layer boundaries.

A converted owner's program is a top graph that calls its layers as modules
(:mod:`attnres_rewrite.passes.outline`); :func:`split_pipeline` cuts that top graph at
layer boundaries into one graph per stage. A stage runs its layers (the real modules:
hooks, FSDP, checkpoint wrappers still apply) and the non-layer code around them (the
embedding before the first layer in stage 0; the output aggregation, final norm and head
in the last stage).

**What crosses a boundary** is not one hidden state but the Block AttnRes state: the
completed blocks ``b_0..b_n`` (``b_0`` the embedding) and, at a boundary inside a block,
the partial sum; plus whatever else the model passes between its layers (a mask, a
rotary table). Sizes (batch, length) are read back from the tensors that cross, so no
integer crosses. Boundaries default to block ends (:func:`block_boundaries`), where no
partial sum crosses.

**Cache-based communication** (the paper's): with more stages than ranks (virtual
stages, e.g. ``ScheduleInterleaved1F1B``), a rank holds several stages and sees the
early blocks once already. With ``scheme="cached"`` each rank keeps, per micro-batch,
every block it received or produced, and a boundary sends only what the receiving rank
does not hold yet: each completed block crosses once per pair of ranks that needs it.
``scheme="resend"`` (the naive scheme) sends the whole live state at every boundary.
Gradients follow the same routes: a block read from a rank's cache hands its gradient
to the stage that received or produced it (autograd, in the same micro-batch's
backward, which the schedule always runs after the readers').

The AttnRes parameters are read by every stage (each stage uses its own rows). Each
rank's first stage module registers them (so the schedule scales their gradients once
per rank); :meth:`PipelineSplit.sync_grads` sums their gradients over the pipeline's
ranks before the optimizer step, so every rank applies the same update.

Limits: one converted owner, split at its own level (the owner must be the model for
the last stage to return the loss's input, as for the ``samples`` models; a Hugging
Face causal LM's ``model.model`` can be split, its head then runs outside); every
micro-batch must be of the example's kind (dtypes, no size-1 batch when the example's
is larger); stages of one rank run in one process.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from ..errors import InvalidInputError
from ..passes.call_inputs import CallInputs
from ..passes.capture import normalize_inputs
from ..passes.outline import call_layer, read_attribute

__all__ = ["PipelineSplit", "StagePlan", "split_pipeline", "block_boundaries", "SCHEMES"]

SCHEMES = ("cached", "resend")


# --------------------------------------------------------------------------------------
# per-rank cache of received and produced values, per micro-batch


class _Slot:
    """One value held by a rank for one micro-batch: ``leaf`` is what later stages read."""

    __slots__ = ("leaf",)

    def __init__(self) -> None:
        self.leaf: Tensor | None = None


class _Publish(torch.autograd.Function):
    """Identity whose backward adds the gradient later stages of this rank left on the slot's leaf."""

    @staticmethod
    def forward(ctx, value: Tensor, slot: _Slot) -> Tensor:
        ctx.slot = slot
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        extra = ctx.slot.leaf.grad if ctx.slot.leaf is not None else None
        ctx.slot = None
        return (grad if extra is None else grad + extra), None


def cache_publish(cache: dict, name: str, value: Tensor) -> Tensor:
    """Keep ``value`` for this rank's later stages of the micro-batch; use the result in place of ``value``."""
    slot = _Slot()
    if isinstance(value, Tensor) and value.requires_grad:
        value = _Publish.apply(value, slot)
        slot.leaf = value.detach().requires_grad_(True)
    else:
        slot.leaf = value
    cache[name] = slot
    return value


def cache_read(cache: dict, name: str) -> Tensor:
    """A value an earlier stage of this rank published for this micro-batch."""
    try:
        return cache[name].leaf
    except KeyError:
        raise RuntimeError(f"pipeline cache: {name} was not published on this rank for this micro-batch") from None


class RankCache:
    """The values one rank holds, by micro-batch; emptied when the rank's first stage starts micro-batch 0."""

    def __init__(self) -> None:
        self.chunks: dict[int, dict[str, _Slot]] = {}

    def at(self, chunk: int) -> dict[str, _Slot]:
        return self.chunks.setdefault(chunk, {})

    def clear(self) -> None:
        self.chunks.clear()


# --------------------------------------------------------------------------------------
# the split


@dataclass
class StagePlan:
    """One stage: its layers, what it receives, reads from its rank's cache, publishes and sends."""

    index: int
    rank: int
    layers: list[str]
    inputs: list[str]  # pipeline inputs (stage 0) or values received from the previous stage, in order
    cache_reads: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # values sent to the next stage, in order (empty for the last)


@dataclass
class _Value:
    node: fx.Node
    defined: int  # stage
    used: set[int] = field(default_factory=set)


def block_boundaries(plan_blocks: Sequence[Sequence[int]], sublayers_per_layer: int, stages: int) -> list[int]:
    """First layer of each stage after the first, at block ends, blocks shared out as evenly as possible.

    ``plan_blocks``: a stream plan's ``[start, stop)`` sublayer ranges.
    """
    ends = [stop for _start, stop in plan_blocks][:-1]
    layer_ends = [e // sublayers_per_layer for e in ends if e % sublayers_per_layer == 0]
    if len(layer_ends) < stages - 1:
        raise InvalidInputError(
            f"{len(plan_blocks)} blocks cannot make {stages} stages at block ends; pass boundaries= (any layer index)"
        )
    picks = []
    for k in range(1, stages):
        picks.append(layer_ends[round(k * (len(layer_ends) + 1) / stages) - 1])
    return sorted(set(picks))


class PipelineSplit:
    """A converted owner's program cut into stages; see :func:`split_pipeline`."""

    def __init__(
        self,
        owner: nn.Module,
        attnres: nn.Module,
        program: Any,
        boundaries: list[int],
        ranks: list[int],
        scheme: str,
    ) -> None:
        self.owner, self.attnres, self.program = owner, attnres, program
        self.scheme = scheme
        self.ranks = ranks
        self.num_stages = len(boundaries) + 1
        self.caches: dict[int, RankCache] = defaultdict(RankCache)
        self._modules: dict[int, StageModule] = {}
        graph = program.outline.top
        self._graph = graph
        self._analyse(graph, boundaries)

    # ---- analysis ---------------------------------------------------------------------

    def _analyse(self, graph: fx.Graph, boundaries: list[int]) -> None:
        nodes = list(graph.nodes)
        self._order = {n: i for i, n in enumerate(nodes)}
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self._attnres_ph, self._programs_ph, self._consts_ph = placeholders[:3]
        self._inputs = placeholders[3:]
        calls = [n for n in nodes if n.op == "call_function" and n.target is call_layer]
        if not calls:
            raise InvalidInputError("the program calls no layer module: there is nothing to split at layer boundaries")
        bad = [b for b in boundaries if not 0 < b < len(calls)]
        if bad or sorted(set(boundaries)) != list(boundaries):
            raise InvalidInputError(
                f"boundaries must be increasing layer indices in 1..{len(calls) - 1} (the first layer of each stage "
                f"after the first), got {list(boundaries)}"
            )
        starts = [0, *boundaries]
        stage_of_call = {}
        for i, call in enumerate(calls):
            stage_of_call[call] = max(s for s, start in enumerate(starts) if start <= i)
        self.layer_paths = [str(c.args[0].target) for c in calls]
        stage_of: dict[fx.Node, int] = {}
        upcoming = self.num_stages - 1
        for node in reversed(nodes):
            if node.op == "call_function" and node.target is call_layer:
                upcoming = stage_of_call[node]
                stage_of[node] = upcoming
            elif node.op == "output":
                stage_of[node] = self.num_stages - 1
            elif node.op != "placeholder" and not self._is_free(node):
                stage_of[node] = upcoming
        for node in nodes:  # a layer call's results stay with the call
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in stage_of_call:
                stage_of[node] = stage_of_call[node.args[0]]
        for ph in self._inputs:
            stage_of[ph] = 0
        self._stage_of = stage_of
        values: dict[fx.Node, _Value] = {}
        self._symbolic: dict[fx.Node, set[int]] = defaultdict(set)
        for node in nodes:
            if node not in stage_of or node.op == "placeholder":
                continue
            s = stage_of[node]
            for inp in node.all_input_nodes:
                if self._is_free(inp) or stage_of.get(inp, s) >= s:
                    continue
                if not isinstance(inp.meta.get("val"), Tensor):
                    self._symbolic[inp].add(s)  # a size: read back from a tensor that crosses
                    continue
                values.setdefault(inp, _Value(inp, stage_of[inp])).used.add(s)
        self._values = values
        self.stages = self._route(calls, stage_of_call)

    def _is_free(self, node: fx.Node) -> bool:
        """Reads that every stage makes itself: attributes, AttnRes parameters, layer programs, constants."""
        if node.op == "get_attr":
            return True
        if node.op != "call_function":
            return False
        if node.target is read_attribute and node.args[0] is self._attnres_ph:
            return True
        return node.target is operator.getitem and node.args[0] in (self._programs_ph, self._consts_ph)

    def _live(self, boundary: int) -> list[fx.Node]:
        """Values defined before stage ``boundary`` and used at or after it, in graph order."""
        return [n for n, v in self._values.items() if v.defined < boundary <= max(v.used)]

    def _route(self, calls: list[fx.Node], stage_of_call: dict) -> list[StagePlan]:
        stages = []
        for s in range(self.num_stages):
            layers = [str(c.args[0].target) for c in calls if stage_of_call[c] == s]
            stages.append(StagePlan(s, self.ranks[s], layers, []))
        stages[0].inputs = [ph.name for ph in self._inputs]
        defined = defaultdict(set)
        for n, v in self._values.items():
            defined[v.defined].add(n)
        has: dict[int, set[fx.Node]] = defaultdict(set)
        entered: dict[tuple[int, fx.Node], int] = {}  # (rank, value) -> the stage through which the rank got it
        for n in defined[0]:
            has[self.ranks[0]].add(n)
            entered[(self.ranks[0], n)] = 0
        self._received: dict[int, list[fx.Node]] = {0: []}
        self._reads: dict[int, list[fx.Node]] = defaultdict(list)
        for b in range(1, self.num_stages):
            rank = self.ranks[b]
            live = self._live(b)
            sent = live if self.scheme == "resend" else [n for n in live if n not in has[rank]]
            self._received[b] = sent
            stages[b].inputs = [n.name for n in sent]
            stages[b - 1].sent = [n.name for n in sent]
            if self.scheme == "cached":
                for n in sent:
                    has[rank].add(n)
                    entered[(rank, n)] = b
                for n in defined[b]:
                    has[rank].add(n)
                    entered[(rank, n)] = b
        if self.scheme == "cached":  # what each stage takes from its rank's cache, and who publishes it
            for s in range(1, self.num_stages):
                own = set(self._received[s]) | defined[s]
                need = {n for n, v in self._values.items() if s in v.used}
                if s + 1 < self.num_stages:
                    need |= set(self._received[s + 1])
                for n in sorted(need - own, key=self._order.__getitem__):
                    self._reads[s].append(n)
                    publisher = entered[(self.ranks[s], n)]
                    if n.name not in stages[publisher].published:
                        stages[publisher].published.append(n.name)
                stages[s].cache_reads = [n.name for n in self._reads[s]]
        for s in range(self.num_stages - 1):  # a stage sends only what it holds
            if self.scheme == "resend":
                continue
            holds = set(self._received[s]) | defined[s] | set(self._reads[s]) if s else defined[0]
            missing = [n.name for n in self._received[s + 1] if n not in holds]
            if missing:
                raise AssertionError(f"stage {s} cannot send {missing}")
        return stages

    # ---- stage graphs ---------------------------------------------------------------

    def stage_graph(self, index: int) -> fx.Graph:
        """The graph of stage ``index``: ``(attnres, layer_programs, constants, cache, *inputs) -> outputs``."""
        s = index
        last = s == self.num_stages - 1
        plan = self.stages[s]
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        free: dict[fx.Node, fx.Node] = {}
        attnres, programs, consts, cache = (
            g.placeholder(n) for n in ("attnres", "layer_programs", "constants", "cache")
        )
        outer = {self._attnres_ph: attnres, self._programs_ph: programs, self._consts_ph: consts}
        received = list(self._inputs) if s == 0 else list(self._received[s])
        published = set(plan.published)
        for node in received:
            ph = g.placeholder(node.name)
            ph.meta = dict(node.meta)
            env[node] = self._publish(g, cache, node, ph) if node.name in published else ph
        for node in self._reads.get(s, []):
            read = g.call_function(cache_read, (cache, node.name))
            read.meta = dict(node.meta)
            env[node] = read

        def resolve(arg: fx.Node) -> fx.Node:
            if arg in env:
                return env[arg]
            if arg in outer:
                return outer[arg]
            if self._is_free(arg):
                if arg not in free:
                    free[arg] = g.node_copy(arg, resolve)
                return free[arg]
            if arg in self._symbolic:
                env[arg] = self._size_from_tensors(g, arg, env)
                return env[arg]
            raise AssertionError(f"stage {s}: {arg.name} is neither computed here nor received")

        for node in self._graph.nodes:
            if self._stage_of.get(node) != s or node.op in ("placeholder", "output"):
                continue
            new = g.node_copy(node, resolve)
            env[node] = self._publish(g, cache, node, new) if node.name in published else new
        if last:
            (outputs,) = next(n for n in self._graph.nodes if n.op == "output").args
            g.output(tuple(resolve(o) if isinstance(o, fx.Node) else o for o in outputs))
        else:
            g.output(tuple(resolve(n) for n in self._received[s + 1]))
        g.lint()
        return g

    @staticmethod
    def _publish(g: fx.Graph, cache: fx.Node, node: fx.Node, value: fx.Node) -> fx.Node:
        out = g.call_function(cache_publish, (cache, node.name, value))
        out.meta = dict(node.meta)
        return out

    def _size_from_tensors(self, g: fx.Graph, size: fx.Node, env: dict) -> fx.Node:
        """A size computed before this stage, read back from the shape of a tensor this stage holds."""
        want = size.meta.get("val")
        expr = str(want.node.expr) if isinstance(want, torch.SymInt) else str(want)
        for old, new in env.items():
            val = old.meta.get("val")
            if not isinstance(val, Tensor):
                continue
            for axis, dim in enumerate(val.shape):
                if str(dim.node.expr if isinstance(dim, torch.SymInt) else dim) == expr:
                    return g.call_function(torch.ops.aten.sym_size.int, (new, axis))
        raise InvalidInputError(
            f"the size {size.name} ({expr}) computed before this stage is not the size of any tensor that crosses "
            "the boundary; split at another layer"
        )

    # ---- modules ---------------------------------------------------------------------

    def module(self, index: int) -> StageModule:
        """The ``nn.Module`` of stage ``index`` (built once): holds only the modules that stage uses."""
        if index not in self._modules:
            self._modules[index] = StageModule(self, index)
        return self._modules[index]

    def pipeline_stage(self, index: int, device: torch.device | str, group: Any = None, **kwargs: Any):
        """A ``torch.distributed.pipelining.PipelineStage`` of stage ``index`` that tells its module the micro-batch."""
        from torch.distributed.pipelining import PipelineStage

        class AttnResPipelineStage(PipelineStage):
            def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
                self.submod.begin(fwd_chunk_id)
                return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)

        return AttnResPipelineStage(
            self.module(index), index, self.num_stages, torch.device(device), group=group, **kwargs
        )

    def sync_grads(self, group: Any = None) -> None:
        """Sum the AttnRes parameters' gradients over the pipeline's ranks (each rank has its stages' rows)."""
        import torch.distributed as dist

        for p in self.attnres.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=group)

    def run_locally(self, inputs: tuple, target: Any = None, loss_fn: Any = None) -> tuple[Any, list[int]]:
        """Run every stage in this process as a pipeline would (detached boundaries, backward stage by stage).

        Returns the last stage's output (and runs the backward when ``loss_fn`` is
        given) and the bytes each boundary carried. For tests and the benchmark: the
        ranks' caches are kept apart as on separate processes.
        """
        for module in (self.module(s) for s in range(self.num_stages)):
            module.begin(0)
        carried, stage_io = [], []
        args = tuple(inputs)
        for s in range(self.num_stages):
            if s:
                args = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in args)
            out = self.module(s)(*args)
            stage_io.append((args, out))
            if s + 1 < self.num_stages:
                carried.append(sum(t.numel() * t.element_size() for t in out))
                args = out
        output = stage_io[-1][1]
        if loss_fn is not None:
            loss = loss_fn(output, target)
            grads = None
            for s in reversed(range(self.num_stages)):
                stage_in, stage_out = stage_io[s]
                if s == self.num_stages - 1:
                    loss.backward()
                else:
                    pairs = [(o, g) for o, g in zip(stage_out, grads) if o.requires_grad and g is not None]
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                grads = [t.grad if t.requires_grad else None for t in stage_in]
            return (output, loss), carried
        return output, carried


class StageModule(nn.Module):
    """One pipeline stage: the modules it uses at their own paths under ``view``, and its generated code."""

    def __init__(self, split: PipelineSplit, index: int) -> None:
        super().__init__()
        from ..runtime.codegen import compile_graph

        graph = split.stage_graph(index)
        self.index = index
        self.view = _view(split.owner, graph)
        rank = split.ranks[index]
        first_on_rank = index == min(i for i, r in enumerate(split.ranks) if r == rank)
        if first_on_rank:  # the rank's first stage owns the AttnRes parameters (gradients scaled once per rank)
            self.attnres = split.attnres
        else:
            object.__setattr__(self, "_shared_attnres", split.attnres)
        object.__setattr__(self, "_split", split)
        self._first_on_rank = first_on_rank
        self._cache = split.caches[rank]
        self._chunk = 0
        self._last = index == split.num_stages - 1
        self._fn = compile_graph(graph, f"stage{index}")
        self.last_sent_bytes = 0

    @property
    def source(self) -> str:
        """The stage's generated code."""
        return self._fn.source

    def begin(self, chunk: int) -> None:
        """The schedule starts micro-batch ``chunk`` on this stage; a new step empties the rank's cache."""
        if chunk == 0 and self._first_on_rank:
            self._cache.clear()
        self._chunk = chunk

    def forward(self, *inputs: Tensor) -> Any:
        split = self._split
        attnres = split.attnres
        program = split.program
        out = self._fn(self.view, attnres, program.layers, program.constants, self._cache.at(self._chunk), *inputs)
        if self._last:
            return pytree.tree_unflatten(list(out), program.out_spec)
        self.last_sent_bytes = sum(t.numel() * t.element_size() for t in out)
        return out


def _view(owner: nn.Module, graph: fx.Graph) -> nn.Module:
    """A module holding, at their paths in ``owner``, the submodules ``graph``'s attribute reads reach."""
    view = nn.Module()
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        target = str(node.target)
        obj = owner
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise InvalidInputError(f"the stage reads {target}, which the model does not have") from None
        path = target if isinstance(obj, nn.Module) else target.rpartition(".")[0]
        _place(view, owner, path)
    return view


def _place(view: nn.Module, owner: nn.Module, path: str) -> None:
    if not path:
        raise InvalidInputError("a stage reads the owner's own parameters directly; split below the owner")
    parts = path.split(".")
    here = view
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        existing = here._modules.get(part)
        if last:
            here._modules[part] = owner.get_submodule(path)
        elif existing is None:
            container = nn.Module()
            here._modules[part] = container
            here = container
        else:
            here = existing


def split_pipeline(
    converted: nn.Module,
    example_inputs: Any,
    *,
    stages: int | None = None,
    boundaries: Sequence[int] | None = None,
    ranks: Sequence[int] | None = None,
    world_size: int | None = None,
    scheme: str = "cached",
    owner: str | None = None,
) -> PipelineSplit:
    """Cut the program of ``converted`` (for calls like ``example_inputs``) into pipeline stages.

    ``boundaries``: the first layer (index in call order) of every stage after the first;
    else ``stages`` stages at block ends (:func:`block_boundaries`). ``ranks``: the rank
    of each stage; default stage ``i`` on rank ``i % world_size`` (virtual stages looped
    over the ranks, as ``ScheduleInterleaved1F1B`` and ``ScheduleLoopedBFS`` place them;
    ``world_size`` defaults to the number of stages). ``scheme``: ``"cached"`` (each block
    crosses once per pair of ranks) or ``"resend"`` (the whole live state at every
    boundary). ``owner``: which converted module to split (default: the only one).

    Every rank builds the same split of its own copy of the model and keeps the stages it
    runs (:meth:`PipelineSplit.pipeline_stage`); the program of the example's call is
    captured first if the model has none yet.
    """
    from ..api import plan_of
    from ..runtime.converted import owners

    if scheme not in SCHEMES:
        raise InvalidInputError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    forwards = owners(converted)
    if not forwards:
        raise InvalidInputError("split_pipeline needs a model returned by attnres_rewrite.convert")
    if owner is None:
        if len(forwards) != 1:
            raise InvalidInputError(f"the model has several converted owners ({', '.join(forwards)}); pass owner=")
        owner = next(iter(forwards))
    forward = forwards[owner]
    args, kwargs = normalize_inputs(example_inputs)
    with torch.no_grad():
        program, _ = forward.program_for(args, kwargs)
    if program.outline is None:
        raise InvalidInputError("this program was built without its outline; capture it again")
    if not any(lp for lp in program.layers):
        raise InvalidInputError("the program calls no layer module")
    if boundaries is None:
        if stages is None:
            raise InvalidInputError("pass stages= (split at block ends) or boundaries= (layer indices)")
        (stream,) = [s for s in plan_of(converted).streams if (s.owner or "") == owner][:1] or [None]
        layers = len(program.layers)
        per_layer = stream.num_sublayers // layers if stream is not None and layers else 0
        if not per_layer or stream.num_sublayers % layers:
            raise InvalidInputError("cannot place block ends on layer boundaries; pass boundaries=")
        boundaries = block_boundaries(stream.blocks, per_layer, stages)
    boundaries = list(boundaries)
    count = len(boundaries) + 1
    if ranks is None:
        world = world_size or count
        ranks = [i % world for i in range(count)]
    if len(ranks) != count:
        raise InvalidInputError(f"ranks names {len(ranks)} stages, the split has {count}")
    module = converted.get_submodule(owner) if owner else converted
    CallInputs.of(args, kwargs)  # the example's inputs must be tensors and plain values
    return PipelineSplit(module, converted.attnres, program, boundaries, list(ranks), scheme)
