"""The `attnres` app in-process (typer CliRunner): flags, errors and exit codes, config files.

Commands that do real work (convert, export, verify, bench) are in test_cli_commands.py;
real subprocess runs in test_cli_subprocess.py and test_cli_docs.py.
"""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from attnres_rewrite import __version__
from attnres_rewrite.cli.app import app

runner = CliRunner()


def invoke(*args: str, **kwargs):
    return runner.invoke(app, list(args), **kwargs)


def flat(text: str) -> str:
    """Click's usage errors come in a box that wraps lines: compare the words only."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def assert_user_error(result, *fragments: str) -> None:
    """Exit code 2, no traceback, the reason on stderr, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"attnres {__version__} (torch ")


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("inspect", "convert", "export", "verify", "bench"):
        assert command in result.stdout


def test_no_arguments_shows_help():
    result = invoke()
    assert "Usage" in result.output
    assert "convert" in result.output


def test_unknown_command_and_flag_are_usage_errors():
    assert invoke("transmogrify").exit_code == 2
    result = invoke("inspect", "samples:llama", "--no-such-flag")
    assert result.exit_code == 2
    assert "No such option" in result.stderr


def test_bad_flag_value_is_a_usage_error():
    result = invoke("convert", "samples:llama", "-o", "x", "--blocks", "0")
    assert result.exit_code == 2
    assert "--blocks" in result.stderr
    result = invoke("convert", "samples:llama", "-o", "x", "--mode", "fancy")
    assert result.exit_code == 2
    assert "fancy" in result.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("samples:nope", "unknown sample 'nope'"),
        ("does/not/exist/", "no such directory"),
        ("org/model", "never downloads"),
        ("gopher:thing-x", "unknown MODEL scheme"),
    ],
)
def test_bad_model_is_one_line_exit_2(model, message):
    result = invoke("inspect", model)
    assert_user_error(result, message)
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line


def test_bad_model_with_json_keeps_stdout_empty():
    result = invoke("inspect", "samples:nope", "--json")
    assert_user_error(result, "unknown sample")


def test_debug_shows_the_traceback_with_the_same_exit_code():
    result = invoke("inspect", "samples:nope", "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert "ModelSourceError" in result.stderr
    assert invoke("--debug", "inspect", "samples:nope").stderr.count("Traceback") == 1


def test_conflicting_block_flags(tmp_path):
    result = invoke("convert", "samples:llama", "-o", str(tmp_path / "out"), "--blocks", "2", "--full")
    assert_user_error(result, "--blocks and --full are alternatives")


def test_convert_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    result = invoke("convert", "samples:llama", "-o", str(tmp_path))
    assert_user_error(result, "exists and is not empty", "--force")
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_export_refuses_an_existing_file(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"x")
    assert_user_error(invoke("export", "samples:llama", "-o", str(target)), "exists", "--force")


def test_verify_needs_an_adapter_directory(tmp_path):
    assert_user_error(invoke("verify", "samples:llama", "--adapter", str(tmp_path / "none")), "no adapter directory")
    assert_user_error(invoke("verify", "samples:llama", "--adapter", str(tmp_path)), "is not an attnres adapter")


def test_adapter_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    from attnres_rewrite.cli import common

    def no_model(*args, **kwargs):
        raise AssertionError("MODEL was loaded before --adapter was checked")

    monkeypatch.setattr(common, "load_model", no_model)
    missing = str(tmp_path / "none")
    for command in (["verify"], ["export", "-o", str(tmp_path / "m.onnx")], ["bench", "--no-compile"]):
        result = invoke(command[0], "samples:llama", *command[1:], "--adapter", missing)
        assert_user_error(result, "no adapter directory")
    result = invoke("bench", "samples:llama", "--adapter", str(tmp_path), "--blocks", "2")
    assert_user_error(result, "--adapter carries its own conversion settings")


def test_config_file_unknown_option_is_a_usage_error(tmp_path):
    cfg = tmp_path / "attnres.toml"
    cfg.write_text("[convert]\nblokcs = 4\n")
    result = invoke("--config", str(cfg), "inspect", "samples:nope")
    assert result.exit_code == 2
    assert "blokcs" in result.stderr


def test_config_file_unknown_table_and_bad_toml(tmp_path):
    cfg = tmp_path / "attnres.toml"
    cfg.write_text("[convrt]\nblocks = 4\n")
    assert "convrt" in invoke("--config", str(cfg), "inspect", "x").stderr
    cfg.write_text("blocks = \n")
    assert invoke("--config", str(cfg), "inspect", "x").exit_code == 2
    assert invoke("--config", str(tmp_path / "missing.toml"), "inspect", "x").exit_code == 2


def test_config_file_values_are_validated_like_flags(tmp_path):
    cfg = tmp_path / "attnres.toml"
    cfg.write_text('[convert]\nmode = "fancy"\n')
    result = invoke("--config", str(cfg), "convert", "samples:llama", "-o", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "fancy" in result.stderr


def test_config_defaults_reach_the_command(tmp_path):
    """A [convert] default that conflicts with a flag proves the default was applied."""
    cfg = tmp_path / "attnres.toml"
    cfg.write_text("[convert]\nblocks = 2\n")
    result = invoke("--config", str(cfg), "convert", "samples:llama", "-o", str(tmp_path / "o"), "--full")
    assert_user_error(result, "--blocks and --full are alternatives")


def test_atomic_directory_replaces_on_success_and_keeps_the_old_one_on_error(tmp_path):
    from attnres_rewrite.fileio import atomic_directory

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_bundled_samples_do_not_collide_with_a_users_samples_package(tmp_path, monkeypatch):
    """A user's own ``samples`` package on sys.path used to shadow ours (exit 3: no attribute SAMPLES)."""
    import importlib
    import sys

    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "__init__.py").write_text("MINE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "samples", raising=False)
    assert_user_error(invoke("inspect", "samples:nope"), "unknown sample 'nope'; available: bert, gpt2, llama")
    assert importlib.import_module("samples").MINE  # theirs is still theirs


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def build(:\n", "raised SyntaxError: invalid syntax"),
        ("x = undefined_name\n", "raised NameError: name 'undefined_name' is not defined"),
        ("import no_such_dependency_xyz\n", "it imports 'no_such_dependency_xyz', which is not installed"),
        ("raise SystemExit(3)\n", "raised SystemExit: 3"),
    ],
)
def test_a_factory_module_that_fails_to_import_is_a_user_error(tmp_path, monkeypatch, source, message):
    import sys

    name = f"broken_factory_{abs(hash(source))}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    result = invoke("inspect", f"{name}:build")
    assert_user_error(result, f"importing '{name}' for MODEL '{name}:build'", message)
    assert result.stderr.strip().count("\n") == 0, result.stderr


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
@pytest.mark.parametrize("flag", ["--rtol", "--atol"])
def test_verify_refuses_a_tolerance_that_could_never_pass(tmp_path, flag, value):
    result = invoke("verify", "samples:llama", "--adapter", str(tmp_path), flag, value)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "not a tolerance; pass a finite number >= 0" in flat(result.stderr)


@pytest.mark.parametrize("value", ["0", "-1e-6", "inf", "nan"])
def test_eps_must_be_positive_and_finite(tmp_path, value):
    result = invoke("convert", "samples:llama", "-o", str(tmp_path / "o"), "--eps", value)
    assert_user_error(result, "--eps must be a positive finite number")


def test_hint_for_a_hub_id_names_the_current_hf_client():
    result = invoke("inspect", "org/model")
    assert_user_error(result, "`hf download org/model --local-dir DIR`")


def test_block_size_beyond_the_sublayers_is_refused_like_blocks(tmp_path, monkeypatch):
    """It used to be capped silently, while --blocks beyond the sublayer count was refused."""
    from attnres_rewrite import samples
    from attnres_rewrite.cli import common
    from attnres_rewrite.cli.sources import ResolvedModel

    one_layer = ResolvedModel("samples:llama", "sample", *samples.get("llama", layers=1))  # 2 sublayers, cheap trace
    monkeypatch.setattr(common, "load_model", lambda *args, **kwargs: one_layer)
    result = invoke("convert", "samples:llama", "-o", str(tmp_path / "o"), "--block-size", "100")
    assert_user_error(result, "block_size=100 is out of range for stream 'layers'", "between 1 and 2")
    assert not (tmp_path / "o").exists()
