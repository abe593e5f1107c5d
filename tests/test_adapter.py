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
    assert plan == converted.attnres_plan
    weights = load_file(directory / WEIGHTS_NAME)
    assert set(weights) == {"attnres.layers.query", "attnres.layers.key_gain"}  # only the new parameters
    torch.testing.assert_close(weights["attnres.layers.query"], converted.attnres.layers.query.detach())


def test_round_trip_on_fresh_model(trained):
    converted, inputs, directory = trained
    fresh, _ = samples.get("llama", layers=2)  # same seed -> same base weights
    loaded = ar.load_adapter(fresh, inputs, directory)
    assert loaded.attnres_plan == converted.attnres_plan
    ids = torch.randint(0, 97, (3, 9))
    torch.testing.assert_close(loaded(ids), converted(ids), rtol=0, atol=0)


def test_different_depth_fails_naming_the_mismatch(trained):
    _, inputs, directory = trained
    deeper, _ = samples.get("llama", layers=3)
    with pytest.raises(AdapterError, match=r"4 sublayers but the model has 6.*different depth"):
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
    plan = converted.attnres_plan
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
