"""Commands doing real work, in-process (CliRunner): JSON contents, written files, failure modes.

Conversions are the expensive part (a torch.export trace each), so one gpt2 adapter is
made per module and shared; the happy paths docs/cli.md shows are in test_cli_docs.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
from typer.testing import CliRunner

from attnres_rewrite.cli import common
from attnres_rewrite.cli.app import app

runner = CliRunner(env={"COLUMNS": "120", "NO_COLOR": "1"})


def invoke(*args: str):
    return runner.invoke(app, list(args))


def ok_json(result) -> dict:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """``attnres convert samples:gpt2 --json`` once: (adapter dir, stdout JSON)."""
    out = tmp_path_factory.mktemp("adapters") / "gpt2"
    payload = ok_json(invoke("convert", "samples:gpt2", "-o", str(out), "--blocks", "2", "--json"))
    return out, payload


def test_convert_writes_adapter_and_report(adapter):
    out, payload = adapter
    assert sorted(p.name for p in out.iterdir()) == ["attnres.safetensors", "attnres_config.json", "report.json"]
    assert json.loads((out / "report.json").read_text()) == payload
    assert payload["num_streams_converted"] == 1
    assert payload["num_blocks"] == 2
    assert payload["num_sublayers"] == sum(s["num_sublayers"] for s in payload["streams"])
    assert payload["params_added"] > 0
    assert 0 <= payload["max_rel_diff"] < 1e-3  # paper mode on a pre-norm stream: equal up to the norms' eps
    assert payload["max_abs_diff"] >= 0
    assert not list(out.parent.glob(".gpt2.*"))  # the temporary directory is gone
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, *out.iterdir()):  # the umask's usual modes, not mkdtemp's private 0700/0600
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_inspect_previews_the_partition_convert_writes(adapter):
    """inspect --blocks shows passes.plan.resolve_partition's split, the one convert used."""
    inspected = ok_json(invoke("inspect", "samples:gpt2", "--blocks", "2", "--json"))
    previews = {s["name"]: s["blocks"] for s in inspected["streams"] if s["convertible"]}
    assert previews == {s["name"]: s["blocks"] for s in adapter[1]["streams"]}


def test_convert_with_a_sampled_trace_says_so_and_matches_the_full_conversion(adapter, tmp_path):
    payload = ok_json(
        invoke(
            "convert", "samples:gpt2", "-o", str(tmp_path / "s"), "--blocks", "2", "--trace-depth", "sampled", "--json"
        )
    )
    assert any(n.startswith("sampled trace: traced layers 0, 1 and the last of h (4 layers)") for n in payload["notes"])
    assert not any("sampled" in n for n in adapter[1]["notes"])  # real weights: traced in full by default
    assert payload["streams"] == adapter[1]["streams"] and payload["params_added"] == adapter[1]["params_added"]
    assert payload["max_rel_diff"] < 1e-3
    bad = invoke("inspect", "samples:gpt2", "--trace-depth", "half")
    assert bad.exit_code == 2 and "half" in bad.stderr


def test_corrupted_adapter_is_a_user_error(adapter, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapter[0], broken)
    (broken / "attnres.safetensors").write_bytes(b"\x00garbage")
    result = invoke("verify", "samples:gpt2", "--adapter", str(broken))
    assert result.exit_code == 2, result.stderr
    assert "error:" in result.stderr and "safetensors" in result.stderr
    assert "Traceback" not in result.output
    (broken / "attnres_config.json").write_text("{not json")
    result = invoke("verify", "samples:gpt2", "--adapter", str(broken))
    assert result.exit_code == 2
    assert "attnres_config.json" in result.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda plan: plan["streams"][0].update(blocks=[[1, 2], [0, 1]]), "blocks: block 0 starts at 1, expected 0"),
        (lambda plan: plan["streams"][0].update(blocks=[[0, 2], [2, 9]]), "the blocks end at 9 but the stream has"),
        (lambda plan: plan["streams"][0].update(query="h.0.attn.c_attn.weight"), "query: must be 'attnres.h.query'"),
        (lambda plan: plan.clear(), "plan: missing field(s)"),
    ],
    ids=["reversed", "out-of-range", "query-renamed", "empty-plan"],
)
def test_a_tampered_adapter_is_refused_not_applied(adapter, tmp_path, edit, message):
    """A reversed or out-of-range partition used to be loaded and exported with exit code 0."""
    tampered = tmp_path / "tampered"
    shutil.copytree(adapter[0], tampered)
    config = json.loads((tampered / "attnres_config.json").read_text())
    edit(config["plan"])
    (tampered / "attnres_config.json").write_text(json.dumps(config))
    onnx_file = tmp_path / "m.onnx"
    for args in (["verify"], ["export", "-o", str(onnx_file)]):
        result = invoke(args[0], "samples:gpt2", "--adapter", str(tampered), *args[1:])
        assert result.exit_code == 2, (result.stderr, result.exception)
        assert message in result.stderr and "is not a valid AttnRes adapter config" in result.stderr
        assert "Traceback" not in result.output
    assert not onnx_file.exists()
    (tampered / "attnres_config.json").write_text("[1, 2]")  # valid JSON, not an object: was exit 3
    result = invoke("verify", "samples:gpt2", "--adapter", str(tampered))
    assert result.exit_code == 2 and "expected a JSON object, got list" in result.stderr


def test_verify_passes_then_fails_under_a_tighter_tolerance(adapter):
    payload = ok_json(invoke("verify", "samples:gpt2", "--adapter", str(adapter[0]), "--json"))
    assert payload["ok"] is True
    (check,) = payload["checks"]
    assert check["check"] == "adapter" and check["ok"]
    if check["max_abs_diff"] > 0:
        result = invoke("verify", "samples:gpt2", "--adapter", str(adapter[0]), "--rtol", "1e-12")
        assert result.exit_code == 1
        assert "verification failed: adapter" in result.stderr
        assert "FAILED" in result.stdout


def test_verify_onnx_checks_the_exported_file(adapter, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "gpt2.onnx"
    exported = ok_json(
        invoke("export", "samples:gpt2", "--adapter", str(adapter[0]), "-o", str(onnx_file), "--seed", "2", "--json")
    )
    verify = ["verify", "samples:gpt2", "--adapter", str(adapter[0]), "--onnx", str(onnx_file), "--seed", "2", "--json"]
    calls, real = [], common.check_adapter_dir
    monkeypatch.setattr(common, "check_adapter_dir", lambda directory: calls.append(directory) or real(directory))
    payload = ok_json(invoke(*verify))
    assert payload["ok"] is True
    assert calls == [adapter[0]]  # the adapter directory is checked once, not per check
    (check,) = [c for c in payload["checks"] if c["check"] == "onnx"]
    assert check["ok"] and check["providers"] == exported["providers"]
    # export's own check: same inputs, same figures, same default tolerances
    assert check["input_shapes"] == list(exported["verify_input_shapes"].values())
    assert (check["max_abs_diff"], check["max_rel_diff"]) == (exported["max_abs_diff"], exported["max_rel_diff"])
    assert (check["atol"], check["rtol"]) == (exported["atol"], exported["rtol"])
    max_abs = check["max_abs_diff"]
    if max_abs > 0:  # (the atol + rtol * max|torch| criterion per output: test_onnx_export's tolerance test)
        result = invoke(*verify, "--atol", repr(0.5 * max_abs), "--rtol", "0")
        assert result.exit_code == 1
        (check,) = [c for c in json.loads(result.stdout)["checks"] if c["check"] == "onnx"]
        assert not check["ok"] and check["failures"]
        assert "onnx: CPUExecutionProvider output" in result.stderr


def test_verify_onnx_refuses_a_foreign_or_broken_file(adapter, tmp_path, monkeypatch):
    """A file that is not ONNX, or an ONNX model with other inputs, is a user error (2), not a failed check.

    A file that is not ONNX at all is refused before MODEL loads (nothing to trace for it).
    """
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00not protobuf")
    with monkeypatch.context() as patch:
        patch.setattr(common, "load_model", lambda *a, **k: pytest.fail("MODEL loaded before the ONNX file was read"))
        for path, message in ((broken, "is not an ONNX model"), (tmp_path / "none.onnx", "no ONNX file")):
            result = invoke("verify", "samples:gpt2", "--adapter", str(adapter[0]), "--onnx", str(path))
            assert result.exit_code == 2 and message in result.stderr, result.stderr
    foreign = tmp_path / "foreign.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(foreign))
    result = invoke("verify", "samples:gpt2", "--adapter", str(adapter[0]), "--onnx", str(foreign))
    assert result.exit_code == 2, result.stderr
    assert "exported from another model?" in result.stderr and "Traceback" not in result.stderr


def test_bench_json_with_training_step_and_a_failing_compile(adapter, monkeypatch):
    """Compiling is stubbed (real compiles take minutes on CPU): the original "compiles" to
    itself, the converted model's compile fails, which must be reported in its row only."""
    from attnres_rewrite.cli.commands import benchmarking

    def fake_compile(model, converted):
        if converted:
            raise RuntimeError("simulated compile failure")
        return model

    monkeypatch.setattr(benchmarking, "_compile", fake_compile)
    modes = []
    real_train_step = benchmarking._train_step
    monkeypatch.setattr(
        benchmarking,
        "_train_step",
        lambda model, inputs: modes.append(model.training) or real_train_step(model, inputs),
    )
    args = ["bench", "samples:gpt2", "--adapter", str(adapter[0]), "--iters", "1", "--warmup", "0", "--train"]
    payload = ok_json(invoke(*args, "--json"))
    # the converted graph was traced in eval mode: the original's training step must not run dropout
    assert payload["module_mode"] == "eval" and modes == [False, False, False]  # eager x2, compiled original
    rows = {(r["model"], r["phase"], r["mode"]): r for r in payload["results"]}
    assert set(rows) == {
        (m, p, c) for m in ("original", "converted") for p in ("forward", "train") for c in ("eager", "compiled")
    }
    for (model, _, how), row in rows.items():
        if model == "converted" and how == "compiled":
            assert row["error"] == "RuntimeError: simulated compile failure" and "median_ms" not in row
        else:
            assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"]
    assert set(payload["overhead_pct"]) == {"forward_eager", "train_eager"}
    assert payload["params_converted"] > payload["params_original"]


def test_adapter_and_conversion_flags_conflict(adapter, tmp_path):
    result = invoke(
        "export", "samples:gpt2", "--adapter", str(adapter[0]), "--blocks", "2", "-o", str(tmp_path / "m.onnx")
    )
    assert result.exit_code == 2
    assert "--adapter carries its own conversion settings" in result.stderr


def test_unconvertible_model_is_a_user_error(tmp_path):
    result = invoke("convert", "samples:resnet", "-o", str(tmp_path / "r"))
    assert result.exit_code == 2, result.stderr
    assert "post-activation" in result.stderr
    assert not (tmp_path / "r").exists()  # nothing written on failure


def test_internal_errors_exit_3_with_a_hint(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(common, "convert", boom)
    result = invoke("convert", "samples:gpt2", "-o", str(tmp_path / "x"))
    assert result.exit_code == 3
    assert "internal error: RuntimeError: simulated bug" in result.stderr
    assert "--debug" in result.stderr and "Traceback" not in result.stderr
    result = invoke("convert", "samples:gpt2", "-o", str(tmp_path / "x"), "--debug")
    assert result.exit_code == 3
    assert "Traceback" in result.stderr


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A config-only Hugging Face directory (random weights, rebuilt identically from --seed)."""
    path = tmp_path_factory.mktemp("hf-llama")
    transformers.LlamaConfig(
        vocab_size=53,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)
    return path


def test_hf_directory_convert_then_verify_without_report(hf_dir, tmp_path):
    out = tmp_path / "hf-adapter"
    result = invoke("convert", str(hf_dir), "-o", str(out), "--seq-len", "8", "--mode", "exact", "--json")
    payload = ok_json(result)
    assert "random weights" in result.stderr
    assert payload["num_streams_converted"] >= 1
    assert payload["num_sublayers"] == 4  # 2 decoder layers x (attention, MLP)
    assert payload["mode"] == "exact"
    assert payload["max_rel_diff"] < 1e-4  # exact mode: equal to float rounding
    (out / "report.json").unlink()  # no recorded difference: the tolerance comes from the plan's mode
    verified = ok_json(invoke("verify", str(hf_dir), "--adapter", str(out), "--seq-len", "8", "--json"))
    assert verified["ok"] is True
    (check,) = verified["checks"]
    assert check["rtol"] == 1e-4  # exact mode's (paper mode's would be 1e-3)


def test_export_verification_mismatch_exits_1_not_2(monkeypatch, tmp_path):
    """A numeric mismatch is a failed check (1), not a user mistake (2); the numbers are shown."""
    from attnres_rewrite.errors import VerificationError

    def mismatching_export(*args, **kwargs):
        raise VerificationError("ONNX output differs from PyTorch beyond tolerance: logits max abs diff 0.5")

    monkeypatch.setattr(common.backend("onnx"), "export_onnx", mismatching_export)
    monkeypatch.setattr(common, "converted_model", lambda *args: None)  # the stub export needs no conversion
    result = invoke("export", "samples:gpt2", "-o", str(tmp_path / "m.onnx"), "--blocks", "2")
    assert result.exit_code == 1, result.stderr
    assert "verification failed: ONNX output differs from PyTorch beyond tolerance" in result.stderr
    assert "max abs diff 0.5" in result.stderr


def test_export_of_a_model_onnx_cannot_express_exits_1_not_2(monkeypatch, tmp_path):
    """A model the exporter cannot translate is "cannot do this" (1), not a user mistake (2)."""
    from attnres_rewrite.errors import NotExportableError

    def untranslatable_export(*args, **kwargs):
        raise NotExportableError("M is not exportable to ONNX because it calls the op x::y, which has no translation")

    monkeypatch.setattr(common.backend("onnx"), "export_onnx", untranslatable_export)
    result = invoke("export", "samples:gpt2", "-o", str(tmp_path / "m.onnx"), "--blocks", "2")
    assert result.exit_code == 1, result.stderr
    assert "error: M is not exportable to ONNX because it calls the op x::y" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--task", "bogus", "-o", "m.onnx"], "--task 'bogus' is not known"),
        (["--task", "text-generation-with-past", "-o", "m.onnx"], "writes a directory"),
        (["--task", "text-generation-with-past", "-o", "out", "--static"], "needs dynamic axes"),
        (["--task", "text2text-generation-with-past", "-o", "m.onnx"], "writes a directory (encoder_model.onnx"),
        (["--task", "text2text-generation-with-past", "-o", "out", "--static"], "needs dynamic axes"),
    ],
    ids=["unknown", "file", "static", "seq2seq-file", "seq2seq-static"],
)
def test_export_task_mistakes_exit_2_before_any_work(tmp_path, flags, message):
    flags = [str(tmp_path / f) if f in ("m.onnx", "out") else f for f in flags]
    result = invoke("export", "samples:gpt2", *flags)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_convert_whole_model_writes_a_directory_load_converted_reads(tmp_path):
    import torch

    import attnres_rewrite as ar
    from attnres_rewrite import samples

    out = tmp_path / "whole"
    payload = ok_json(invoke("convert", "samples:gpt2", "-o", str(out), "--blocks", "2", "--whole-model", "--json"))
    names = {p.name for p in out.iterdir()}
    assert names == {
        "attnres_config.json",
        "attnres.safetensors",
        "report.json",
        "model.safetensors",
        "attnres_model.json",
    }
    assert set(payload["files"]) == names
    model, inputs = samples.get("gpt2")
    loaded = ar.load_converted(out, model)
    adapted = ar.load_adapter(model, inputs, out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), adapted(*inputs), rtol=0, atol=0)
    # --force knows the whole-model files it wrote (listed in report.json), and nothing else
    (out / "notes.txt").write_text("mine")
    refused = invoke("convert", "samples:gpt2", "-o", str(out), "--blocks", "2", "--force")
    assert refused.exit_code == 2 and "holds notes.txt" in refused.stderr, refused.stderr
    (out / "notes.txt").unlink()
    again = ok_json(invoke("convert", "samples:gpt2", "-o", str(out), "--blocks", "3", "--force", "--json"))
    assert {p.name for p in out.iterdir()} == set(common.ADAPTER_FILES) | {"report.json"} == set(again["files"])


def test_ort_ops_writes_a_library_that_runs_every_attnres_op(tmp_path):
    """``attnres ort-ops``: the JSON names every op of the domain; the file registers with onnxruntime."""
    from attnres_rewrite.onnx import ort_ops
    from attnres_rewrite.onnx.function import FUNCTION_NAMES

    ort = pytest.importorskip("onnxruntime")
    if not ort_ops.available():
        pytest.skip(f"no op library: {ort_ops.unavailable_reason()}")
    dest = tmp_path / "lib" / "libattnres_ort.so"
    payload = ok_json(invoke("ort-ops", "-o", str(dest), "--json"))
    assert payload["library"] == str(dest) and payload["domain"] == "attnres"
    assert payload["ops"] == list(FUNCTION_NAMES) and len(FUNCTION_NAMES) == 4
    import numpy as np
    import torch
    from test_onnx_ort_ops import _inputs, _node_model, _reference, _rel, _run

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(dest))
    for name in FUNCTION_NAMES:  # a one-node model of each op, which only a registered kernel can run
        norm, partial = "RMSNorm" in name, "Partial" in name
        model = _node_model(norm_eps=1e-6 if norm else None, partial=partial)
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        sources, query, gain = _inputs(3, (4,), 16, torch.float32)
        got = _run(session, sources, query, gain, torch.ones(16) if norm else None, partial=partial)
        if not norm:
            assert _rel(got, _reference(sources, query, gain, 1e-6, 1.0)) <= 2e-6, name
        else:
            assert np.allclose(np.sqrt((got.astype(np.float64) ** 2).mean(-1)), 1.0, atol=1e-3), name
    again = invoke("ort-ops", "-o", str(dest))
    assert again.exit_code == 2 and "--force" in again.stderr
    assert invoke("ort-ops", "-o", str(dest), "--force", "--json").exit_code == 0
