"""attnres-rewrite: rewrite residual streams of PyTorch models into Block Attention Residuals."""

from . import kernels  # noqa: F401  (registers torch.ops.attnres.*)

__version__ = "0.1.0"
