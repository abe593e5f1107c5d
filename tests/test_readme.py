"""The README's usage section cannot rot: its console and Python blocks run here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnres_rewrite.cli.app import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def test_first_two_commands_set_up_then_run_the_main_job_and_the_tests():
    """CI runs the second (`.ci/run` greps it); the first must convert a bundled sample."""
    commands = [line for block in _blocks("bash") for line in block.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) >= 2
    assert "attnres convert samples:" in commands[0]
    assert "pytest" in commands[1] and "dev" in commands[1]


def test_readme_console_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    commands = [line[2:] for block in _blocks("console") for line in block.splitlines() if line.startswith("$ ")]
    assert commands, "the README shows no attnres commands"
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "attnres"
        result = runner.invoke(app, words[1:])
        assert result.exit_code == 0, (command, result.stdout, result.stderr)
    assert (tmp_path / "out" / "gpt2" / "attnres.safetensors").is_file()
    assert (tmp_path / "out" / "gpt2.onnx").is_file()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_readme_python_usage_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (python,) = _blocks("python")[-1:]
    namespace: dict = {}
    exec(compile(python, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "out" / "llama.onnx").is_file()
    assert namespace["restored"].attnres.plan == namespace["converted"].attnres.plan


def test_relative_links_resolve_inside_the_repository():
    """The README once linked the math contract outside the repository (../shared/SPEC.md): dead in every clone."""
    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted(root.glob("benchmarks/*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            assert path.is_relative_to(root) and path.exists(), f"{page.relative_to(root)} links to {target}"
            checked += 1
    assert checked > 10
    assert "[docs/spec.md](docs/spec.md)" in README
