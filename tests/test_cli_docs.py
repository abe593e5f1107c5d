"""docs/cli.md cannot rot: every `$ attnres ...` line of its ```console blocks runs here.

The commands run in order, in one scratch directory (later examples use the adapter
written by earlier ones), in-process through typer's CliRunner: the same app the
console script runs, without paying the torch import per command (real subprocess runs
of every command are in test_cli_subprocess.py). A command
whose shown output contains an ``error: ...`` line must exit with code 2 and print that
line; every other command must exit 0. ``--json`` commands must print one JSON document
with the fields the docs promise. ```toml file=NAME blocks are written to NAME first.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnres_rewrite.cli.app import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)

JSON_KEYS = {
    "inspect": {"report_format", "streams", "static_axes"},
    "convert": {
        "report_format",
        "num_streams_converted",
        "num_sublayers",
        "num_blocks",
        "streams",
        "params_added",
        "max_abs_diff",
        "max_rel_diff",
        "max_ref",
        "check_passed",
    },
    "export": {"onnx_path", "opset", "max_abs_diff", "max_rel_diff", "providers"},
    "verify": {"ok", "checks"},
    "bench": {"results", "overhead_pct"},
}


def doc_steps(text: str) -> list[tuple[str, str, list[str]]]:
    """``("file", name, [content])`` and ``("run", command, shown_output_lines)`` in document order."""
    steps: list[tuple[str, str, list[str]]] = []
    for info, body in FENCE.findall(text):
        words = info.split()
        if words and words[0] == "toml" and any(w.startswith("file=") for w in words):
            name = next(w for w in words if w.startswith("file="))[len("file=") :]
            steps.append(("file", name, [body]))
        elif words and words[0] == "console":
            for line in body.splitlines():
                if line.startswith("$ "):
                    steps.append(("run", line[2:], []))
                elif steps and steps[-1][0] == "run":
                    steps[-1][2].append(line)
    return steps


def test_doc_has_an_example_of_every_command():
    commands = {shlex.split(cmd)[1] for kind, cmd, _ in doc_steps(DOC.read_text()) if kind == "run"}
    assert {"inspect", "convert", "verify", "export", "ort-ops", "bench"} <= commands


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner(env={"COLUMNS": "120", "NO_COLOR": "1"})
    for kind, text, extra in doc_steps(DOC.read_text()):
        if kind == "file":
            (tmp_path / text).write_text(extra[0])
            continue
        args = shlex.split(text)
        assert args[0] == "attnres", text
        result = runner.invoke(app, args[1:])
        errors = [line for line in extra if line.startswith("error: ")]
        context = f"$ {text}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}\n{result.exception!r}"
        assert "Traceback" not in result.stderr, context
        if errors:
            assert result.exit_code == 2, context
            for line in errors:
                assert line in result.stderr, context
            continue
        assert result.exit_code == 0, context
        if "--json" in args:
            payload = json.loads(result.stdout)
            command = next(a for a in args[1:] if a in JSON_KEYS)
            missing = JSON_KEYS[command] - set(payload)
            assert not missing, context
