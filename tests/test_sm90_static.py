"""sm_90 static gate: the Triton kernels compile for H100/H200 without a GPU, spill-free and vectorised.

The gate (:mod:`attnres_rewrite.kernels.static_check`) runs in a child process (the
kernels must be compiled by a process without ``TRITON_INTERPRET``): a stub driver
reports ``sm_90``, the CUDA launchers run on ``meta`` tensors with their CUDA
heuristics, and every launch is compiled with ``warmup=True``. Here it runs a
representative subset (~20 s); ``benchmarks/sm90_static.py`` runs the full matrix and
writes ``benchmarks/results/kernels_sm90_static.json``. Triton 3.6 (the GPU machine's
version) is checked too when it is in its cache directory, or is installed there when
``ATTNRES_GATE_TRITON36=1`` (a download and ~90 s of cold compiles: more than the CI
budget holds, so CI runs the installed Triton only and the benchmark covers 3.6).

The rest are fast unit tests of what the gate relies on: launch heuristics (no
one-token tiles), the alignment check behind ``VEC``, the PTX/ptxas parsers and the
traffic model.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICE

from attnres_rewrite import reference as R
from attnres_rewrite.kernels import static_check as SC
from attnres_rewrite.kernels import traffic
from attnres_rewrite.kernels import triton_attnres as TA


def _check_report(report: dict) -> None:
    assert report["exit_code"] == 0 or report["failures"], report
    assert not report["failures"], "\n".join(report["failures"])
    assert report["kernels"], "nothing was compiled"
    for k in report["kernels"]:
        assert k["registers"], k
        assert not k["spill_stores"] and not k["stack_frame"], k


def test_gate_installed_triton(tmp_path):
    report = SC.run_subprocess("ci", tmp_path / "gate.json", timeout=900)
    _check_report(report)
    kernels = {(k["kernel"], k["first_case"]): k for k in report["kernels"]}
    # The fused bf16 forward at d = 7168 (a two-token tile) reads its sources as 16-byte vectors.
    fused = [k for (name, case), k in kernels.items() if name == "_fused_fwd_kernel" and "d=7168" in case]
    assert fused and all(k["meta"]["VEC"] == 8 and k["meta"]["BT"] >= 2 for k in fused)
    assert all(k["accesses"]["ld"].get("128", 0) > 0 and k["accesses"]["scalar16"]["ld"] == 0 for k in fused)
    # Phase 1 at S = 8 (split path): the 16-bit sources are read as 16-byte vectors and the
    # source gradients written as such. The PTX counts widths, not element types: the
    # forward kernels' only 128-bit load is the source tile; the backward stats kernel's
    # grad_o tile (fp32) takes S_PAD * BT * BD / (threads * 4) of them, the source one
    # more; the backward apply kernel's only 128-bit store is the gradient.
    phase1 = [k for (_, case), k in kernels.items() if case.startswith("block_phase1") and "bfloat16" in case]
    for k in phase1:
        meta, acc = k["meta"], k["accesses"]
        if k["kernel"] == "_fused_fwd_kernel":
            continue
        assert meta["VEC"] == 8 and meta["BT"] * meta["BD"] >= k["num_warps"] * 32 * 8, k
        if k["kernel"] in ("_apply_fwd_kernel", "_stats_kernel") and meta.get("MODE", 1) == 1:
            assert acc["ld"].get("128", 0) >= 1, k
        elif k["kernel"] == "_stats_kernel":
            grad_o = meta["S_PAD"] * meta["BT"] * meta["BD"] // (k["num_warps"] * 32 * 4)
            assert acc["ld"].get("128", 0) >= grad_o + 1, k
        else:
            assert acc["st"].get("128", 0) >= 1, k
    assert {k["kernel"] for k in phase1} >= {"_stats_kernel", "_apply_fwd_kernel", "_apply_bwd_kernel"}
    # d = 127 cannot be aligned: the scalar kernel is compiled (and allowed to be scalar)
    assert any(k["meta"].get("VEC") == 1 for k in report["kernels"])
    # every launch carries its modelled traffic
    assert all(launch["bytes_per_token"]["hbm"] > 0 for launch in report["launches"])


def test_gate_triton36(tmp_path):
    """The GPU machine's Triton: the shapes it miscompiled with one-token tiles now compile cleanly,
    and phase 1's S = 8 vector tiles compile without spills there too."""
    install = os.environ.get("ATTNRES_GATE_TRITON36", "") not in ("", "0")
    found = SC.triton_target_dir(install=install)
    if found is None:
        pytest.skip(
            f"Triton {SC.TRITON36} is not installed for the gate"
            + (" and could not be (no network?)" if install else ": set ATTNRES_GATE_TRITON36=1 to install it")
        )
    report = SC.run_subprocess("ci36", tmp_path / "gate36.json", found, timeout=900)
    assert report["triton"].startswith("3.6"), report["triton"]
    _check_report(report)


# --------------------------------------------------------------------------------------
# What the gate relies on


def _launches(case: SC.Case) -> list[tuple[str, dict]]:
    recorded = []
    with TA.compile_only(lambda kernel, grid, args, meta: recorded.append((kernel.fn.__name__, meta))):
        SC._call(case)
    return recorded


@pytest.mark.parametrize("t", [1, 3, 16384])
@pytest.mark.parametrize("d", [64, 127, 2048, 7168, 12000])
def test_cuda_launches_never_use_one_token_tiles(t, d):
    """Triton 3.6 miscompiles one-token tiles; every CUDA launch has BT >= 2."""
    for op, s in [
        ("block_attnres", 1),
        ("block_attnres_backward", 1),
        ("block_phase1", 8),
        ("block_phase1_backward", 8),
        ("block_phase2", 1),
        ("block_phase2_backward", 1),
    ]:
        launches = _launches(SC.Case(op, d, "bfloat16", t=t, s=s))
        assert launches
        for name, meta in launches:
            assert meta["BT"] >= 2, (op, name, meta)
            if "VEC" in meta:  # pointer-table kernels (phase 2 takes its tensors directly)
                assert meta["VEC"] == (8 if d % 8 == 0 else 1), (op, name, meta)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [2048, 4096, 7168])
def test_phase1_split_tiles_give_every_thread_a_16_byte_vector(d, dtype):
    """S = 8, 16-bit aligned sources: each split kernel's ``[BT, BD]`` source tile has at
    least ``VEC`` elements per thread, so Triton's coalescing makes the source loads (and
    the source-gradient stores) 128-bit; the token tiles keep ``u`` re-reads at the
    traffic model's figure (forward and backward stats: 32 tokens on long sequences)."""
    for op, t in [("block_phase1", 16384), ("block_phase1", 1), ("block_phase1_backward", 16384)]:
        launches = [(n, m) for n, m in _launches(SC.Case(op, d, dtype, t=t, s=8)) if n != "_fused_fwd_kernel"]
        assert len(launches) == 2, (op, launches)
        for name, meta in launches:
            assert meta["VEC"] == 8 and meta["BT"] * meta["BD"] >= meta["num_warps"] * 32 * 8, (op, t, name, meta)
            if name == "_stats_kernel" and t > 1:
                assert meta["BT"] == 32, (op, name, meta)


def test_vec_needs_aligned_pointers_and_rows():
    x = torch.empty(4, 2048, dtype=torch.bfloat16)
    assert TA._vec([x, x.clone()], 2048) == 8
    assert TA._vec([torch.empty(4, 64)], 64) == 4
    assert TA._vec([torch.empty(4, 127, dtype=torch.float16)], 127) == 1
    flat = torch.empty(4 * 2048 + 1, dtype=torch.bfloat16)
    shifted = flat[1:].view(4, 2048)  # storage offset of 2 bytes
    assert TA._vec([x, shifted], 2048) == 1


def test_misaligned_view_takes_the_scalar_kernel_and_stays_correct():
    d, t = 64, 5
    flat = torch.randn(t * d + 1, device=DEVICE)
    srcs = [flat[1:].view(t, d), torch.randn(t, d, device=DEVICE)]
    q, g = torch.randn(d, device=DEVICE) / 8, 1 + 0.1 * torch.randn(d, device=DEVICE)
    want = R.attnres([s.double() for s in srcs], q.double(), g.double(), 1e-6, 1.0)
    torch.testing.assert_close(TA.attnres_forward(srcs, q, g, 1e-6, 1.0).double(), want, rtol=1e-4, atol=1e-5)


def test_ptx_and_ptxas_parsers():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b16 %rs1, [%rd2];
    @%p2 ld.global.L1::evict_last.b64 %rd3, [%rd4];
    st.global.v2.b16 [%rd5], {%rs2, %rs3};
    st.global.b16 [%rd5], %rs2;
    """
    acc = SC.ptx_accesses(ptx)
    assert acc["ld"] == {"128": 1, "16": 1, "64": 1}
    assert acc["st"] == {"32": 1, "16": 1}
    assert acc["scalar16"] == {"ld": 1, "st": 1}
    log = "ptxas info    : Used 126 registers, used 1 barriers, 16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads"
    assert SC.parse_ptxas_log(log) == {"registers": 126, "stack_frame": 16, "spill_stores": 8, "spill_loads": 12}


def test_traffic_model_matches_the_roofline_counts():
    """Fused forward and backward at the ideal (3K + 2 units); the two-kernel backward reads
    the sources twice (fwd+bwd 4K + 3 units)."""
    k, d = 9, 4096
    unit = d * 2
    fwd = traffic.op_traffic("block_attnres", k=k, d=d, itemsize=2)
    bwd = traffic.op_traffic("block_attnres_backward", k=k, d=d, itemsize=2)
    two = traffic.op_traffic("block_attnres_backward", k=k, d=d, itemsize=2, fused=False)
    assert fwd["hbm"] == fwd["ideal"] == (k + 1) * unit
    assert bwd["hbm"] == bwd["ideal"] == (2 * k + 1) * unit and bwd["cache"] >= k * unit
    assert two["hbm"] == (3 * k + 2) * unit
    split = traffic.op_traffic("block_attnres", k=k, d=d, itemsize=2, fused=False)
    assert split["hbm"] == (2 * k + 1) * unit
    # phase 1 at S = 8 with 32-token tiles: u costs half a source read per source (L1/L2)
    p1 = traffic.op_traffic("block_phase1", k=k, d=d, itemsize=2, s=8, bt=32, fused=False)
    assert p1["cache"] == pytest.approx(k * 8 * d * 4 / 32)
    rows = traffic.table()
    assert {r["op"] for r in rows} >= {"block_attnres", "block_phase1_backward", "block_phase2_backward"}


def test_decode_step_is_one_launch_and_no_device_glue():
    """One token per sequence: a ``block_attnres`` forward is one kernel launch; on the device
    nothing else runs (``u = query * gain`` is formed in the kernel; only the output is allocated)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    srcs = [torch.empty(4, 1, 2048, dtype=torch.bfloat16, device="meta") for _ in range(9)]
    q = torch.empty(2048, device="meta")
    launches = []
    with TA.compile_only(lambda kernel, grid, args, meta: launches.append(kernel.fn.__name__)), Ops() as ops:
        TA.attnres_forward(srcs, q, q, 1e-6, 1.0)
    assert launches == ["_fused_fwd_kernel"]
    compute = [n for n in ops.names if n not in {"empty_like", "empty", "unsqueeze", "view", "lift_fresh", "detach"}]
    assert compute == [], ops.names
