"""Finding onnxruntime and opening sessions for verification.

Why a distribution check: ``onnxruntime`` and ``onnxruntime-gpu`` install the same
``onnxruntime`` Python package; with both present, whichever was installed last has
overwritten the other's files, and the result is often a build whose providers do not
match its metadata. Rather than verify against an unknown runtime, we refuse and say
how to fix the environment.
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ExportError

#: Distributions that provide the ``onnxruntime`` Python package and that we support.
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


@dataclass(frozen=True)
class Runtime:
    """The onnxruntime installation used for verification."""

    distribution: str  # "onnxruntime" or "onnxruntime-gpu"
    version: str
    providers: tuple[str, ...]  # providers we verify with, CPU first
    notes: tuple[str, ...] = ()  # why an advertised provider is not among them


def installed_runtime_distributions() -> list[str]:
    """Names of the onnxruntime distributions installed in this environment."""
    found = []
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def find_runtime(distributions: Sequence[str] | None = None) -> Runtime:
    """Return the usable onnxruntime, or raise :class:`ExportError` saying what to install.

    ``distributions`` overrides the metadata lookup (tests use it to simulate an
    environment with both packages installed).
    """
    found = list(installed_runtime_distributions() if distributions is None else distributions)
    if len(found) > 1:
        raise ExportError(
            "both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's files, so the "
            "runtime used for verification is undefined. Uninstall both and reinstall exactly one "
            "(pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime), or pass verify=False"
        )
    if not found:
        raise ExportError(
            "ONNX verification needs onnxruntime: pip install 'attnres-rewrite[onnx]' "
            "(or onnxruntime-gpu for CUDA), or pass verify=False to skip verification"
        )
    try:
        import onnxruntime as ort
    except ImportError as exc:  # installed metadata but a broken package
        raise ExportError(f"{found[0]} is installed but cannot be imported ({exc}); reinstall it") from exc
    available = set(ort.get_available_providers())
    providers, notes = ["CPUExecutionProvider"], []
    if "CUDAExecutionProvider" in available:
        if provider_loads("CUDAExecutionProvider"):
            providers.append("CUDAExecutionProvider")
        else:
            notes.append(
                f"{found[0]} advertises CUDAExecutionProvider but it could not be loaded (CUDA/cuDNN libraries "
                "or a GPU missing); verified on CPUExecutionProvider only"
            )
    return Runtime(found[0], ort.__version__, tuple(providers), tuple(notes))


@functools.cache
def provider_loads(provider: str) -> bool:
    """Whether onnxruntime really runs ``provider``, probed with a one-node model.

    ``onnxruntime-gpu`` lists CUDA among its available providers even where the CUDA
    and cuDNN libraries (or the GPU) are missing; a session then falls back to CPU
    with only a log line, and a verification "on CUDA" would silently be a second CPU
    run. ``session.get_providers()`` tells what was actually loaded.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "provider_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)  # the failed library load is logged by the default logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(
                model.SerializeToString(), sess_options=options, providers=[provider, "CPUExecutionProvider"]
            )
        return provider in session.get_providers()
    except Exception:  # noqa: BLE001 - any failure to create the provider means it is unusable
        return False
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default (warnings)


def open_session(path: str, provider: str):
    """An ``InferenceSession`` on one provider, set up for a fair fp32 comparison.

    CUDA runs with TF32 disabled: ORT enables TF32 MatMuls by default on Ampere and
    newer, which would blur a 1e-4 relative check with 1e-3-level rounding.
    ``ort_ops.FUSED_CPU`` is the CPU provider with the attnres op library registered.
    """
    import onnxruntime as ort

    from . import ort_ops

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    if provider == ort_ops.FUSED_CPU:
        ort_ops.register(options)
        providers = ["CPUExecutionProvider"]
    elif provider == "CUDAExecutionProvider":
        providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    else:
        providers = [provider]
    return ort.InferenceSession(path, sess_options=options, providers=providers)
