"""``--task text2text-generation-with-past``: an encoder-decoder LM in ONNX with its caches, greedy decoding in onnxruntime.

One tiny T5 (random weights saved as safetensors, nothing downloaded) is converted in
``exact`` mode and exported once for the module through the CLI (``convert``, then
``export --task text2text-generation-with-past --json``), so the files, the JSON report
and the Python helpers are all checked on the one export (the torch.export traces are
the cost). The references are independent of the files: the original model's
``generate`` and the converted model's own cache loop in PyTorch.
"""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
from test_cli_commands import invoke, ok_json

from attnres_rewrite.cli.commands import exporting, verifying
from attnres_rewrite.errors import ExportError, VerificationError
from attnres_rewrite.onnx import ort_ops, seq2seq
from attnres_rewrite.onnx.runtime import find_runtime

pytest.importorskip("onnxruntime")
T = pytest.importorskip("transformers")

LAYERS = 2
TASK = "text2text-generation-with-past"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A saved tiny T5 whose greedy tokens vary (untied head, larger init: the default init decodes pad only)."""
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=None, tie_word_embeddings=False, initializer_factor=4.0,
        architectures=["T5ForConditionalGeneration"],
    )  # fmt: skip
    path = tmp_path_factory.mktemp("t5")
    T.T5ForConditionalGeneration(cfg).save_pretrained(path)
    return path


def _other_onnx_model() -> bytes:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "other", [x], [x])
    return onnx.helper.make_model(graph).SerializeToString()


@pytest.fixture(scope="module")
def exported(t5_dir, tmp_path_factory):
    """``attnres convert`` (exact) then ``attnres export --task text2text-generation-with-past --force --json``, once.

    Into a directory that holds the user's notes and a stale ONNX model under one of the
    three names (one export serves the layout checks and the ``--force`` check: exports
    cost seconds).
    """
    root = tmp_path_factory.mktemp("seq2seq")
    adapter, out = root / "adapter", root / "onnx"
    out.mkdir()
    (out / "README.txt").write_text("my deployment notes")
    (out / "decoder_model.onnx").write_bytes(_other_onnx_model())
    ok_json(invoke("convert", str(t5_dir), "-o", str(adapter), "--mode", "exact", "--blocks", "2", "--json"))
    payload = ok_json(
        invoke("export", str(t5_dir), "--adapter", str(adapter), "-o", str(out), "--task", TASK, "--force", "--json")
    )
    return out, payload, adapter


@pytest.fixture(scope="module")
def models(t5_dir, exported):
    """(original, converted) in PyTorch: the saved weights, the converted one with the CLI's adapter."""
    import attnres_rewrite as ar

    original = T.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = {"input_ids": torch.randint(1, 64, (2, 7)), "decoder_input_ids": torch.randint(1, 64, (2, 5))}
        converted = ar.load_adapter(copy.deepcopy(original), inputs, exported[2]).eval()
    return original, converted


def _names(path) -> tuple[list[str], list[str], dict[str, list]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    return [i.name for i in graph.input], [o.name for o in graph.output], dims


def _kv(prefix: str, parts: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{i}.{part}.{kv}" for i in range(LAYERS) for part in parts for kv in ("key", "value")]


def test_files_have_optimums_layout_and_names(exported):
    """Also ``--force``: the three models are replaced (the stale one too), the user's file is left alone."""
    out, payload, _ = exported
    assert sorted(p.name for p in out.iterdir()) == sorted([*seq2seq.FILES, "README.txt"])  # no staging directory
    assert (out / "README.txt").read_text() == "my deployment notes"
    assert exporting.DIRECTORY_FILES[TASK] == seq2seq.FILES == verifying.SEQ2SEQ_FILES
    inputs, outputs, dims = _names(out / "encoder_model.onnx")
    assert (inputs, outputs) == (["input_ids", "attention_mask"], ["last_hidden_state"])
    assert dims["input_ids"] == ["batch_size", "encoder_sequence_length"]
    inputs, outputs, dims = _names(out / "decoder_model.onnx")
    assert inputs == ["input_ids", "encoder_attention_mask", "encoder_hidden_states"]
    assert outputs == ["logits", *_kv("present", ("decoder", "encoder"))]
    assert dims["input_ids"] == ["batch_size", "decoder_sequence_length"]
    inputs, outputs, dims = _names(out / "decoder_with_past_model.onnx")
    assert inputs == [
        "input_ids",
        "encoder_attention_mask",
        "encoder_hidden_states",
        *_kv("past_key_values", ("decoder", "encoder")),
    ]
    assert outputs == ["logits", *_kv("present", ("decoder",))]
    assert dims["past_key_values.0.decoder.key"] == ["batch_size", 4, "past_decoder_sequence_length", 8]
    assert dims["past_key_values.1.encoder.value"] == ["batch_size", 4, "encoder_sequence_length", 8]


def test_json_report_has_the_chain_check_with_reference_magnitudes(exported):
    out, payload, _ = exported
    assert payload["task"] == TASK and payload["onnx_dir"] == str(out.absolute())
    assert payload["layout"] == list(seq2seq.FILES) and payload["verified"] is True
    assert [f["onnx_path"] for f in payload["files"]] == [str(out.absolute() / n) for n in seq2seq.FILES]
    assert all(f["attnres_ops"] > 0 for f in payload["files"])  # encoder and decoder streams are both AttnRes
    encoder = payload["files"][0]
    assert encoder["verified"] and encoder["outputs"][0]["reference_max_abs"] > 0  # its own check on new shapes
    steps = payload["task_verification"]
    assert [s["file"] for s in steps] == list(seq2seq.FILES) + ["decoder_with_past_model.onnx"] * 2
    assert [s.get("past_length") for s in steps] == [None, 0, 3, 4, 5]  # decoder prompt of 3, then one token a step
    for s in steps:
        assert s["reference_max_abs"] > 0 and s["max_abs_diff"] <= 1e-4 * s["reference_max_abs"], s
    assert payload["max_abs_diff"] == max(s["worst_max_abs_diff"] for s in steps)


def test_chain_matches_its_model_and_fails_against_another(exported, models):
    out, *_ = exported
    _, converted = models
    paths = seq2seq.paths_in(out)
    same = seq2seq.verify_steps(paths, converted, steps=4, rtol=1e-4, atol=1e-6, seed=7)
    assert same["ok"], same["failures"]
    assert [s.get("past_length") for s in same["steps"]][-1] == 6
    other = copy.deepcopy(converted)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.01)
    with pytest.raises(VerificationError, match="decoder_model.onnx step 0 output 'logits'.*No file was written"):
        seq2seq._verify_chain(paths, other, find_runtime(), 1e-4, 1e-6, 1, 0)


def test_onnxruntime_greedy_tokens_equal_the_original_models_generate(exported, models):
    out, *_ = exported
    original, _ = models
    prompt = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[1, -3:] = 0  # a padded row: the encoder mask must reach the encoder and the cross-attention
    with torch.no_grad():
        want = original.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = seq2seq.generate_greedy(out, prompt.numpy(), 6, decoder_start_token_id=0, attention_mask=mask.numpy())
    assert want.shape == (2, 7) and len(set(want[:, 1:].flatten().tolist())) > 2  # not a degenerate constant
    np.testing.assert_array_equal(got, want.numpy())


def test_generation_check_passes_on_its_model_and_catches_another(exported, models):
    out, *_ = exported
    _, converted = models
    same = seq2seq.compare_generation(out, converted, max_new_tokens=5, seed=1)
    assert same["tokens_equal"] and same["first_difference"] is None and len(same["onnx_tokens"][0]) == 5
    other = copy.deepcopy(converted)
    with torch.no_grad():
        other.lm_head.weight.copy_(torch.randn_like(other.lm_head.weight))
    differs = seq2seq.compare_generation(out, other, max_new_tokens=5, seed=1)
    assert not differs["tokens_equal"] and differs["first_difference"] is not None


def test_cli_verify_checks_the_directory_and_greedy_tokens(exported, t5_dir):
    out, _, adapter = exported
    payload = ok_json(
        invoke("verify", str(t5_dir), "--adapter", str(adapter), "--onnx", str(out / "decoder_model.onnx"), "--json")
    )
    assert payload["ok"] and payload["onnx"] == str(out)  # a file of the directory names the directory
    check = payload["checks"][1]
    assert check["task"] == TASK and check["generation"]["tokens_equal"]
    assert check["max_abs_diff"] <= check["rtol"] * check["max_ref"]


def test_cli_refuses_an_existing_file_and_an_incomplete_directory(exported, t5_dir, tmp_path):
    out, _, adapter = exported
    result = invoke("export", str(t5_dir), "--adapter", str(adapter), "-o", str(out), "--task", TASK)
    assert result.exit_code == 2 and "encoder_model.onnx' exists; pass --force" in result.stderr
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "encoder_model.onnx").write_bytes((out / "encoder_model.onnx").read_bytes())
    result = invoke("verify", str(t5_dir), "--adapter", str(adapter), "--onnx", str(partial))
    assert result.exit_code == 2 and "not decoder_model.onnx, decoder_with_past_model.onnx" in result.stderr


def test_force_refuses_a_directory_whose_file_of_that_name_is_not_an_onnx_model(exported, t5_dir, tmp_path):
    """``--force`` replaces only ONNX models: a user's file under one of the three names stops the export before
    any work, and nothing in the directory is written or removed."""
    _, _, adapter = exported
    out = tmp_path / "mine"
    out.mkdir()
    notes = out / "decoder_with_past_model.onnx"
    notes.write_text("my notes, not a model")
    result = invoke("export", str(t5_dir), "--adapter", str(adapter), "-o", str(out), "--task", TASK, "--force")
    assert result.exit_code == 2, result.stderr
    assert "decoder_with_past_model.onnx" in result.stderr and "Converting" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["decoder_with_past_model.onnx"]
    assert notes.read_text() == "my notes, not a model"


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("llama", "is a decoder-only language model (config.is_encoder_decoder is false)"),
        ("bert", "is not an encoder-decoder model"),
        ("t5", "has no language-model head"),
    ],
)
def test_models_without_an_encoder_decoder_lm_are_refused(model, reason):
    import tiny_hf

    built, _ = getattr(tiny_hf, model)(1)
    with pytest.raises(ExportError, match=re.escape(f"is not exportable with --task {TASK} because it {reason}")):
        seq2seq.check_model(built)


def test_cli_refuses_a_decoder_only_model_with_exit_2_before_converting(tmp_path):
    directory = tmp_path / "llama"
    T.LlamaConfig(
        vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, architectures=["LlamaForCausalLM"],
    ).save_pretrained(directory)  # fmt: skip
    result = invoke("export", str(directory), "-o", str(tmp_path / "out"), "--task", TASK)
    assert result.exit_code == 2, result.stderr
    assert (
        "is a decoder-only language model" in result.stderr and "use --task text-generation-with-past" in result.stderr
    )
    assert "Converting" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_converted_mbart_exports_and_generates_like_the_original(tmp_path):
    """BART-style models take the same path (``encoder_outputs``, an ``EncoderDecoderCache``); mBART is pre-norm,
    so it converts (BART itself is post-norm), and starts decoding from BOS (no decoder_start_token_id).
    Exported as ``attnres.BlockAttnRes`` calls."""
    import attnres_rewrite as ar

    torch.manual_seed(0)
    cfg = T.MBartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        use_cache=False, eos_token_id=None, forced_eos_token_id=None,
    )  # fmt: skip
    original = T.MBartForConditionalGeneration(cfg).eval()
    inputs = {"input_ids": torch.randint(3, 64, (2, 7)), "decoder_input_ids": torch.randint(3, 64, (2, 5))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ar.convert(original, inputs, num_blocks=2, mode="exact")
    report = seq2seq.export_seq2seq_with_past(converted, tmp_path, as_function=True)
    assert report.verified and all(f.attnres_ops > 0 for f in report.files)
    if ort_ops.available():  # the function form: checked as its body and with the fused op library
        assert report.providers == ["CPUExecutionProvider", ort_ops.FUSED_CPU]
        assert {r["provider"] for r in report.task_verification} == set(report.providers)
    prompt = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = original.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    start = seq2seq.decoder_start_token(original)
    got = seq2seq.generate_greedy(tmp_path, prompt.numpy(), 5, decoder_start_token_id=start)
    np.testing.assert_array_equal(got, want.numpy())
