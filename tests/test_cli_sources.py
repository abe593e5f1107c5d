"""MODEL resolution (attnres_rewrite.cli.sources / hf): every scheme, and every user mistake
turning into a ModelSourceError whose message names the fix (the CLI maps it to exit 2)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from attnres_rewrite.cli.sources import resolve
from attnres_rewrite.errors import ModelSourceError

transformers = pytest.importorskip("transformers")


def tiny_llama_config():
    return transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        architectures=["LlamaForCausalLM"],
    )


@pytest.fixture(scope="module")
def hf_config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-config")
    tiny_llama_config().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_weights_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-weights")
    torch.manual_seed(123)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path


def test_sample_resolves_with_sizes():
    resolved = resolve("samples:llama", batch=3, seq_len=5)
    assert resolved.kind == "sample"
    (ids,) = resolved.example_inputs
    assert ids.shape == (3, 5)
    assert not resolved.model.training


def test_unknown_sample_lists_the_valid_names():
    with pytest.raises(ModelSourceError, match=r"unknown sample 'nope'.*llama"):
        resolve("samples:nope")


def test_seq_len_on_a_vision_sample_is_a_user_error():
    with pytest.raises(ModelSourceError, match="no sequence axis"):
        resolve("samples:vit", seq_len=4)


def test_hf_config_dir_builds_random_weights_deterministically(hf_config_dir):
    first = resolve(str(hf_config_dir), batch=2, seq_len=6)
    second = resolve(str(hf_config_dir), batch=2, seq_len=6)
    assert type(first.model).__name__ == "LlamaForCausalLM"
    assert first.example_inputs["input_ids"].shape == (2, 6)
    assert int(first.example_inputs["input_ids"].max()) < 61
    assert "random weights" in first.note
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_hf_weights_are_loaded_from_safetensors(hf_weights_dir):
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_weights_dir)
    resolved = resolve(str(hf_weights_dir))
    assert "safetensors" in resolved.note
    got = resolved.model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("bert", {"input_ids"}),
        ("t5", {"input_ids", "decoder_input_ids"}),
        ("vit", {"pixel_values"}),
        ("whisper", {"input_features", "decoder_input_ids"}),
    ],
)
def test_example_inputs_per_model_family(tmp_path, config, expected):
    configs = {
        "bert": lambda: transformers.BertConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        ),
        "t5": lambda: transformers.T5Config(
            vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, architectures=["T5Model"]
        ),
        "vit": lambda: transformers.ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        "whisper": lambda: transformers.WhisperConfig(
            vocab_size=50,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            architectures=["WhisperModel"],
        ),
    }
    configs[config]().save_pretrained(tmp_path)
    resolved = resolve(str(tmp_path), seq_len=4)
    assert set(resolved.example_inputs) == expected


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve(str(tmp_path))


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-arch"}')
    with pytest.raises(ModelSourceError, match="cannot load"):
        resolve(str(tmp_path))


def test_remote_code_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "custom", "auto_map": {"AutoConfig": "modeling.Cfg"}}')
    (tmp_path / "modeling.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelSourceError, match="cannot load"):
        resolve(str(tmp_path))


def test_pickled_weights_are_refused(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelSourceError, match="safetensors"):
        resolve(str(tmp_path))


def sharded_copy(source, target, *, odd_shard: str | None = None, everything: bool = False):
    """``source`` as one shard plus its ``model.safetensors.index.json``; ``odd_shard`` takes one tensor (or all)."""
    import json
    import shutil

    shutil.copytree(source, target)
    (target / "model.safetensors").rename(target / "model-00001-of-00001.safetensors")
    names = list(transformers.LlamaForCausalLM.from_pretrained(source).state_dict())
    weight_map = dict.fromkeys(names, "model-00001-of-00001.safetensors")
    if odd_shard is not None:
        weight_map.update({name: odd_shard for name in (names if everything else ["model.norm.weight"])})
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


@pytest.mark.parametrize(
    ("shard", "everything", "message"),
    [
        ("pytorch_model-00001-of-00001.bin", True, "points at 'pytorch_model-00001-of-00001.bin'; attnres loads only"),
        ("pytorch_model-00001-of-00001.bin", False, "points at 'pytorch_model-00001-of-00001.bin'"),
        ("../model.safetensors", False, "points at '../model.safetensors'"),
        ("model-00002-of-00002.safetensors", False, "lists 'model-00002-of-00002.safetensors', which is not in"),
    ],
)
def test_a_shard_index_pointing_outside_safetensors_is_refused_before_transformers_reads_it(
    hf_weights_dir, tmp_path, monkeypatch, shard, everything, message
):
    """transformers follows model.safetensors.index.json to any file, and a .bin shard reaches torch.load."""
    model_dir = sharded_copy(hf_weights_dir, tmp_path / "model", odd_shard=shard, everything=everything)
    state = transformers.LlamaForCausalLM.from_pretrained(hf_weights_dir).state_dict()
    torch.save(state, model_dir / "pytorch_model-00001-of-00001.bin")  # a pickle, as transformers would unpickle it
    (tmp_path / "model.safetensors").write_bytes((model_dir / "model-00001-of-00001.safetensors").read_bytes())

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelSourceError, match="model.safetensors.index.json") as info:
        resolve(str(model_dir))
    assert message in str(info.value)


def test_sharded_safetensors_load_and_other_indexes_are_ignored(hf_weights_dir, tmp_path):
    """Only *.safetensors.index.json is read with use_safetensors; a directory also shipping .bin files loads."""
    import json

    model_dir = sharded_copy(hf_weights_dir, tmp_path / "model")
    (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "pytorch_model.bin"}}))
    (model_dir / "pytorch_model.bin").write_bytes(b"never read")
    resolved = resolve(str(model_dir))
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_weights_dir).state_dict()
    assert all(torch.equal(resolved.model.state_dict()[k], v) for k, v in reference.items())


def test_seq_len_beyond_positions(hf_config_dir):
    with pytest.raises(ModelSourceError, match="--seq-len 65 exceeds"):
        resolve(str(hf_config_dir), seq_len=65)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no/such/dir/", "no such directory"),
        ("someorg/somemodel", "never downloads"),
        ("hf-hub:x", "unknown MODEL scheme"),
        ("nosuchmodule_xyz:build", "cannot import module"),
    ],
)
def test_unresolvable_specs(spec, message):
    with pytest.raises(ModelSourceError, match=message):
        resolve(spec)


def test_file_is_not_a_model(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve(str(path))


FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def pair():
        return nn.Linear(4, 4), (torch.randn(2, 4),)

    def bare():
        return nn.Linear(4, 4)

    def broken():
        raise RuntimeError("boom")

    def wrong():
        return 42

    not_callable = 3
    """
)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "cli_factories_mod.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cli_factories_mod"


def test_factory_pair(factories):
    resolved = resolve(f"{factories}:pair")
    assert resolved.kind == "factory"
    assert isinstance(resolved.model, torch.nn.Linear)
    assert resolved.example_inputs[0].shape == (2, 4)


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("bare", "without example inputs"),
        ("broken", "raised RuntimeError: boom"),
        ("wrong", "returned int"),
        ("not_callable", "not a factory"),
        ("missing", "has no attribute"),
    ],
)
def test_factory_mistakes(factories, attr, message):
    with pytest.raises(ModelSourceError, match=message):
        resolve(f"{factories}:{attr}")


def test_factory_returning_a_transformers_model_gets_inputs_from_its_config(factories, tmp_path, hf_config_dir):
    (tmp_path / "cli_hf_factory_mod.py").write_text(
        "import transformers\n"
        "def build():\n"
        f"    return transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained({str(hf_config_dir)!r}))\n"
    )
    resolved = resolve("cli_hf_factory_mod:build", seq_len=3)
    assert resolved.example_inputs["input_ids"].shape == (2, 3)
