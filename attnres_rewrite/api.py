"""Public API: inspect, convert, measure equivalence, save/load adapters.

Pipeline: :func:`~.passes.capture.capture` -> :func:`~.passes.detect.detect` ->
:class:`~.passes.plan.ConversionPlan` -> :func:`~.runtime.converted.install`, after
which each stream owner's calls are captured, rewritten and outlined per signature
(:mod:`attnres_rewrite.runtime`).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .adapter import load_adapter, save_adapter
from .errors import InvalidInputError, NoResidualStreamError, NotConvertibleError
from .passes.capture import Captured, capture, normalize_inputs, static_axes
from .passes.detect import Detection, Stream, detect, stream_owner
from .passes.plan import ConversionPlan, check_eps, check_mode, make_stream_plan, resolve_partition
from .passes.rewrite import make_parameters
from .runtime import converted as _runtime

__all__ = [
    "InspectReport",
    "StreamReport",
    "EquivalenceReport",
    "inspect",
    "convert",
    "convert_",
    "convert_captured",
    "is_converted",
    "inspect_captured",
    "build_plan",
    "plan_of",
    "programs",
    "rewritten_graphs",
    "equivalence",
    "fresh_inputs",
    "save_adapter",
    "load_adapter",
]


#: Version of the JSON reports (``inspect``/``convert``/``verify``/``export``/``bench``
#: ``--json``, ``report.json``, :meth:`InspectReport.to_dict`); docs/cli.md "JSON
#: reports" lists their fields. One naming rule: a plural name is a list (``sublayers``:
#: module paths, ``blocks``: ``[start, stop)`` pairs), its count is ``num_<name>``.
REPORT_FORMAT = 1


@dataclass
class StreamReport:
    """One residual stream as the detector sees it."""

    name: str
    kind: str  # prenorm | additive | postnorm | postact | unsupported | single
    convertible: bool
    reason: str
    num_sublayers: int
    sublayers: list[str]
    dim: int
    shape: str
    dtype: str
    eps: float | None
    blocks: list[list[int]]  # the default partition convert would use ([start, stop) per block)
    norms: list[str] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        """The stream as every report shows it (:data:`REPORT_FORMAT`): lists and their ``num_`` counts."""
        return {**asdict(self), "num_blocks": self.num_blocks}

    @classmethod
    def from_stream(cls, s: Stream) -> StreamReport:
        blocks = resolve_partition(len(s.sublayers), None, None, False, s.name) if s.convertible else []
        return cls(
            name=s.name,
            kind=s.kind,
            convertible=s.convertible,
            reason=s.reason,
            num_sublayers=len(s.sublayers),
            sublayers=[x.module_path for x in s.sublayers],
            dim=s.dim,
            shape=s.shape,
            dtype=str(s.dtype).replace("torch.", ""),
            eps=s.eps,
            blocks=blocks,
            norms=list(s.norm_paths),
        )


@dataclass
class InspectReport:
    """Every residual stream found, with classification and reasons.

    ``skipped`` lists single residual adds (chains of length 1, e.g. the
    ``x + 0.044715 x^3`` inside a tanh-GELU): not streams, kept for transparency.
    """

    streams: list[StreamReport]
    skipped: list[StreamReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    static_axes: list[str] = field(default_factory=list)  # input axes the model's code fixed (see capture)

    @property
    def convertible(self) -> list[StreamReport]:
        return [s for s in self.streams if s.convertible]

    def to_dict(self) -> dict[str, Any]:
        return {
            "report_format": REPORT_FORMAT,
            "streams": [s.to_dict() for s in self.streams],
            "skipped": [s.to_dict() for s in self.skipped],
            "notes": list(self.notes),
            "static_axes": list(self.static_axes),
        }


def inspect(model: nn.Module, example_inputs: Any, *, trace_depth: str = "auto") -> InspectReport:
    """Trace ``model`` on ``example_inputs`` and report its residual streams (nothing is changed).

    ``trace_depth`` as in :func:`convert`.
    """
    return inspect_captured(capture(model, example_inputs, trace_depth=trace_depth))


def inspect_captured(captured: Captured) -> InspectReport:
    """:func:`inspect` on an existing capture (see :func:`~.passes.capture.capture`)."""
    detection = detect(captured.module, captured.model)
    return InspectReport(
        streams=[StreamReport.from_stream(s) for s in detection.streams],
        skipped=[StreamReport.from_stream(s) for s in detection.skipped],
        notes=list(captured.notes),
        static_axes=static_axes(captured),
    )


def _check_convertible(detection: Detection) -> list[Stream]:
    if not detection.streams and not detection.skipped:
        raise NoResidualStreamError(
            "no residual stream found: the model has no add of the form x + f(x); nothing to convert"
        )
    ok = [s for s in detection.streams if s.convertible]
    if not ok:
        found = detection.streams or detection.skipped
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in found[:5])
        if not detection.streams:
            raise NoResidualStreamError(f"no residual stream found (only single residual adds: {reasons})")
        raise NotConvertibleError(f"no convertible residual stream: {reasons}")
    return ok


def _check_options(num_blocks, block_size, full, mode, eps, layers_per_block=None) -> None:
    check_mode(mode)
    check_eps(eps)
    if not isinstance(full, bool):
        raise InvalidInputError(f"full must be True or False, got {full!r}")
    for label, value in (
        ("num_blocks", num_blocks),
        ("block_size", block_size),
        ("layers_per_block", layers_per_block),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInputError(f"{label} must be a positive integer, got {value!r}")
    if layers_per_block is not None and (full or num_blocks is not None or block_size is not None):
        raise InvalidInputError(
            "layers_per_block sets the whole partition; do not also pass num_blocks/block_size/full"
        )


def build_plan(
    detection: Detection,
    *,
    num_blocks: int | None = None,
    block_size: int | None = None,
    full: bool = False,
    mode: str = "paper",
    eps: float | None = None,
    layers_per_block: int | None = None,
) -> ConversionPlan:
    """Plan the conversion of every convertible stream of ``detection``."""
    _check_options(num_blocks, block_size, full, mode, eps, layers_per_block)
    streams = _check_convertible(detection)
    options = dict(num_blocks=num_blocks, block_size=block_size, full=full, eps=eps, layers_per_block=layers_per_block)
    planned = [make_stream_plan(s, owner=stream_owner(s), **options) for s in streams]
    notes = [f"{s.name}: not converted ({s.reason})" for s in detection.streams if not s.convertible]
    return ConversionPlan(
        planned,
        mode=mode,
        full=full,
        num_blocks=num_blocks,
        block_size=block_size,
        notes=notes,
        layers_per_block=layers_per_block,
    )


def convert(
    model: nn.Module,
    example_inputs: Any,
    *,
    num_blocks: int | None = None,
    block_size: int | None = None,
    full: bool = False,
    layers_per_block: int | None = None,
    mode: str = "paper",
    eps: float | None = None,
    trace_depth: str = "auto",
) -> nn.Module:
    """A converted copy of ``model``: every convertible residual stream becomes Block AttnRes.

    ``model`` itself is not changed (it is deep-copied first; a model on the ``meta``
    device copies for free). :func:`convert_` converts in place, without the copy.

    The partition: ``num_blocks`` (default 8, capped at each stream's sublayer count)
    or ``block_size`` split the stream's sublayers (``S = ceil(L / N)``; a block may
    then start between a layer's attention and its MLP); ``layers_per_block`` makes
    blocks of whole layers (the convention of the Kimi reference model, Megatron-LM and
    flash-linear-attention); ``full=True`` is one block per sublayer. ``mode`` is
    ``"paper"`` or ``"exact"`` (SPEC section 1); ``eps`` overrides the key-norm epsilon
    (default: the model's norm epsilon, else 1e-6).

    The result is the same class as ``model`` with the same attributes, submodules and
    parameter names, plus an ``attnres`` submodule holding the queries and key-norm
    gains (``attnres.<stream>.{query,key_gain}``) and the plan (``attnres.plan``). It
    takes any call the model takes (masks, labels, caches, ``generate``), in train or
    eval mode, in any dtype and on any device: the module that holds each stream runs a
    program captured for each new call signature (see :mod:`attnres_rewrite.runtime`).

    ``trace_depth``: ``"full"`` traces every layer; ``"sampled"`` traces the first,
    second and last layer of each stack of identical layers and replicates the second
    (seconds instead of a minute for a 7B model; falls back to a full trace, with a
    note in the plan, when the layers or the way the model calls them differ);
    ``"auto"`` (default) samples when the weights are on the ``meta`` device. The same
    setting applies to the captures of later calls.
    """
    options = dict(num_blocks=num_blocks, block_size=block_size, full=full, mode=mode, eps=eps)
    _check_options(**options, layers_per_block=layers_per_block)
    _refuse_converted(model)
    return convert_(
        copy.deepcopy(model), example_inputs, **options, layers_per_block=layers_per_block, trace_depth=trace_depth
    )


def convert_(
    model: nn.Module,
    example_inputs: Any,
    *,
    num_blocks: int | None = None,
    block_size: int | None = None,
    full: bool = False,
    layers_per_block: int | None = None,
    mode: str = "paper",
    eps: float | None = None,
    trace_depth: str = "auto",
) -> nn.Module:
    """:func:`convert` in place: ``model`` itself becomes the converted model (and is returned).

    The memory-free path for large models, e.g. one built on the ``meta`` device before
    its weights are attached with :func:`~attnres_rewrite.attach_weights`.
    """
    options = dict(num_blocks=num_blocks, block_size=block_size, full=full, mode=mode, eps=eps)
    _check_options(**options, layers_per_block=layers_per_block)
    _refuse_converted(model)
    captured = capture(model, example_inputs, trace_depth=trace_depth)
    return convert_captured(
        captured, **options, layers_per_block=layers_per_block, trace_depth=trace_depth, inplace=True
    )


def _refuse_converted(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_converted(model):
        raise InvalidInputError(
            f"this {type(model).__name__} is already converted (it has an attnres submodule with a plan); "
            "convert the original model, or load its AttnRes weights with attnres_rewrite.load_adapter"
        )


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` is the result of :func:`convert` (or :func:`load_adapter`)."""
    return _runtime.is_converted(model)


def convert_captured(
    captured: Captured,
    *,
    num_blocks: int | None = None,
    block_size: int | None = None,
    full: bool = False,
    layers_per_block: int | None = None,
    mode: str = "paper",
    eps: float | None = None,
    trace_depth: str = "auto",
    inplace: bool = False,
) -> nn.Module:
    """:func:`convert` from an existing capture: of a copy of ``captured.model``, or of the model itself (``inplace``).

    May be called repeatedly on one capture (tests and benchmarks try several partitions
    on one trace).
    """
    module = captured.take_module()
    detection = detect(module, captured.model)
    plan = build_plan(
        detection,
        num_blocks=num_blocks,
        block_size=block_size,
        full=full,
        mode=mode,
        eps=eps,
        layers_per_block=layers_per_block,
    )
    plan.notes = captured.notes + plan.notes
    target = captured.model if inplace else copy.deepcopy(captured.model)
    return apply_plan(target, captured, module, detection, plan, trace_depth)


def apply_plan(
    model: nn.Module,
    captured: Captured,
    module: torch.fx.GraphModule,
    detection: Detection,
    plan: ConversionPlan,
    trace_depth: str,
) -> nn.Module:
    """Install ``plan`` on ``model`` (``captured.model`` or a copy of it); ``module`` becomes its first program.

    ``module`` is the graph ``detection`` ran on. Where a stream's owner is the model
    itself, the capture conversion made is the program of the example's call; other
    owners capture on their first call.
    """
    if trace_depth == "auto" and captured.sampled:
        trace_depth = "sampled"  # it worked on this model: later captures (after attach_weights too) sample as well
    _runtime.install(model, plan, make_parameters(plan, detection), trace_depth)
    root = _runtime.owners(model).get("")
    if root is not None:
        root.adopt(captured, module, detection)
    return model


def plan_of(module: nn.Module) -> ConversionPlan | None:
    """The plan of a converted model, else None."""
    attnres = getattr(module, "attnres", None)
    return getattr(attnres, "plan", None)


def programs(model: nn.Module) -> dict[str, list[Any]]:
    """The programs a converted model has captured so far, by owner path (for inspection)."""
    return {path: list(forward.programs) for path, forward in _runtime.owners(model).items()}


def rewritten_graphs(converted: nn.Module, example_inputs: Any) -> dict[str, torch.fx.GraphModule]:
    """The rewritten ATen graphs a converted model runs for ``example_inputs``, by stream owner (before outlining).

    For inspection and tests: every AttnRes aggregation is one
    ``torch.ops.attnres.block_attnres`` node. Owners the call does not reach are left out.
    """
    forwards = _runtime.owners(converted)
    if not forwards:
        raise InvalidInputError("rewritten_graphs needs a model returned by attnres_rewrite.convert")
    for forward in forwards.values():
        forward.last = None
    with torch.no_grad():
        _call(converted, example_inputs)
    return {path: f.last.flat for path, f in forwards.items() if f.last is not None}


# --------------------------------------------------------------------------------------
# equivalence


@dataclass
class EquivalenceReport:
    """How far the converted model is from the original on fresh inputs.

    ``inconclusive`` (with ``reason``): the reference output does not vary with the
    input (a zero-initialised head, an output that underflows), so a small difference
    proves nothing. ``stream_rms``: the RMS of the stream values the AttnRes
    aggregations read, for judging a ``paper``-mode gap against the norms' eps.
    """

    max_abs: float
    max_rel: float  # max_abs / max|original|
    max_ref: float
    input_shapes: list[list[int]]
    finite: bool
    spread: float = 0.0  # largest max - min of one reference output: 0 for a constant output
    inconclusive: bool = False
    reason: str = ""
    stream_rms: float | None = None
    inputs: str = "fresh"  # fresh: resampled, other shapes | given: the caller's check inputs | example

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fresh_inputs(example_inputs: Any, *, batch_delta: int = 1, seq_delta: int = 3, seed: int = 1234) -> Any:
    """Inputs of the example's kinds with another batch size and sequence length.

    Integer tensors get random values below the example's maximum (token ids), keeping
    the example's structure (:func:`_fresh_ids`); 0/1 tensors and booleans become all
    ones (attention masks); float tensors get normal noise with the example's scale. The
    sequence axis (dim 1 of 2-D integer and 3-D float inputs) grows by ``seq_delta``;
    use ``seq_delta=0`` for fixed-length models.
    """
    gen = torch.Generator().manual_seed(seed)

    def make(t: Any) -> Any:
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t
        shape = list(t.shape)
        shape[0] += batch_delta
        integer = not t.dtype.is_floating_point and t.dtype != torch.bool
        if t.dim() == 2 and (integer or t.dtype == torch.bool) or t.dim() == 3 and t.dtype.is_floating_point:
            shape[1] += seq_delta
        if t.dtype == torch.bool:
            return torch.ones(shape, dtype=torch.bool, device=t.device)
        if integer:
            high = int(t.max()) + 1 if t.numel() else 1
            if high <= 2:
                return torch.ones(shape, dtype=t.dtype, device=t.device)
            if t.dim() == 2 and t.numel():
                return _fresh_ids(t, shape, gen)
            return torch.randint(0, high, shape, generator=gen, dtype=t.dtype).to(t.device)
        std = float(t.float().std()) if t.numel() > 1 else 1.0
        return (torch.randn(shape, generator=gen) * (std or 1.0)).to(dtype=t.dtype, device=t.device)

    return pytree.tree_map(make, example_inputs)


def _fresh_ids(ids: Tensor, shape: list[int], gen: torch.Generator) -> Tensor:
    """Token ids of ``shape`` that keep the example's special tokens where it has them.

    An id repeated within a row of the example (an image-token span, padding) is
    structure rather than text: a multimodal model checks that the number of image
    tokens matches its images. Row ``i`` keeps the positions of those ids from example
    row ``i % batch``; every other position (and every position past the example's
    length) gets an ordinary id, drawn below the example's maximum and never one of
    the special ids.
    """
    rows = ids.cpu()
    special = sorted({v for row in rows.tolist() for v, n in Counter(row).items() if n > 1})
    ordinary = torch.tensor([v for v in range(int(rows.max()) + 1) if v not in set(special)], dtype=ids.dtype)
    if not len(ordinary):  # every id is special: nothing to resample
        ordinary = torch.tensor(special, dtype=ids.dtype)
    out = ordinary[torch.randint(0, len(ordinary), shape, generator=gen)]
    if special:
        base = rows[torch.arange(shape[0]) % rows.shape[0]]
        keep = torch.isin(base, torch.tensor(special, dtype=ids.dtype))
        width = min(shape[1], rows.shape[1])
        out[:, :width] = torch.where(keep[:, :width], base[:, :width], out[:, :width])
    return out.to(ids.device)


def _call(model: nn.Module, inputs: Any) -> Any:
    args, kwargs = normalize_inputs(inputs)
    return model(*args, **kwargs)


def float_leaves(out: Any) -> list[Tensor]:
    """The floating-point tensors of a model output (a tensor, a nested structure, or a ModelOutput)."""
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    return [x for x in pytree.tree_leaves(out) if isinstance(x, Tensor) and x.dtype.is_floating_point]


class _StreamWatch(TorchDispatchMode):
    """Records the RMS of the sources each AttnRes aggregation reads (one converted forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.rms: list[float] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.attnres.block_attnres.default:
            for src in args[0]:
                self.rms.append(float(src.detach().float().pow(2).mean().sqrt()))
        return func(*args, **(kwargs or {}))


def _seeded(model: nn.Module, inputs: Any, seed: int) -> Any:
    """The model's output with the global RNG forked and seeded: both models draw the same random numbers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _call(model, inputs)


@torch.no_grad()
def equivalence(
    original: nn.Module,
    converted: nn.Module,
    example_inputs: Any,
    *,
    seed: int = 1234,
    check_inputs: Any = None,
) -> EquivalenceReport:
    """Max abs / relative difference between ``converted`` and ``original`` on fresh inputs.

    Tries another batch size and sequence length first, then another batch size only
    (models with a fixed length), then the example's own shapes with fresh values, then
    the example itself (inputs with structure a resampling breaks, such as image tokens
    that must match the images). ``check_inputs`` replaces all of that with the caller's
    inputs. Each model runs with the RNG seeded alike, so a model that draws random
    numbers (dropout left on, random masking) is compared on the same draws.
    """
    attempts: list[tuple[str, Any]]
    if check_inputs is not None:
        attempts = [("given", check_inputs)]
    else:
        attempts = [
            ("fresh", fresh_inputs(example_inputs, batch_delta=b, seq_delta=t, seed=seed))
            for b, t in ((1, 3), (1, 0), (0, 0))
        ]
        attempts.append(("example", example_inputs))
    errors: list[str] = []
    for label, inputs in attempts:
        watch = _StreamWatch()
        try:
            with watch:
                got = float_leaves(_seeded(converted, inputs, seed))
            want = float_leaves(_seeded(original, inputs, seed))
        except Exception as exc:  # noqa: BLE001 - try the next, more conservative inputs
            errors.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            continue
        if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
            raise InvalidInputError("converted and original models return outputs of different structure")
        return _compare(got, want, inputs, label, watch.rms)
    raise InvalidInputError(
        "could not run the models on check inputs (tried resampled inputs of other shapes, then the example): "
        + " | ".join(errors[-2:])
        + ". Pass check inputs that the model accepts (check_inputs=, or --check-inputs in the CLI)"
    )


def _compare(got: list[Tensor], want: list[Tensor], inputs: Any, label: str, rms: list[float]) -> EquivalenceReport:
    pairs = [(a.float(), b.float()) for a, b in zip(got, want) if a.numel()]
    max_abs = max((float((a - b).abs().max()) for a, b in pairs), default=0.0)
    max_ref = max((float(b.abs().max()) for _, b in pairs), default=0.0)
    spread = max((float(b.max() - b.min()) for _, b in pairs), default=0.0)
    shapes = [list(t.shape) for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
    finite = all(bool(torch.isfinite(a).all()) for a in got)
    report = EquivalenceReport(
        max_abs,
        max_abs / max_ref if max_ref else max_abs,
        max_ref,
        shapes,
        finite,
        spread=spread,
        stream_rms=float(torch.tensor(rms).median()) if rms else None,
        inputs=label,
    )
    if max_ref == 0.0 or spread <= CONSTANT_OUTPUT * max_ref:
        report.inconclusive = True
        report.reason = (
            f"the original's output does not vary with the input (max |output| {max_ref:.3g}, spread {spread:.3g}): "
            "a zero-initialised or vanishing head makes any conversion look equal; check a model whose output "
            "depends on its input (load real weights, or compare the last hidden state)"
        )
    return report


#: An output whose spread (max - min) is below this fraction of its magnitude is taken as constant.
CONSTANT_OUTPUT = 1e-6
