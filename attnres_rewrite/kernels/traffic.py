"""Traffic model of the Triton kernels: bytes moved per token, ideal against actual.

One function for every consumer: the sm_90 static gate (:mod:`.static_check`) puts the
figures next to each compiled kernel, ``benchmarks/kernels.py`` turns them into GB/s,
and benchmarks/README.md prints the table :func:`table` builds. No GPU is involved:
the model counts what each kernel reads and writes, per token, from its code.

Conventions. ``k`` sources of ``d`` features and ``itemsize`` bytes each; ``s`` queries
(1 for ``block_attnres``); ``bt`` the kernel's token tile. Three figures per kernel:

* ``hbm``: bytes per token that must cross the memory bus at least once per kernel
  (a tile re-read within one program is assumed to hit L1/L2 and counted once);
* ``cache``: further bytes per token the kernel re-reads from L1/L2 (``u`` per token
  tile and source in the stats kernel, ``grad_out`` per source in the backward stats
  loop); they cost issue slots and L2 bandwidth, not HBM bandwidth;
* ``scratch``: the fp32 per-(source, query, token) coefficients the split path writes
  and reads back (``k * s * 4`` bytes per token and pass: small next to ``k * d * itemsize``).

``ideal`` of an op is the minimum: each input read once, each output written once.
"""

from __future__ import annotations

F32 = 4


def _kernel(hbm: float, cache: float = 0.0, scratch: float = 0.0) -> dict[str, float]:
    return {"hbm": float(hbm), "cache": float(cache), "scratch": float(scratch)}


def kernel_traffic(
    kernel: str,
    *,
    k: int,
    d: int,
    itemsize: int,
    s: int = 1,
    bt: int = 1,
    mode: int = 0,
    phase1: bool = False,
    has_partial: bool = True,
    one_chunk: bool = True,
) -> dict[str, float]:
    """Bytes per token of one launch of ``kernel`` (a name in :mod:`.triton_attnres`)."""
    row = d * itemsize
    u_tile = s * d * F32 / bt  # one u (S x d fp32) load amortised over a token tile
    if kernel == "_fused_fwd_kernel":
        out = s * d * F32 + 2 * s * F32 if phase1 else row
        return _kernel(k * row + out, cache=u_tile)
    if kernel == "_stats_kernel":
        # MODE 0/1: forward statistics; MODE 2/3: backward (reads grad_out / grad_o).
        g_row = 0.0 if mode < 2 else (row if mode == 2 else s * d * F32)
        stats_io = 2 * s * F32 if mode == 1 else (4 * s * F32 if mode == 3 else 0.0)
        passes = 3 if mode < 2 else 5  # scratch written, then re-read/re-written by the finishing loops
        return _kernel(
            k * row + g_row + stats_io,
            cache=k * u_tile + max(k - 1, 0) * g_row,
            scratch=passes * k * s * F32 + (0 if mode < 2 else 3 * k * F32),
        )
    if kernel == "_fused_bwd_kernel":
        # sources read once from HBM, re-read right away from L1/L2 (the tile was just read);
        # grad_out read once, K gradients written
        return _kernel(2 * k * row + row, cache=k * row + d * 2 * F32 / bt)
    if kernel == "_apply_fwd_kernel":
        out = s * d * F32 if phase1 else row
        return _kernel(k * row + out, scratch=k * s * F32)
    if kernel == "_apply_bwd_kernel":
        g_row = row if s == 1 and not phase1 else s * d * F32
        return _kernel(2 * k * row + g_row, scratch=k * (2 * s + 1) * F32)
    if kernel == "_phase2_fwd_kernel":
        p_reads = (1 if one_chunk else 2) if has_partial else 0
        return _kernel(d * F32 + p_reads * row + row + 2 * F32)
    if kernel == "_phase2_bwd_kernel":
        # reads grad_out, o, partial (twice each without ONE_CHUNK, o once); writes g_o, g_p
        reads = (row + d * F32 + row) if one_chunk else (2 * row + d * F32 + 2 * row)
        return _kernel(reads + d * F32 + row + 4 * F32)
    raise ValueError(f"unknown kernel {kernel!r}")


def op_ideal(op: str, *, k: int, d: int, itemsize: int, s: int = 1, has_partial: bool = True) -> float:
    """Minimum bytes per token of an op: inputs read once, outputs written once."""
    row = d * itemsize
    if op == "block_attnres":
        return (k + 1) * row
    if op == "block_attnres_backward":
        return (2 * k + 1) * row  # sources and grad_out read, source gradients written
    if op == "block_phase1":
        return k * row + s * (d * F32 + 2 * F32)
    if op == "block_phase1_backward":
        return 2 * k * row + s * d * F32  # + grad_o (fp32) read
    if op == "block_phase2":
        return d * F32 + (row if has_partial else 0) + row
    if op == "block_phase2_backward":
        return 2 * row + d * F32 + d * F32 + row  # grad_out, partial, o read; g_o, g_p written
    raise ValueError(f"unknown op {op!r}")


# The paths each op takes, as the launchers choose them (``fused`` when a row fits).
def op_traffic(
    op: str, *, k: int, d: int, itemsize: int, s: int = 1, bt: int = 16, fused: bool = True, has_partial: bool = True
) -> dict[str, float]:
    """Ideal and modelled actual bytes per token of one op on one path."""
    kt = lambda name, **kw: kernel_traffic(name, k=k, d=d, itemsize=itemsize, s=s, bt=bt, **kw)  # noqa: E731
    if op in ("block_attnres", "block_phase1"):
        phase1 = op == "block_phase1"
        if fused:
            parts = [kt("_fused_fwd_kernel", phase1=phase1)]
        else:
            parts = [kt("_stats_kernel", mode=1 if phase1 else 0), kt("_apply_fwd_kernel", phase1=phase1)]
    elif op == "block_attnres_backward" and fused:
        parts = [kt("_fused_bwd_kernel")]
    elif op in ("block_attnres_backward", "block_phase1_backward"):
        phase1 = op == "block_phase1_backward"
        parts = [kt("_stats_kernel", mode=3 if phase1 else 2), kt("_apply_bwd_kernel", phase1=phase1)]
    elif op == "block_phase2":
        parts = [kt("_phase2_fwd_kernel", has_partial=has_partial)]
    elif op == "block_phase2_backward":
        parts = [kt("_phase2_bwd_kernel")]
    else:
        raise ValueError(f"unknown op {op!r}")
    total = {key: sum(p[key] for p in parts) for key in ("hbm", "cache", "scratch")}
    total["ideal"] = op_ideal(op, k=k, d=d, itemsize=itemsize, s=s, has_partial=has_partial)
    total["hbm_over_ideal"] = total["hbm"] / total["ideal"]
    return total


def table(k: int = 9, d: int = 4096, itemsize: int = 2, s: int = 8) -> list[dict]:
    """Per-op rows (in units of ``d * itemsize`` bytes per token) for benchmarks/README.md."""
    unit = d * itemsize
    rows = []
    cases = [
        ("block_attnres", 1, True, "fused (row in registers)"),
        ("block_attnres", 1, False, "split (stats + apply)"),
        ("block_attnres_backward", 1, True, "fused (d <= 4096; second read from L1/L2)"),
        ("block_attnres_backward", 1, False, "stats + apply (d > 4096)"),
        ("block_phase1", s, True, "fused (S x row in registers)"),
        ("block_phase1", s, False, "split (stats + apply)"),
        ("block_phase1_backward", s, False, "stats + apply"),
        ("block_phase2", 1, True, "merge"),
        ("block_phase2_backward", 1, True, "merge backward"),
    ]
    for op, queries, fused, path in cases:
        t = op_traffic(op, k=k, d=d, itemsize=itemsize, s=queries, fused=fused, bt=16 if queries == 1 else 32)
        rows.append(
            {
                "op": op,
                "path": path,
                "S": queries,
                "ideal": round(t["ideal"] / unit, 2),
                "hbm": round(t["hbm"] / unit, 2),
                "cache": round(t["cache"] / unit, 2),
                "scratch": round(t["scratch"] / unit, 3),
                "hbm_over_ideal": round(t["hbm_over_ideal"], 3),
            }
        )
    return rows
