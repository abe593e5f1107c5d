"""Property: a randomly mutated adapter is refused with AdapterError, or it loads as exactly what its files say.

Hypothesis edits a valid adapter's ``attnres_config.json`` (values, keys, list entries,
raw characters) and ``attnres.safetensors`` (names, dtypes, shapes, values, raw bytes,
the header). Whatever it produces, ``load_adapter`` must either

- raise :class:`AdapterError` (no other exception type: no crash, no internal error), or
- return a model whose plan is valid, equals the plan in the file, agrees with the model's
  own streams, holds the file's weights, and runs to finite outputs;

and it must never write into the adapter directory (no partial or temporary file).

Speed: tracing the model costs about a second, so the trace is made once and each
example gets a fresh copy of its module (what ``Captured.take_module`` does for a
repeated conversion); everything after the trace (detection, matching, the rewrite,
loading the weights) runs for real on every example.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_adapter import load_reusing_trace

import attnres_rewrite as ar
from attnres_rewrite import samples
from attnres_rewrite.adapter import CONFIG_NAME, WEIGHTS_NAME
from attnres_rewrite.api import convert_captured
from attnres_rewrite.errors import AdapterError
from attnres_rewrite.passes import capture as capture_module
from attnres_rewrite.passes.plan import ConversionPlan
from attnres_rewrite.passes.plan_schema import check_plan_dict

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same examples on every run and machine: a failure reproduces
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid adapter (trained-looking weights, 2 blocks over 4 sublayers) and one trace of its model."""
    model, inputs = samples.get("llama", layers=2)
    traced = capture_module.capture(model, inputs)
    converted = convert_captured(traced, num_blocks=2, mode="exact")  # one trace serves every example
    with torch.no_grad():
        for p in converted.attnres.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    directory = tmp_path_factory.mktemp("valid")
    ar.save_adapter(converted, directory)
    return {
        "model": model,
        "inputs": inputs,
        "traced": traced,
        "plan": converted.attnres.plan,
        "config": (directory / CONFIG_NAME).read_text(),
        "weights": load_file(directory / WEIGHTS_NAME),
    }


def _load(base: dict, directory: Path) -> torch.nn.Module:
    """``load_adapter`` with the model's trace reused (see test_adapter.load_reusing_trace)."""
    return load_reusing_trace(base["traced"], directory)


# --------------------------------------------------------------------------------------
# What to write: values that are plausible in a plan (boundaries, other fields' values,
# names of original weights) as well as arbitrary JSON


PLAUSIBLE = [
    -1, 0, 1, 2, 3, 4, 5, 48, 1e-6, 0.0, -1e-6, 1e300, True, False, None, "", "paper", "exact",
    "prenorm", "additive", "postnorm", "float32", "int32", "layers", "layers.0.attn",
    "attnres.layers.query", "attnres.layers.key_gain", "layers.0.attn.qkv.weight", "embed.weight",
    [0, 4], [[0, 2], [2, 4]], [[2, 4], [0, 2]], [[0, 1], [1, 2], [2, 3], [3, 4]], [[0, 4]], [[0, 2], [3, 4]],
    [0, 1, 2, 3], [0, 0, 1, 1], [], {},
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-5, 10)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
JSON_VALUES = st.sampled_from(PLAUSIBLE) | st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=5,
)


VALID_EDITS = {  # values the plan's rules accept for the llama adapter below (4 sublayers)
    ("plan", "streams", 0, "eps"): st.floats(1e-12, 1.0),
    ("plan", "streams", 0, "blocks"): st.sampled_from(
        [[[0, 4]], [[0, 1], [1, 4]], [[0, 3], [3, 4]], [[0, 1], [1, 2], [2, 3], [3, 4]]]
    ),
    ("plan", "mode"): st.sampled_from(["paper", "exact"]),
    ("plan", "full"): st.booleans(),
    ("plan", "num_blocks"): st.none() | st.integers(1, 8),
    ("plan", "notes"): st.lists(st.text(max_size=8), max_size=2),
    ("versions", "torch"): st.text(max_size=8),
}


def _slots(tree: Any, path: tuple = ()) -> list[tuple]:
    """Every (container path, key) in a JSON tree, the root included as ``((), None)``."""
    found = [(path, None)] if not path else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, value in items:
        found.append((path, key))
        found.extend(_slots(value, (*path, key)))
    return found


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@st.composite
def mutated_config(draw, valid_text: str) -> str:
    """The config text after 1-3 structural edits, or with its raw characters damaged."""
    if draw(st.integers(0, 4)) == 0:  # raw damage: truncation or one character replaced
        cut = draw(st.integers(0, len(valid_text)))
        if draw(st.booleans()):
            return valid_text[:cut]
        return valid_text[:cut] + draw(st.characters()) + valid_text[cut + 1 :]
    config = json.loads(valid_text)
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):  # an edit that keeps the plan valid: such files must load, as written
            (*path, key), values = draw(st.sampled_from(list(VALID_EDITS.items())))
            _at(config, tuple(path))[key] = draw(values)
            continue
        path, key = draw(st.sampled_from(_slots(config)))
        if key is None:
            config = draw(JSON_VALUES)
            continue
        container = _at(config, path)
        action = draw(st.sampled_from(["replace", "delete", "insert", "swap"]))
        if action == "replace":
            container[key] = draw(JSON_VALUES)
        elif action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw(st.sampled_from(["extra", "eps", "blocks", "query"]) | st.text(max_size=5))] = draw(
                JSON_VALUES
            )
        elif action == "insert":
            container.insert(key, draw(JSON_VALUES))
        else:
            other = draw(st.integers(0, len(container) - 1))
            container[key], container[other] = container[other], container[key]
    return json.dumps(config, allow_nan=True)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int32, torch.int64, torch.bool]
NAMES = ["attnres.layers.query", "attnres.layers.key_gain", "attnres.other.query", "layers.0.attn.qkv.weight", "x"]
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e300, -1e300, 7e4, 0.0])


@st.composite
def mutated_weights(draw, valid: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | bytes:
    """The tensors after 1-3 edits (names, dtypes, shapes, values), or the file's bytes damaged."""
    tensors = {k: v.clone() for k, v in valid.items()}
    if draw(st.integers(0, 4)) == 0:
        return draw(damaged_file(tensors))
    for _ in range(draw(st.integers(1, 3))):
        if not tensors:
            break
        name = draw(st.sampled_from(sorted(tensors)))
        action = draw(st.sampled_from(["drop", "rename", "retype", "reshape", "poke", "add"]))
        t = tensors[name]
        if action == "drop":
            del tensors[name]
        elif action == "rename":
            tensors[draw(st.sampled_from(NAMES) | st.text(min_size=1, max_size=6))] = tensors.pop(name)
        elif action == "retype":
            tensors[name] = t.to(draw(st.sampled_from(DTYPES)))
        elif action == "reshape" and t.dim() == 2:
            tensors[name] = draw(reshaped(t))
        elif action == "poke" and t.numel() and t.is_floating_point():
            value = torch.tensor(draw(FLOATS), dtype=torch.float64).to(t.dtype)  # 1e300 overflows to inf in float32
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = value
        elif action == "add":
            tensors[draw(st.sampled_from(NAMES) | st.text(min_size=1, max_size=6))] = torch.zeros(
                draw(st.lists(st.integers(0, 6), max_size=2))
            )
    return tensors


@st.composite
def reshaped(draw, t: torch.Tensor) -> torch.Tensor:
    """``t`` (rows x features) with rows or features cut, transposed, flattened or given another axis."""
    how = draw(st.sampled_from(["rows", "cols", "transpose", "flatten", "unsqueeze"]))
    if how == "rows":
        return t[: draw(st.integers(0, t.shape[0] + 1))].contiguous()
    if how == "cols":
        return t[:, : draw(st.integers(0, t.shape[1]))].contiguous()
    return {"transpose": t.t(), "flatten": t.flatten(), "unsqueeze": t.unsqueeze(0)}[how].contiguous()


@st.composite
def damaged_file(draw, tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes truncated, with one byte changed, or with an edited header."""
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/w.safetensors")
        raw = Path(f"{tmp}/w.safetensors").read_bytes()
    how = draw(st.sampled_from(["truncate", "byte", "header"]))
    if how == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "byte":
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    entry = header[draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))]
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    entry[field] = draw(
        st.sampled_from(
            ["F32", "F64", "I64", "BOOL", "F8_E4M3", "U16", "XX", [5, 48], [48, 5], [0, 0], [-1, 4], [0, 99999]]
        )
    )
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


# --------------------------------------------------------------------------------------
# The property


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _load_and_judge(base: dict, config_text: str, weights: dict[str, torch.Tensor] | bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / CONFIG_NAME).write_text(config_text)
        if isinstance(weights, bytes):
            (directory / WEIGHTS_NAME).write_bytes(weights)
        else:
            save_file(weights, directory / WEIGHTS_NAME)
        before = _files(directory)
        try:
            loaded = _load(base, directory)
        except AdapterError as exc:
            assert str(exc).strip()
            outcome = f"refused: {str(exc).split(': ', 1)[-1][:40]}"
        else:
            _check_loaded(base, loaded, json.loads(config_text), load_file(directory / WEIGHTS_NAME))
            outcome = "loaded"
        assert _files(directory) == before  # loading never writes, not even a temporary file
    return outcome


def _check_loaded(base: dict, loaded: torch.nn.Module, config: dict, weights: dict[str, torch.Tensor]) -> None:
    plan = loaded.attnres.plan
    check_plan_dict(plan.to_dict())  # a valid plan...
    assert plan == ConversionPlan.from_dict(config["plan"])  # ...exactly the one in the file...
    (stream,), (reference,) = plan.streams, base["plan"].streams
    for field in ("name", "kind", "dim", "sublayers", "inputs", "feature_axis"):  # ...that fits this model
        assert getattr(stream, field) == getattr(reference, field), field
    state = loaded.attnres.state_dict()
    assert set(weights) == {f"attnres.{k}" for k in state}
    for name, value in state.items():
        assert torch.equal(value, weights[f"attnres.{name}"].to(value.dtype)), name
        assert bool(torch.isfinite(value).all()), name
    ids = base["inputs"][0]
    assert bool(torch.isfinite(loaded(ids)).all())
    with tempfile.TemporaryDirectory() as tmp:  # and it saves again as a complete adapter of the same content
        ar.save_adapter(loaded, tmp)
        assert sorted(p.name for p in Path(tmp).iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
        assert ConversionPlan.from_dict(json.loads((Path(tmp) / CONFIG_NAME).read_text())["plan"]) == plan
        again = load_file(Path(tmp) / WEIGHTS_NAME)
        assert all(torch.equal(again[f"attnres.{k}"], v) for k, v in state.items())


@FUZZ
@given(data=st.data())
def test_a_mutated_config_is_refused_or_loads_as_written(base, data):
    config = data.draw(mutated_config(base["config"]))
    event(_load_and_judge(base, config, base["weights"]))  # --hypothesis-show-statistics lists the outcomes


@FUZZ
@given(data=st.data())
def test_mutated_weights_are_refused_or_load_as_written(base, data):
    weights = data.draw(mutated_weights(base["weights"]))
    event(_load_and_judge(base, base["config"], weights))


def test_the_unmutated_adapter_loads(base):
    """The property's other branch is reachable: the valid files load and pass every check."""
    assert _load_and_judge(base, base["config"], base["weights"]) == "loaded"
    edited = json.loads(base["config"])
    edited["plan"]["streams"][0]["blocks"] = [[0, 1], [1, 4]]  # another valid partition: loads as written
    edited["plan"]["streams"][0]["eps"] = 1e-3
    assert _load_and_judge(base, json.dumps(edited), base["weights"]) == "loaded"
    assert math.isfinite(edited["plan"]["streams"][0]["eps"])
