"""Custom ops ``torch.ops.attnres.*`` and their kernels.

Importing this package registers the ops (the one module-level side effect the
project allows). The Triton kernels of :mod:`.triton_attnres` are registered as the
CUDA kernels on top of the PyTorch ones when a CUDA device is present and
``import triton`` succeeds. On CPU-only hosts Triton is not imported at all, so
``import attnres_rewrite`` stays cheap; the tests import the Triton module
themselves and run its launchers under ``TRITON_INTERPRET=1``.
"""

import torch

from . import ops  # noqa: F401  (registers torch.ops.attnres.*)

HAS_TRITON_KERNELS = False
if torch.cuda.is_available():
    try:
        from . import triton_attnres
    except ImportError:  # no Triton: the PyTorch kernels serve CUDA too
        pass
    else:
        triton_attnres.register()
        HAS_TRITON_KERNELS = True
