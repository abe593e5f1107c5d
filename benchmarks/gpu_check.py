"""One-shot GPU check of the Triton kernels: tests, correctness and speed at real size, in < 8 minutes.

For a machine with torch, Triton and a CUDA GPU preinstalled and no internet (run it
from the repository root; ``benchmarks/gpu_check.sh`` is the one-line entry)::

    python benchmarks/gpu_check.py                    # writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --dry-run          # CPU only: every step on tiny shapes (CI runs this)

Steps, each recorded in the JSON as soon as it finishes (a crash or a timeout keeps
what came before):

1. ``environment``: GPU, torch, Triton, CUDA, SM count, nominal HBM peak;
2. ``kernel_tests``: ``pytest tests/test_triton_kernels.py tests/test_sm90_static.py``
   on the GPU (subprocess, 240 s timeout);
3. ``correctness``: Triton against the PyTorch kernels (fp32 statistics) at T = 16384,
   d in {2048, 4096}, K = 9, bf16: forward and every gradient, max relative error;
4. ``bandwidth``: forward and forward + backward at those shapes, GB/s and % of peak
   (``benchmarks/kernels.py`` minimum-traffic formula), next to ``torch.compile`` of the
   PyTorch forward (Inductor, backward by AOTAutograd) as the baseline;
5. ``two_phase``: a block of S = 8 sublayers, one phase 1 + 8 phase 2 vs 8 single calls;
6. ``d7168``: correctness and forward bandwidth at d = 7168 in a subprocess with a
   timeout (the shape that took Triton 3.6 minutes to compile before the tiles changed).

Targets (benchmarks/README.md): forward >= 85% of HBM peak at T >= 16K, d >= 2048;
two-phase block >= 1.5x 8 separate calls; fwd+bwd >= 2x ``torch.compile`` of the
reference. ``--dry-run`` sets ``TRITON_INTERPRET=1`` and runs the same code on CPU with
T = 64, d in {64, 72}, K = 3 (the kernel tests are only collected, the compile baseline
is skipped), so the script is exercised by the test suite and cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
EPS = 1e-6


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU only, tiny shapes (what CI runs)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dims", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--sources", type=int, default=9)
    ap.add_argument("--skip", nargs="*", default=[], help="steps to skip")
    ap.add_argument("--one-shape", help="internal: run one correctness+bandwidth shape D (subprocess)")
    return ap.parse_args(argv)


ARGS = _args(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402


class Report:
    """The JSON, rewritten after every step."""

    def __init__(self, path: Path, dry_run: bool):
        self.path, self.data = path, {"benchmark": "gpu_check", "dry_run": dry_run, "steps": {}}

    def step(self, name: str, result: dict, seconds: float) -> None:
        self.data["steps"][name] = {"seconds": round(seconds, 2), **result}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        print(f"[gpu_check] {name}: {seconds:.1f}s {json.dumps(result, default=str)[:300]}", flush=True)


def _rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.detach().float(), e.detach().float()
    scale = e.abs().max().clamp_min(1e-30)
    return ((a - e).abs() / (e.abs() + scale)).max().item()


def environment(device: str) -> dict:
    import kernels as KB

    info = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda)
        info["capability"] = list(torch.cuda.get_device_capability())
    info["peak_GBps"], info["peak_source"] = KB._peak(device)
    return info


def kernel_tests(dry_run: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_triton_kernels.py", "tests/test_sm90_static.py"]
    if dry_run:
        cmd.append("--collect-only")
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        return {"ok": False, "timed_out": True, "tail": (exc.stdout or b"")[-2000:].decode(errors="replace")}
    return {"ok": done.returncode == 0, "returncode": done.returncode, "tail": done.stdout[-1500:]}


def _inputs(t: int, d: int, k: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    srcs = [(torch.randn(t, d, generator=gen) * (0.5 + i % 4)).to(device, dtype) for i in range(k)]
    q = (torch.randn(d, generator=gen) * 2 / d**0.5).to(device)
    g = (1 + 0.3 * torch.randn(d, generator=gen)).to(device)
    go = torch.randn(t, d, generator=gen).to(device, dtype)
    return srcs, q, g, go


def correctness(t: int, d: int, k: int, dtype: torch.dtype, device: str) -> dict:
    """Triton launchers against the PyTorch kernels (fp32 statistics, independent code)."""
    from attnres_rewrite.kernels import torch_kernels as K
    from attnres_rewrite.kernels import triton_attnres as TA

    srcs, q, g, go = _inputs(t, d, k, dtype, device)
    errs = {"forward": _rel_err(TA.attnres_forward(srcs, q, g, EPS, 1.0), K.attnres_forward(srcs, q, g, EPS, 1.0))}
    got, want = TA.attnres_backward(go, srcs, q, g, EPS, 1.0), K.attnres_backward(go, srcs, q, g, EPS, 1.0)
    errs["grad_sources"] = max(_rel_err(a, e) for a, e in zip(got[0], want[0]))
    errs["grad_query"] = _rel_err(got[1], want[1])
    errs["grad_key_gain"] = _rel_err(got[2], want[2])
    qs, gs = q.expand(8, d).contiguous(), g.expand(8, d).contiguous()
    o, m, l = TA.phase1_forward(srcs, qs, gs, EPS)  # noqa: E741
    ro, rm, rl = K.phase1_forward(srcs, qs, gs, EPS)
    errs["phase1_o"], errs["phase1_l"] = _rel_err(o, ro), _rel_err(l, rl)
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    return {"tokens": t, "d": d, "sources": k, "errors": errs, "tolerance": tol, "ok": max(errs.values()) <= tol}


def bandwidth(t: int, d: int, k: int, dtype: torch.dtype, device: str, peak: float, with_compile: bool) -> dict:
    import kernels as KB

    from attnres_rewrite.kernels import torch_kernels as K

    args = argparse.Namespace(warmup=2 if device == "cpu" else 5, iters=2 if device == "cpu" else 20, peak=peak)
    compiled = None
    if with_compile:
        KB._compile_limits()
        compiled = torch.compile(K.attnres_forward, dynamic=False)
    row = KB.bench_shape(t, d, k, dtype, device, args, use_triton=True, compiled=compiled)
    targets = {}
    tri = row.get("variants", {}).get("triton", {})
    if isinstance(tri.get("fwd_frac_peak"), float):
        targets["forward_ge_85pct_peak"] = tri["fwd_frac_peak"] >= 0.85
    if "triton_vs_compile_fwd_bwd_speedup" in row:
        targets["fwd_bwd_ge_2x_compile"] = row["triton_vs_compile_fwd_bwd_speedup"] >= 2.0
    row["targets"] = targets
    return row


def two_phase(t: int, d: int, k: int, dtype: torch.dtype, device: str) -> dict:
    import kernels as KB

    args = argparse.Namespace(warmup=1 if device == "cpu" else 5, iters=1 if device == "cpu" else 20)
    row = KB.bench_two_phase(t, d, k, dtype, device, args)
    if isinstance(row.get("two_phase_fwd_speedup"), float):
        row["targets"] = {"two_phase_ge_1_5x": row["two_phase_fwd_speedup"] >= 1.5}
    return row


def one_shape_subprocess(d: int, args, timeout: float) -> dict:
    """Correctness and forward bandwidth at one d in a child process (a compile may hang)."""
    out = (args.out or OUT).with_suffix(f".d{d}.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-shape", str(d), "--out", str(out)]
    cmd += ["--tokens", str(args.tokens), "--sources", str(args.sources)] + (["--dry-run"] if args.dry_run else [])
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"d": d, "ok": False, "timed_out": True, "timeout_s": timeout}
    result = json.loads(out.read_text()) if out.exists() else {}
    out.unlink(missing_ok=True)
    return {"d": d, "returncode": done.returncode, "seconds": round(time.perf_counter() - start, 1), **result}


def main(args) -> dict:
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU-only check")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    t, k = (64, 3) if args.dry_run else (args.tokens, args.sources)
    dims = [64, 72] if args.dry_run else args.dims
    if args.one_shape:  # child process of step 6
        d = int(args.one_shape)
        res = {"correctness": correctness(t, d, k, dtype, device)}
        res["bandwidth"] = bandwidth(t, d, k, dtype, device, environment(device)["peak_GBps"], False)
        (args.out or OUT).write_text(json.dumps(res, default=str))
        return res
    report = Report(args.out or OUT, args.dry_run)

    def run(name, fn):
        if name in args.skip:
            return None
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001  (a failed step is a finding; the others still run)
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        report.step(name, result, time.perf_counter() - start)
        return result

    env = run("environment", lambda: environment(device))
    run("kernel_tests", lambda: kernel_tests(args.dry_run))
    run("correctness", lambda: {"shapes": [correctness(t, d, k, dtype, device) for d in dims]})
    peak = env["peak_GBps"] if env and "peak_GBps" in env else 1.0
    run("bandwidth", lambda: {"shapes": [bandwidth(t, d, k, dtype, device, peak, not args.dry_run) for d in dims]})
    run("two_phase", lambda: {"shapes": [two_phase(t, d, k, dtype, device) for d in dims]})
    run("d7168", lambda: one_shape_subprocess(80 if args.dry_run else 7168, args, 120 if args.dry_run else 150))
    report.data["finished"] = True
    report.step("done", {"ok": True}, 0.0)
    return report.data


if __name__ == "__main__":
    main(ARGS)
