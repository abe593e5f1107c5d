"""sm_90 static gate: compile every kernel variant the CUDA launchers launch, without a GPU.

Triton compiles for a GPU it cannot see when the driver says which one: a stub driver
whose ``get_current_target()`` is ``GPUTarget("cuda", 90, 32)`` (H100/H200), and
``JITFunction.run(..., warmup=True)`` so that nothing is launched. The launchers of
:mod:`.triton_attnres` run unchanged under :class:`~.triton_attnres.compile_only` on
``meta`` tensors (no memory), so the token tiles, warps, ``VEC`` and grid are exactly
the ones a CUDA run at that shape would pick. For every compiled kernel this records

* registers, spill stores/loads (ptxas ``-v`` log; the cubin's stack frame as a
  fallback when the compile came from Triton's cache), shared memory;
* global load/store instructions of the PTX by width (``ld.global.v4.b32`` = 128 bits);
* bytes moved per token (:mod:`.traffic`, the model the benchmarks use);

and reports as failures: a kernel that does not compile, any spill, and any scalar
16-bit global load/store in a kernel whose 16-bit tensors are 16-byte aligned with
``d % 8 == 0`` (every source, output and gradient access must then be a vector).

Run as a module (the test suite does, in a subprocess: the kernels must be compiled
by a process without ``TRITON_INTERPRET``)::

    python -m attnres_rewrite.kernels.static_check --subset full --json out.json
    PYTHONPATH=DIR python -m attnres_rewrite.kernels.static_check --subset ci36  # Triton in DIR

``benchmarks/sm90_static.py`` runs the full matrix with the installed Triton and with
Triton 3.6 and writes ``benchmarks/results/kernels_sm90_static.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

K_SOURCES = 9
S_QUERIES = 8
EPS = 1e-6
DTYPES = ("float32", "float16", "bfloat16")
DIMS = (64, 127, 2048, 4096, 7168)
LONG_T = 16384


@dataclass(frozen=True)
class Case:
    """One launcher call: ``op`` at ``d`` features, ``t`` tokens, ``dtype`` sources."""

    op: str  # block_attnres, block_attnres_backward, block_phase1, ..., block_phase2_nopartial
    d: int
    dtype: str
    t: int = LONG_T
    k: int = K_SOURCES
    s: int = 1

    @property
    def name(self) -> str:
        return f"{self.op} d={self.d} {self.dtype} T={self.t} K={self.k} S={self.s}"


def _cases_for(d: int, dtype: str, decode: bool = True) -> list[Case]:
    cases = [
        Case("block_attnres", d, dtype),
        Case("block_attnres_backward", d, dtype),
        Case("block_phase1", d, dtype, s=S_QUERIES),
        Case("block_phase1_backward", d, dtype, s=S_QUERIES),
        Case("block_phase2", d, dtype),
        Case("block_phase2_nopartial", d, dtype),
        Case("block_phase2_backward", d, dtype),
    ]
    if decode:  # one token per sequence: T = 1 (a decode step of batch 1)
        cases += [
            Case("block_attnres", d, dtype, t=1),
            Case("block_phase1", d, dtype, t=1, s=S_QUERIES),
            Case("block_phase2", d, dtype, t=1),
        ]
    return cases


def matrix(subset: str) -> list[Case]:
    """``full``: the issue's matrix; ``ci``: a representative part that compiles in ~20 s;
    ``ci36``: for a second Triton, the shapes Triton 3.6 miscompiled (one-token tiles) and
    phase 1's S = 8 vector tiles (sized on both versions' register counts)."""
    if subset == "full":
        return [c for d in DIMS for dt in DTYPES for c in _cases_for(d, dt)]
    if subset == "ci":
        return [
            *[c for c in _cases_for(7168, "bfloat16", decode=False) if c.op != "block_phase2_nopartial"],
            Case("block_attnres", 2048, "bfloat16", t=1),
            Case("block_phase1", 2048, "bfloat16", t=1, s=S_QUERIES),
            Case("block_attnres_backward", 2048, "bfloat16"),
            Case("block_attnres_backward", 127, "float16"),  # VEC = 1: the unaligned kernel compiles
        ]
    if subset == "ci36":
        return [
            Case("block_attnres", 7168, "bfloat16"),
            Case("block_attnres", 2048, "bfloat16", t=1),
            Case("block_attnres_backward", 2048, "bfloat16"),
            Case("block_phase1", 7168, "bfloat16", s=S_QUERIES),
            Case("block_phase1_backward", 7168, "bfloat16", s=S_QUERIES),
        ]
    raise ValueError(f"unknown subset {subset!r}")


# --------------------------------------------------------------------------------------
# A second Triton (the GPU machine's 3.6), installed for compiling only


TRITON36 = "3.6.0"


def triton_target_dir(version: str = TRITON36, install: bool = True) -> Path | None:
    """A directory holding Triton ``version`` (``pip install --target``), or None.

    ``ATTNRES_TRITON36_DIR`` names one explicitly; otherwise it is kept under
    ``~/.cache/attnres_rewrite/triton-<version>`` and installed there on first use
    (torch is not needed to compile kernels, so ``--no-deps``). None when that fails
    (no network): the caller skips the second compiler.
    """
    env = os.environ.get("ATTNRES_TRITON36_DIR")
    if env:
        return Path(env) if (Path(env) / "triton").is_dir() else None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnres_rewrite"
    target = cache / f"triton-{version}"
    if (target / "triton" / "__init__.py").exists():
        return target
    if not install:
        return None
    tmp = cache / f"triton-{version}.partial"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--timeout", "30", "--retries", "1"]
    cmd += ["--target", str(tmp), f"triton=={version}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not (tmp / "triton" / "__init__.py").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    if target.exists():  # another process won the race
        return target
    tmp.rename(target)
    return target


def run_subprocess(subset: str, out: Path, triton_dir: Path | None = None, timeout: float = 1800) -> dict:
    """Run the gate in a child process (no ``TRITON_INTERPRET``; ``triton_dir`` first on the path)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    paths = ([str(triton_dir)] if triton_dir else []) + [root, env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [sys.executable, "-m", "attnres_rewrite.kernels.static_check", "--subset", subset, "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        raise RuntimeError(f"static gate crashed (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}")
    report = json.loads(out.read_text())
    report["exit_code"] = done.returncode
    return report


# --------------------------------------------------------------------------------------
# The stub driver


def install_stub_driver(capability: int = 90, warp_size: int = 32) -> None:
    """Make Triton compile for ``sm_<capability>`` with no GPU and no CUDA driver."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver

    class StubCudaDriver(CudaDriver):
        def __init__(self):  # the real one loads libcuda
            pass

        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", capability, warp_size)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

    driver.set_active(StubCudaDriver())


# --------------------------------------------------------------------------------------
# Running the launchers on meta tensors


def _call(case: Case) -> None:
    """Call the public launcher of ``case.op`` with meta tensors of the case's shapes."""
    import torch

    from . import triton_attnres as TA

    dt = getattr(torch, case.dtype)
    meta = dict(device="meta")
    srcs = [torch.empty(case.t, case.d, dtype=dt, **meta) for _ in range(case.k)]
    q = torch.empty(case.d, **meta)
    qs = torch.empty(case.s, case.d, **meta)
    if case.op == "block_attnres":
        TA.attnres_forward(srcs, q, q, EPS, 1.0)
    elif case.op == "block_attnres_backward":
        TA.attnres_backward(torch.empty_like(srcs[0]), srcs, q, q, EPS, 1.0)
    elif case.op == "block_phase1":
        TA.phase1_forward(srcs, qs, qs, EPS)
    elif case.op == "block_phase1_backward":
        o = torch.empty(case.s, case.t, case.d, **meta)
        m = torch.empty(case.s, case.t, **meta)
        TA.phase1_backward(o, m, m, srcs, qs, qs, o, m, m, EPS)
    elif case.op.startswith("block_phase2"):
        o = torch.empty(case.t, case.d, **meta)
        m = torch.empty(case.t, **meta)
        partial = None if case.op == "block_phase2_nopartial" else srcs[0]
        if case.op == "block_phase2_backward":
            TA.phase2_backward(srcs[1], o, m, m, srcs[0], q, q, EPS, 1.0)
        else:
            TA.phase2_forward(o, m, m, partial, q, q, EPS, 1.0, dt)
    else:
        raise ValueError(case.op)


_INSN = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


def ptx_accesses(ptx: str) -> dict[str, dict[str, int]]:
    """Global loads/stores of a PTX text by width in bits: ``{"ld": {"128": 4, "16": 0}, "st": ...}``.

    Also ``ld16_scalar`` / ``st16_scalar``: scalar 16-bit accesses (``ld.global.b16``).
    """
    out: dict[str, dict[str, int]] = {"ld": {}, "st": {}}
    scalar16 = {"ld": 0, "st": 0}
    for kind, suffix in _INSN.findall(ptx):
        parts = suffix.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bsuf]\d+", p)), 0)
        width = str(vec * bits)
        out[kind][width] = out[kind].get(width, 0) + 1
        if vec == 1 and bits == 16:
            scalar16[kind] += 1
    out["scalar16"] = scalar16
    return out


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    found = {}
    for key, pattern in _PTXAS.items():
        m = pattern.search(log)
        if m:
            found[key] = int(m.group(1))
    return found


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of a cubin: REG, STACK, SHARED, LOCAL."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    res = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m:
            res[key] = int(m.group(1))
    return res


# --------------------------------------------------------------------------------------
# The gate


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def _traffic(case: Case, kernel: str, meta: dict) -> dict[str, float]:
    from .traffic import kernel_traffic

    phase1 = case.op.startswith("block_phase1")
    kw = dict(k=case.k, d=case.d, itemsize=_itemsize(case.dtype), s=case.s, bt=meta.get("BT", 1))
    if kernel == "_fused_fwd_kernel":
        return kernel_traffic(kernel, phase1=phase1, **kw)
    if kernel == "_stats_kernel":
        return kernel_traffic(kernel, mode=meta.get("MODE", 0), **kw)
    if kernel in ("_apply_fwd_kernel", "_apply_bwd_kernel"):
        return kernel_traffic(kernel, phase1=phase1, **kw)
    if kernel == "_fused_bwd_kernel":
        return kernel_traffic(kernel, **kw)
    return kernel_traffic(
        kernel, has_partial=bool(meta.get("HAS_P", True)), one_chunk=bool(meta.get("ONE_CHUNK", True)), **kw
    )


def run(cases: list[Case], progress=None) -> dict:
    """Compile every launch of every case; return the per-kernel table and the failures."""
    import triton

    from . import triton_attnres as TA

    try:
        triton.knobs.nvidia.dump_ptxas_log = True
    except AttributeError:  # pragma: no cover - older Triton
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    kernels: dict[str, dict] = {}
    failures: list[str] = []
    launches: list[dict] = []

    for case in cases:
        recorded: list[tuple] = []
        with TA.compile_only(lambda kernel, grid, args, meta, out=recorded: out.append((kernel, grid, args, meta))):
            _call(case)
        for kernel, grid, args, meta in recorded:
            name = kernel.fn.__name__
            constexprs = {k: v for k, v in meta.items() if k != "num_warps"}
            log = io.StringIO()
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(log), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    compiled = kernel.run(*args, grid=grid, warmup=True, **meta)
            except Exception as exc:  # noqa: BLE001  (a compile failure is a finding)
                failures.append(f"{case.name}: {name} {constexprs} does not compile: {type(exc).__name__}: {exc}")
                continue
            seconds = time.perf_counter() - start
            key = compiled.hash if hasattr(compiled, "hash") else str(id(compiled))
            launches.append(
                {
                    "case": case.name,
                    "kernel": name,
                    "key": key,
                    "grid": list(grid),
                    "meta": constexprs,
                    "num_warps": meta.get("num_warps"),
                    "bytes_per_token": _traffic(case, name, meta),
                }
            )
            if key in kernels:
                continue
            info = _analyse(compiled, log.getvalue())
            info.update(
                kernel=name, key=key, meta=constexprs, num_warps=meta.get("num_warps"), compile_s=round(seconds, 2)
            )
            info["first_case"] = case.name
            kernels[key] = info
            failures += _judge(case, name, constexprs, info)
            if progress:
                progress(f"{name} {constexprs} nw={meta.get('num_warps')}: {_short(info)} ({seconds:.1f}s)")
    return {
        "triton": triton.__version__,
        "target": "cuda sm_90 (warp 32), stub driver, compile only",
        "cases": [asdict(c) | {"name": c.name} for c in cases],
        "kernels": list(kernels.values()),
        "launches": launches,
        "failures": failures,
    }


def _analyse(compiled, log: str) -> dict:
    asm = compiled.asm
    res = cubin_resources(asm["cubin"]) if "cubin" in asm else {}
    ptxas = parse_ptxas_log(log)
    registers = ptxas.get("registers", res.get("REG"))
    stack = ptxas.get("stack_frame", res.get("STACK"))
    return {
        "registers": registers,
        "spill_stores": ptxas.get("spill_stores"),
        "spill_loads": ptxas.get("spill_loads"),
        "stack_frame": stack,
        "local": res.get("LOCAL"),
        "shared": getattr(compiled.metadata, "shared", None),
        "accesses": ptx_accesses(asm["ptx"]),
        "ptxas_log": bool(ptxas),
    }


def _judge(case: Case, name: str, meta: dict, info: dict) -> list[str]:
    where = f"{case.name}: {name} {meta}"
    bad = []
    spills = (info["spill_stores"] or 0) + (info["spill_loads"] or 0)
    if spills or (info["stack_frame"] or 0) or (info["local"] or 0):
        bad.append(f"{where} spills ({info['spill_stores']} B stores, {info['spill_loads']} B loads, "
                   f"stack {info['stack_frame']} B)")  # fmt: skip
    aligned = _itemsize(case.dtype) == 2 and case.d % 8 == 0 and meta.get("VEC", 8) > 1
    s16 = info["accesses"]["scalar16"]
    if aligned and (s16["ld"] or s16["st"]):
        bad.append(f"{where} has {s16['ld']} scalar 16-bit loads and {s16['st']} scalar 16-bit stores")
    return bad


def _short(info: dict) -> str:
    acc = info["accesses"]
    return (
        f"{info['registers']} regs, spills {info['spill_stores']}/{info['spill_loads']}, smem {info['shared']}, "
        f"ld {acc['ld']}, st {acc['st']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", default="ci", choices=("full", "ci", "ci36"))
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the interpreter cannot compile for sm_90")
    install_stub_driver()
    report = run(matrix(args.subset), progress=None if args.quiet else lambda m: print(m, file=sys.stderr))
    report["subset"] = args.subset
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    for failure in report["failures"]:
        print("FAIL", failure, file=sys.stderr)
    print(f"triton {report['triton']}: {len(report['kernels'])} kernels, {len(report['failures'])} failures")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
