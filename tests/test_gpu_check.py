"""benchmarks/gpu_check.py --dry-run: the GPU script's steps run on CPU (tiny shapes), so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    # kernel_tests only collects the test files in a dry run, which this suite does anyway
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--skip", "kernel_tests", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["dry_run"] and data["finished"]
    steps = data["steps"]
    assert set(steps) == {"environment", "correctness", "bandwidth", "two_phase", "d7168", "done"}
    assert not [name for name, step in steps.items() if "error" in step], steps
    assert all(shape["ok"] for shape in steps["correctness"]["shapes"])
    assert all("triton" in shape["variants"] for shape in steps["bandwidth"]["shapes"])
    assert all("two_phase_fwd_ms" in shape for shape in steps["two_phase"]["shapes"])
    assert steps["d7168"]["returncode"] == 0 and steps["d7168"]["correctness"]["ok"]
    assert "gpu_check.py" in (ROOT / "benchmarks" / "gpu_check.sh").read_text()
