"""Custom ops ``torch.ops.attnres.*`` and their kernels.

Importing this package registers the ops (the one module-level side effect the
project allows). CUDA kernels written in Triton register themselves on import of
:mod:`.triton_ops` when Triton is installed.
"""

from . import ops  # noqa: F401  (registers torch.ops.attnres.*)
