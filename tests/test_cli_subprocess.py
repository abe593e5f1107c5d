"""Real `attnres` processes (the installed console script): convert, inspect and a user error.

(inspect runs on a Hugging Face directory with safetensors weights, convert on a sample.)

In-process tests cannot see what a shell sees: the entry point, the exit status, the
bytes on stdout vs stderr, a traceback escaping ``main()``. Each run pays the torch
import, so the commands share one adapter and run in a single test where they can.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}


def attnres(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the console script next to this interpreter (what `pip install` created), else `python -m`."""
    script = Path(sys.executable).with_name("attnres")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "attnres_rewrite.cli.app"]
    return subprocess.run(command + list(args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def json_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)  # stdout is exactly one JSON document


@pytest.mark.slow
def test_convert_and_inspect_in_real_processes(tmp_path):
    transformers = pytest.importorskip("transformers")
    proc = attnres("convert", "samples:gpt2", "-o", "out/gpt2", "--blocks", "2", "--json", cwd=tmp_path)
    convert = json_of(proc)
    assert "Converting residual streams" in proc.stderr  # progress goes to stderr, JSON alone to stdout
    assert convert["num_blocks"] == 2
    assert (tmp_path / "out/gpt2/attnres.safetensors").is_file()

    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    proc = attnres("inspect", "hf", "--seq-len", "8", "--json", cwd=tmp_path)
    inspect = json_of(proc)
    assert "weights from 1 safetensors file" in proc.stderr
    (stream,) = [s for s in inspect["streams"] if s["convertible"]]
    assert {"name", "kind", "convertible", "sublayers", "reason"} <= set(stream)
    assert stream["kind"] == "prenorm" and stream["num_sublayers"] == 4

    # verify, export and bench run in-process (test_cli_commands, test_cli_docs): same main(), no torch import each


def test_user_error_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    proc = attnres("convert", "samples:gpt2", "-o", "taken", "--json", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == "error: output directory 'taken' exists and is not empty; pass --force to replace it.\n"
