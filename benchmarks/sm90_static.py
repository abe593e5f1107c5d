"""sm_90 static gate, full matrix: writes benchmarks/results/kernels_sm90_static.json.

Compiles every kernel variant the CUDA launchers choose for d in {64, 127, 2048, 4096,
7168} x {fp32, fp16, bf16} (K = 9 sources, S = 8 queries, T = 16384 and T = 1) for
``sm_90`` without a GPU (see :mod:`attnres_rewrite.kernels.static_check`), with the
installed Triton and with Triton 3.6 (the GPU machine's version; installed into a cache
directory with ``pip install --target`` on first use, skipped when that fails).

Usage::

    python benchmarks/sm90_static.py                 # both Tritons (2-11 min on 2 cores)
    python benchmarks/sm90_static.py --no-triton36   # installed Triton only
    python benchmarks/sm90_static.py --table         # print the README summary of the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnres_rewrite.kernels import static_check as SC  # noqa: E402
from attnres_rewrite.kernels import traffic  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "kernels_sm90_static.json"


def _widths(acc: dict) -> str:
    def fmt(d):
        return " ".join(f"{w}b:{n}" for w, n in sorted(d.items(), key=lambda kv: -int(kv[0])))

    return f"ld {fmt(acc['ld'])}; st {fmt(acc['st'])}"


def markdown(result: dict) -> str:
    lines = []
    for run in result["runs"]:
        ks = run["kernels"]
        regs = [k["registers"] for k in ks if k["registers"] is not None]
        lines += [
            f"**Triton {run['triton']}** ({run['seconds']:.0f} s): {len(run['cases'])} launcher calls, "
            f"{len(ks)} distinct kernels, {len(run['failures'])} failures; registers "
            f"{min(regs)}-{max(regs)}, spills: {sum(1 for k in ks if k['spill_stores'] or k['stack_frame'])} kernels, "
            f"scalar 16-bit accesses in aligned kernels: "
            f"{sum(1 for f in run['failures'] if 'scalar 16-bit' in f)}.",
            "",
        ]
        for failure in run["failures"]:
            lines.append(f"- FAIL {failure}")
        if run["failures"]:
            lines.append("")
    first = result["runs"][0]
    lines += [
        f"Per kernel variant (Triton {first['triton']}, bf16 and d = 7168 / 2048 unless noted; all rows in the JSON):",
        "",
        "| first case | kernel | constexprs | warps | regs | spills | smem B | PTX global ld/st (bits:count) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # every kernel a bf16 d = 7168 / 2048 launch uses, with the first such launch's case (a
    # kernel's own first case can be another d: phase 1's backward is first compiled at d = 64)
    by_key = {k["key"]: k for k in first["kernels"]}
    rows = []
    for launch in first["launches"]:
        case = launch["case"]
        if "bfloat16" in case and (" d=7168 " in case or " d=2048 " in case):
            k = by_key.pop(launch["key"], None)
            if k is not None:
                rows.append((case, k))
    for case, k in rows:
        meta = ", ".join(f"{a}={b}" for a, b in k["meta"].items())
        lines.append(
            f"| {case} | `{k['kernel']}` | {meta} | {k['num_warps']} | {k['registers']} "
            f"| {k['spill_stores'] or 0} | {k['shared']} | {_widths(k['accesses'])} |"
        )
    return "\n".join(lines)


def traffic_markdown(k: int = 9, d: int = 4096, s: int = 8) -> str:
    lines = [
        f"Traffic per token in units of `d * 2` bytes (bf16, K = {k}, d = {d}, S = {s} for phase 1; "
        "`attnres_rewrite.kernels.traffic.table`):",
        "",
        "| op | path | ideal | HBM (model) | HBM / ideal | L1/L2 re-reads | fp32 scratch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in traffic.table(k=k, d=d, itemsize=2, s=s):
        lines.append(
            f"| {row['op']} | {row['path']} | {row['ideal']} | {row['hbm']} | {row['hbm_over_ideal']} "
            f"| {row['cache']} | {row['scratch']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", default="full", choices=("full", "ci", "ci36"))
    ap.add_argument("--no-triton36", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", action="store_true", help="print the README summary of --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        print()
        print(traffic_markdown())
        return 0
    runs = []
    dirs = [None]
    if not args.no_triton36:
        found = SC.triton_target_dir()
        if found is None:
            print(f"Triton {SC.TRITON36} could not be installed; compiling with the installed Triton only")
        else:
            dirs.append(found)
    with tempfile.TemporaryDirectory() as tmp:
        for i, triton_dir in enumerate(dirs):
            start = time.perf_counter()
            report = SC.run_subprocess(args.subset, Path(tmp) / f"run{i}.json", triton_dir, timeout=3600)
            report["seconds"] = time.perf_counter() - start
            report["triton_dir"] = None if triton_dir is None else "pip --target cache"
            runs.append(report)
            print(f"Triton {report['triton']}: {len(report['kernels'])} kernels, {len(report['failures'])} failures, "
                  f"{report['seconds']:.0f} s")  # fmt: skip
    result = {
        "benchmark": "sm_90 static gate (benchmarks/sm90_static.py)",
        "note": "Compiled for sm_90 with a stub driver; nothing ran on a GPU. Registers and spills from ptxas -v "
        "(or the cubin's resource usage on a cache hit), load/store widths from the PTX, bytes per token from "
        "attnres_rewrite.kernels.traffic.",
        "traffic_table_bf16_K9_d4096_S8": traffic.table(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    print(markdown(result))
    return 1 if any(r["failures"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
