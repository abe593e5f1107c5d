"""The rules a serialised :class:`~.plan.ConversionPlan` must follow before anything uses it.

A plan read back from an adapter file drives the graph rewrite: its block partition
decides which values each aggregation reads, its parameter names decide which
tensors the graph reads as queries and key gains, its ``eps`` goes into every key
norm. A tampered or hand-edited file must therefore be refused here, field by field,
with the field named, instead of being applied and producing a model that is subtly
wrong (a reversed partition, a query that is really an original weight) or failing
later with an unrelated message. Only the fields of the plan dataclasses are
accepted, and all of them must be present: a missing ``mode`` silently turning an
``exact`` adapter into a ``paper`` one is exactly what this refuses.

Each field has one checker in :data:`STREAM_FIELDS` / :data:`PLAN_FIELDS`; a field added
to the dataclasses without a checker is refused too (and a test says so), so the
schema cannot silently fall behind.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from ..errors import InvalidInputError
from ..reference import MODES

__all__ = ["check_plan_dict", "STREAM_FIELDS", "PLAN_FIELDS", "OPTIONAL_FIELDS", "FLOAT_DTYPES"]

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
STREAM_KINDS = ("prenorm", "additive")  # the convertible kinds (detect.py)
_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # detect.py names streams this way; a module name without dots


class _Invalid(Exception):
    """One field's problem, before the path to it is known."""


def _integer(value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {value!r}")
    if value < minimum:
        raise _Invalid(f"expected an integer >= {minimum}, got {value}")
    return value


def _optional_count(value: Any, _: dict) -> None:
    if value is not None:
        _integer(value, minimum=1)


def _string_list(value: Any, *, non_empty: bool) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"expected a list of strings, got {value!r}")
    if non_empty and (not value or not all(value)):
        raise _Invalid("expected a non-empty list of non-empty strings")
    return value


def _one_of(choices: tuple) -> Callable[[Any, dict], None]:
    def check(value: Any, _: dict) -> None:
        if not any(type(value) is type(choice) and value == choice for choice in choices):  # 1.0, True are not 1
            raise _Invalid(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")

    return check


def _name(value: Any, _: dict) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise _Invalid(f"expected a stream name of letters, digits and '_', got {value!r}")


def _dim(value: Any, _: dict) -> None:
    _integer(value, minimum=1)


def _sublayers(value: Any, _: dict) -> None:
    names = _string_list(value, non_empty=True)
    if len(set(names)) != len(names):
        raise _Invalid("a sublayer module path appears twice")


def _inputs(value: Any, stream: dict) -> None:
    """One query row per sublayer; rows 0..A-1 each feed at least one sublayer."""
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of row indices, got {value!r}")
    rows = [_integer(v, minimum=0) for v in value]
    if isinstance(stream.get("sublayers"), list) and len(rows) != len(stream["sublayers"]):
        raise _Invalid(f"has {len(rows)} entries for {len(stream['sublayers'])} sublayers")
    if rows and sorted(set(rows)) != list(range(max(rows) + 1)):
        raise _Invalid(f"rows {sorted(set(rows))} skip a row; each of 0..{max(rows)} must feed a sublayer")


def _blocks(value: Any, stream: dict) -> None:
    """Consecutive, non-empty ``[start, stop)`` ranges covering ``[0, L)`` in order."""
    if not isinstance(value, list) or not value:
        raise _Invalid(f"expected a non-empty list of [start, stop) pairs, got {value!r}")
    expected_start = 0
    for i, block in enumerate(value):
        if not isinstance(block, list) or len(block) != 2:
            raise _Invalid(f"block {i} is {block!r}, not a [start, stop) pair")
        start, stop = (_integer(v, minimum=0) for v in block)
        if start != expected_start:
            raise _Invalid(
                f"block {i} starts at {start}, expected {expected_start}: the blocks must cover 0..L in order"
            )
        if stop <= start:
            raise _Invalid(f"block {i} [{start}, {stop}) is empty or reversed")
        expected_start = stop
    sublayers = stream.get("sublayers")
    if isinstance(sublayers, list) and expected_start != len(sublayers):
        raise _Invalid(f"the blocks end at {expected_start} but the stream has {len(sublayers)} sublayers")


def _eps(value: Any, _: dict) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise _Invalid(f"expected a positive finite number, got {value!r}")


def _parameter(role: str) -> Callable[[Any, dict], None]:
    def check(value: Any, stream: dict) -> None:
        expected = f"attnres.{stream.get('name')}.{role}"
        if value != expected:
            raise _Invalid(f"must be {expected!r} (the stream's own AttnRes parameter), got {value!r}")

    return check


_MODULE_PATH = re.compile(r"^([A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*)?$")


def _owner(value: Any, _: dict) -> None:
    """The module whose forward holds the stream: a dotted path, "" for the model itself, or null (unrecorded)."""
    if value is not None and (not isinstance(value, str) or not _MODULE_PATH.match(value)):
        raise _Invalid(f"expected a module path like 'model' or 'model.encoder' ('' = the model), got {value!r}")


def _bool(value: Any, _: dict) -> None:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {value!r}")


def _notes(value: Any, _: dict) -> None:
    _string_list(value, non_empty=False)


def _format(value: Any, _: dict) -> None:
    from .plan import PLAN_FORMAT

    if isinstance(value, bool) or value != PLAN_FORMAT:
        raise _Invalid(f"plan format {value!r} is not supported (this version reads {PLAN_FORMAT})")


def _streams(value: Any, _: dict) -> None:
    if not isinstance(value, list) or not value:
        raise _Invalid("expected a non-empty list of streams")
    for i, stream in enumerate(value):
        _check_record(stream, STREAM_FIELDS, f"plan.streams[{i}]")
    names = [s["name"] for s in value]
    if len(set(names)) != len(names):
        raise _Invalid(f"stream names repeat: {names}")


Checker = Callable[[Any, dict], None]

STREAM_FIELDS: dict[str, Checker] = {
    "name": _name,
    "kind": _one_of(STREAM_KINDS),
    "dim": _dim,
    "dtype": _one_of(FLOAT_DTYPES),
    "sublayers": _sublayers,
    "inputs": _inputs,
    "blocks": _blocks,
    "eps": _eps,
    "query": _parameter("query"),
    "key_gain": _parameter("key_gain"),
    "feature_axis": _one_of((-1, 1)),
    "owner": _owner,
}

# Fields that adapters written before they existed lack (both only record how the
# plan was made); absent, they take their
# dataclass default (an unrecorded owner only means the model must be traced first).
OPTIONAL_FIELDS = frozenset({"owner", "layers_per_block"})

PLAN_FIELDS: dict[str, Checker] = {
    "streams": _streams,
    "mode": _one_of(MODES),
    "full": _bool,
    "num_blocks": _optional_count,
    "block_size": _optional_count,
    "layers_per_block": _optional_count,
    "format": _format,
    "notes": _notes,
}


def _check_record(data: Any, fields: dict[str, Checker], where: str) -> None:
    if not isinstance(data, dict):
        raise InvalidInputError(f"{where}: expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise InvalidInputError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(fields)}")
    missing = [name for name in fields if name not in data and name not in OPTIONAL_FIELDS]
    if missing:
        raise InvalidInputError(f"{where}: missing field(s) {missing}")
    for name, check in fields.items():
        if name not in data:
            continue
        try:
            check(data[name], data)
        except _Invalid as exc:
            raise InvalidInputError(f"{where}.{name}: {exc}") from None


def check_plan_dict(data: Any) -> None:
    """Raise :class:`InvalidInputError` naming the first field of ``data`` that is not a valid plan."""
    _check_record(data, PLAN_FIELDS, "plan")
