"""Plan: what a conversion does, as plain serialisable data.

The plan is the contract between detection and rewrite, and what an adapter stores:
loading an adapter re-detects the streams of a freshly built model and checks them
against the plan before applying it. It names every sublayer by the module path it
came from, the block partition, mode, eps and the AttnRes parameter names.

Parameter layout per stream ``<name>`` (see docs/parameters.md):

* ``attnres.<name>.query``    shape ``(A + 1, d)``, zeros at init
* ``attnres.<name>.key_gain`` shape ``(A + 1, d)``, ones at init

where ``A`` is the number of distinct sublayer inputs (``A = L`` for a sequential
stream, fewer when parallel branches share one input); row ``inputs[l]`` feeds
sublayer ``l`` and the last row ``A`` is the stream-output aggregation.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidInputError
from ..reference import DEFAULT_EPS, MODES, block_partition
from .plan_schema import check_plan_dict

__all__ = [
    "StreamPlan",
    "ConversionPlan",
    "PLAN_FORMAT",
    "make_stream_plan",
    "plan_mismatch",
    "layer_of",
    "layer_partition",
]

PLAN_FORMAT = 1


@dataclass
class StreamPlan:
    """The conversion of one residual stream."""

    name: str
    kind: str  # prenorm | additive
    dim: int
    dtype: str
    sublayers: list[str]  # module path of each sublayer, in stream order (L entries)
    inputs: list[int]  # query row of each sublayer's input aggregation (parallel branches share one)
    blocks: list[list[int]]  # [start, stop) sublayer ranges
    eps: float
    query: str  # parameter names
    key_gain: str
    feature_axis: int = -1  # 1: channel-first (B, C, H, W) stream, aggregated on a channels-last view
    owner: str | None = None  # path of the module whose forward holds the whole stream ("" = the model itself)

    @property
    def num_sublayers(self) -> int:
        return len(self.sublayers)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_rows(self) -> int:
        """Rows of ``query``/``key_gain``: one per distinct input, plus the stream output."""
        return (max(self.inputs) + 1 if self.inputs else 0) + 1

    @property
    def output_row(self) -> int:
        return self.num_rows - 1


@dataclass
class ConversionPlan:
    """Every stream to convert, and how."""

    streams: list[StreamPlan]
    mode: str = "paper"
    full: bool = False
    num_blocks: int | None = None
    block_size: int | None = None
    format: int = PLAN_FORMAT
    notes: list[str] = field(default_factory=list)
    layers_per_block: int | None = None

    def stream(self, name: str) -> StreamPlan:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)

    def parameter_names(self) -> list[str]:
        return [n for s in self.streams for n in (s.query, s.key_gain)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionPlan:
        """Rebuild a plan from :meth:`to_dict` output, refusing anything that is not a valid plan.

        Serialised plans come from files a user may have edited or received, so every
        field is checked (:func:`.plan_schema.check_plan_dict`): an invalid one raises
        :class:`~attnres_rewrite.errors.InvalidInputError` naming it.
        """
        check_plan_dict(data)
        streams = [StreamPlan(**copy.deepcopy(s)) for s in data["streams"]]
        rest = {k: copy.deepcopy(v) for k, v in data.items() if k != "streams"}
        return cls(streams=streams, **rest)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ConversionPlan:
        return cls.from_dict(json.loads(text))


def resolve_partition(
    num_sublayers: int, num_blocks: int | None, block_size: int | None, full: bool, stream: str = "stream"
) -> list[list[int]]:
    """Block partition of one stream, as ``[start, stop)`` pairs; bad requests raise InvalidInputError.

    An explicit ``num_blocks`` or ``block_size`` beyond the stream's sublayer count is
    refused, both alike, rather than quietly capped: the user asked for a partition
    this stream cannot have. Only the default (8 blocks) is capped at the count.
    """
    if full:
        if num_blocks is not None or block_size is not None:
            raise InvalidInputError(
                "full=True is Full AttnRes (one block per sublayer); do not also pass num_blocks/block_size"
            )
        num_blocks = num_sublayers
    if num_blocks is not None and block_size is not None:
        raise InvalidInputError("pass num_blocks or block_size, not both")
    for label, value in (("num_blocks", num_blocks), ("block_size", block_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidInputError(f"{label} must be an integer, got {value!r}")
    if num_blocks is not None and not 1 <= num_blocks <= num_sublayers:
        raise InvalidInputError(
            f"num_blocks={num_blocks} is out of range for stream {stream!r}: it has {num_sublayers} sublayers, "
            f"so num_blocks must be between 1 and {num_sublayers}"
        )
    if block_size is not None and not 1 <= block_size <= num_sublayers:  # as num_blocks: no silent cap
        raise InvalidInputError(
            f"block_size={block_size} is out of range for stream {stream!r}: it has {num_sublayers} sublayers, "
            f"so block_size must be between 1 and {num_sublayers}"
        )
    return [[r.start, r.stop] for r in block_partition(num_sublayers, num_blocks, block_size)]


def layer_of(path: str) -> str:
    """The layer a sublayer belongs to: its path up to the first index (``model.layers.3.mlp`` -> ``model.layers.3``).

    A sublayer path without an index (a model without a layer list) is its own layer.
    """
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return path


def layer_partition(sublayers: list[str], layers_per_block: int, stream: str = "stream") -> list[list[int]]:
    """Blocks of ``layers_per_block`` whole layers, as sublayer ``[start, stop)`` pairs.

    The convention of the Kimi reference model, Megatron-LM and flash-linear-attention:
    a block starts only at a layer boundary, so a layer's attention and MLP are never in
    two blocks. The last block may hold fewer layers.
    """
    if isinstance(layers_per_block, bool) or not isinstance(layers_per_block, int) or layers_per_block < 1:
        raise InvalidInputError(f"layers_per_block must be a positive integer, got {layers_per_block!r}")
    starts = [i for i, path in enumerate(sublayers) if i == 0 or layer_of(path) != layer_of(sublayers[i - 1])]
    if layers_per_block > len(starts):
        raise InvalidInputError(
            f"layers_per_block={layers_per_block} is out of range for stream {stream!r}: it has {len(starts)} layers"
        )
    bounds = starts[::layers_per_block] + [len(sublayers)]
    return [[a, b] for a, b in zip(bounds, bounds[1:])]


def make_stream_plan(
    stream,
    *,
    num_blocks,
    block_size,
    full,
    eps: float | None,
    owner: str | None = None,
    layers_per_block: int | None = None,
) -> StreamPlan:
    """Plan one detected stream (a :class:`~.detect.Stream`)."""
    rows = {state: row for row, state in enumerate(stream.input_states)}
    chosen_eps = eps if eps is not None else (stream.eps if stream.eps is not None else DEFAULT_EPS)
    return StreamPlan(
        name=stream.name,
        kind=stream.kind,
        dim=stream.dim,
        dtype=str(stream.dtype).replace("torch.", ""),
        sublayers=[s.module_path for s in stream.sublayers],
        inputs=[rows[s.reads] for s in stream.sublayers],
        blocks=_partition(stream, num_blocks, block_size, full, layers_per_block),
        eps=float(chosen_eps),
        query=f"attnres.{stream.name}.query",
        key_gain=f"attnres.{stream.name}.key_gain",
        feature_axis=stream.feature_axis,
        owner=owner,
    )


def plan_mismatch(plan: ConversionPlan, detection, *, kinds: bool = False) -> str | None:
    """Why ``plan`` does not fit the streams ``detection`` found, or None when every planned stream is there.

    Each planned stream must be found, convertible, with the same sublayers (module
    paths, in order), feature axis and size and shared inputs. Used when an adapter is
    applied to a freshly built model (``kinds=True``: the kind must match too) and
    whenever a converted model captures a new call, where the kind may differ: a call
    returning hidden states reads the stream directly, which makes a pre-norm stream
    look additive, and the rewrite is the same for both.
    """
    found = {s.name: s for s in detection.streams}
    for sp in plan.streams:
        s = found.get(sp.name)
        if s is None:
            return f"there is no residual stream {sp.name!r} (the model has {', '.join(sorted(found)) or 'none'})"
        if not s.convertible:
            return f"stream {sp.name!r} is not convertible here: {s.reason}"
        paths = [x.module_path for x in s.sublayers]
        if len(paths) != sp.num_sublayers:
            return f"stream {sp.name!r} has {len(paths)} sublayers here but {sp.num_sublayers} in the plan (different depth)"
        if paths != sp.sublayers:
            i = next(i for i, (a, b) in enumerate(zip(paths, sp.sublayers)) if a != b)
            return f"stream {sp.name!r}: sublayer {i} is {paths[i]!r} here but {sp.sublayers[i]!r} in the plan"
        if s.dim != sp.dim:
            return f"stream {sp.name!r}: feature size {s.dim} here, {sp.dim} in the plan"
        if s.feature_axis != sp.feature_axis or kinds and s.kind != sp.kind:  # the axis decides the aggregation
            return (
                f"stream {sp.name!r}: a {s.kind} stream with features on axis {s.feature_axis} here, "
                f"{sp.kind} on axis {sp.feature_axis} in the plan"
            )
        rows = {state: r for r, state in enumerate(s.input_states)}
        if [rows[x.reads] for x in s.sublayers] != sp.inputs:
            return f"stream {sp.name!r}: the sublayers share inputs differently (parallel branches)"
    return None


def _partition(stream, num_blocks, block_size, full, layers_per_block) -> list[list[int]]:
    paths = [s.module_path for s in stream.sublayers]
    if layers_per_block is None:
        return resolve_partition(len(paths), num_blocks, block_size, full, stream.name)
    if full or num_blocks is not None or block_size is not None:
        raise InvalidInputError(
            "layers_per_block sets the whole partition; do not also pass num_blocks/block_size/full"
        )
    return layer_partition(paths, layers_per_block, stream.name)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def check_eps(eps: float | None) -> None:
    if eps is None:
        return
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < float("inf")):
        raise InvalidInputError(f"eps must be a positive finite number, got {eps!r}")
