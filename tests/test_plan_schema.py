"""ConversionPlan.from_dict is strict: every field of a serialised plan is checked, with the field named.

A plan read from an adapter file drives the rewrite, so a reversed or gapped block
partition, a query renamed to an original weight, a bad eps or a missing mode used to be
applied (or failed later with "could not apply the adapter's plan: 3"). No model here:
these are the plan's own rules.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest

from attnres_rewrite.errors import InvalidInputError
from attnres_rewrite.passes.plan import ConversionPlan, StreamPlan
from attnres_rewrite.passes.plan_schema import PLAN_FIELDS, STREAM_FIELDS


def valid_plan() -> dict:
    """Two streams: a sequential one (4 sublayers, 2 blocks) and a parallel one (inputs shared in pairs)."""
    return {
        "streams": [
            {
                "name": "layers",
                "kind": "prenorm",
                "dim": 8,
                "dtype": "float32",
                "sublayers": ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"],
                "inputs": [0, 1, 2, 3],
                "blocks": [[0, 2], [2, 4]],
                "eps": 1e-6,
                "query": "attnres.layers.query",
                "key_gain": "attnres.layers.key_gain",
                "feature_axis": -1,
                "owner": "",
            },
            {
                "name": "decoder_h",
                "kind": "additive",
                "dim": 4,
                "dtype": "bfloat16",
                "sublayers": ["decoder.h.0.attn", "decoder.h.0.mlp", "decoder.h.1.attn", "decoder.h.1.mlp"],
                "inputs": [0, 0, 1, 1],
                "blocks": [[0, 1], [1, 4]],
                "eps": 1e-5,
                "query": "attnres.decoder_h.query",
                "key_gain": "attnres.decoder_h.key_gain",
                "feature_axis": 1,
                "owner": "decoder",
            },
        ],
        "mode": "exact",
        "full": False,
        "num_blocks": 2,
        "block_size": None,
        "layers_per_block": None,
        "format": 1,
        "notes": ["a note"],
    }


def test_every_dataclass_field_has_a_checker():
    """A field added to the plan without a rule would be refused in every adapter: add its checker."""
    assert set(STREAM_FIELDS) == {f.name for f in dataclasses.fields(StreamPlan)}
    assert set(PLAN_FIELDS) == {f.name for f in dataclasses.fields(ConversionPlan)}


def test_a_valid_plan_round_trips_and_is_not_aliased():
    data = valid_plan()
    plan = ConversionPlan.from_dict(data)
    assert plan.to_dict() == data
    data["streams"][0]["blocks"].append([4, 5])  # editing the source afterwards must not reach the plan
    assert plan.streams[0].blocks == [[0, 2], [2, 4]]


def set_field(path: str, value):
    """A mutation of ``valid_plan()``: ``path`` is ``field`` or ``streams.<i>.field``; DELETE removes it."""

    def mutate(data: dict) -> None:
        *parents, last = path.split(".")
        target = data
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        key = int(last) if last.isdigit() else last
        if value is DELETE:
            del target[key]
        else:
            target[key] = value

    return mutate


DELETE = object()


def rename_second_stream(name: str):
    def mutate(data: dict) -> None:
        stream = data["streams"][1]
        stream.update(name=name, query=f"attnres.{name}.query", key_gain=f"attnres.{name}.key_gain")

    return mutate


CASES = {
    # the block partition must cover [0, L) in order
    "reversed blocks": (set_field("streams.0.blocks", [[2, 4], [0, 2]]), "blocks: block 0 starts at 2, expected 0"),
    "gap": (set_field("streams.0.blocks", [[0, 1], [2, 4]]), "blocks: block 1 starts at 2, expected 1"),
    "overlap": (set_field("streams.0.blocks", [[0, 3], [2, 4]]), "blocks: block 1 starts at 2, expected 3"),
    "beyond L": (set_field("streams.0.blocks", [[0, 2], [2, 9]]), "the blocks end at 9 but the stream has 4"),
    "short of L": (set_field("streams.0.blocks", [[0, 2]]), "the blocks end at 2 but the stream has 4"),
    "empty block": (set_field("streams.0.blocks", [[0, 0], [0, 4]]), "block 0 [0, 0) is empty or reversed"),
    "no blocks": (set_field("streams.0.blocks", []), "expected a non-empty list"),
    "float bound": (set_field("streams.0.blocks", [[0, 2.0], [2, 4]]), "expected an integer, got 2.0"),
    "triple": (set_field("streams.0.blocks", [[0, 2, 3], [2, 4]]), "not a [start, stop) pair"),
    # parameter names are the stream's own, nothing else
    "query renamed to a weight": (
        set_field("streams.0.query", "layers.0.attn.qkv.weight"),
        "must be 'attnres.layers.query'",
    ),
    "gain of another stream": (
        set_field("streams.0.key_gain", "attnres.decoder_h.key_gain"),
        "must be 'attnres.layers.key_gain'",
    ),
    # eps feeds every key norm
    "eps 0": (set_field("streams.0.eps", 0.0), "eps: expected a positive finite number, got 0.0"),
    "eps negative": (set_field("streams.0.eps", -1e-6), "eps: expected a positive finite number"),
    "eps inf": (set_field("streams.0.eps", float("inf")), "eps: expected a positive finite number, got inf"),
    "eps nan": (set_field("streams.0.eps", float("nan")), "eps: expected a positive finite number, got nan"),
    "eps bool": (set_field("streams.0.eps", True), "eps: expected a positive finite number, got True"),
    "eps string": (set_field("streams.0.eps", "1e-6"), "eps: expected a positive finite number"),
    # the other stream fields
    "name with a dot": (set_field("streams.0.name", "model.layers"), "name: expected a stream name"),
    "kind postnorm": (set_field("streams.0.kind", "postnorm"), "kind: expected one of 'prenorm', 'additive'"),
    "dim 0": (set_field("streams.0.dim", 0), "dim: expected an integer >= 1, got 0"),
    "dim bool": (set_field("streams.0.dim", True), "dim: expected an integer, got True"),
    "integer dtype": (set_field("streams.0.dtype", "int32"), "dtype: expected one of"),
    "feature axis 2": (set_field("streams.0.feature_axis", 2), "feature_axis: expected one of -1, 1, got 2"),
    "feature axis True": (set_field("streams.0.feature_axis", True), "feature_axis: expected one of -1, 1, got True"),
    "feature axis 1.0": (set_field("streams.0.feature_axis", 1.0), "feature_axis: expected one of -1, 1, got 1.0"),
    "no sublayers": (set_field("streams.0.sublayers", []), "sublayers: expected a non-empty list"),
    "repeated sublayer": (set_field("streams.0.sublayers", ["a", "b", "a", "c"]), "appears twice"),
    "inputs too short": (set_field("streams.0.inputs", [0, 1, 2]), "inputs: has 3 entries for 4 sublayers"),
    "inputs skip a row": (set_field("streams.0.inputs", [0, 1, 3, 3]), "skip a row"),
    "negative input": (set_field("streams.0.inputs", [-1, 0, 1, 2]), "expected an integer >= 0, got -1"),
    "owner not a path": (set_field("streams.0.owner", "model..layers"), "owner: expected a module path"),
    "owner a number": (set_field("streams.0.owner", 0), "owner: expected a module path"),
    "unknown stream field": (set_field("streams.0.extra", 1), "plan.streams[0]: unknown field(s) ['extra']"),
    "missing stream field": (set_field("streams.1.eps", DELETE), "plan.streams[1]: missing field(s) ['eps']"),
    "repeated stream": (rename_second_stream("layers"), "stream names repeat"),
    "stream not an object": (set_field("streams.0", [1, 2]), "plan.streams[0]: expected an object, got list"),
    # the plan's own fields
    "no streams": (set_field("streams", []), "plan.streams: expected a non-empty list"),
    "missing mode": (set_field("mode", DELETE), "plan: missing field(s) ['mode']"),
    "bad mode": (set_field("mode", "fancy"), "plan.mode: expected one of 'paper', 'exact'"),
    "full as text": (set_field("full", "yes"), "plan.full: expected true or false"),
    "num_blocks 0": (set_field("num_blocks", 0), "plan.num_blocks: expected an integer >= 1"),
    "layers_per_block 0": (set_field("layers_per_block", 0), "plan.layers_per_block: expected an integer >= 1"),
    "block_size bool": (set_field("block_size", True), "plan.block_size: expected an integer, got True"),
    "other format": (set_field("format", 2), "plan format 2 is not supported (this version reads 1)"),
    "notes not text": (set_field("notes", [1]), "plan.notes: expected a list of strings"),
    "unknown field": (set_field("extra", {}), "plan: unknown field(s) ['extra']"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_invalid_field_is_refused_and_named(case):
    mutate, message = CASES[case]
    data = copy.deepcopy(valid_plan())
    mutate(data)
    with pytest.raises(InvalidInputError) as info:
        ConversionPlan.from_dict(data)
    assert message in str(info.value)


def test_an_adapter_written_before_owners_were_recorded_still_reads():
    """``owner`` and ``layers_per_block`` may be absent: without an owner the model is traced before the plan applies."""
    data = valid_plan()
    del data["streams"][0]["owner"], data["layers_per_block"]
    data["streams"][1]["owner"] = None
    plan = ConversionPlan.from_dict(data)
    assert [sp.owner for sp in plan.streams] == [None, None]


@pytest.mark.parametrize("data", [None, [], "plan", 3])
def test_a_plan_that_is_not_an_object_is_refused(data):
    with pytest.raises(InvalidInputError, match="plan: expected an object"):
        ConversionPlan.from_dict(data)
