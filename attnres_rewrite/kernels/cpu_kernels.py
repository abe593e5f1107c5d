"""Fast CPU kernels for ``attnres::block_attnres`` (forward and backward): one read per source.

The PyTorch kernels (:mod:`.torch_kernels`) make several full passes per source (RMS,
dot, two accumulator updates with temporaries); on a memory-bound op that is 5-17x the
time of an in-place sum of the sources. These kernels do per token what the Triton
kernels do per tile: each source row is read once from memory, its RMS and logit (and
in the backward ``grad_out . v``) come from that one read, the softmax is formed over
the K logits, and the output row (or the K gradient rows) is produced from the rows
still in L1/L2. Statistics and accumulation are fp32, like every other kernel; the
backward rebuilds ``grad_out . h`` from the fp32 per-source dots (no read of ``out``).

The C++ source below is compiled on first use with the system C++ compiler (``$CXX``,
else ``c++``/``g++``; no torch headers, about a second) into a shared library cached
under ``~/.cache/attnres_rewrite/`` (keyed by the source, flags and compiler), and called
through ctypes. Without a compiler, or for anything the kernels do not cover (fp64,
non-CPU tensors, empty tensors), the callers fall back to the PyTorch kernels:
:func:`available` says which one runs. ``ATTNRES_CPU_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("attnres_rewrite")

FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fopenmp", "-std=c++17", "-fno-math-errno"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_SOURCE = r"""
// Fused CPU kernels of attnres::block_attnres (forward and backward), one token at a time.
//
// Built by cpu_kernels.py with the system C++ compiler into a small shared library
// (no torch headers: it compiles in about a second) and called through ctypes with
// raw pointers. Per token, each source row is read once from memory: the first loop
// computes its RMS and logit (and, in the backward, grad_out . v); the second loop
// re-reads the K rows from L1/L2 (K * d * 4 bytes per token) to form the output or
// the gradients. Statistics, softmax and accumulation are fp32; 16-bit rows are
// converted to fp32 once per token into a per-thread buffer.
//
// dtype codes: 0 = float32, 1 = bfloat16, 2 = float16.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

inline float bf16_to_f(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t f_to_bf16(float f) {  // round to nearest even, NaN kept quiet
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return static_cast<uint16_t>((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

inline float h_to_f(uint16_t h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return static_cast<float>(x);
}

inline uint16_t f_to_h(float f) {
    _Float16 x = static_cast<_Float16>(f);
    uint16_t h;
    std::memcpy(&h, &x, 2);
    return h;
}

// Row pointer as fp32: fp32 rows are used in place, 16-bit rows converted into buf.
inline const float* row_f32(int dtype, const void* base, int64_t t, int64_t D, float* buf) {
    if (dtype == 0) return static_cast<const float*>(base) + t * D;
    const uint16_t* p = static_cast<const uint16_t*>(base) + t * D;
    if (dtype == 1) {
        for (int64_t j = 0; j < D; ++j) buf[j] = bf16_to_f(p[j]);
    } else {
        for (int64_t j = 0; j < D; ++j) buf[j] = h_to_f(p[j]);
    }
    return buf;
}

inline void store_row(int dtype, void* base, int64_t t, int64_t D, const float* v) {
    if (dtype == 0) {
        std::memcpy(static_cast<float*>(base) + t * D, v, D * sizeof(float));
    } else if (dtype == 1) {
        uint16_t* p = static_cast<uint16_t*>(base) + t * D;
        for (int64_t j = 0; j < D; ++j) p[j] = f_to_bf16(v[j]);
    } else {
        uint16_t* p = static_cast<uint16_t*>(base) + t * D;
        for (int64_t j = 0; j < D; ++j) p[j] = f_to_h(v[j]);
    }
}

// Row reductions with 32 independent partial sums: one vector accumulator per variable
// would make them FMA-latency bound (4x slower than the loads).
constexpr int LANES = 32;

inline void sums2(const float* v, const float* u, int64_t D, float& ss, float& dot) {
    float a[LANES] = {0.f}, b[LANES] = {0.f};
    int64_t j = 0;
    for (; j + LANES <= D; j += LANES) {
#pragma omp simd
        for (int q = 0; q < LANES; ++q) {
            a[q] += v[j + q] * v[j + q];
            b[q] += v[j + q] * u[j + q];
        }
    }
    float s0 = 0.f, s1 = 0.f;
    for (; j < D; ++j) {
        s0 += v[j] * v[j];
        s1 += v[j] * u[j];
    }
    for (int q = 0; q < LANES; ++q) {
        s0 += a[q];
        s1 += b[q];
    }
    ss = s0;
    dot = s1;
}

inline void sums3(const float* v, const float* u, const float* g, int64_t D, float& ss, float& dot, float& dg) {
    float a[LANES] = {0.f}, b[LANES] = {0.f}, c[LANES] = {0.f};
    int64_t j = 0;
    for (; j + LANES <= D; j += LANES) {
#pragma omp simd
        for (int q = 0; q < LANES; ++q) {
            a[q] += v[j + q] * v[j + q];
            b[q] += v[j + q] * u[j + q];
            c[q] += v[j + q] * g[j + q];
        }
    }
    float s0 = 0.f, s1 = 0.f, s2 = 0.f;
    for (; j < D; ++j) {
        s0 += v[j] * v[j];
        s1 += v[j] * u[j];
        s2 += v[j] * g[j];
    }
    for (int q = 0; q < LANES; ++q) {
        s0 += a[q];
        s1 += b[q];
        s2 += c[q];
    }
    ss = s0;
    dot = s1;
    dg = s2;
}

int threads_for(int64_t T, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    int64_t useful = T / 16;  // at least 16 tokens per thread
    if (useful < 1) useful = 1;
    return static_cast<int>(nthreads < useful ? nthreads : useful);
}

}  // namespace

extern "C" {

// out = scale * sum_i softmax_i(z) v_i with z_i = rsqrt(mean(v_i^2) + eps) (u . v_i).
int attnres_cpu_forward(int dtype, const int64_t* ptrs, int K, int64_t T, int64_t D, const float* u, float eps,
                        float scale, void* out, int nthreads) {
    const int nt = threads_for(T, nthreads);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        std::vector<float> rows(dtype == 0 ? 0 : static_cast<size_t>(K) * D);
        std::vector<const float*> vp(K);
        std::vector<float> z(K), acc(dtype == 0 ? 0 : D);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            float zmax = -INFINITY;
            for (int i = 0; i < K; ++i) {
                const float* v = row_f32(dtype, reinterpret_cast<const void*>(ptrs[i]), t, D,
                                         dtype == 0 ? nullptr : rows.data() + static_cast<size_t>(i) * D);
                vp[i] = v;
                float ss, dot;
                sums2(v, u, D, ss, dot);
                z[i] = dot / std::sqrt(ss / static_cast<float>(D) + eps);
                zmax = z[i] > zmax ? z[i] : zmax;
            }
            float l = 0.f;
            for (int i = 0; i < K; ++i) {
                z[i] = std::exp(z[i] - zmax);
                l += z[i];
            }
            const float inv = scale / l;
            float* o = dtype == 0 ? static_cast<float*>(out) + t * D : acc.data();  // fp32: accumulate in place
            {
                const float a = z[0] * inv;
                const float* v = vp[0];
#pragma omp simd
                for (int64_t j = 0; j < D; ++j) o[j] = a * v[j];
            }
            for (int i = 1; i < K; ++i) {
                const float a = z[i] * inv;
                const float* v = vp[i];
#pragma omp simd
                for (int64_t j = 0; j < D; ++j) o[j] += a * v[j];
            }
            if (dtype != 0) store_row(dtype, out, t, D, o);
        }
    }
    return 0;
}

// Gradients of attnres_cpu_forward: grad v_i (written through gptrs, the sources' dtype)
// and grad u (fp32, D values, summed over tokens per thread, then in thread order).
// grad_out . h is rebuilt in fp32 from the per-source dots grad_out . v_i.
int attnres_cpu_backward(int dtype, const int64_t* ptrs, int K, int64_t T, int64_t D, const float* u,
                         const void* grad_out, float eps, float scale, const int64_t* gptrs, float* grad_u,
                         int nthreads) {
    const int nt = threads_for(T, nthreads);
    std::vector<float> partial(static_cast<size_t>(nt) * D, 0.f);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float* gu = partial.data() + static_cast<size_t>(tid) * D;
        std::vector<float> rows(dtype == 0 ? 0 : static_cast<size_t>(K) * D), gbuf(dtype == 0 ? 0 : D), gv(D);
        std::vector<const float*> vp(K);
        std::vector<float> z(K), r(K), dg(K);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            const float* go = row_f32(dtype, grad_out, t, D, dtype == 0 ? nullptr : gbuf.data());
            float zmax = -INFINITY;
            for (int i = 0; i < K; ++i) {
                const float* v = row_f32(dtype, reinterpret_cast<const void*>(ptrs[i]), t, D,
                                         dtype == 0 ? nullptr : rows.data() + static_cast<size_t>(i) * D);
                vp[i] = v;
                float ss, dot, dgo;
                sums3(v, u, go, D, ss, dot, dgo);
                r[i] = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
                z[i] = dot * r[i];
                dg[i] = dgo;
                zmax = z[i] > zmax ? z[i] : zmax;
            }
            float l = 0.f;
            for (int i = 0; i < K; ++i) l += std::exp(z[i] - zmax);
            float go_h = 0.f;
            for (int i = 0; i < K; ++i) go_h += std::exp(z[i] - zmax) / l * dg[i];
            go_h *= scale;
            for (int i = 0; i < K; ++i) {
                const float alpha = std::exp(z[i] - zmax) / l;
                const float gz = alpha * (scale * dg[i] - go_h);
                const float cg = scale * alpha, cu = gz * r[i], cv = -gz * z[i] * r[i] * r[i] / static_cast<float>(D);
                const float* v = vp[i];
#pragma omp simd
                for (int64_t j = 0; j < D; ++j) {
                    gv[j] = cg * go[j] + cu * u[j] + cv * v[j];
                    gu[j] += cu * v[j];
                }
                store_row(dtype, reinterpret_cast<void*>(gptrs[i]), t, D, gv.data());
            }
        }
    }
    for (int64_t j = 0; j < D; ++j) grad_u[j] = 0.f;
    for (int p = 0; p < nt; ++p)
        for (int64_t j = 0; j < D; ++j) grad_u[j] += partial[static_cast<size_t>(p) * D + j];
    return 0;
}

}  // extern "C"
"""

_state: dict = {}
_lock = threading.Lock()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """The CPU model and feature flags (Linux), else the machine name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "attnres_rewrite" / "cpu_kernels"


def _build() -> ctypes.CDLL | None:
    cxx = _compiler()
    if cxx is None:
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    # -march=native: the library is built for this CPU, so the CPU is part of its key
    key = hashlib.sha256("\n".join([_SOURCE, " ".join(FLAGS), cxx, version, _cpu_id()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"attnres_cpu_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "attnres_cpu.cpp"
            src.write_text(_SOURCE)
            out = Path(tmp) / target.name
            done = subprocess.run([cxx, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                log.warning(
                    "attnres: building the CPU kernels failed; using the PyTorch kernels:\n%s", done.stderr[-2000:]
                )
                return None
            os.replace(out, target)  # atomic: concurrent builders agree on the result
    lib = ctypes.CDLL(str(target))
    i64p = ctypes.POINTER(ctypes.c_int64)
    vp, c_int, c_i64, c_f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.attnres_cpu_forward.argtypes = [c_int, i64p, c_int, c_i64, c_i64, vp, c_f, c_f, vp, c_int]
    lib.attnres_cpu_backward.argtypes = [c_int, i64p, c_int, c_i64, c_i64, vp, vp, c_f, c_f, i64p, vp, c_int]
    lib.attnres_cpu_forward.restype = lib.attnres_cpu_backward.restype = c_int
    return lib


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                enabled = os.environ.get("ATTNRES_CPU_KERNELS", "1") not in ("0", "")
                try:
                    _state["lib"] = _build() if enabled else None
                except (OSError, subprocess.SubprocessError) as exc:
                    log.warning("attnres: CPU kernels unavailable (%s); using the PyTorch kernels", exc)
                    _state["lib"] = None
    return _state["lib"]


def available() -> bool:
    """True when the compiled CPU kernels can be used in this process."""
    return _lib() is not None


def supports(sources: Sequence[Tensor], *others: Tensor) -> bool:
    """Whether these tensors can take the fused CPU kernels (else: the PyTorch kernels)."""
    first = sources[0]
    if first.device.type != "cpu" or first.dtype not in _DTYPES or first.numel() == 0:
        return False
    if any(o.device.type != "cpu" for o in others):
        return False
    return available()


def _ptrs(tensors: Sequence[Tensor]):
    return (ctypes.c_int64 * len(tensors))(*[t.data_ptr() for t in tensors])


def _u(query: Tensor, key_gain: Tensor) -> Tensor:
    return (query.float() * key_gain.float()).contiguous()


def _like(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(result, buffer)``: the result is laid out like ``x`` (as the fake impls promise:
    ``empty_like``), the kernel writes row-major into ``buffer`` (the result itself when
    that is contiguous, else a temporary copied into it afterwards)."""
    result = torch.empty_like(x)
    return result, result if result.is_contiguous() else torch.empty(x.shape, dtype=x.dtype)


def _finish(pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
    for result, buffer in pairs:
        if buffer is not result:
            result.copy_(buffer)


def attnres_forward(sources: Sequence[Tensor], query: Tensor, key_gain: Tensor, eps: float, scale: float) -> Tensor:
    """Fused ``block_attnres`` on CPU (call :func:`supports` first)."""
    srcs = [s.contiguous() for s in sources]
    first = srcs[0]
    d = first.shape[-1]
    u = _u(query, key_gain)
    out = _like(sources[0])
    _lib().attnres_cpu_forward(
        _DTYPES[first.dtype], _ptrs(srcs), len(srcs), first.numel() // d, d, u.data_ptr(), eps, scale,
        out[1].data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _finish([out])
    return out[0]


def attnres_backward(
    grad_out: Tensor, sources: Sequence[Tensor], query: Tensor, key_gain: Tensor, eps: float, scale: float
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Fused ``block_attnres_backward`` on CPU: each source read once from memory."""
    srcs = [s.contiguous() for s in sources]
    first = srcs[0]
    d = first.shape[-1]
    go = grad_out.to(first.dtype).contiguous()
    u = _u(query, key_gain)
    grads = [_like(s) for s in sources]
    gu = torch.empty(d, dtype=torch.float32)
    _lib().attnres_cpu_backward(
        _DTYPES[first.dtype], _ptrs(srcs), len(srcs), first.numel() // d, d, u.data_ptr(), go.data_ptr(), eps, scale,
        _ptrs([g[1] for g in grads]), gu.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _finish(grads)
    return [g[0] for g in grads], (gu * key_gain.float()).to(query.dtype), (gu * query.float()).to(key_gain.dtype)
