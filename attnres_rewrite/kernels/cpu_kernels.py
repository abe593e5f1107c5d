"""Fast CPU kernels for ``attnres::block_attnres`` (forward and backward): one read per source.

The PyTorch kernels (:mod:`.torch_kernels`) make several full passes per source (RMS,
dot, two accumulator updates with temporaries); on a memory-bound op that is 5-17x the
time of an in-place sum of the sources. These kernels do per token what the Triton
kernels do per tile: each source row is read once from memory, its RMS and logit (and
in the backward ``grad_out . v``) come from that one read, the softmax is formed over
the K logits, and the output row (or the K gradient rows) is produced from the rows
still in L1/L2. Statistics and accumulation are fp32, like every other kernel; the
backward rebuilds ``grad_out . h`` from the fp32 per-source dots (no read of ``out``).
One thread, 1024 tokens, d in {256, 1024}, K in {3, 5, 9}: the forward takes 1.0-1.7x
and the backward 2.4-6.4x the time of an in-place sum of the sources (benchmarks/README.md).

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

FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fopenmp", "-std=c++17", "-fno-math-errno", "-ffp-contract=fast"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

SOURCE = r"""
// Fused CPU kernels of attnres::block_attnres (forward and backward), one token at a time.
//
// Built by cpu_kernels.py with the system C++ compiler into a small shared library
// (no torch headers: it compiles in about a second) and called through ctypes with
// raw pointers. Per token, each source row is read once from memory: pass 1 computes
// its RMS and logit (and, in the backward, grad_out . v); pass 2 re-reads the K rows
// from L1/L2 (K * d elements per token) to form the output or the gradients, feature
// block by feature block: an output block is accumulated over the K sources in
// registers and stored once, so the output costs one store per element, not K loads
// and K stores as in an in-place sum. (An online softmax would not remove pass 2: a
// row's weight needs the whole row's logit, so the row is re-read either way.) Pass 1
// runs source by source over a block of tokens (see block_tokens). Statistics, softmax and accumulation are fp32; 16-bit rows are
// converted to fp32 in registers as they are loaded, and results are rounded once (to
// nearest even), so a 16-bit result is the fp32 kernel's result on the same values,
// rounded.
//
// The arithmetic uses GCC/Clang vector extensions, W = 16 floats: one AVX-512 register,
// two AVX2 registers, four NEON registers; -march=native picks the instructions. Row
// sums keep two accumulators per quantity (one FMA chain would be latency bound) and
// a fixed reduction tree, so a token's result does not depend on the thread count or
// the token blocks. -ffp-contract=fast makes every `acc += a * b` one FMA.
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

constexpr int W = 16;
typedef float vf __attribute__((vector_size(W * 4)));
typedef float vf8 __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
typedef _Float16 vx __attribute__((vector_size(W * 2)));

template <class T>
inline T load(const void* p) {  // unaligned
    T x;
    std::memcpy(&x, p, sizeof x);
    return x;
}

template <class T>
inline void store(void* p, const T& x) {
    std::memcpy(p, &x, sizeof x);
}

inline float hsum(vf x) {  // fixed tree: 16 -> 8 lanes, then pairs
    vf8 lo, hi;
    std::memcpy(&lo, &x, 32);
    std::memcpy(&hi, reinterpret_cast<const char*>(&x) + 32, 32);
    const vf8 a = lo + hi;
    const float b0 = a[0] + a[4], b1 = a[1] + a[5], b2 = a[2] + a[6], b3 = a[3] + a[7];
    return (b0 + b2) + (b1 + b3);
}

// Element access as fp32 by dtype code; E is the stored element type.
template <int DT>
struct Io;

template <>
struct Io<0> {
    using E = float;
    static vf getv(const E* p) { return load<vf>(p); }
    static void putv(E* p, vf x) { store(p, x); }
};

template <>
struct Io<1> {  // bfloat16: the top half of a float; stores round to nearest even, NaN kept quiet
    using E = uint16_t;
    static vf getv(const E* p) { return (vf)(__builtin_convertvector(load<vh>(p), vu) << 16); }
    static void putv(E* p, vf x) {
        const vu b = (vu)x;
        const vu nan = (vu)(((b & 0x7f800000u) == 0x7f800000u) & ((b & 0x007fffffu) != 0u));
        const vu r = (nan & ((b >> 16) | 0x40u)) | (~nan & ((b + 0x7fffu + ((b >> 16) & 1u)) >> 16));
        store(p, __builtin_convertvector(r, vh));
    }
};

template <>
struct Io<2> {  // float16
    using E = uint16_t;
    static vf getv(const E* p) { return __builtin_convertvector(load<vx>(p), vf); }
    static void putv(E* p, vf x) { store(p, __builtin_convertvector(x, vx)); }
};

// The last n < W elements of a row: loaded zero-padded into a vector, stored from one. Row
// tails thus take the vector arithmetic too (same rounding as the rest of the row, in every
// dtype; zero lanes add nothing to the sums).
template <int DT>
inline vf getv_part(const typename Io<DT>::E* p, int64_t n) {
    typename Io<DT>::E buf[W] = {};
    std::memcpy(buf, p, n * sizeof(buf[0]));
    return Io<DT>::getv(buf);
}

template <int DT>
inline void putv_part(typename Io<DT>::E* p, int64_t n, vf x) {
    typename Io<DT>::E buf[W];
    Io<DT>::putv(buf, x);
    std::memcpy(p, buf, n * sizeof(buf[0]));
}

// Sums over one row v: v . v, v . u and, if g, v . g (u, g fp32).
template <int DT, bool G>
inline void row_sums(const typename Io<DT>::E* v, const float* u, const float* g, int64_t D, float* out) {
    using IO = Io<DT>;
    vf s0 = {}, s1 = {}, d0 = {}, d1 = {}, e0 = {}, e1 = {};
    int64_t j = 0;
    for (; j + 2 * W <= D; j += 2 * W) {
        const vf x0 = IO::getv(v + j), x1 = IO::getv(v + j + W);
        s0 += x0 * x0;
        s1 += x1 * x1;
        d0 += x0 * load<vf>(u + j);
        d1 += x1 * load<vf>(u + j + W);
        if (G) {
            e0 += x0 * load<vf>(g + j);
            e1 += x1 * load<vf>(g + j + W);
        }
    }
    if (j + W <= D) {
        const vf x0 = IO::getv(v + j);
        s0 += x0 * x0;
        d0 += x0 * load<vf>(u + j);
        if (G) e0 += x0 * load<vf>(g + j);
        j += W;
    }
    if (j < D) {
        const vf x0 = getv_part<DT>(v + j, D - j);
        s1 += x0 * x0;
        d1 += x0 * getv_part<0>(u + j, D - j);
        if (G) e1 += x0 * getv_part<0>(g + j, D - j);
    }
    out[0] = hsum(s0 + s1);
    out[1] = hsum(d0 + d1);
    out[2] = G ? hsum(e0 + e1) : 0.f;
}

// out = sum_{i<K} a_i v_i (rows vp), feature block by feature block, one store per element.
template <int DT>
inline void weighted_sum(const typename Io<DT>::E* const* vp, const float* a, int K, int64_t D,
                         typename Io<DT>::E* out) {
    using IO = Io<DT>;
    using E = typename IO::E;
    int64_t j = 0;
    for (; j + 4 * W <= D; j += 4 * W) {
        vf o0 = {}, o1 = {}, o2 = {}, o3 = {};
        for (int i = 0; i < K; ++i) {
            const E* v = vp[i] + j;
            const float w = a[i];
            o0 += w * IO::getv(v);
            o1 += w * IO::getv(v + W);
            o2 += w * IO::getv(v + 2 * W);
            o3 += w * IO::getv(v + 3 * W);
        }
        IO::putv(out + j, o0);
        IO::putv(out + j + W, o1);
        IO::putv(out + j + 2 * W, o2);
        IO::putv(out + j + 3 * W, o3);
    }
    for (; j + W <= D; j += W) {
        vf o0 = {};
        for (int i = 0; i < K; ++i) o0 += a[i] * IO::getv(vp[i] + j);
        IO::putv(out + j, o0);
    }
    if (j < D) {
        vf o0 = {};
        for (int i = 0; i < K; ++i) o0 += a[i] * getv_part<DT>(vp[i] + j, D - j);
        putv_part<DT>(out + j, D - j, o0);
    }
}

// Token blocks. Pass 1 runs source by source over a block of tokens, then each token of
// the block is finished (softmax, pass 2). Blocks of rows that fit L1 (L1_ROWS bytes) when
// a token's rows do: pass 2 still finds them in L1, and the per-token latency chain (row
// sums, sqrt, exp, softmax) overlaps across the block's rows (d = 256, K = 3: 1.6x -> 1.4x
// an in-place sum). Otherwise blocks of rows that fit L2 (BLOCK_BYTES): each source is read
// as one sequential run of the block's rows, which the hardware prefetchers stream far
// better than K interleaved runs of one row each (d = 1024, K = 9: 2.1-2.3x -> 1.2-1.3x).
#ifndef L1_ROWS
#define L1_ROWS 16384
#endif
#ifndef BLOCK_BYTES
#define BLOCK_BYTES 262144
#endif

inline int64_t block_tokens(int64_t token_bytes) {
    const int64_t b = (token_bytes <= L1_ROWS ? L1_ROWS : BLOCK_BYTES) / token_bytes;
    return b < 1 ? 1 : b;
}

template <int DT>
void forward_tokens(const int64_t* ptrs, int K, int64_t t0, int64_t t1, int64_t D, const float* u, float eps,
                    float scale, void* out) {
    using E = typename Io<DT>::E;
    const int64_t B = block_tokens(static_cast<int64_t>(K) * D * static_cast<int64_t>(sizeof(E)));
    std::vector<const E*> vp(K);
    std::vector<float> z(static_cast<size_t>(K) * B), a(K);
    for (int64_t tb = t0; tb < t1; tb += B) {
        const int64_t te = tb + B < t1 ? tb + B : t1;
        // pass 1, source by source over the token block: each row's RMS and logit
        for (int i = 0; i < K; ++i) {
            const E* base = reinterpret_cast<const E*>(ptrs[i]);
            for (int64_t t = tb; t < te; ++t) {
                float s[3];
                row_sums<DT, false>(base + t * D, u, nullptr, D, s);
                z[(t - tb) * K + i] = s[1] / std::sqrt(s[0] / static_cast<float>(D) + eps);
            }
        }
        for (int64_t t = tb; t < te; ++t) {
            const float* zt = z.data() + (t - tb) * K;
            float zmax = -INFINITY;
            for (int i = 0; i < K; ++i) zmax = zt[i] > zmax ? zt[i] : zmax;
            float l = 0.f;
            for (int i = 0; i < K; ++i) {
                a[i] = std::exp(zt[i] - zmax);
                l += a[i];
            }
            const float inv = scale / l;
            for (int i = 0; i < K; ++i) {
                a[i] *= inv;
                vp[i] = reinterpret_cast<const E*>(ptrs[i]) + t * D;
            }
            weighted_sum<DT>(vp.data(), a.data(), K, D, static_cast<E*>(out) + t * D);
        }
    }
}

template <int DT>
void backward_tokens(const int64_t* ptrs, int K, int64_t t0, int64_t t1, int64_t D, const float* u,
                     const void* grad_out, float eps, float scale, const int64_t* gptrs, float* gu) {
    using IO = Io<DT>;
    using E = typename IO::E;
    const int64_t B = block_tokens(static_cast<int64_t>(K + 1) * D * static_cast<int64_t>(sizeof(E)));
    std::vector<const E*> vp(K);
    std::vector<E*> gp(K);
    std::vector<float> sums(static_cast<size_t>(3 * K * B)), z(K), r(K), dg(K), cg(K), cu(K), cv(K);
    std::vector<float> gobuf(DT == 0 ? 0 : static_cast<size_t>(B * D));
    for (int64_t tb = t0; tb < t1; tb += B) {
        const int64_t te = tb + B < t1 ? tb + B : t1;
        const float* go_block;
        if constexpr (DT == 0) {
            go_block = static_cast<const float*>(grad_out) + tb * D;
        } else {  // the grad_out rows as fp32, once per token
            const E* src = static_cast<const E*>(grad_out) + tb * D;
            const int64_t n = (te - tb) * D;
            int64_t j = 0;
            for (; j + W <= n; j += W) store(gobuf.data() + j, IO::getv(src + j));
            if (j < n) putv_part<0>(gobuf.data() + j, n - j, getv_part<DT>(src + j, n - j));
            go_block = gobuf.data();
        }
        // pass 1 (source by source over the block): v . v, v . u and grad_out . v of each row
        for (int i = 0; i < K; ++i) {
            const E* base = reinterpret_cast<const E*>(ptrs[i]);
            for (int64_t t = tb; t < te; ++t)
                row_sums<DT, true>(base + t * D, u, go_block + (t - tb) * D, D, sums.data() + ((t - tb) * K + i) * 3);
        }
        for (int64_t t = tb; t < te; ++t) {
            const float* go = go_block + (t - tb) * D;
            const float* s = sums.data() + (t - tb) * K * 3;
            float zmax = -INFINITY;
            for (int i = 0; i < K; ++i) {
                vp[i] = reinterpret_cast<const E*>(ptrs[i]) + t * D;
                gp[i] = reinterpret_cast<E*>(gptrs[i]) + t * D;
                r[i] = 1.f / std::sqrt(s[3 * i] / static_cast<float>(D) + eps);
                z[i] = s[3 * i + 1] * r[i];
                dg[i] = s[3 * i + 2];
                zmax = z[i] > zmax ? z[i] : zmax;
            }
            float l = 0.f;
            for (int i = 0; i < K; ++i) {
                cg[i] = std::exp(z[i] - zmax);
                l += cg[i];
            }
            // grad_out . h rebuilt in fp32 from the per-source dots (no read of out)
            float go_h = 0.f;
            for (int i = 0; i < K; ++i) {
                cg[i] /= l;  // alpha_i
                go_h += cg[i] * dg[i];
            }
            go_h *= scale;
            for (int i = 0; i < K; ++i) {
                const float alpha = cg[i];
                const float gz = alpha * (scale * dg[i] - go_h);
                cg[i] = scale * alpha;
                cu[i] = gz * r[i];
                cv[i] = -gz * z[i] * r[i] * r[i] / static_cast<float>(D);
            }
            // pass 2: grad v_i = cg_i go + cu_i u + cv_i v_i and grad u += cu_i v_i, block by block
            int64_t j = 0;
            for (; j + 2 * W <= D; j += 2 * W) {
                const vf g0 = load<vf>(go + j), g1 = load<vf>(go + j + W);
                const vf u0 = load<vf>(u + j), u1 = load<vf>(u + j + W);
                vf a0 = load<vf>(gu + j), a1 = load<vf>(gu + j + W);
                for (int i = 0; i < K; ++i) {
                    const vf x0 = IO::getv(vp[i] + j), x1 = IO::getv(vp[i] + j + W);
                    const float c0 = cg[i], c1 = cu[i], c2 = cv[i];
                    IO::putv(gp[i] + j, c0 * g0 + c1 * u0 + c2 * x0);
                    IO::putv(gp[i] + j + W, c0 * g1 + c1 * u1 + c2 * x1);
                    a0 += c1 * x0;
                    a1 += c1 * x1;
                }
                store(gu + j, a0);
                store(gu + j + W, a1);
            }
            for (; j + W <= D; j += W) {
                const vf g0 = load<vf>(go + j), u0 = load<vf>(u + j);
                vf a0 = load<vf>(gu + j);
                for (int i = 0; i < K; ++i) {
                    const vf x0 = IO::getv(vp[i] + j);
                    IO::putv(gp[i] + j, cg[i] * g0 + cu[i] * u0 + cv[i] * x0);
                    a0 += cu[i] * x0;
                }
                store(gu + j, a0);
            }
            if (j < D) {
                const int64_t n = D - j;
                const vf g0 = getv_part<0>(go + j, n), u0 = getv_part<0>(u + j, n);
                vf a0 = getv_part<0>(gu + j, n);
                for (int i = 0; i < K; ++i) {
                    const vf x0 = getv_part<DT>(vp[i] + j, n);
                    putv_part<DT>(gp[i] + j, n, cg[i] * g0 + cu[i] * u0 + cv[i] * x0);
                    a0 += cu[i] * x0;
                }
                putv_part<0>(gu + j, n, a0);
            }
        }
    }
}

int threads_for(int64_t T, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    int64_t useful = T / 16;  // at least 16 tokens per thread
    if (useful < 1) useful = 1;
    return static_cast<int>(nthreads < useful ? nthreads : useful);
}

// Tokens [t0, t1) of thread tid of n: contiguous, deterministic.
inline void token_range(int64_t T, int n, int tid, int64_t& t0, int64_t& t1) {
    const int64_t chunk = (T + n - 1) / n;
    t0 = chunk * tid < T ? chunk * tid : T;
    t1 = t0 + chunk < T ? t0 + chunk : T;
}

template <int DT>
void forward(const int64_t* ptrs, int K, int64_t T, int64_t D, const float* u, float eps, float scale, void* out,
             int nthreads) {
    const int nt = threads_for(T, nthreads);
    if (nt == 1) return forward_tokens<DT>(ptrs, K, 0, T, D, u, eps, scale, out);  // no OpenMP team
#pragma omp parallel num_threads(nt)
    {
        int tid = 0, n = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        int64_t t0, t1;
        token_range(T, n, tid, t0, t1);
        forward_tokens<DT>(ptrs, K, t0, t1, D, u, eps, scale, out);
    }
}

template <int DT>
void backward(const int64_t* ptrs, int K, int64_t T, int64_t D, const float* u, const void* grad_out, float eps,
              float scale, const int64_t* gptrs, float* grad_u, int nthreads) {
    const int nt = threads_for(T, nthreads);
    for (int64_t j = 0; j < D; ++j) grad_u[j] = 0.f;
    if (nt == 1) return backward_tokens<DT>(ptrs, K, 0, T, D, u, grad_out, eps, scale, gptrs, grad_u);
    std::vector<float> partial(static_cast<size_t>(nt) * D, 0.f);
#pragma omp parallel num_threads(nt)
    {
        int tid = 0, n = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        int64_t t0, t1;
        token_range(T, n, tid, t0, t1);
        backward_tokens<DT>(ptrs, K, t0, t1, D, u, grad_out, eps, scale, gptrs,
                            partial.data() + static_cast<size_t>(tid) * D);
    }
    for (int p = 0; p < nt; ++p)  // partial sums in thread order (a thread without tokens adds zeros)
        for (int64_t j = 0; j < D; ++j) grad_u[j] += partial[static_cast<size_t>(p) * D + j];
}

}  // namespace

extern "C" {

// out = scale * sum_i softmax_i(z) v_i with z_i = rsqrt(mean(v_i^2) + eps) (u . v_i), u = q * g
// (q, g: fp32, D values).
int attnres_cpu_forward(int dtype, const int64_t* ptrs, int K, int64_t T, int64_t D, const float* q, const float* g,
                        float eps, float scale, void* out, int nthreads) {
    std::vector<float> u(D);
    for (int64_t j = 0; j < D; ++j) u[j] = q[j] * g[j];
    switch (dtype) {
        case 0: forward<0>(ptrs, K, T, D, u.data(), eps, scale, out, nthreads); return 0;
        case 1: forward<1>(ptrs, K, T, D, u.data(), eps, scale, out, nthreads); return 0;
        case 2: forward<2>(ptrs, K, T, D, u.data(), eps, scale, out, nthreads); return 0;
    }
    return 1;
}

// Gradients of attnres_cpu_forward: grad v_i (written through gptrs, the sources' dtype),
// grad q = grad u * g and grad g = grad u * q (fp32, D values each; grad u is summed over
// tokens per thread, then in thread order). grad_out . h is rebuilt in fp32 from the
// per-source dots grad_out . v_i.
int attnres_cpu_backward(int dtype, const int64_t* ptrs, int K, int64_t T, int64_t D, const float* q, const float* g,
                         const void* grad_out, float eps, float scale, const int64_t* gptrs, float* grad_q,
                         float* grad_g, int nthreads) {
    std::vector<float> u(D), gu(D);
    for (int64_t j = 0; j < D; ++j) u[j] = q[j] * g[j];
    switch (dtype) {
        case 0: backward<0>(ptrs, K, T, D, u.data(), grad_out, eps, scale, gptrs, gu.data(), nthreads); break;
        case 1: backward<1>(ptrs, K, T, D, u.data(), grad_out, eps, scale, gptrs, gu.data(), nthreads); break;
        case 2: backward<2>(ptrs, K, T, D, u.data(), grad_out, eps, scale, gptrs, gu.data(), nthreads); break;
        default: return 1;
    }
    for (int64_t j = 0; j < D; ++j) {
        grad_q[j] = gu[j] * g[j];
        grad_g[j] = gu[j] * q[j];
    }
    return 0;
}

}  // extern "C"
"""

_state: dict = {}
_lock = threading.Lock()


def compiler() -> str | None:
    """The C++ compiler the kernels are built with: ``$CXX``, else ``c++``, ``g++`` or ``clang++``."""
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


def build_library(source: str, stem: str, fallback: str, extra_flags: Sequence[str] = ()) -> Path | None:
    """Compile ``source`` into a shared library cached under :func:`_cache_dir`; None without a compiler.

    The cache key covers the source, flags, compiler and CPU (``-march=native``), so a
    changed kernel or another machine never picks up a stale build. Also builds the
    onnxruntime op library (:mod:`attnres_rewrite.onnx.ort_ops`), which adds its glue to
    ``SOURCE``. ``fallback`` ends the warning logged when the compiler fails;
    ``extra_flags`` follow :data:`FLAGS`.
    """
    cxx = compiler()
    if cxx is None:
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    # -march=native: the library is built for this CPU, so the CPU is part of its key
    flags = [*FLAGS, *extra_flags]
    key = hashlib.sha256("\n".join([source, " ".join(flags), cxx, version, _cpu_id()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{stem}_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / f"{stem}.cpp"
            src.write_text(source)
            out = Path(tmp) / target.name
            done = subprocess.run([cxx, *flags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                log.warning("attnres: building %s failed; %s:\n%s", stem, fallback, done.stderr[-2000:])
                return None
            os.replace(out, target)  # atomic: concurrent builders agree on the result
    return target


def _build() -> ctypes.CDLL | None:
    target = build_library(SOURCE, "attnres_cpu", "using the PyTorch kernels")
    if target is None:
        return None
    lib = ctypes.CDLL(str(target))
    i64p = ctypes.POINTER(ctypes.c_int64)
    vp, c_int, c_i64, c_f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.attnres_cpu_forward.argtypes = [c_int, i64p, c_int, c_i64, c_i64, vp, vp, c_f, c_f, vp, c_int]
    lib.attnres_cpu_backward.argtypes = [c_int, i64p, c_int, c_i64, c_i64, vp, vp, vp, c_f, c_f, i64p, vp, vp, c_int]
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


def _f32(x: Tensor) -> Tensor:
    """``x`` as a contiguous fp32 tensor (itself when it already is one)."""
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


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
    q, g = _f32(query), _f32(key_gain)
    out = _like(sources[0])
    _lib().attnres_cpu_forward(
        _DTYPES[first.dtype], _ptrs(srcs), len(srcs), first.numel() // d, d, q.data_ptr(), g.data_ptr(), eps, scale,
        out[1].data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if out[1] is not out[0]:
        out[0].copy_(out[1])
    return out[0]


def attnres_backward(
    grad_out: Tensor, sources: Sequence[Tensor], query: Tensor, key_gain: Tensor, eps: float, scale: float
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Fused ``block_attnres_backward`` on CPU: each source read once from memory."""
    srcs = [s.contiguous() for s in sources]
    first = srcs[0]
    d = first.shape[-1]
    if grad_out.shape != first.shape:  # the kernel reads grad_out with the sources' layout
        raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}, the sources {tuple(first.shape)}")
    go = (grad_out if grad_out.dtype == first.dtype else grad_out.to(first.dtype)).contiguous()
    q, g = _f32(query), _f32(key_gain)
    grads = [_like(s) for s in sources]
    g_q, g_g = torch.empty(d, dtype=torch.float32), torch.empty(d, dtype=torch.float32)
    _lib().attnres_cpu_backward(
        _DTYPES[first.dtype], _ptrs(srcs), len(srcs), first.numel() // d, d, q.data_ptr(), g.data_ptr(),
        go.data_ptr(), eps, scale, _ptrs([b for _, b in grads]), g_q.data_ptr(), g_g.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    _finish(grads)
    if query.dtype != torch.float32:
        g_q = g_q.to(query.dtype)
    if key_gain.dtype != torch.float32:
        g_g = g_g.to(key_gain.dtype)
    return [r for r, _ in grads], g_q, g_g
