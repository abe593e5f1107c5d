"""attnres-rewrite: rewrite residual streams of PyTorch models into Block Attention Residuals.

Importing the package registers ``torch.ops.attnres.*``; everything else is loaded on
first use, so ``import attnres_rewrite`` stays cheap and pulls in no optional
dependency (onnx, transformers, triton).
"""

from __future__ import annotations

import importlib

from . import kernels  # noqa: F401  (registers torch.ops.attnres.*)

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_LAZY = {
    "inspect": "api",
    "convert": "api",
    "convert_": "api",
    "is_converted": "api",
    "save_adapter": "api",
    "load_adapter": "api",
    "equivalence": "api",
    "ConversionPlan": "passes.plan",
    "export_onnx": "onnx",
    "compile": "backend",
    "attach_weights": "weights",
    "save_converted": "saving",
    "load_converted": "saving",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
