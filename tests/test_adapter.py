"""Adapters: save the AttnRes part, re-apply it to a freshly built model, fail clearly on mismatch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import attnres_rewrite as ar
from attnres_rewrite import samples
from attnres_rewrite.adapter import CONFIG_NAME, WEIGHTS_NAME
from attnres_rewrite.errors import AdapterError, InvalidInputError
from attnres_rewrite.passes.plan import ConversionPlan


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A converted llama sample whose AttnRes parameters are not at their init, saved once."""
    model, inputs = samples.get("llama", layers=2)
    converted = ar.convert(model, inputs, num_blocks=2, mode="exact")
    with torch.no_grad():
        for p in converted.attnres.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    directory = tmp_path_factory.mktemp("adapter")
    ar.save_adapter(converted, directory)
    return converted, inputs, directory


def test_files_and_contents(trained):
    converted, _, directory = trained
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert set(config["versions"]) >= {"attnres_rewrite", "torch"}
    plan = ConversionPlan.from_dict(config["plan"])
    assert plan == converted.attnres.plan
    weights = load_file(directory / WEIGHTS_NAME)
    assert set(weights) == {"attnres.layers.query", "attnres.layers.key_gain"}  # only the new parameters
    torch.testing.assert_close(weights["attnres.layers.query"], converted.attnres.layers.query.detach())


def test_round_trip_on_fresh_model(trained):
    converted, inputs, directory = trained
    fresh, _ = samples.get("llama", layers=2)  # same seed -> same base weights
    loaded = ar.load_adapter(fresh, inputs, directory)
    assert loaded.attnres.plan == converted.attnres.plan
    ids = torch.randint(0, 97, (3, 9))
    torch.testing.assert_close(loaded(ids), converted(ids), rtol=0, atol=0)


def test_different_depth_fails_naming_the_mismatch(trained):
    _, inputs, directory = trained
    deeper, _ = samples.get("llama", layers=3)
    with pytest.raises(AdapterError, match=r"has 6 sublayers here but 4 in the plan \(different depth\)"):
        ar.load_adapter(deeper, inputs, directory)


def test_other_architecture_fails(trained):
    _, _, directory = trained
    model, inputs = samples.get("vit")
    with pytest.raises(AdapterError, match="no residual stream 'layers'|sublayer 0"):
        ar.load_adapter(model, inputs, directory)


def test_missing_and_corrupt_files(trained, tmp_path):
    _, inputs, directory = trained
    model, _ = samples.get("llama", layers=2)
    with pytest.raises(AdapterError, match="does not exist"):
        ar.load_adapter(model, inputs, tmp_path / "nowhere")
    (tmp_path / CONFIG_NAME).write_text("{not json")
    (tmp_path / WEIGHTS_NAME).write_bytes((directory / WEIGHTS_NAME).read_bytes())
    with pytest.raises(AdapterError, match="not a valid AttnRes adapter config"):
        ar.load_adapter(model, inputs, tmp_path)
    (tmp_path / CONFIG_NAME).write_text((directory / CONFIG_NAME).read_text())
    (tmp_path / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="safetensors"):
        ar.load_adapter(model, inputs, tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match="missing"):
        ar.load_adapter(model, inputs, tmp_path)


def test_save_refuses_unconverted_model_and_writes_nothing(tmp_path):
    model, _ = samples.get("llama", layers=2)
    target = tmp_path / "out"
    with pytest.raises(InvalidInputError, match="convert"):
        ar.save_adapter(model, target)
    assert not target.exists()


def test_save_leaves_no_temporaries(trained, tmp_path):
    converted, _, _ = trained
    ar.save_adapter(converted, tmp_path / "a")
    ar.save_adapter(converted, tmp_path / "a")  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_plan_json_round_trip(trained):
    converted, _, _ = trained
    plan = converted.attnres.plan
    again = ConversionPlan.from_json(plan.to_json())
    assert again == plan
    assert again.streams[0].num_rows == 5 and again.streams[0].output_row == 4
    assert again.parameter_names() == ["attnres.layers.query", "attnres.layers.key_gain"]


def test_deepcopy_keeps_plan_and_saves(trained, tmp_path):
    import copy

    converted, _, _ = trained
    clone = copy.deepcopy(converted)
    ar.save_adapter(clone, tmp_path / "copy")
    weights = load_file(tmp_path / "copy" / WEIGHTS_NAME)
    torch.testing.assert_close(weights["attnres.layers.key_gain"], converted.attnres.layers.key_gain.detach())


def test_saved_files_get_the_umask_modes_not_private_temp_modes(trained):
    """Staging uses mkstemp (0600); a finished adapter must be readable like any file the user writes."""
    import os
    import stat

    _, _, out = trained
    umask = os.umask(0)
    os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


# --------------------------------------------------------------------------------------
# Strictness: a tampered or mismatched adapter is refused with AdapterError, never applied


def tampered(source, target, *, config=None, weights=None):
    """A copy of the adapter in ``source`` with its config and/or weights passed through the given edits."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(source, target)
    if config is not None:
        data = json.loads((target / CONFIG_NAME).read_text())
        (target / CONFIG_NAME).write_text(json.dumps(config(data)))
    if weights is not None:
        save_file(weights(load_file(target / WEIGHTS_NAME)), target / WEIGHTS_NAME)
    return target


@pytest.fixture
def no_trace(monkeypatch):
    """These adapters must be refused while reading, before the model is traced or anything applied."""
    from attnres_rewrite.passes import capture

    def fail(*args, **kwargs):
        raise AssertionError("the model was traced although the adapter files are invalid")

    monkeypatch.setattr(capture, "capture", fail)


def _stream(edit):
    def config(data):
        edit(data["plan"]["streams"][0])
        return data

    return config


CONFIG_EDITS = {
    "not an object": (lambda data: [data], "expected a JSON object, got list"),
    "a number": (lambda data: 3, "expected a JSON object, got int"),
    "unknown key": (lambda data: {**data, "extra": 1}, "unknown key(s) ['extra']"),
    "no versions": (lambda data: {k: v for k, v in data.items() if k != "versions"}, "missing key(s) ['versions']"),
    "versions not text": (lambda data: {**data, "versions": {"torch": 2}}, "'versions' must map"),
    "other format": (lambda data: {**data, "format": 2}, "adapter format 2 is not 1"),
    "reversed blocks": (_stream(lambda s: s.update(blocks=[[2, 4], [0, 2]])), "blocks: block 0 starts at 2"),
    "blocks out of range": (_stream(lambda s: s.update(blocks=[[0, 2], [2, 9]])), "the blocks end at 9"),
    "gap in blocks": (_stream(lambda s: s.update(blocks=[[0, 2], [3, 4]])), "block 1 starts at 3, expected 2"),
    "query is an original weight": (
        _stream(lambda s: s.update(query="layers.0.attn.qkv.weight")),
        "query: must be 'attnres.layers.query'",
    ),
    "eps 0": (_stream(lambda s: s.update(eps=0.0)), "eps: expected a positive finite number, got 0.0"),
    "eps -1": (_stream(lambda s: s.update(eps=-1.0)), "eps: expected a positive finite number, got -1.0"),
    "eps inf": (_stream(lambda s: s.update(eps=float("inf"))), "eps: expected a positive finite number, got inf"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_a_tampered_config_is_refused_before_tracing(trained, tmp_path, no_trace, case):
    _, inputs, directory = trained
    edit, message = CONFIG_EDITS[case]
    bad = tampered(directory, tmp_path / "bad", config=edit)
    model, _ = samples.get("llama", layers=2)
    with pytest.raises(AdapterError, match="attnres_config.json") as info:
        ar.load_adapter(model, inputs, bad)
    assert message in str(info.value)


def _set(name, fn):
    return lambda w: {**w, name: fn(w[name])}


WEIGHT_EDITS = {
    "NaN": (_set("attnres.layers.query", lambda t: t.index_fill(0, torch.tensor([1]), float("nan"))), "NaN or inf"),
    "inf": (_set("attnres.layers.key_gain", lambda t: t.index_fill(1, torch.tensor([0]), float("inf"))), "NaN or inf"),
    "overflows the stream's float32": (
        _set("attnres.layers.query", lambda t: t.double().index_fill(0, torch.tensor([0]), 1e300)),
        "NaN or infinite values (in torch.float64 or in float32)",
    ),
    "integers": (_set("attnres.layers.query", lambda t: t.round().to(torch.int32)), "dtype torch.int32"),
    "booleans": (_set("attnres.layers.key_gain", lambda t: t > 0), "dtype torch.bool"),
    "one row short": (
        _set("attnres.layers.query", lambda t: t[:-1].contiguous()),
        "has shape (4, 48), the plan needs (5, 48)",
    ),
    "transposed": (_set("attnres.layers.query", lambda t: t.t().contiguous()), "has shape (48, 5)"),
    "missing": (lambda w: {"attnres.layers.query": w["attnres.layers.query"]}, "missing ['attnres.layers.key_gain']"),
    "renamed": (
        lambda w: {
            "attnres.layers.query": w["attnres.layers.query"],
            "layers.0.attn.qkv.weight": w["attnres.layers.key_gain"],
        },
        "unexpected ['layers.0.attn.qkv.weight']",
    ),
    "extra": (lambda w: {**w, "attnres.other.query": torch.zeros(2)}, "unexpected ['attnres.other.query']"),
}


@pytest.mark.parametrize("case", list(WEIGHT_EDITS))
def test_tampered_weights_are_refused_before_tracing(trained, tmp_path, no_trace, case):
    _, inputs, directory = trained
    edit, message = WEIGHT_EDITS[case]
    bad = tampered(directory, tmp_path / "bad", weights=edit)
    model, _ = samples.get("llama", layers=2)
    with pytest.raises(AdapterError, match="attnres.safetensors") as info:
        ar.load_adapter(model, inputs, bad)
    assert message in str(info.value)


def test_float64_weights_load_into_the_models_dtype(trained, tmp_path):
    """Any float dtype is a valid adapter: the values are cast to the converted model's parameters."""
    converted, inputs, directory = trained
    wide = tampered(directory, tmp_path / "f64", weights=lambda w: {k: v.to(torch.float64) for k, v in w.items()})
    loaded = ar.load_adapter(samples.get("llama", layers=2)[0], inputs, wide)
    assert loaded.attnres.layers.query.dtype == torch.float32
    torch.testing.assert_close(loaded.attnres.layers.query, converted.attnres.layers.query, rtol=0, atol=0)


def load_reusing_trace(traced, directory):
    """``load_adapter`` onto ``traced.model`` with its existing trace: a fresh module of the same program.

    That is what tracing the same model (``load_adapter`` traces its copy) again gives
    (``Captured.take_module``), for a fraction of the time; everything after the trace
    runs as in a real load.
    """
    import dataclasses

    from attnres_rewrite.passes import capture as capture_module

    def capture(model, example_inputs, **kwargs):
        assert type(model) is type(traced.model) and model is not traced.model  # the copy load_adapter converts
        return dataclasses.replace(
            traced, model=model, module=traced.program.module(), notes=list(traced.notes), _module_taken=False
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(capture_module, "capture", capture)
        return ar.load_adapter(traced.model, (*traced.args,), directory)


def test_a_feature_axis_or_kind_other_than_the_models_is_refused(trained, tmp_path):
    """A token stream aggregated as channel-first would permute the wrong axes: refuse, do not apply."""
    from attnres_rewrite.passes.capture import capture

    _, inputs, directory = trained
    traced = capture(samples.get("llama", layers=2)[0], inputs)
    assert load_reusing_trace(traced, directory).attnres.plan.streams[0].feature_axis == -1  # the helper loads
    channel_first = tampered(directory, tmp_path / "axis", config=_stream(lambda s: s.update(feature_axis=1)))
    with pytest.raises(AdapterError, match="features on axis -1 here, prenorm on axis 1 in the plan"):
        load_reusing_trace(traced, channel_first)
    additive = tampered(directory, tmp_path / "kind", config=_stream(lambda s: s.update(kind="additive")))
    with pytest.raises(AdapterError, match="a prenorm stream .* additive on axis -1 in the plan"):
        load_reusing_trace(traced, additive)
