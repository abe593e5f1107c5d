"""The fused ``attnres`` kernels for onnxruntime's CPU provider (a custom-op library).

Why: standard ONNX has no fused op for an aggregation, so the inline form costs about
16 nodes per aggregation and the function form, which onnxruntime inlines, about as
many. At a small model's decode step a node costs its dispatch, not its arithmetic:
a converted 64 x 4 Llama decoded at 1.2-1.3x the original's time per token. Registered
with a session, this library runs each call of a function-form export (``export
--function``) as one call of the fused CPU kernel of
:mod:`attnres_rewrite.kernels.cpu_kernels` (one read per source, fp32 statistics)
instead of the function's body: ``attnres.BlockAttnRes``,
``attnres.BlockAttnResRMSNorm`` (the aggregation, then the RMSNorm reading it, on the
output row while it is in cache) and their ``Partial`` forms (the last source as an
input of its own); :mod:`.fusions` makes those calls. A decode step then costs
0.96-0.99x the original's at d = 192 and 512 and about 1.03x at 64 x 4
(benchmarks/README.md, ``onnx.py``).

The file stays portable: a runtime without the library inlines the functions, which
give the same numbers to rounding (the export verifies both). The library registers a
kernel for every pair of element types the functions accept (sources, output and norm
weight fp32, fp16, bf16 or fp64; query and key gain likewise): a node that no kernel
fitted would fail the session instead of falling back on the body. fp64 sources run a
plain fp64 loop (the body computes fp64 in fp32); the others the fused kernel. A call
without sources is an error here (the body would return zeros); exports never make
one. Files without ``attnres`` nodes run as before.

How: the library is the CPU kernels' C++ source plus the glue below, built on first
use with the system C++ compiler and cached like the CPU kernels. The glue speaks
onnxruntime's C ABI directly: the ``OrtApi`` function table (whose slots never move
once shipped) and the ``OrtCustomOp`` record of version 16, so no onnxruntime headers
are needed (the pip wheels ship none). It needs onnxruntime >= 1.16. A node runs on
one thread: at decode there are a few tokens per node, and onnxruntime's own thread
pool is not reachable through these slots.

Deploying elsewhere: :func:`write_library` copies the built library to a path of your
choice; it is built with ``-march=native`` for this machine's CPU, so build it on (a
machine like) the one that will run the model.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from ..errors import ExportError, OutputError
from ..fileio import write_atomic
from ..kernels import cpu_kernels
from .function import DOMAIN

#: The verification and session target "CPU provider with this library registered".
FUSED_CPU = "CPUExecutionProvider+attnres"
MIN_ONNXRUNTIME = (1, 16)

_GLUE = r"""
// ---- the attnres functions as onnxruntime custom ops (CPU execution provider) ----
//
// Appended to the CPU kernels' source (cpu_kernels.py): compute() calls
// attnres_cpu_forward on the stacked sources (K, *tokens, d) in place, one pointer per
// source row block (and one for a Partial op's last source), then (*RMSNorm ops)
// normalises the output rows in place. Only onnxruntime's ABI is declared here, by
// table slot and record field; ort_ops.py's docstring says why that is enough.
#include <new>
#include <string>

namespace ortop {

using Status = void*;  // OrtStatus*: nullptr means success

// onnxruntime's C API is a table of function pointers (OrtApi) that only ever grows:
// a slot, once shipped, never moves. The op needs only slots of the version-1 table
// (numbered in the order of that table in onnxruntime_c_api.cc, whose static_assert
// pins ReleaseCustomOpDomain at 101), so any onnxruntime that accepts a custom op of
// version 16 (below), i.e. >= 1.16, serves it.
enum Slot : int {
    kCreateStatus = 0,
    kCreateCustomOpDomain = 26,
    kCustomOpDomainAdd = 27,
    kAddCustomOpDomain = 28,
    kGetTensorMutableData = 51,
    kGetTensorElementType = 60,
    kGetDimensionsCount = 61,
    kGetDimensions = 62,
    kGetTensorTypeAndShape = 65,
    kKernelInfoGetAttributeFloat = 85,
    kKernelContextGetInput = 90,
    kKernelContextGetOutput = 91,
    kReleaseTensorTypeAndShapeInfo = 99,
    kReleaseCustomOpDomain = 101,
};

struct Api {
    const void* const* slots = nullptr;
    template <typename F>
    F at(Slot s) const { return reinterpret_cast<F>(slots[s]); }

    Status status(int code, const char* msg) const {
        return at<Status (*)(int, const char*)>(kCreateStatus)(code, msg);
    }
    Status error(const char* msg) const { return status(2, msg); }  // ORT_INVALID_ARGUMENT
    Status failure(const char* msg) const { return status(1, msg); }  // ORT_FAIL
    Status input(void* ctx, size_t i, const void** out) const {
        return at<Status (*)(const void*, size_t, const void**)>(kKernelContextGetInput)(ctx, i, out);
    }
    Status output(void* ctx, size_t i, const int64_t* dims, size_t n, void** out) const {
        return at<Status (*)(void*, size_t, const int64_t*, size_t, void**)>(kKernelContextGetOutput)(ctx, i, dims, n, out);
    }
    Status data(const void* value, void** out) const {
        return at<Status (*)(const void*, void**)>(kGetTensorMutableData)(value, out);
    }
    // element type and shape of a tensor value
    Status shape(const void* value, int* elem, std::vector<int64_t>& dims) const {
        void* info = nullptr;
        Status st = at<Status (*)(const void*, void**)>(kGetTensorTypeAndShape)(value, &info);
        if (st) return st;
        size_t n = 0;
        st = at<Status (*)(const void*, int*)>(kGetTensorElementType)(info, elem);
        if (!st) st = at<Status (*)(const void*, size_t*)>(kGetDimensionsCount)(info, &n);
        if (!st) {
            dims.resize(n);
            st = at<Status (*)(const void*, int64_t*, size_t)>(kGetDimensions)(info, dims.data(), n);
        }
        at<void (*)(void*)>(kReleaseTensorTypeAndShapeInfo)(info);
        return st;
    }
};

// ONNX element types (TensorProto.DataType) and the kernels' dtype codes
constexpr int kOnnxFloat = 1, kOnnxFloat16 = 10, kOnnxDouble = 11, kOnnxBFloat16 = 16;
constexpr int kTypes[4] = {kOnnxFloat, kOnnxFloat16, kOnnxBFloat16, kOnnxDouble};

int kernel_dtype(int onnx) { return onnx == kOnnxFloat ? 0 : onnx == kOnnxBFloat16 ? 1 : 2; }

double to_double(const void* p, int64_t i, int onnx) {
    if (onnx == kOnnxDouble) return static_cast<const double*>(p)[i];
    if (onnx == kOnnxFloat) return static_cast<const float*>(p)[i];
    const uint16_t h = static_cast<const uint16_t*>(p)[i];
    if (onnx == kOnnxBFloat16) {
        uint32_t bits = static_cast<uint32_t>(h) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return static_cast<float>(x);
}

// RMSNorm of each output row in place, as BlockAttnResRMSNorm's body does: statistics in fp32,
// the normalised row rounded to the element type, then times the weight (one more rounding).
template <int DT>
void rms_norm_rows(typename Io<DT>::E* o, int64_t T, int64_t D, const typename Io<DT>::E* w, float eps) {
    using IO = Io<DT>;
    for (int64_t t = 0; t < T; ++t, o += D) {
        vf s = {};
        int64_t j = 0;
        for (; j + W <= D; j += W) {
            const vf x = IO::getv(o + j);
            s += x * x;
        }
        if (j < D) {
            const vf x = getv_part<DT>(o + j, D - j);
            s += x * x;
        }
        const float inv = 1.0f / std::sqrt(hsum(s) / static_cast<float>(D) + eps);
        for (j = 0; j + W <= D; j += W) {
            IO::putv(o + j, IO::getv(o + j) * inv);
            IO::putv(o + j, IO::getv(o + j) * IO::getv(w + j));
        }
        if (j < D) {
            putv_part<DT>(o + j, D - j, getv_part<DT>(o + j, D - j) * inv);
            putv_part<DT>(o + j, D - j, getv_part<DT>(o + j, D - j) * getv_part<DT>(w + j, D - j));
        }
    }
}

void rms_norm_f64(double* o, int64_t T, int64_t D, const double* w, double eps) {
    for (int64_t t = 0; t < T; ++t, o += D) {
        double sq = 0;
        for (int64_t j = 0; j < D; ++j) sq += o[j] * o[j];
        const double inv = 1.0 / std::sqrt(sq / D + eps);
        for (int64_t j = 0; j < D; ++j) o[j] = w[j] * (o[j] * inv);
    }
}

// fp64 sources (which the fused kernels do not take): the same math in fp64, token by token.
void forward_f64(const std::vector<const double*>& s, int64_t T, int64_t D, const std::vector<double>& u,
                 double eps, double scale, double* out) {
    const int64_t K = static_cast<int64_t>(s.size());
    std::vector<double> z(K);
    for (int64_t t = 0; t < T; ++t) {
        double top = -INFINITY, total = 0;
        for (int64_t k = 0; k < K; ++k) {
            const double* v = s[k] + t * D;
            double sq = 0, dot = 0;
            for (int64_t j = 0; j < D; ++j) {
                sq += v[j] * v[j];
                dot += v[j] * u[j];
            }
            z[k] = dot / std::sqrt(sq / D + eps);
            top = z[k] > top ? z[k] : top;
        }
        for (int64_t k = 0; k < K; ++k) total += (z[k] = std::exp(z[k] - top));
        double* o = out + t * D;
        for (int64_t j = 0; j < D; ++j) o[j] = 0;
        for (int64_t k = 0; k < K; ++k) {
            const double* v = s[k] + t * D;
            const double w = scale * z[k] / total;
            for (int64_t j = 0; j < D; ++j) o[j] += w * v[j];
        }
    }
}

// The layout of onnxruntime's OrtCustomOp up to version 16 (the fields a version-16 op
// is read for), followed by this op's own data. Fields of later versions are never read.
struct CustomOp {
    uint32_t version;
    void* (*CreateKernel)(const CustomOp*, const void*, const void*);
    const char* (*GetName)(const CustomOp*);
    const char* (*GetExecutionProviderType)(const CustomOp*);
    int (*GetInputType)(const CustomOp*, size_t);
    size_t (*GetInputTypeCount)(const CustomOp*);
    int (*GetOutputType)(const CustomOp*, size_t);
    size_t (*GetOutputTypeCount)(const CustomOp*);
    void (*KernelCompute)(void*, void*);
    void (*KernelDestroy)(void*);
    int (*GetInputCharacteristic)(const CustomOp*, size_t);
    int (*GetOutputCharacteristic)(const CustomOp*, size_t);
    int (*GetInputMemoryType)(const CustomOp*, size_t);
    int (*GetVariadicInputMinArity)(const CustomOp*);
    int (*GetVariadicInputHomogeneity)(const CustomOp*);
    int (*GetVariadicOutputMinArity)(const CustomOp*);
    int (*GetVariadicOutputHomogeneity)(const CustomOp*);
    Status (*CreateKernelV2)(const CustomOp*, const void*, const void*, void**);
    Status (*KernelComputeV2)(void*, void*);
    int elem, gain_elem;  // element types of this instance: the sources, output and weight; the query and key gain
    bool partial;         // the last source is an input of its own, after the stack (BlockAttnResPartial*)
    bool norm;            // an RMSNorm of the output, with the norm's weight as the last input (*RMSNorm)
};

// The inputs of each op, in order: sources, [partial], query, key_gain, [weight].
size_t input_count(bool partial, bool norm) { return 3 + partial + norm; }

struct Kernel {  // immutable after creation: onnxruntime may run one kernel from several threads at once
    Api api;
    float eps, scale, norm_eps;
    bool partial, norm;
    const char* name;
};

// "attnres.<op>: <what>" as an error status
Status op_error(const Kernel& kern, const char* what) {
    std::string msg = std::string("attnres.") + kern.name + ": " + what;
    return kern.api.error(msg.c_str());
}

Status compute_unguarded(void* k, void* ctx) {
    const Kernel& kern = *static_cast<const Kernel*>(k);
    const Api& api = kern.api;
    const size_t inputs = input_count(kern.partial, kern.norm);
    const void* in[5];
    std::vector<int64_t> dims[5];
    int elem[5];
    void* data[5];
    for (size_t i = 0; i < inputs; ++i) {
        if (Status st = api.input(ctx, i, &in[i])) return st;
        if (!in[i]) return op_error(kern, "an input is missing");
        if (Status st = api.shape(in[i], &elem[i], dims[i])) return st;
        if (Status st = api.data(in[i], &data[i])) return st;
    }
    const size_t qi = kern.partial ? 2 : 1, gi = qi + 1, wi = gi + 1;
    const std::vector<int64_t>& sd = dims[0];
    if (sd.size() < 2) return op_error(kern, "sources must be (K, *tokens, d)");
    const std::vector<int64_t> od(sd.begin() + 1, sd.end());  // one source: the output's shape
    if (kern.partial && dims[1] != od) return op_error(kern, "partial must have the shape of one source");
    const int64_t K = sd[0] + kern.partial, D = sd.back();
    int64_t T = 1;
    for (size_t i = 1; i + 1 < sd.size(); ++i) T *= sd[i];
    for (size_t i : {qi, gi, wi}) {
        if (i >= inputs) continue;
        int64_t n = 1;
        for (int64_t x : dims[i]) n *= x;
        const char* what = i == qi ? "query" : i == gi ? "key_gain" : "weight";
        if (n != D) return op_error(kern, (std::string(what) + " must have d elements (the sources' last dim)").c_str());
    }
    if (K < 1) return op_error(kern, "no sources (K = 0)");
    if (K > (1 << 30)) return op_error(kern, "more than 2^30 sources");
    void* out_value = nullptr;
    if (Status st = api.output(ctx, 0, od.data(), od.size(), &out_value)) return st;
    void* out = nullptr;
    if (Status st = api.data(out_value, &out)) return st;
    if (T == 0 || D == 0) return nullptr;
    // one pointer per source: the rows of the stack, then the partial
    const int64_t row = T * D * (elem[0] == kOnnxDouble ? 8 : elem[0] == kOnnxFloat ? 4 : 2);
    std::vector<char*> src(K);
    for (int64_t i = 0; i < sd[0]; ++i) src[i] = static_cast<char*>(data[0]) + i * row;
    if (kern.partial) src[K - 1] = static_cast<char*>(data[1]);
    if (elem[0] == kOnnxDouble) {
        std::vector<double> u(D);
        for (int64_t j = 0; j < D; ++j) u[j] = to_double(data[qi], j, elem[qi]) * to_double(data[gi], j, elem[gi]);
        std::vector<const double*> rows(K);
        for (int64_t i = 0; i < K; ++i) rows[i] = reinterpret_cast<const double*>(src[i]);
        forward_f64(rows, T, D, u, kern.eps, kern.scale, static_cast<double*>(out));
        if (kern.norm)
            rms_norm_f64(static_cast<double*>(out), T, D, static_cast<const double*>(data[wi]), kern.norm_eps);
        return nullptr;
    }
    std::vector<float> q(D), g(D);
    for (int64_t j = 0; j < D; ++j) {
        q[j] = static_cast<float>(to_double(data[qi], j, elem[qi]));
        g[j] = static_cast<float>(to_double(data[gi], j, elem[gi]));
    }
    std::vector<int64_t> ptrs(K);
    for (int64_t i = 0; i < K; ++i) ptrs[i] = reinterpret_cast<int64_t>(src[i]);
    attnres_cpu_forward(kernel_dtype(elem[0]), ptrs.data(), static_cast<int>(K), T, D, q.data(), g.data(), kern.eps,
                        kern.scale, out, 1);
    if (kern.norm) {
        if (elem[0] == kOnnxFloat)
            rms_norm_rows<0>(static_cast<float*>(out), T, D, static_cast<const float*>(data[wi]), kern.norm_eps);
        else if (elem[0] == kOnnxBFloat16)
            rms_norm_rows<1>(static_cast<uint16_t*>(out), T, D, static_cast<const uint16_t*>(data[wi]), kern.norm_eps);
        else
            rms_norm_rows<2>(static_cast<uint16_t*>(out), T, D, static_cast<const uint16_t*>(data[wi]), kern.norm_eps);
    }
    return nullptr;
}

// No C++ exception may cross into onnxruntime's frames: allocation failures become statuses.
Status compute(void* k, void* ctx) {
    try {
        return compute_unguarded(k, ctx);
    } catch (...) {
        return static_cast<const Kernel*>(k)->api.failure("attnres: out of memory");
    }
}

// by 2 * partial + norm
const char* kNames[4] = {"BlockAttnRes", "BlockAttnResRMSNorm", "BlockAttnResPartial", "BlockAttnResPartialRMSNorm"};
const char* name(const CustomOp* op) { return kNames[2 * op->partial + op->norm]; }

Status create(const CustomOp* op, const void* api_table, const void* info, void** out) {
    Kernel* k = new (std::nothrow) Kernel();
    if (!k) return Api{static_cast<const void* const*>(api_table)}.failure("attnres: out of memory");
    k->api.slots = static_cast<const void* const*>(api_table);
    k->partial = op->partial;
    k->norm = op->norm;
    k->name = name(op);
    auto attr = k->api.at<Status (*)(const void*, const char*, float*)>(kKernelInfoGetAttributeFloat);
    Status st = attr(info, "eps", &k->eps);
    if (!st) st = attr(info, "scale", &k->scale);
    if (!st && k->norm) st = attr(info, "norm_eps", &k->norm_eps);
    if (st) {
        delete k;
        return st;
    }
    *out = k;
    return nullptr;
}

const char* cpu(const CustomOp*) { return nullptr; }
// query and key gain in the gain type; sources, partial and weight in the element type
int input_type(const CustomOp* op, size_t i) {
    const size_t qi = op->partial ? 2 : 1;
    return i == qi || i == qi + 1 ? op->gain_elem : op->elem;
}
int output_type(const CustomOp* op, size_t) { return op->elem; }
size_t inputs(const CustomOp* op) { return input_count(op->partial, op->norm); }
size_t one(const CustomOp*) { return 1; }
int required(const CustomOp*, size_t) { return 0; }
int memory(const CustomOp*, size_t) { return 0; }
int arity(const CustomOp*) { return 1; }
int homogeneous(const CustomOp*) { return 1; }
void destroy(void* k) { delete static_cast<Kernel*>(k); }

CustomOp make(int elem, int gain_elem, bool partial, bool norm) {
    CustomOp op{};
    op.version = 16;
    op.GetName = name;
    op.GetExecutionProviderType = cpu;
    op.GetInputType = input_type;
    op.GetInputTypeCount = inputs;
    op.GetOutputType = output_type;
    op.GetOutputTypeCount = one;
    op.KernelDestroy = destroy;
    op.GetInputCharacteristic = required;
    op.GetOutputCharacteristic = required;
    op.GetInputMemoryType = memory;
    op.GetVariadicInputMinArity = arity;
    op.GetVariadicInputHomogeneity = homogeneous;
    op.GetVariadicOutputMinArity = arity;
    op.GetVariadicOutputHomogeneity = homogeneous;
    op.CreateKernelV2 = create;
    op.KernelComputeV2 = compute;
    op.elem = elem;
    op.gain_elem = gain_elem;
    op.partial = partial;
    op.norm = norm;
    return op;
}

// One instance per op and type pair the functions accept (their TFloat x TGain): a node
// that no registered kernel fits fails the session's type inference; it does not fall
// back on the function's body.
struct Ops {
    CustomOp all[64];
    Ops() {
        for (int i = 0; i < 64; ++i) all[i] = make(kTypes[i / 4 % 4], kTypes[i % 4], i / 32, i / 16 % 2);
    }
} ops;

}  // namespace ortop

extern "C" __attribute__((visibility("default"))) void* RegisterCustomOps(void* options, const void* api_base) {
    using ortop::Api;
    using ortop::Status;
    auto get_api = reinterpret_cast<const void* const* (*)(uint32_t)>(static_cast<void* const*>(const_cast<void*>(api_base))[0]);
    Api api;
    api.slots = get_api(16);
    if (!api.slots) {  // an onnxruntime older than 1.16: say so with the version-1 table
        api.slots = get_api(1);
        return api.slots ? api.error("attnres.BlockAttnRes needs onnxruntime >= 1.16") : nullptr;
    }
    void* domain = nullptr;
    if (Status st = api.at<Status (*)(const char*, void**)>(ortop::kCreateCustomOpDomain)("attnres", &domain)) return st;
    Status st = nullptr;
    for (auto& op : ortop::ops.all)
        if (!st) st = api.at<Status (*)(void*, const void*)>(ortop::kCustomOpDomainAdd)(domain, &op);
    if (!st) st = api.at<Status (*)(void*, void*)>(ortop::kAddCustomOpDomain)(options, domain);
    // on success the options (and sessions made from them) use the domain for their lifetime: never released
    if (st) api.at<void (*)(void*)>(ortop::kReleaseCustomOpDomain)(domain);
    return st;
}
"""


_state: dict = {}
_lock = threading.Lock()


def onnxruntime_version() -> tuple[int, int]:
    import onnxruntime as ort

    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in ort.__version__.split(".")[:2])
    return major, minor


def _build() -> Path | None:
    # hidden symbols: onnxruntime needs RegisterCustomOps only, and the kernels' own entry points must not
    # resolve to another loaded copy (the ctypes library of cpu_kernels) through the PLT
    return cpu_kernels.build_library(
        cpu_kernels.SOURCE + _GLUE,
        "attnres_ort_ops",
        "onnxruntime runs the attnres function's body instead",
        extra_flags=("-fvisibility=hidden",),
    )


def _library() -> Path | None:
    if "path" not in _state:
        with _lock:
            if "path" not in _state:
                _state["path"] = _build()
    return _state["path"]


def unavailable_reason() -> str | None:
    """Why the library cannot be used here, or None when it can."""
    try:
        version = onnxruntime_version()
    except ImportError:
        return "onnxruntime is not installed"
    if version < MIN_ONNXRUNTIME:
        return f"onnxruntime {'.'.join(map(str, version))} is older than 1.16"
    if cpu_kernels.compiler() is None:
        return "no C++ compiler (set $CXX, or install g++ or clang++)"
    if _library() is None:
        return "the C++ compiler failed on it (the log has the compiler's message)"
    return None


def available() -> bool:
    """True when the library can be built (or is cached) and this onnxruntime can load it."""
    return unavailable_reason() is None


def library_path() -> Path:
    """The built library (cached per source, compiler and CPU); :class:`ExportError` when it cannot be built."""
    reason = unavailable_reason()
    if reason is not None:
        raise ExportError(f"the attnres onnxruntime op library is unavailable: {reason}")
    return _library()


_REGISTERED = "attnres.ort_ops.registered"


def register(options) -> Path:
    """Register the library with an ``onnxruntime.SessionOptions``; returns its path.

    Sessions created with ``options`` then run ``attnres.BlockAttnRes`` nodes on the
    CPU provider with the fused kernel. Registering twice is harmless (onnxruntime
    would refuse a session whose options carry the ``attnres`` domain twice).
    """
    path = library_path()
    try:
        already = options.get_session_config_entry(_REGISTERED) == "1"
    except RuntimeError:  # onnxruntime raises for a key that was never set
        already = False
    if not already:
        options.register_custom_ops_library(str(path))
        options.add_session_config_entry(_REGISTERED, "1")
    return path


def has_attnres_nodes(path: str | Path) -> bool:
    """Whether the ONNX file at ``path`` calls ops of the ``attnres`` domain in its main graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(node.domain == DOMAIN for node in model.graph.node)


def cpu_target(path: str | Path) -> str:
    """:data:`FUSED_CPU` for a file with ``attnres`` nodes where the library is available, else the CPU provider."""
    return FUSED_CPU if has_attnres_nodes(path) and available() else "CPUExecutionProvider"


def write_library(dest: str | Path, *, force: bool = False) -> Path:
    """Copy the built library to ``dest`` (for deployment); written to a temporary file, then renamed."""
    source = library_path()
    dest = Path(dest)
    if dest.is_dir():
        raise OutputError(f"{dest} is a directory; give a file name such as {dest / 'libattnres_ort.so'}")
    if dest.exists() and not force:
        raise OutputError(f"{dest} exists; pass force=True (--force) to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, lambda tmp: shutil.copyfile(source, tmp), executable=True)
    return dest
