"""``block_attnres`` as a converted model's program calls it (eagerly, and in the traceable code).

A decode step aggregates one token per sequence, so the op's arithmetic takes a few
microseconds while the way to it costs several times that: the dispatcher, the
``custom_op`` autograd wrapper (even under ``no_grad``), a redispatch to the CPU
kernel and the Python checks; 31 us per call against 10 us for the fused kernel
itself (1 token, d=64, 3 sources, one thread). A program calls :func:`block_attnres`
instead of the op: when nothing the dispatcher provides is needed it validates the
inputs and runs the fused CPU kernel directly, else it calls the op, which is what
the program's graph records and what compilers, exporters and tracers see. Sources of
mixed floating dtypes (autocast: a bf16 branch output joining the fp32 stream) are
first promoted to their common dtype (:func:`promoted`), as the residual add was.

The dispatcher is needed, and the op is called, when any of these holds:

* a compiler or exporter is tracing (Dynamo folds ``is_compiling()`` to ``True``, so
  the traced code holds the op node), or ``torch.jit.trace`` is recording (it sees
  dispatcher calls only: a direct call would be baked in as a constant);
* a tensor is a subclass (fake, functional, ``DTensor``) or a ``TorchDispatchMode``,
  ``TorchFunctionMode`` or functorch transform is active;
* autograd records: grad mode is on and a source, the query or the gain requires grad;
* a profiler or other RecordFunction observer is on (so that profiles show
  ``attnres::block_attnres``);
* the fused CPU kernel does not cover the call (not CPU, fp64, empty, no compiler).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import cpu_kernels as C
from .checks import PLAIN_TENSOR_TYPES, check_aggregate

__all__ = ["block_attnres", "promoted", "runs_direct"]


def _dispatch_needed() -> bool:
    return (
        torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or torch._C._autograd._profiler_enabled()
    )


def runs_direct(sources: Sequence[Tensor], query: Tensor, key_gain: Tensor) -> bool:
    """Would :func:`block_attnres` call the fused CPU kernel without the dispatcher?"""
    if _dispatch_needed():
        return False
    grad = torch.is_grad_enabled()
    for t in (query, key_gain, *sources):
        if type(t) not in PLAIN_TENSOR_TYPES or grad and t.requires_grad:
            return False
    return C.supports(sources, query, key_gain)


def promoted(sources: list[Tensor]) -> list[Tensor]:
    """``sources`` cast to their common dtype when they differ, as the residual adds they replace promoted.

    Under autocast a branch ends in a low-precision matmul while the stream it joins
    stays fp32 (the embedding, earlier sums): the original model's ``h + f(h)`` promoted
    to fp32, so the aggregation reads the sources in fp32 and returns fp32. The op itself
    takes one dtype and says so.
    """
    if not all(isinstance(s, Tensor) and s.is_floating_point() for s in sources):
        return sources  # the op names what is wrong
    first = sources[0].dtype
    if all(s.dtype == first for s in sources):
        return sources
    common = first
    for s in sources[1:]:
        common = torch.promote_types(common, s.dtype)
    return [s.to(common) for s in sources]


def block_attnres(sources: list[Tensor], query: Tensor, key_gain: Tensor, eps: float, scale: float) -> Tensor:
    """``torch.ops.attnres.block_attnres`` of the promoted sources, minus the dispatcher when unneeded."""
    if type(sources) is list and sources:
        sources = promoted(sources)
        if runs_direct(sources, query, key_gain):
            check_aggregate(sources, query, key_gain, eps, "attnres.block_attnres")
            return C.attnres_forward(sources, query, key_gain, eps, scale)
    return torch.ops.attnres.block_attnres.default(sources, query, key_gain, eps, scale)
