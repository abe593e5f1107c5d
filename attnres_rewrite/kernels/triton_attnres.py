"""Triton kernels for ``torch.ops.attnres.*`` (the CUDA path), forward and backward.

Design (see ``docs/architecture.md`` for the op contract; notation as in
:mod:`.torch_kernels`: ``u = w * g``, ``r_i = rsqrt(mean(v_i^2) + eps)``, ``z_i = r_i (u . v_i)``):

* **Sources are never concatenated.** Every kernel takes a *pointer table*: an int64
  tensor of ``data_ptr()`` values, loaded in the kernel and cast with
  ``tl.pointer_type``. A rewrite keeps its L sources as separate tensors; stacking them
  would cost a full extra read and write of all of them per aggregation. A pointer cast
  from the table carries no alignment, so Triton would read it one element at a time:
  when every source (and gradient) is 16-byte aligned and ``d * itemsize % 16 == 0``
  the launcher passes ``VEC = 16 / itemsize`` and the kernels assert it
  (``tl.multiple_of``), which makes every source load and gradient store a 16-byte
  vector; otherwise (a view with a storage offset) ``VEC = 1``, the scalar kernel.
* **Token tiles have at least two tokens** (``MIN_BT``), T = 1 included (padded and
  masked): Triton 3.6 miscompiles the fused forward for a one-token tile.
* **Fused forward** (``block_attnres`` and ``block_phase1`` when ``S_pad * 2 * next_pow2(d)``
  fits a register tile, 16384 fp32 values): one program per tile of tokens holds the
  whole feature row of each source in registers, computes its fp32 RMS, the S logits,
  and updates S online-softmax accumulators; every source is read exactly once and
  the output is written once.
* **Split path** (larger rows, and every backward): a *stats* kernel loops over the
  sources and over d-chunks (any d: masking, no power-of-two requirement) computing the
  per-(source, query, token) scalars (RMS, logits, gradient dots), finishes the softmax
  per token and writes per-token coefficients to a small fp32 scratch ``[K, S, T]``
  (``S/d`` of the data size); an *apply* kernel on a 2-D grid (token groups x d-chunks)
  then streams the sources once more and produces outputs / gradients from those
  coefficients. So the split forward reads the sources twice (stats pass, accumulate
  pass), and so does every backward: ``block_attnres_backward`` receives neither the
  output nor a per-token log-sum-exp, so all logits must be recomputed before the first
  gradient can be formed. (A forward that also saved the fp32 LSE, T floats, would allow a fused
  single-read backward for rows that fit in registers.) The backward needs no
  ``out`` (nor phase 1's fp32 ``o``) at all: ``grad_out . out`` is rebuilt in fp32 from the
  per-source dots ``grad_out . v_i`` the stats pass computes anyway, which also avoids
  amplifying the fp16/bf16 rounding of ``out`` in the softmax-gradient subtraction.
* **Phase 2** is one small kernel per direction: the partial sum's logit, the
  online-softmax merge with ``(o, m, l)`` and the output in one pass (the row is held in
  registers up to 8192 features; beyond, a stats pass over d-chunks comes first).
* **Query / gain gradients** are reduced deterministically in two stages: each program
  of the apply kernel accumulates its ``[S, d-chunk]`` partial sum in registers over
  all of its tokens and writes it once to ``partial[group, S, d]``; the launcher sums
  over groups with ``torch.sum``. No atomics: the result is bitwise reproducible run to
  run (useful for training-loss comparisons and bisection), and the number of groups
  is small (a few per SM), so the buffer is a negligible fraction of the traffic and
  the second stage costs one tiny reduction.
* Everything is accumulated in fp32; bf16/fp16 values are converted to fp32 right
  after the load (the interpreter's bf16 arithmetic is not IEEE). fp64 inputs are
  routed to the PyTorch kernels (the contract promises fp64 statistics for them,
  used by gradcheck; the Triton kernels are fp32 machines).
* Launch configuration comes from shape heuristics (:func:`_fused_config`,
  :func:`_chunk_config`, :func:`_p2_config`), sized by the sm_90 static gate
  (:mod:`.static_check`: no spills, vector traffic, on Triton 3.6 and 3.9); under
  ``TRITON_INTERPRET=1`` larger token tiles are used so that tests run few (slow)
  interpreted program instances.

The launchers accept CPU tensors, so the tests run them under ``TRITON_INTERPRET=1``,
and ``meta`` tensors under :class:`compile_only` (the gate compiles what they would
launch). Compatible with Triton 3.6-3.9: plain pointer arithmetic, no block pointers.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import torch_kernels as K
from .checks import check_aggregate, check_phase1, check_phase2

FUSED_MAX_ELEMS = 16384  # fp32 accumulator values per program in the fused forward (at the minimum tile)
FUSED_GROW_ELEMS = 8192  # the fused token tile grows while the accumulator stays within this
CHUNK_ELEMS = 8192  # elements of a [S_pad, BT, BD] tile in the split kernels
CHUNK_MAX_BT = 32  # token tile of the split kernels (u is re-read once per tile and source)
# Every token tile has at least two tokens: Triton 3.6 miscompiles the fused forward for a
# one-token tile (32 registers, 10-75 KB of spills, each thread reducing the whole row,
# minutes of compile time); a two-token tile (T = 1 padded and masked) compiles cleanly.
MIN_BT = 2
# Under TRITON_INTERPRET=1 each program instance costs milliseconds per op, so token
# tiles grow to this many tokens (tests lower it to exercise multi-program grids).
INTERPRET_MAX_BT = 256
H100_SMS = 132  # streaming multiprocessors assumed by compile-only runs (sm_90)


# ``tl.sum`` is itself a @jit function; under TRITON_INTERPRET=1 every nested jit call
# re-patches triton.language (~10 ms), which made the interpreted tests ~3x slower.
# ``tl.reduce`` with the standard sum combiner compiles to exactly what ``tl.sum`` does
# for fp32 inputs, and the interpreter maps it straight to ``np.sum``. It is a private
# name (present in Triton 3.x); a Triton without it gets an equivalent public combiner.
_sum_combine = getattr(tl.standard, "_sum_combine", None)
if _sum_combine is None:  # pragma: no cover - depends on the installed Triton

    @triton.jit
    def _sum_combine(a, b):
        return a + b


# --------------------------------------------------------------------------------------
# Where the kernels go: launched (CUDA, or the interpreter on CPU), or only compiled
#
# ``compile_only(record)`` (used by :mod:`.static_check`, the sm_90 gate) makes every
# launcher hand its launches to ``record(kernel, grid, args, meta)`` instead of running
# them, with CUDA launch heuristics (token tiles, SM count) whatever the tensors' device.
# The launchers then accept ``meta`` tensors, so the gate sizes real shapes (T = 16K,
# d = 7168) without allocating them.

_COMPILE_ONLY: dict = {}


class compile_only:  # noqa: N801  (a context manager used like a function)
    """Context: launches go to ``record`` (not run); heuristics are those of a ``num_sms`` GPU."""

    def __init__(self, record, num_sms: int = H100_SMS):
        self.state = {"record": record, "num_sms": num_sms}

    def __enter__(self):
        _COMPILE_ONLY.update(self.state)
        return self

    def __exit__(self, *exc):
        _COMPILE_ONLY.clear()


def _launch(kernel, grid: tuple, *args, **meta) -> None:
    record = _COMPILE_ONLY.get("record")
    if record is not None:
        record(kernel, grid, args, meta)
    else:
        kernel[grid](*args, **meta)


def _interpret() -> bool:
    if _COMPILE_ONLY:
        return False
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda" or bool(_COMPILE_ONLY)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _warps(elems: int) -> int:
    """Warps for a tile of ``elems`` fp32 values: about 16-32 values per thread."""
    if elems <= 1024:
        return 2
    if elems <= 2048:
        return 4
    if elems <= 8192:
        return 8
    return 16


def _num_sms(device: torch.device) -> int:
    if _COMPILE_ONLY:
        return _COMPILE_ONLY["num_sms"]
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _fused_config(s_pad: int, d: int, t: int) -> tuple[int, int, int] | None:
    """(BT, BD, num_warps) for the fused forward, or None when a row does not fit.

    A program holds ``S_pad * BT * BD`` fp32 accumulators plus one ``BT x BD`` source
    tile. The tile has at least ``MIN_BT`` tokens, so a row fits when
    ``S_pad * MIN_BT * BD <= FUSED_MAX_ELEMS`` (every d <= 8192 for one query); the
    token tile then grows while the accumulator stays within ``FUSED_GROW_ELEMS``
    (fewer, fatter programs for small d); under the interpreter it grows further to cut
    the number of program instances.
    """
    bd = _pow2(d)
    if s_pad * MIN_BT * bd > FUSED_MAX_ELEMS:
        return None
    budget = (1 << 18) if _interpret() else FUSED_GROW_ELEMS
    cap = INTERPRET_MAX_BT if _interpret() else 16
    bt = MIN_BT
    while bt * 2 <= min(_pow2(t), cap) and s_pad * bt * 2 * bd <= budget:
        bt *= 2
    return bt, bd, _warps(s_pad * bt * bd)


def _chunk_config(
    s_pad: int,
    d: int,
    t: int,
    block_d: int | None,
    budget: int = CHUNK_ELEMS,
    *,
    vec: int = 1,
    warps: int = 8,
    max_bt: int = CHUNK_MAX_BT,
    max_bd: int = 512,
) -> tuple[int, int, int]:
    """(BT, BD, num_warps) for the split kernels: token tiles first, then d-chunks up to 512.

    The stats kernel reads a ``[S, BD]`` chunk of ``u`` (fp32) per source and token tile,
    i.e. ``2 S / BT`` bytes of ``u`` per byte of a 16-bit source: the token tile is made
    as large as ``CHUNK_MAX_BT`` (so at S = 8, u costs half a source read, from L1/L2)
    and the d-chunk shrinks to keep the ``[S_pad, BT, BD]`` tile within ``budget``
    (``CHUNK_ELEMS``; half of it for the backward stats kernel, which also holds a
    ``grad_out`` tile: the sm_90 gate found it spilling at the full budget).

    At ``S_pad = 8`` with 16-bit, 16-byte aligned sources (``vec = 8``) that tile leaves
    each thread 4 source elements (64-bit loads): :func:`_vector_tile` sizes it from
    ``warps``, ``max_bt`` and ``max_bd`` instead, one 16-byte vector per thread. A
    kernel that asks for narrow d-chunks (the backward's, ``max_bd``) gets them for
    ``T >= max_bt`` only: fewer tokens keep the general rule's wider chunks (a short
    d-loop for the few programs of a short sequence).
    """
    if _interpret():
        bd = min(_pow2(d), 512) if block_d is None else _pow2(block_d)
        bt = MIN_BT
        while bt * 2 <= min(_pow2(t), INTERPRET_MAX_BT) and s_pad * bt * 2 * bd <= (1 << 18):
            bt *= 2
        while s_pad * bt * bd > (1 << 18) and bd > 16:
            bd //= 2
        return bt, bd, _warps(s_pad * bt * bd)
    cap = min(_pow2(d), 512) if block_d is None else _pow2(block_d)
    if s_pad == 8 and vec == 8 and (max_bd >= cap or t >= max_bt):
        return _vector_tile(t, min(cap, max_bd), warps, max_bt)
    bt = min(max(_pow2(t), MIN_BT), CHUNK_MAX_BT)
    bd = max(min(32, cap), min(cap, budget // (s_pad * bt)))  # BD = 16 tiles spilled (sm_90 gate)
    while s_pad * bt * bd > budget and bt > MIN_BT:
        bt //= 2
    return bt, bd, _warps(s_pad * bt * bd)


def _vector_tile(t: int, cap: int, warps: int, max_bt: int) -> tuple[int, int, int]:
    """(BT, BD, num_warps) of a split kernel at S_pad = 8 with 16-bit, 16-byte aligned sources.

    Triton's coalescing gives a load ``min(16 bytes, elements / threads)`` per thread: the
    general rule's ``[8, 32, 32]`` tile on 8 warps reads its ``[32, 32]`` source tile 4
    elements (64 bits) at a time. Here ``BT * BD = warps * 32 * 8``: one 16-byte vector
    of the source tile per thread (``ld.global.v4.b32``, and so are the source
    gradients' stores), so ``8 * 8 = 64`` fp32 values per thread of the ``[8, BT, BD]``
    tile. Token tile ``min(T, max_bt)``, the d-chunk fills the rest up to ``cap``;
    fewer warps when the tile is still smaller (narrow rows). Sized by the sm_90 gate
    (Triton 3.6 and 3.9, no spills):

    * forward stats and apply: 8 warps, ``[8, 32, 64]`` (on 4 warps, ``[8, 32, 32]``,
      Triton 3.6's ptxas spills the stats kernel at 64 registers); decode ``[8, 2, 512]``
      on 4 warps;
    * backward stats: 4 warps, ``[8, 32, 32]`` (it also holds a ``grad_o`` tile; wider
      d-chunks took Triton 3.6 to 254-255 registers);
    * backward apply: 4 warps, ``[8, 64, 16]``: it keeps its ``[8, BT, BD]`` ``grad_o``
      tile, ``u`` and the ``grad u`` sum in registers across the sources, 168-240
      registers; d-chunks of 32-128 took 243-255.
    """
    elems = warps * 32 * 8
    bt = min(max(_pow2(t), MIN_BT), max_bt)
    bd = min(cap, max(16, elems // bt))
    return bt, bd, max(1, min(warps, bt * bd // (32 * 8)))


def _vec(tensors: Sequence[Tensor], d: int) -> int:
    """Elements per 16-byte vector when every tensor and every row is 16-byte aligned, else 1.

    The kernels read sources (and write their gradients) through pointers cast from an
    int64 table, which carry no alignment: with ``VEC > 1`` they assert 16-byte
    alignment (``tl.multiple_of``) and ``d % VEC == 0``, and the loads become 16-byte
    vectors. A view with a storage offset can be misaligned; it gets the scalar kernel.
    """
    item = tensors[0].element_size()
    if (d * item) % 16 or any(x.data_ptr() % 16 for x in tensors):
        return 1
    return 16 // item


_PTR_TABLES: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
_PTR_TABLES_MAX = 4096
# Tables built while a CUDA graph was being captured: the graph replays their host-to-
# device copy from the pinned host buffer, so that buffer must outlive every replay.
_CAPTURED_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def _ptr_table(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """int64 tensor of data pointers (read in the kernel, cast with ``tl.pointer_type``).

    On CUDA the table is cached by its content (the pointer values themselves, so a hit
    can never be stale): a training loop or a decode loop meets the same addresses step
    after step (the caching allocator reuses blocks), so a hit costs one tuple and one
    dict lookup on the host and nothing on the GPU. A miss is a pinned, non-blocking
    copy (the host never waits for the GPU to drain before a launch); the pinned host
    buffer is kept with the device table, never freed while the entry lives. A miss
    during CUDA-graph capture records that copy in the graph, which replays it from the
    host buffer: such entries are never evicted, so the buffer outlives the graph.
    """
    ptrs = tuple(x.data_ptr() for x in tensors)
    if device.type != "cuda":
        return torch.tensor(ptrs, dtype=torch.int64, device=device)
    key = (device.index, ptrs)
    entry = _PTR_TABLES.get(key) or _CAPTURED_TABLES.get(key)
    if entry is None:
        host = torch.tensor(ptrs, dtype=torch.int64).pin_memory()
        entry = (host, host.to(device, non_blocking=True))
        if torch.cuda.is_current_stream_capturing():
            _CAPTURED_TABLES[key] = entry
        else:
            _PTR_TABLES[key] = entry
            if len(_PTR_TABLES) > _PTR_TABLES_MAX:
                _PTR_TABLES.popitem(last=False)
    elif key in _PTR_TABLES:
        _PTR_TABLES.move_to_end(key)
    return entry[1]


def _flat(x: Tensor) -> Tensor:
    return x.contiguous()


# ======================================================================================
# Kernels


@triton.jit
def _fused_fwd_kernel(
    tab,
    first,
    Q,
    Gk,
    out,
    m_out,
    l_out,
    num_src,
    T,
    D,
    S,
    eps,
    scale,
    S_PAD: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    PHASE1: tl.constexpr,
    VEC: tl.constexpr,
):
    """One token tile, whole rows in registers: each source read once, output written once.

    ``PHASE1``: write the unnormalised ``o`` (fp32) and ``m, l`` for S queries; otherwise
    write ``scale * o / l`` in the output's dtype (S = 1). ``u = Q * Gk`` is formed here
    (one launch per call: what a decode step pays for).
    """
    if VEC > 1:  # the launcher checked D % VEC == 0; say so, so row offsets and masks vectorise
        D = D // VEC * VEC
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    t64 = t.to(tl.int64)
    dd = tl.arange(0, BD)
    s = tl.arange(0, S_PAD)
    tmask = t < T
    dmask = dd < D
    smask = s < S
    offs = t64[:, None] * D + dd[None, :]
    mask2 = tmask[:, None] & dmask[None, :]
    u_off = s[:, None] * D + dd[None, :]
    u_mask = smask[:, None] & dmask[None, :]
    u = tl.load(Q + u_off, mask=u_mask, other=0.0).to(tl.float32) * tl.load(Gk + u_off, mask=u_mask, other=0.0).to(
        tl.float32
    )
    m = tl.full([S_PAD, BT], float("-inf"), tl.float32)
    l = tl.zeros([S_PAD, BT], tl.float32)
    acc = tl.zeros([S_PAD, BT, BD], tl.float32)
    for i in range(num_src):
        src = tl.load(tab + i).to(tl.pointer_type(first.dtype.element_ty))
        if VEC > 1:
            src = tl.multiple_of(src, 16)
        v = tl.load(src + offs, mask=mask2, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.reduce(v * v, 1, _sum_combine) / D + eps)
        z = tl.reduce(v[None, :, :] * u[:, None, :], 2, _sum_combine) * r[None, :]
        m_new = tl.maximum(m, z)
        a = tl.exp(m - m_new)
        b = tl.exp(z - m_new)
        acc = acc * a[:, :, None] + b[:, :, None] * v[None, :, :]
        l = l * a + b
        m = m_new
    st = s[:, None].to(tl.int64) * T + t64[None, :]
    stmask = smask[:, None] & tmask[None, :]
    o_off = st[:, :, None] * D + dd[None, None, :]
    o_mask = stmask[:, :, None] & dmask[None, None, :]
    if PHASE1:
        tl.store(out + o_off, acc, mask=o_mask)
        tl.store(m_out + st, m, mask=stmask)
        tl.store(l_out + st, l, mask=stmask)
    else:
        res = acc * (scale / l)[:, :, None]
        tl.store(out + o_off, res.to(out.dtype.element_ty), mask=o_mask)


@triton.jit
def _stats_kernel(
    tab,
    first,
    U,
    G,
    m_io,
    l_io,
    gm,
    gl,
    Z,
    DG,
    R,
    num_src,
    T,
    D,
    S,
    eps,
    scale,
    S_PAD: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    MODE: tl.constexpr,
    VEC: tl.constexpr,
):
    """Per-token statistics over all sources, streamed in d-chunks; writes coefficients.

    MODE 0 (block_attnres forward): ``Z[i] <- scale * softmax weight``.
    MODE 1 (phase 1 forward): ``Z[i] <- e^{z_i - m}``; writes ``m, l``.
    MODE 2 (block_attnres backward) and MODE 3 (phase 1 backward): the coefficients of
    ``grad v_i = sum_s Z[i,s] G[s] + sum_s DG[i,s] u_s + R[i] v_i`` and
    ``grad u_s = sum_t DG[i,s] v_i`` (``Z = dh/dv`` weight, ``DG = gz * r``,
    ``R = -r^2/d sum_s gz z``). ``G`` is grad_out (MODE 2) / grad_o (MODE 3).
    ``grad_out . out`` / ``grad_o . o`` are recomputed from the per-source dots, so the
    kernel never reads ``out`` or ``o``. Phase 1's max term (``grad_m - grad_o.o -
    grad_l l``) goes to the first source attaining the recomputed maximum.
    """
    if VEC > 1:  # the launcher checked D % VEC == 0; say so, so row offsets and masks vectorise
        D = D // VEC * VEC
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    t64 = t.to(tl.int64)
    s = tl.arange(0, S_PAD)
    tmask = t < T
    smask = s < S
    st = s[:, None].to(tl.int64) * T + t64[None, :]
    stmask = smask[:, None] & tmask[None, :]
    KST = S * T  # scratch stride per source (int32 is ample: K*S*T << 2^31)
    HAS_G: tl.constexpr = MODE >= 2
    m = tl.full([S_PAD, BT], float("-inf"), tl.float32)
    l = tl.zeros([S_PAD, BT], tl.float32)
    amax = tl.zeros([S_PAD, BT], tl.int32)
    for i in range(num_src):
        src = tl.load(tab + i).to(tl.pointer_type(first.dtype.element_ty))
        if VEC > 1:
            src = tl.multiple_of(src, 16)
        ss = tl.zeros([BT], tl.float32)
        du = tl.zeros([S_PAD, BT], tl.float32)
        dg = tl.zeros([S_PAD, BT], tl.float32)
        for c in range(0, D, BD):
            dd = c + tl.arange(0, BD)
            dmask = dd < D
            v = tl.load(src + t64[:, None] * D + dd[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
            v = v.to(tl.float32)
            ss += tl.reduce(v * v, 1, _sum_combine)
            uc = tl.load(U + s[:, None] * D + dd[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
            du += tl.reduce(v[None, :, :] * uc[:, None, :], 2, _sum_combine)
            if HAS_G:
                g_off = st[:, :, None] * D + dd[None, None, :]
                g_mask = stmask[:, :, None] & dmask[None, None, :]
                gc = tl.load(G + g_off, mask=g_mask, other=0.0).to(tl.float32)
                dg += tl.reduce(gc * v[None, :, :], 2, _sum_combine)
        r = tl.rsqrt(ss / D + eps)
        z = du * r[None, :]
        tl.store(Z + i * KST + st, z, mask=stmask)
        if HAS_G:
            tl.store(DG + i * KST + st, dg, mask=stmask)
            tl.store(R + i * T + t64, r, mask=tmask)
        if MODE == 3:
            amax = tl.where(z > m, i, amax)
        m_new = tl.maximum(m, z)
        l = l * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    tl.debug_barrier()  # the scratch rows written above are read back below, by other threads
    if MODE == 1:
        tl.store(m_io + st, m, mask=stmask)
        tl.store(l_io + st, l, mask=stmask)
    if MODE <= 1:
        coef = tl.full([S_PAD, BT], 1.0, tl.float32)
        if MODE == 0:
            coef = scale / l
        for i in range(num_src):
            z = tl.load(Z + i * KST + st, mask=stmask, other=0.0)
            tl.store(Z + i * KST + st, tl.exp(z - m) * coef, mask=stmask)
    else:
        # grad_out . out (MODE 2) and grad_o . o (MODE 3) from the per-source dots in fp32:
        # sum_i e^{z_i - m} (g . v_i). Exact in fp32, unlike a dot with the stored fp16/bf16
        # ``out`` (whose rounding the subtraction in gz would amplify), and no read of
        # ``out`` / the fp32 ``o``.
        if MODE == 3:
            m = tl.load(m_io + st, mask=stmask, other=0.0)
        go_o = tl.zeros([S_PAD, BT], tl.float32)
        for i in range(num_src):
            z = tl.load(Z + i * KST + st, mask=stmask, other=0.0)
            dg = tl.load(DG + i * KST + st, mask=stmask, other=0.0)
            go_o += tl.exp(z - m) * dg
        if MODE == 2:
            go_o = go_o * scale / l
        else:
            lsv = tl.load(l_io + st, mask=stmask, other=1.0)
            gls = tl.load(gl + st, mask=stmask, other=0.0)
            peak_grad = tl.load(gm + st, mask=stmask, other=0.0) - go_o - gls * lsv
        for i in range(num_src):
            z = tl.load(Z + i * KST + st, mask=stmask, other=0.0)
            dg = tl.load(DG + i * KST + st, mask=stmask, other=0.0)
            r = tl.load(R + i * T + t64, mask=tmask, other=0.0)
            p = tl.exp(z - m)
            if MODE == 2:
                alpha = p / l
                gz = alpha * (scale * dg - go_o)
                cg = scale * alpha
            else:
                gz = p * (dg + gls) + tl.where(amax == i, peak_grad, 0.0)
                cg = p
            tl.store(Z + i * KST + st, cg, mask=stmask)
            tl.store(DG + i * KST + st, gz * r[None, :], mask=stmask)
            tl.store(R + i * T + t64, -tl.reduce(gz * z, 0, _sum_combine) * r * r / D, mask=tmask)


@triton.jit
def _apply_fwd_kernel(
    tab,
    first,
    W,
    out,
    num_src,
    T,
    D,
    S,
    S_PAD: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    VEC: tl.constexpr,
):
    """``out[s, t, chunk] = sum_i W[i, s, t] v_i[t, chunk]`` on a (token tile, d-chunk) grid."""
    if VEC > 1:  # the launcher checked D % VEC == 0; say so, so row offsets and masks vectorise
        D = D // VEC * VEC
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    t64 = t.to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    s = tl.arange(0, S_PAD)
    tmask = t < T
    dmask = dd < D
    smask = s < S
    st = s[:, None].to(tl.int64) * T + t64[None, :]
    stmask = smask[:, None] & tmask[None, :]
    KST = S * T  # scratch stride per source (int32 is ample: K*S*T << 2^31)
    offs = t64[:, None] * D + dd[None, :]
    mask2 = tmask[:, None] & dmask[None, :]
    acc = tl.zeros([S_PAD, BT, BD], tl.float32)
    for i in range(num_src):
        src = tl.load(tab + i).to(tl.pointer_type(first.dtype.element_ty))
        if VEC > 1:
            src = tl.multiple_of(src, 16)
        v = tl.load(src + offs, mask=mask2, other=0.0).to(tl.float32)
        w = tl.load(W + i * KST + st, mask=stmask, other=0.0)
        acc += w[:, :, None] * v[None, :, :]
    o_off = st[:, :, None] * D + dd[None, None, :]
    o_mask = stmask[:, :, None] & dmask[None, None, :]
    tl.store(out + o_off, acc.to(out.dtype.element_ty), mask=o_mask)


@triton.jit
def _apply_bwd_kernel(
    tab,
    first,
    gtab,
    gfirst,
    U,
    G,
    CG,
    CU,
    CV,
    partial,
    num_src,
    T,
    D,
    S,
    num_tiles,
    NG,
    S_PAD: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    VEC: tl.constexpr,
):
    """Source gradients from per-token coefficients, plus a partial ``grad u`` per program.

    Grid (token groups, d-chunks); a program visits token tiles ``g, g + NG, ...`` so that
    its ``[S, d-chunk]`` partial sum of ``grad u`` stays in registers and is written once.
    """
    if VEC > 1:  # the launcher checked D % VEC == 0; say so, so row offsets and masks vectorise
        D = D // VEC * VEC
    g = tl.program_id(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    s = tl.arange(0, S_PAD)
    dmask = dd < D
    smask = s < S
    KST = S * T  # scratch stride per source (int32 is ample: K*S*T << 2^31)
    u = tl.load(U + s[:, None] * D + dd[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    gu = tl.zeros([S_PAD, BD], tl.float32)
    for tile in range(g, num_tiles, NG):
        t = tile * BT + tl.arange(0, BT)
        t64 = t.to(tl.int64)
        tmask = t < T
        st = s[:, None].to(tl.int64) * T + t64[None, :]
        stmask = smask[:, None] & tmask[None, :]
        offs = t64[:, None] * D + dd[None, :]
        mask2 = tmask[:, None] & dmask[None, :]
        gc = tl.load(
            G + st[:, :, None] * D + dd[None, None, :], mask=stmask[:, :, None] & dmask[None, None, :], other=0.0
        )
        gc = gc.to(tl.float32)
        for i in range(num_src):
            src = tl.load(tab + i).to(tl.pointer_type(first.dtype.element_ty))
            if VEC > 1:
                src = tl.multiple_of(src, 16)
            dst = tl.load(gtab + i).to(tl.pointer_type(gfirst.dtype.element_ty))
            if VEC > 1:
                dst = tl.multiple_of(dst, 16)
            v = tl.load(src + offs, mask=mask2, other=0.0).to(tl.float32)
            cg = tl.load(CG + i * KST + st, mask=stmask, other=0.0)
            cu = tl.load(CU + i * KST + st, mask=stmask, other=0.0)
            cv = tl.load(CV + i * T + t64, mask=tmask, other=0.0)
            # grad u first: Triton 3.6 then needs ~70 fewer registers at S = 8 (sm_90 gate)
            gu += tl.reduce(cu[:, :, None] * v[None, :, :], 1, _sum_combine)
            gv = (
                tl.reduce(cg[:, :, None] * gc, 0, _sum_combine)
                + tl.reduce(cu[:, :, None] * u[:, None, :], 0, _sum_combine)
                + cv[:, None] * v
            )
            tl.store(dst + offs, gv.to(gfirst.dtype.element_ty), mask=mask2)
    p_off = (g * S + s[:, None]).to(tl.int64) * D + dd[None, :]
    tl.store(partial + p_off, gu, mask=smask[:, None] & dmask[None, :])


@triton.jit
def _fused_bwd_kernel(
    tab,
    first,
    gtab,
    gfirst,
    Q,
    Gk,
    G,
    partial,
    num_src,
    T,
    D,
    num_tiles,
    NG,
    eps,
    scale,
    K_PAD: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    VEC: tl.constexpr,
):
    """``block_attnres`` backward in one kernel, whole rows in registers (rows up to 4096).

    Per token tile: the first loop reads each source row once for its RMS, logit and
    ``grad_out . v_i`` (kept as ``[K_PAD, BT]`` register tables), the softmax and the
    fp32 ``grad_out . h`` follow, and the second loop re-reads each row right away (from
    L1/L2: the tile of all sources was just read) to write its gradient. So each source
    crosses the memory bus once per backward while the ``K x BT x d`` tiles of the
    programs in flight fit in L2; no scratch, no second launch. Program ``g`` visits tiles
    ``g, g + NG, ...`` and keeps its ``grad u`` partial sum in registers (written once).
    """
    if VEC > 1:  # the launcher checked D % VEC == 0; say so, so row offsets and masks vectorise
        D = D // VEC * VEC
    g = tl.program_id(0)
    dd = tl.arange(0, BD)
    dmask = dd < D
    u = tl.load(Q + dd, mask=dmask, other=0.0).to(tl.float32) * tl.load(Gk + dd, mask=dmask, other=0.0).to(tl.float32)
    kk = tl.arange(0, K_PAD)
    kvalid = kk < num_src
    gu = tl.zeros([BD], tl.float32)
    for tile in range(g, num_tiles, NG):
        t = tile * BT + tl.arange(0, BT)
        t64 = t.to(tl.int64)
        tmask = t < T
        offs = t64[:, None] * D + dd[None, :]
        mask2 = tmask[:, None] & dmask[None, :]
        go = tl.load(G + offs, mask=mask2, other=0.0).to(tl.float32)
        zs = tl.zeros([K_PAD, BT], tl.float32)
        rs = tl.zeros([K_PAD, BT], tl.float32)
        dgs = tl.zeros([K_PAD, BT], tl.float32)
        for i in range(num_src):
            src = tl.load(tab + i).to(tl.pointer_type(first.dtype.element_ty))
            if VEC > 1:
                src = tl.multiple_of(src, 16)
            v = tl.load(src + offs, mask=mask2, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.reduce(v * v, 1, _sum_combine) / D + eps)
            sel = kk[:, None] == i
            zs = tl.where(sel, (tl.reduce(v * u[None, :], 1, _sum_combine) * r)[None, :], zs)
            rs = tl.where(sel, r[None, :], rs)
            dgs = tl.where(sel, tl.reduce(go * v, 1, _sum_combine)[None, :], dgs)
        peak = tl.max(tl.where(kvalid[:, None], zs, float("-inf")), 0)
        p = tl.where(kvalid[:, None], tl.exp(zs - peak[None, :]), 0.0)
        alpha = p / tl.reduce(p, 0, _sum_combine)[None, :]
        go_h = scale * tl.reduce(alpha * dgs, 0, _sum_combine)  # fp32 grad_out . h from the dots
        gz = alpha * (scale * dgs - go_h[None, :])
        cgs = scale * alpha
        cus = gz * rs
        cvs = -gz * zs * rs * rs / D
        for i in range(num_src):
            src = tl.load(tab + i).to(tl.pointer_type(first.dtype.element_ty))
            dst = tl.load(gtab + i).to(tl.pointer_type(gfirst.dtype.element_ty))
            if VEC > 1:
                src = tl.multiple_of(src, 16)
                dst = tl.multiple_of(dst, 16)
            v = tl.load(src + offs, mask=mask2, other=0.0).to(tl.float32)
            sel = kk[:, None] == i
            cg = tl.reduce(tl.where(sel, cgs, 0.0), 0, _sum_combine)
            cu = tl.reduce(tl.where(sel, cus, 0.0), 0, _sum_combine)
            cv = tl.reduce(tl.where(sel, cvs, 0.0), 0, _sum_combine)
            gv = cg[:, None] * go + cu[:, None] * u[None, :] + cv[:, None] * v
            tl.store(dst + offs, gv.to(gfirst.dtype.element_ty), mask=mask2)
            gu += tl.reduce(cu[:, None] * v, 0, _sum_combine)
    tl.store(partial + g.to(tl.int64) * D + dd, gu, mask=dmask)


@triton.jit
def _phase2_fwd_kernel(
    O,
    m_in,
    l_in,
    P,
    U,
    out,
    T,
    D,
    eps,
    scale,
    HAS_P: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """Merge phase-1 ``(o, m, l)`` with the partial sum's own logit; one output write.

    With ``ONE_CHUNK`` the partial-sum row is held in registers (read once); otherwise a
    stats pass over d-chunks precedes the output pass (the partial sum is read twice).
    """
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    t64 = t.to(tl.int64)
    tmask = t < T
    mm = tl.load(m_in + t64, mask=tmask, other=0.0)
    ll = tl.load(l_in + t64, mask=tmask, other=1.0)
    if ONE_CHUNK:
        dd = tl.arange(0, BD)
        dmask = dd < D
        offs = t64[:, None] * D + dd[None, :]
        mask2 = tmask[:, None] & dmask[None, :]
        ov = tl.load(O + offs, mask=mask2, other=0.0)
        if HAS_P:
            u = tl.load(U + dd, mask=dmask, other=0.0)
            pv = tl.load(P + offs, mask=mask2, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.reduce(pv * pv, 1, _sum_combine) / D + eps)
            z2 = tl.reduce(pv * u[None, :], 1, _sum_combine) * r
            peak = tl.maximum(mm, z2)
            a1 = tl.exp(mm - peak)
            a2 = tl.exp(z2 - peak)
            inv = scale / (a1 * ll + a2)
            res = (a1 * inv)[:, None] * ov + (a2 * inv)[:, None] * pv
        else:
            res = (scale / ll)[:, None] * ov
        tl.store(out + offs, res.to(out.dtype.element_ty), mask=mask2)
    else:
        c1 = scale / ll
        c2 = tl.zeros([BT], tl.float32)
        if HAS_P:
            ss = tl.zeros([BT], tl.float32)
            du = tl.zeros([BT], tl.float32)
            for c in range(0, D, BD):
                dd = c + tl.arange(0, BD)
                dmask = dd < D
                u = tl.load(U + dd, mask=dmask, other=0.0)
                pv = tl.load(P + t64[:, None] * D + dd[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
                pv = pv.to(tl.float32)
                ss += tl.reduce(pv * pv, 1, _sum_combine)
                du += tl.reduce(pv * u[None, :], 1, _sum_combine)
            z2 = du * tl.rsqrt(ss / D + eps)
            peak = tl.maximum(mm, z2)
            a1 = tl.exp(mm - peak)
            a2 = tl.exp(z2 - peak)
            inv = scale / (a1 * ll + a2)
            c1 = a1 * inv
            c2 = a2 * inv
        for c in range(0, D, BD):
            dd = c + tl.arange(0, BD)
            dmask = dd < D
            offs = t64[:, None] * D + dd[None, :]
            mask2 = tmask[:, None] & dmask[None, :]
            res = c1[:, None] * tl.load(O + offs, mask=mask2, other=0.0)
            if HAS_P:
                res += c2[:, None] * tl.load(P + offs, mask=mask2, other=0.0).to(tl.float32)
            tl.store(out + offs, res.to(out.dtype.element_ty), mask=mask2)


@triton.jit
def _phase2_bwd_kernel(
    GO,
    O,
    m_in,
    l_in,
    P,
    U,
    g_o,
    g_m,
    g_l,
    g_p,
    partial,
    T,
    D,
    num_tiles,
    NG,
    eps,
    scale,
    ONE_CHUNK: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """Gradients of the phase-2 merge (formulas in ``torch_kernels.phase2_backward``).

    Program ``g`` visits token tiles ``g, g + NG, ...``; per tile a reduction pass gives
    ``|p|^2, u.p, go.o, go.p`` and a write pass emits ``g_o, g_p``. ``grad u`` is summed
    per program into ``partial[g]`` (registers with ``ONE_CHUNK``, else a program-owned
    row updated in place), then over programs by the launcher: deterministic.
    """
    g = tl.program_id(0)
    if ONE_CHUNK:
        dd = tl.arange(0, BD)
        dmask = dd < D
        u = tl.load(U + dd, mask=dmask, other=0.0)
        gu = tl.zeros([BD], tl.float32)
    for tile in range(g, num_tiles, NG):
        t = tile * BT + tl.arange(0, BT)
        t64 = t.to(tl.int64)
        tmask = t < T
        mm = tl.load(m_in + t64, mask=tmask, other=0.0)
        ll = tl.load(l_in + t64, mask=tmask, other=1.0)
        if ONE_CHUNK:
            offs = t64[:, None] * D + dd[None, :]
            mask2 = tmask[:, None] & dmask[None, :]
            pv = tl.load(P + offs, mask=mask2, other=0.0).to(tl.float32)
            ov = tl.load(O + offs, mask=mask2, other=0.0)
            gov = tl.load(GO + offs, mask=mask2, other=0.0).to(tl.float32)
            ss = tl.reduce(pv * pv, 1, _sum_combine)
            du = tl.reduce(pv * u[None, :], 1, _sum_combine)
            gdo = tl.reduce(gov * ov, 1, _sum_combine)
            gdp = tl.reduce(gov * pv, 1, _sum_combine)
        else:
            ss = tl.zeros([BT], tl.float32)
            du = tl.zeros([BT], tl.float32)
            gdo = tl.zeros([BT], tl.float32)
            gdp = tl.zeros([BT], tl.float32)
            for c in range(0, D, BD):
                dc = c + tl.arange(0, BD)
                dm = dc < D
                offc = t64[:, None] * D + dc[None, :]
                mc = tmask[:, None] & dm[None, :]
                pc = tl.load(P + offc, mask=mc, other=0.0).to(tl.float32)
                oc = tl.load(O + offc, mask=mc, other=0.0)
                gc = tl.load(GO + offc, mask=mc, other=0.0).to(tl.float32)
                uc = tl.load(U + dc, mask=dm, other=0.0)
                ss += tl.reduce(pc * pc, 1, _sum_combine)
                du += tl.reduce(pc * uc[None, :], 1, _sum_combine)
                gdo += tl.reduce(gc * oc, 1, _sum_combine)
                gdp += tl.reduce(gc * pc, 1, _sum_combine)
        r = tl.rsqrt(ss / D + eps)
        z2 = du * r
        peak = tl.maximum(mm, z2)
        a1 = tl.exp(mm - peak)
        a2 = tl.exp(z2 - peak)
        den = a1 * ll + a2
        go_h = (a1 * gdo + a2 * gdp) * scale / den
        tl.store(g_l + t64, -go_h * a1 / den, mask=tmask)
        tl.store(g_m + t64, a1 / den * (scale * gdo - go_h * ll), mask=tmask)
        gz = a2 / den * (scale * gdp - go_h)
        co = scale * a1 / den
        cp = scale * a2 / den
        cu = gz * r
        cv = -gz * z2 * r * r / D
        if ONE_CHUNK:
            tl.store(g_o + offs, co[:, None] * gov, mask=mask2)
            gp = cp[:, None] * gov + cu[:, None] * u[None, :] + cv[:, None] * pv
            tl.store(g_p + offs, gp.to(g_p.dtype.element_ty), mask=mask2)
            gu += tl.reduce(cu[:, None] * pv, 0, _sum_combine)
        else:
            for c in range(0, D, BD):
                dc = c + tl.arange(0, BD)
                dm = dc < D
                offc = t64[:, None] * D + dc[None, :]
                mc = tmask[:, None] & dm[None, :]
                pc = tl.load(P + offc, mask=mc, other=0.0).to(tl.float32)
                gc = tl.load(GO + offc, mask=mc, other=0.0).to(tl.float32)
                uc = tl.load(U + dc, mask=dm, other=0.0)
                tl.store(g_o + offc, co[:, None] * gc, mask=mc)
                gp = cp[:, None] * gc + cu[:, None] * uc[None, :] + cv[:, None] * pc
                tl.store(g_p + offc, gp.to(g_p.dtype.element_ty), mask=mc)
                row = partial + g.to(tl.int64) * D + dc
                tl.store(row, tl.load(row, mask=dm, other=0.0) + tl.reduce(cu[:, None] * pc, 0, _sum_combine), mask=dm)
    if ONE_CHUNK:
        tl.store(partial + g.to(tl.int64) * D + dd, gu, mask=dmask)


# ======================================================================================
# Launchers (accept CPU tensors under TRITON_INTERPRET=1)


def _u(query: Tensor, key_gain: Tensor) -> Tensor:
    """``u = w * g`` in fp32, contiguous (the only way the query and gain enter the logits)."""
    return (query.float() * key_gain.float()).contiguous()


def _groups(num_tiles: int, chunks: int, device: torch.device) -> int:
    """Token groups for the deterministic two-stage reduction: ~4 programs per SM in total."""
    if not _on_gpu(device):
        return max(1, min(num_tiles, 4))
    return max(1, min(num_tiles, triton.cdiv(4 * _num_sms(device), chunks)))


def _forward(
    sources: Sequence[Tensor],
    queries: Tensor,
    gains: Tensor,
    eps: float,
    scale: float,
    phase1: bool,
    block_d: int | None,
    fused: bool | None,
):
    srcs = [_flat(x) for x in sources]
    first = srcs[0]
    d = first.shape[-1]
    t = first.numel() // max(d, 1)
    s = queries.shape[0]
    s_pad = _pow2(s)
    dev = first.device
    if phase1:
        out = torch.empty((s, *first.shape), dtype=torch.float32, device=dev)
        m = torch.empty((s, *first.shape[:-1]), dtype=torch.float32, device=dev)
        l = torch.empty_like(m)  # noqa: E741
    else:
        out = torch.empty_like(first)
        m = l = out  # unused  # noqa: E741
    if t == 0 or d == 0:
        if phase1:
            out.zero_()
            m.fill_(float("-inf") if d == 0 else 0.0)
            l.fill_(float(len(srcs)))
        return (out, m, l) if phase1 else out
    tab = _ptr_table(srcs, dev)
    vec = _vec(srcs, d)
    cfg = _fused_config(s_pad, d, t) if fused is not False and block_d is None else None
    if cfg is not None:
        bt, bd, nw = cfg
        _launch(
            _fused_fwd_kernel,
            (triton.cdiv(t, bt),),
            tab,
            first,
            _flat(queries),
            _flat(gains),
            out,
            m,
            l,
            len(srcs),
            t,
            d,
            s,
            eps,
            scale,
            S_PAD=s_pad,
            BT=bt,
            BD=bd,
            PHASE1=phase1,
            VEC=vec,
            num_warps=nw,
        )
    else:
        bt, bd, nw = _chunk_config(s_pad, d, t, block_d, vec=vec, warps=8)
        u = _u(queries, gains)
        z = torch.empty((len(srcs), s, t), dtype=torch.float32, device=dev)
        _launch(
            _stats_kernel, (triton.cdiv(t, bt),),
            tab, first, u, u, m, l, m, l, z, z, z, len(srcs), t, d, s, eps, scale,
            S_PAD=s_pad, BT=bt, BD=bd, MODE=1 if phase1 else 0, VEC=vec, num_warps=nw,
        )  # fmt: skip
        _launch(
            _apply_fwd_kernel, (triton.cdiv(t, bt), triton.cdiv(d, bd)),
            tab, first, z, out, len(srcs), t, d, s, S_PAD=s_pad, BT=bt, BD=bd, VEC=vec, num_warps=nw,
        )  # fmt: skip
    return (out, m, l) if phase1 else out


def _backward(
    grads_in: Tensor,
    sources: Sequence[Tensor],
    u: Tensor,
    eps: float,
    scale: float,
    mode: int,
    m: Tensor | None,
    l: Tensor | None,  # noqa: E741
    gm: Tensor | None,
    gl: Tensor | None,
    block_d: int | None,
) -> tuple[list[Tensor], Tensor]:
    """Source gradients and ``grad u`` (S, d) for block_attnres (mode 2) / phase 1 (mode 3)."""
    srcs = [_flat(x) for x in sources]
    first = srcs[0]
    d = first.shape[-1]
    t = first.numel() // max(d, 1)
    s = u.shape[0]
    s_pad = _pow2(s)
    dev = first.device
    grads = [torch.empty_like(x) for x in srcs]
    if t == 0 or d == 0:
        for x in grads:
            x.zero_()
        return grads, torch.zeros_like(u)
    vec = min(_vec(srcs, d), _vec(grads, d))
    bt, bd, nw = _chunk_config(s_pad, d, t, block_d, CHUNK_ELEMS // 2, vec=vec, warps=4, max_bd=32)
    # ptxas gives a 256-thread kernel 128 registers before it spills; the unvectorised
    # (VEC = 1) phase-1 backward stats kernel needs a little more (sm_90 gate): 4 warps.
    nw = min(nw, 4)
    k = len(srcs)
    z = torch.empty((k, s, t), dtype=torch.float32, device=dev)
    dg = torch.empty_like(z)
    r = torch.empty((k, t), dtype=torch.float32, device=dev)
    dummy = z
    tab = _ptr_table(srcs, dev)
    _launch(
        _stats_kernel, (triton.cdiv(t, bt),),
        tab, first, u, grads_in,
        dummy if m is None else m, dummy if l is None else l,
        dummy if gm is None else gm, dummy if gl is None else gl,
        z, dg, r, k, t, d, s, eps, scale, S_PAD=s_pad, BT=bt, BD=bd, MODE=mode, VEC=vec, num_warps=nw,
    )  # fmt: skip
    bt, bd, nw = _chunk_config(s_pad, d, t, block_d, vec=vec, warps=4, max_bt=64, max_bd=16)
    num_tiles = triton.cdiv(t, bt)
    chunks = triton.cdiv(d, bd)
    ng = _groups(num_tiles, chunks, dev)
    partial = torch.empty((ng, s, d), dtype=torch.float32, device=dev)
    _launch(
        _apply_bwd_kernel, (ng, chunks),
        tab, first, _ptr_table(grads, dev), grads[0], u, grads_in, z, dg, r, partial,
        k, t, d, s, num_tiles, ng, S_PAD=s_pad, BT=bt, BD=bd, VEC=vec, num_warps=nw,
    )  # fmt: skip
    return grads, partial.sum(dim=0)


FUSED_BWD_MAX_D = 4096  # widest row the fused backward holds in registers (grad_out, v, u, grad u)


def _fused_bwd_config(d: int, t: int) -> tuple[int, int, int] | None:
    """(BT, BD, num_warps) of the fused backward, or None beyond ``FUSED_BWD_MAX_D``."""
    bd = _pow2(d)
    if bd > FUSED_BWD_MAX_D:
        return None
    cap = INTERPRET_MAX_BT if _interpret() else 8
    budget = (1 << 18) if _interpret() else 4096
    bt = MIN_BT
    while bt * 2 <= min(_pow2(t), cap) and bt * 2 * bd <= budget:
        bt *= 2
    # at least 4 warps: Triton 3.6 spilled the 2-warp d = 64 variant (sm_90 gate)
    return bt, bd, max(4, _warps(2 * bt * bd))


def _fused_backward(grad_out: Tensor, sources, query: Tensor, key_gain: Tensor, eps: float, scale: float):
    """Single-read backward of ``block_attnres`` (``grads, grad u``), or None when the row is too wide."""
    srcs = [_flat(x) for x in sources]
    first = srcs[0]
    d = first.shape[-1]
    t = first.numel() // max(d, 1)
    cfg = _fused_bwd_config(d, t)
    if cfg is None or t == 0 or d == 0:
        return None
    bt, bd, nw = cfg
    dev = first.device
    grads = [torch.empty_like(x) for x in srcs]
    num_tiles = triton.cdiv(t, bt)
    ng = _groups(num_tiles, 1, dev)
    partial = torch.empty((ng, d), dtype=torch.float32, device=dev)
    vec = min(_vec(srcs, d), _vec(grads, d))
    _launch(
        _fused_bwd_kernel, (ng,),
        _ptr_table(srcs, dev), first, _ptr_table(grads, dev), grads[0], _flat(query), _flat(key_gain), grad_out,
        partial, len(srcs), t, d, num_tiles, ng, eps, scale,
        K_PAD=_pow2(len(srcs)), BT=bt, BD=bd, VEC=vec, num_warps=nw,
    )  # fmt: skip
    return grads, partial.sum(dim=0)


# --- public launchers -----------------------------------------------------------------


def attnres_forward(
    sources: Sequence[Tensor],
    query: Tensor,
    key_gain: Tensor,
    eps: float,
    scale: float,
    *,
    block_d: int | None = None,
    fused: bool | None = None,
) -> Tensor:
    """Triton ``block_attnres``; ``block_d``/``fused=False`` force the split path (tests)."""
    if sources[0].dtype == torch.float64:
        return K.attnres_forward(sources, query, key_gain, eps, scale)
    return _forward(sources, query[None], key_gain[None], eps, scale, False, block_d, fused)


def attnres_backward(
    grad_out: Tensor,
    sources: Sequence[Tensor],
    query: Tensor,
    key_gain: Tensor,
    eps: float,
    scale: float,
    *,
    block_d: int | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Triton ``block_attnres_backward`` (recomputes the logits; two reads of each source)."""
    if sources[0].dtype == torch.float64:
        return K.attnres_backward(grad_out, sources, query, key_gain, eps, scale)
    fused = _fused_backward(_flat(grad_out), sources, query, key_gain, eps, scale) if block_d is None else None
    if fused is not None:
        grads, gu = fused
    else:
        grads, gu = _backward(
            _flat(grad_out), sources, _u(query, key_gain)[None], eps, scale, 2, None, None, None, None, block_d
        )
        gu = gu[0]
    return grads, (gu * key_gain.float()).to(query.dtype), (gu * query.float()).to(key_gain.dtype)


def phase1_forward(
    sources: Sequence[Tensor],
    queries: Tensor,
    key_gains: Tensor,
    eps: float,
    *,
    block_d: int | None = None,
    fused: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton ``block_phase1``: S queries over the shared sources, one launch."""
    if sources[0].dtype == torch.float64:
        return K.phase1_forward(sources, queries, key_gains, eps)
    return _forward(sources, queries, key_gains, eps, 1.0, True, block_d, fused)


def phase1_backward(
    grad_o: Tensor | None,
    grad_m: Tensor | None,
    grad_l: Tensor | None,
    sources: Sequence[Tensor],
    queries: Tensor,
    key_gains: Tensor,
    o: Tensor,
    m: Tensor,
    l: Tensor,  # noqa: E741
    eps: float,
    *,
    block_d: int | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Triton ``block_phase1_backward`` from the saved ``o, m, l``; missing grads are zeros."""
    if sources[0].dtype == torch.float64:
        return K.phase1_backward(grad_o, grad_m, grad_l, sources, queries, key_gains, o, m, l, eps)
    go = torch.zeros_like(o) if grad_o is None else _flat(grad_o)
    gm = torch.zeros_like(m) if grad_m is None else _flat(grad_m).float()
    gl = torch.zeros_like(l) if grad_l is None else _flat(grad_l).float()
    grads, gu = _backward(go, sources, _u(queries, key_gains), eps, 1.0, 3, _flat(m), _flat(l), gm, gl, block_d)
    return grads, (gu * key_gains.float()).to(queries.dtype), (gu * queries.float()).to(key_gains.dtype)


def _p2_config(d: int, t: int, block_d: int | None, backward: bool = False) -> tuple[int, int, bool, int]:
    """(BT, BD, ONE_CHUNK, num_warps) of the phase-2 kernels.

    The row is held in registers (``ONE_CHUNK``) up to 8192 features in the forward and
    4096 in the backward, which holds four row tiles (the sm_90 gate found it spilling
    at 8192); beyond, d-chunks of 1024.
    """
    if block_d is None and _pow2(d) <= (4096 if backward else 8192):
        bd = _pow2(d)
        one = True
    else:
        bd = min(_pow2(d), 1024) if block_d is None else _pow2(block_d)
        one = bd >= d
    budget = (1 << 18) if _interpret() else 4096
    cap = INTERPRET_MAX_BT if _interpret() else 16
    bt = MIN_BT
    while bt * 2 <= min(_pow2(t), cap) and bt * 2 * bd <= budget:
        bt *= 2
    # the backward holds four row tiles (grad_out, o, partial, u): twice the warps, or
    # (sm_90 gate) the unvectorised d = 127 variant ran out of its 255 registers
    return bt, bd, one, _warps(bt * bd * (2 if backward else 1))


def phase2_forward(
    o: Tensor,
    m: Tensor,
    l: Tensor,  # noqa: E741
    partial: Tensor | None,
    query: Tensor,
    key_gain: Tensor,
    eps: float,
    scale: float,
    out_dtype: torch.dtype,
    *,
    block_d: int | None = None,
) -> Tensor:
    """Triton ``block_phase2``: fused merge + partial-sum attention, one output write."""
    if o.dtype == torch.float64 or (partial is not None and partial.dtype == torch.float64):
        return K.phase2_forward(o, m, l, partial, query, key_gain, eps, scale, out_dtype)
    o, m, l = _flat(o), _flat(m), _flat(l)  # noqa: E741
    d = o.shape[-1]
    t = o.numel() // max(d, 1)
    out = torch.empty(o.shape, dtype=out_dtype, device=o.device)
    if t == 0 or d == 0:
        return out
    p = _flat(partial) if partial is not None else o
    bt, bd, one, nw = _p2_config(d, t, block_d)
    _launch(
        _phase2_fwd_kernel, (triton.cdiv(t, bt),),
        o, m, l, p, _u(query, key_gain), out, t, d, eps, scale,
        HAS_P=partial is not None, ONE_CHUNK=one, BT=bt, BD=bd, num_warps=nw,
    )  # fmt: skip
    return out


def phase2_backward(
    grad_out: Tensor,
    o: Tensor,
    m: Tensor,
    l: Tensor,  # noqa: E741
    partial: Tensor,
    query: Tensor,
    key_gain: Tensor,
    eps: float,
    scale: float,
    *,
    block_d: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton ``block_phase2_backward``: one kernel, deterministic two-stage ``grad u``."""
    if partial is None or o.dtype == torch.float64 or partial.dtype == torch.float64:
        return K.phase2_backward(grad_out, o, m, l, partial, query, key_gain, eps, scale)
    go, o, m, l, p = _flat(grad_out), _flat(o), _flat(m), _flat(l), _flat(partial)  # noqa: E741
    d = o.shape[-1]
    t = o.numel() // max(d, 1)
    g_o = torch.empty_like(o)
    g_m = torch.empty_like(m)
    g_l = torch.empty_like(l)
    g_p = torch.empty_like(p)
    if t == 0 or d == 0:
        z = torch.zeros_like(query)
        return g_o.zero_(), g_m.zero_(), g_l.zero_(), g_p.zero_(), z, torch.zeros_like(key_gain)
    bt, bd, one, nw = _p2_config(d, t, block_d, backward=True)
    num_tiles = triton.cdiv(t, bt)
    ng = _groups(num_tiles, 1, o.device)
    part = torch.zeros((ng, d), dtype=torch.float32, device=o.device)
    _launch(
        _phase2_bwd_kernel, (ng,),
        go, o, m, l, p, _u(query, key_gain), g_o, g_m, g_l, g_p, part, t, d, num_tiles, ng, eps, scale,
        ONE_CHUNK=one, BT=bt, BD=bd, num_warps=nw,
    )  # fmt: skip
    gu = part.sum(dim=0)
    return g_o, g_m, g_l, g_p, (gu * key_gain.float()).to(query.dtype), (gu * query.float()).to(key_gain.dtype)


# ======================================================================================
# Registration as the CUDA kernels of torch.ops.attnres.*

_REGISTERED = False


# The CUDA kernels: validation (the default kernels in ops.py validate inside the kernel
# they replace) followed by the launcher. Module-level so tests can call them directly.


def cuda_block_attnres(sources, query, key_gain, eps, scale):
    check_aggregate(sources, query, key_gain, eps, "attnres.block_attnres")
    return attnres_forward(sources, query, key_gain, eps, scale)


def cuda_block_attnres_backward(grad_out, sources, query, key_gain, eps, scale):
    return attnres_backward(grad_out, sources, query, key_gain, eps, scale)


def cuda_block_phase1(sources, queries, key_gains, eps):
    check_phase1(sources, queries, key_gains, eps, "attnres.block_phase1")
    return phase1_forward(sources, queries, key_gains, eps)


def cuda_block_phase1_backward(grad_o, grad_m, grad_l, sources, queries, key_gains, o, m, l, eps):  # noqa: E741
    return phase1_backward(grad_o, grad_m, grad_l, sources, queries, key_gains, o, m, l, eps)


def cuda_block_phase2(o, m, l, partial, query, key_gain, eps, scale, out_dtype):  # noqa: E741
    check_phase2(o, m, l, partial, query, key_gain, eps, "attnres.block_phase2")
    return phase2_forward(o, m, l, partial, query, key_gain, eps, scale, out_dtype)


def cuda_block_phase2_backward(grad_out, o, m, l, partial, query, key_gain, eps, scale):  # noqa: E741
    return phase2_backward(grad_out, o, m, l, partial, query, key_gain, eps, scale)


CUDA_KERNELS = {
    "block_attnres": cuda_block_attnres,
    "block_attnres_backward": cuda_block_attnres_backward,
    "block_phase1": cuda_block_phase1,
    "block_phase1_backward": cuda_block_phase1_backward,
    "block_phase2": cuda_block_phase2,
    "block_phase2_backward": cuda_block_phase2_backward,
}


def register() -> None:
    """Register every launcher as the ``cuda`` kernel of its op (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from . import ops

    for name, fn in CUDA_KERNELS.items():
        getattr(ops, name).register_kernel("cuda")(fn)
    _REGISTERED = True
