"""Where `convert -o` and `export -o` may write, and what --force may replace (nothing of the user's).

`--force` once deleted every file of the current directory (`-o . --force`) and a
model's own weights (`convert ./hf -o ./hf --force`); writing under a regular file, into
/proc or onto a full disk ended as "internal error" (exit 3). Every case here must exit
with 2 and a one-line reason, leave every existing file as it was, and be decided before
MODEL loads (the load is replaced by a failing stub where the check must come first).
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

import attnres_rewrite as ar
from attnres_rewrite import samples
from attnres_rewrite.adapter import CONFIG_NAME, WEIGHTS_NAME
from attnres_rewrite.cli import common, destination
from attnres_rewrite.cli.app import app
from attnres_rewrite.cli.sources import ResolvedModel
from attnres_rewrite.errors import OutputError

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def invoke(*args: str):
    return runner.invoke(app, list(args))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its bytes: what must survive a refused command."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and result.stdout == ""
    error = result.stderr.strip().splitlines()[-1]  # progress lines of finished steps may precede it
    assert error.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in error, result.stderr


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if MODEL is loaded: the output must be checked before any slow step."""

    def load_model(*args, **kwargs):
        raise AssertionError("MODEL was loaded before the output location was checked")

    monkeypatch.setattr(common, "load_model", load_model)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current directory holding the user's files, as in the original report."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "main.py").write_text("print('my code')\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lib.py").write_text("x = 1\n")
    return tmp_path


def make_adapter_dir(path: Path) -> Path:
    """What `attnres convert` leaves: the adapter files and report.json."""
    path.mkdir(parents=True)
    (path / CONFIG_NAME).write_text(json.dumps({"format": 1, "versions": {}, "plan": {}}))
    (path / WEIGHTS_NAME).write_bytes(b"weights")
    (path / destination.REPORT_NAME).write_text("{}")
    return path


@pytest.mark.parametrize(("output", "what"), [(".", "is the current directory"), ("..", "contains the current")])
def test_force_never_replaces_the_current_directory_or_a_parent(workdir, no_model_load, output, what):
    before = snapshot(workdir)
    refused(invoke("convert", "samples:llama", "-o", output, "--force"), f"-o '{output}' {what}")
    assert snapshot(workdir) == before


def test_force_never_replaces_home_or_root(workdir, no_model_load, monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    refused(invoke("convert", "samples:llama", "-o", str(home), "--force"), "is your home directory")
    refused(invoke("convert", "samples:llama", "-o", "/", "--force"), "is the root directory")


def test_force_never_replaces_the_input_model_directory(workdir, no_model_load):
    model = workdir / "hf_model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    before = snapshot(workdir)
    refused(invoke("convert", "hf_model", "-o", "hf_model", "--force"), "is the input model directory")
    refused(invoke("convert", "hf_model", "-o", "./hf_model/../hf_model", "--force"), "is the input model directory")
    (workdir / "models").mkdir()
    (model).rename(workdir / "models" / "hf_model")
    before = snapshot(workdir)
    refused(invoke("convert", "models/hf_model", "-o", "models", "--force"), "contains the input model directory")
    assert snapshot(workdir) == before


def test_force_replaces_only_what_convert_wrote(workdir, no_model_load):
    mine = workdir / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / CONFIG_NAME).write_text("{}")  # one of our names does not make the directory ours
    before = snapshot(workdir)
    refused(invoke("convert", "samples:llama", "-o", "mine", "--force"), "holds notes.txt", "choose another -o")
    refused(invoke("convert", "samples:llama", "-o", "mine"), "exists and is not empty; pass --force")
    (mine / "notes.txt").unlink()
    refused(invoke("convert", "samples:llama", "-o", "mine", "--force"), "written by `attnres convert`")
    (mine / "notes.txt").write_text("precious")
    assert snapshot(workdir) == before


def test_an_adapter_directory_or_an_empty_one_may_be_replaced(tmp_path):
    destination.check_directory(make_adapter_dir(tmp_path / "adapter"), force=True)
    (tmp_path / "empty").mkdir()
    destination.check_directory(tmp_path / "empty", force=False)
    destination.check_directory(tmp_path / "new" / "deeper", force=False)
    with pytest.raises(OutputError, match="not empty; pass --force"):
        destination.check_directory(tmp_path / "adapter", force=False)
    (tmp_path / "adapter" / "extra.bin").write_bytes(b"x")
    with pytest.raises(OutputError, match="holds extra.bin"):
        destination.check_directory(tmp_path / "adapter", force=True)


def test_symbolic_links_are_not_outputs(tmp_path):
    make_adapter_dir(tmp_path / "adapter")
    (tmp_path / "link").symlink_to(tmp_path / "adapter")
    with pytest.raises(OutputError, match="symbolic link"):
        destination.check_directory(tmp_path / "link", force=True)
    (tmp_path / "file.onnx").write_bytes(b"")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "file.onnx")
    with pytest.raises(OutputError, match="symbolic link"):
        destination.check_file(tmp_path / "link.onnx", force=True)


@pytest.mark.parametrize("command", ["convert", "export"])
def test_an_output_under_a_regular_file_is_a_user_error(workdir, no_model_load, command):
    (workdir / "README.md").write_text("readme")
    output = "README.md/sub" if command == "convert" else "README.md/sub.onnx"
    refused(invoke(command, "samples:llama", "-o", output), "README.md' is a file, not a directory")
    assert (workdir / "README.md").read_text() == "readme"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["convert", "export"])
def test_an_unwritable_output_is_a_user_error(no_model_load, command):
    refused(invoke(command, "samples:llama", "-o", "/proc/attnres-test/out.onnx"), "is not writable")


def test_export_to_a_directory_says_it_is_one(workdir, no_model_load):
    (workdir / "exports").mkdir()
    (workdir / "exports" / "old.onnx").write_bytes(b"x")
    refused(invoke("export", "samples:llama", "-o", "exports"), "is a directory; pass a file path such as")
    refused(invoke("export", "samples:llama", "-o", "src", "--force"), "is a directory")


def test_export_force_replaces_only_an_onnx_model_or_an_empty_file(workdir, no_model_load):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    before = snapshot(workdir)
    refused(invoke("export", "samples:llama", "-o", "main.py"), "exists; pass --force")
    refused(invoke("export", "samples:llama", "-o", "main.py", "--force"), "replaces only an ONNX model")
    assert snapshot(workdir) == before
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph), str(workdir / "old.onnx"))
    destination.check_file(workdir / "old.onnx", force=True)
    (workdir / "empty.onnx").write_bytes(b"")
    destination.check_file(workdir / "empty.onnx", force=True)


@pytest.fixture(scope="module")
def tiny():
    """A one-layer llama and its conversion, made once: the write step is what these tests exercise."""
    model, inputs = samples.get("llama", layers=1)
    return model, inputs, ar.convert(model, inputs, num_blocks=1)


@pytest.fixture
def cheap_convert(tiny, monkeypatch):
    """`attnres convert` on the tiny model without tracing it again."""
    model, inputs, converted = tiny
    monkeypatch.setattr(common, "load_model", lambda *a, **k: ResolvedModel("samples:llama", "sample", model, inputs))
    monkeypatch.setattr(common, "convert", lambda resolved, options: converted)


@contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG, as on a full disk (SIGXFSZ ignored, limits restored)."""
    resource = pytest.importorskip("resource")  # POSIX only
    old_limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limits)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_full_disk_during_convert_is_a_user_error_and_leaves_the_old_adapter(tmp_path, cheap_convert):
    out = tmp_path / "adapter"
    assert invoke("convert", "samples:llama", "-o", str(out)).exit_code == 0
    before = snapshot(tmp_path)
    with file_size_limit(256):  # the weights file is larger: safetensors reports the OS error its own way
        result = invoke("convert", "samples:llama", "-o", str(out), "--force")
    refused(result, f"writing '{out}' failed: File too large; free some space or choose another -o")
    assert snapshot(tmp_path) == before  # no temporary directory, the previous adapter intact


def test_a_failing_report_write_is_a_user_error_too(tmp_path, cheap_convert, monkeypatch):
    import errno

    real_write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == destination.REPORT_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    result = invoke("convert", "samples:llama", "-o", str(tmp_path / "adapter"))
    refused(result, "No space left on device; free some space or choose another -o")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_filled_while_converting_is_not_replaced(tmp_path, tiny, monkeypatch):
    """The check runs again just before writing: files that appeared during the conversion are kept."""
    model, inputs, converted = tiny
    out = tmp_path / "out"
    monkeypatch.setattr(common, "load_model", lambda *a, **k: ResolvedModel("samples:llama", "sample", model, inputs))

    def convert_while_someone_writes(resolved, options):
        out.mkdir()
        (out / "theirs.txt").write_text("written meanwhile")
        return converted

    monkeypatch.setattr(common, "convert", convert_while_someone_writes)
    refused(invoke("convert", "samples:llama", "-o", str(out), "--force"), "holds theirs.txt")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
