"""End-to-end cost of Block AttnRes under torch.compile, written to benchmarks/results/end_to_end.json.

For a Llama-style decoder (``attnres_rewrite.samples.llama``) at a few sizes, the variants:

* ``original_inductor``: the unconverted model, ``torch.compile`` (Inductor);
* ``converted_inductor``: the converted model, ``torch.compile`` (Inductor; one
  opaque ``block_attnres`` kernel call per sublayer);
* ``converted_attnres``: the converted model, ``backend="attnres"`` (per device: the
  two-phase schedule on CUDA, the ATen decomposition on CPU; then Inductor);
* ``original_eager`` / ``converted_eager``: both models without compiling (the eager
  cost of the op: on CPU its fused C++ kernel).

``--variants`` picks some; ``overhead_vs_original`` compares each converted variant
with the original of the same kind (compiled with ``original_inductor``, eager with
``original_eager``).

Measured per variant: forward latency under ``no_grad`` and training-step time
(forward, loss, backward, SGD step), as medians; training memory peak. Overheads
against the original come two ways: ``overhead_vs_original`` divides the variants'
medians; ``paired_overhead_vs_original`` divides within each round (the variants run
seconds apart) and gives the median, quartiles and range of those ratios: a drift of
the host's speed over the run cancels in them, its call-to-call noise does not (many
rounds of ``--iters 1`` narrow the median). On CUDA the
peak is ``torch.cuda.max_memory_allocated`` over one step. On CPU (Linux) it is the
growth of the resident set during one step: freed heap is returned to the OS
(``malloc_trim``) and the high-water mark reset (``/proc/self/clear_refs``) first, so
the figure is what the step itself touches, not what compilation left behind.

``--kernel-breakdown ROUNDS`` also profiles ROUNDS interleaved forwards per variant and
reports the forward's time per kind of kernel (``forward_kernel_ms``): wall-clock ratios
on a shared host move by several percent between runs, the attribution shows what the
conversion itself adds.

Usage: ``python benchmarks/end_to_end.py`` (CPU, small sizes, a few minutes on two
cores, one thread by default); ``python benchmarks/end_to_end.py --device cuda --sizes 1024x16x2048,2048x16x2048
--dtype bfloat16`` for the GPU figures the issue asks for.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnres_rewrite  # noqa: E402
from attnres_rewrite import samples  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "end_to_end.json"
VARIANTS = ("original_inductor", "converted_inductor", "converted_attnres", "original_eager", "converted_eager")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], object], device: str, iters: int) -> float:
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_bytes(step: Callable[[], None], device: str) -> int | None:
    """Memory peak of one training step (see the module docstring for the CPU method)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    if not Path("/proc/self/clear_refs").exists():
        return None
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) * 1024


def _models(dim: int, layers: int, seq: int, batch: int, num_blocks: int, device: str, dtype: torch.dtype):
    """The original decoder and its conversion (parameters shared), plus token ids."""
    heads = max(1, dim // 64) if dim >= 256 else 4
    hidden = 64 * ((8 * dim // 3 + 63) // 64)
    model, _ = samples.get("llama", dim=dim, layers=layers, heads=heads, hidden=hidden, dropout=0.0, vocab=512)
    model = model.to(device=device, dtype=dtype).train()
    ids = torch.randint(0, 512, (batch, seq), device=device)
    converted = attnres_rewrite.convert(model, (ids,), num_blocks=num_blocks)
    return model, converted, ids


def _compiled(variant: str, model, converted):
    if variant == "original_eager":
        return model, model
    if variant == "converted_eager":
        return converted, converted
    if variant == "original_inductor":
        return model, torch.compile(model)
    if variant == "converted_inductor":
        return converted, torch.compile(converted)
    return converted, torch.compile(converted, backend="attnres")


class _Runner:
    """One variant's compiled forward and training step."""

    def __init__(self, module, compiled, ids):
        self.compiled, self.ids = compiled, ids
        self.opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-6)

    def forward(self) -> None:
        with torch.no_grad():
            self.compiled(self.ids)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.compiled(self.ids).float().square().mean().backward()
        self.opt.step()

    def warm_up(self) -> float:
        """Compile the inference and training graphs; return the seconds it took."""
        start = time.perf_counter()
        for _ in range(3):
            self.forward()
            self.step()
        return time.perf_counter() - start


def _measure_interleaved(runners: dict, device: str, rounds: int, iters: int) -> dict:
    """Per-round medians, in rounds that alternate the variants, so load drift on a shared host hits all alike."""
    times = {name: {"forward_ms": [], "train_step_ms": []} for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name]["forward_ms"].append(_median_ms(runner.forward, device, iters))
            times[name]["train_step_ms"].append(_median_ms(runner.step, device, iters))
    return times


PAIRS = (
    ("converted_inductor", "original_inductor"),
    ("converted_attnres", "original_inductor"),
    ("converted_eager", "original_eager"),
)


def _paired_overheads(times: dict) -> dict:
    """Each converted variant against its original, round by round: median, quartiles and range of the ratios - 1.

    A round measures every variant within seconds, so a slow drift of the host's speed
    cancels in a ratio within one round, where it does not in a ratio of medians over
    the whole run (``overhead_vs_original``).
    """
    out = {}
    for variant, original in PAIRS:
        if variant not in times or original not in times:
            continue
        for key, mine in times[variant].items():
            ratios = [a / b - 1.0 for a, b in zip(mine, times[original][key], strict=True)]
            p25, _, p75 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
            stats = {
                "median": statistics.median(ratios),
                "p25": p25,
                "p75": p75,
                "min": min(ratios),
                "max": max(ratios),
            }
            out[f"{variant}.{key}"] = {k: round(v, 4) for k, v in stats.items()} | {"rounds": len(ratios)}
    return out


def _kernel_kind(name: str) -> str | None:
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matmul"
    if name.startswith("aten::_scaled_dot_product"):
        return "attention"
    if "cpp_fused" in name or "triton_" in name:
        return "depth_softmax_kernels" if "_softmax" in name else "other_inductor_kernels"
    if name.startswith("attnres::"):
        return "attnres_ops"
    return None


def _kernel_breakdown(runners: dict, rounds: int) -> dict:
    """Forward time per kind of kernel (ms per forward, mean over interleaved profiled rounds).

    Wall-clock ratios on a shared host move by about +-5% between runs, and most of a
    forward is BLAS matmul whose speed drifts with the host; attributing the time to
    kernels in one process shows what the conversion itself adds. Kinds: ``matmul``,
    ``attention`` (SDPA), Inductor kernels that compute a softmax (in these models
    only the depth softmax of AttnRes: attention is SDPA) and the other Inductor
    kernels (norms, activations, residual adds), and the ``attnres::`` ops (eager or
    opaque under Inductor). Needs ``torch._inductor.config.cpp.enable_kernel_profile``
    set before compiling, which ``--kernel-breakdown`` does.
    """
    from torch.profiler import ProfilerActivity, profile

    totals = {name: {} for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runner.forward()
            for event in prof.key_averages():
                kind = _kernel_kind(event.key)
                if kind:
                    totals[name][kind] = totals[name].get(kind, 0.0) + event.self_cpu_time_total / 1e3 / rounds
    return {name: {k: round(v, 3) for k, v in sorted(kinds.items())} for name, kinds in totals.items()}


def _overheads(row: dict) -> dict:
    out = {}
    for variant, original in PAIRS:
        if variant not in row or original not in row:
            continue
        base = row[original]
        for key in ("forward_ms", "train_step_ms", "train_peak_bytes"):
            if base.get(key) and row[variant].get(key) is not None:
                out[f"{variant}.{key}"] = round(row[variant][key] / base[key] - 1.0, 4)
    return out


def run_size(dim, layers, seq, args) -> dict:
    dtype = getattr(torch, args.dtype)
    sublayers = 2 * layers
    num_blocks = max(1, -(-sublayers // args.block_size))
    model, converted, ids = _models(dim, layers, seq, args.batch, num_blocks, args.device, dtype)
    row = {"dim": dim, "layers": layers, "sublayers": sublayers, "seq": seq, "batch": args.batch}
    row.update(num_blocks=num_blocks, block_size=args.block_size)
    torch._dynamo.reset()
    runners = {}
    for variant in args.variants:
        runners[variant] = _Runner(*_compiled(variant, model, converted), ids)
        row[variant] = {"compile_and_warm_up_s": round(runners[variant].warm_up(), 2)}
        print(f"  compiled {variant} in {row[variant]['compile_and_warm_up_s']} s", flush=True)
    times = _measure_interleaved(runners, args.device, args.rounds, args.iters)
    for variant, runner in runners.items():
        medians = {key: statistics.median(values) for key, values in times[variant].items()}
        row[variant].update(medians, train_peak_bytes=_peak_bytes(runner.step, args.device))
        print(f"  {variant}: {row[variant]}", flush=True)
    if args.kernel_breakdown:
        row["forward_kernel_ms"] = _kernel_breakdown(runners, args.kernel_breakdown)
        print(f"  forward kernel ms: {row['forward_kernel_ms']}", flush=True)
    row["overhead_vs_original"] = _overheads(row)
    row["paired_overhead_vs_original"] = _paired_overheads(times)
    print(f"  paired overhead (per-round ratios - 1): {row['paired_overhead_vs_original']}")
    return row


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """``DIMxLAYERSxSEQ`` items separated by commas."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sizes", default="64x4x64,128x4x128", help="DIMxLAYERSxSEQ,...")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=4, help="sublayers per block (S)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: leave torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--kernel-breakdown", type=int, default=0, metavar="ROUNDS",
        help="also profile ROUNDS interleaved forwards per variant and report ms per kind of kernel (CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    # Before any compile: Inductor bakes the OpenMP thread count into its C++ kernels, and
    # spinning OpenMP threads on a shared, oversubscribed host cost 10-50x in latency.
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.kernel_breakdown:
        torch._inductor.config.cpp.enable_kernel_profile = True  # names Inductor's C++ kernels in the profile
    torch.manual_seed(0)
    rows = []
    for dim, layers, seq in _parse_sizes(args.sizes):
        print(f"d={dim} layers={layers} T={seq}", flush=True)
        rows.append(run_size(dim, layers, seq, args))
    result = {
        "benchmark": "end_to_end",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "peak_memory_method": "cuda max_memory_allocated" if args.device == "cuda" else "RSS growth during one step",
        "note": "CPU figures only; GPU figures (the issue's d=1024/2048, T=2048 targets) not yet measured.",
        "sizes": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
