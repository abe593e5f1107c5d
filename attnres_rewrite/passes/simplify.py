"""Simplify: drop the nodes of a captured graph that cannot do anything when its program runs.

``torch.export`` records each ``x.to(dtype)`` of the model's code as an
``aten._assert_tensor_metadata`` (the dtype and device ``x`` had in the trace) and an
``aten.to``. A converted program only runs for calls whose tensors, and whose module's
parameters and buffers, have the dtypes and devices of its capture (the program cache
is keyed by them: :func:`attnres_rewrite.runtime.converted.state_key`), so the
assertions cannot fail and a cast to the dtype and device a value already has returns
the value itself. Run op by op they still cost a dispatch each (2-5 us), about 40 per
decode step of a 4-layer Llama; compilers drop them anyway.

Casts of values traced on ``meta`` stay: a sharded owner is captured on meta stand-ins
and its device arguments are pointed at the compute device afterwards
(:func:`~attnres_rewrite.runtime.distributed.retarget_devices`), so a move that looked
like meta-to-meta in the trace is a real one when the program runs.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["drop_trace_assertions"]

_aten = torch.ops.aten


def _same_as_input(node: fx.Node) -> bool:
    """``node`` is an ``aten.to`` that returns its input: same dtype (and device), no copy or layout change."""
    if node.target not in (_aten.to.dtype, _aten.to.device) or not isinstance(node.args[0], fx.Node):
        return False
    if node.kwargs.get("copy") or node.kwargs.get("memory_format") is not None:
        return False
    source, result = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(source, torch.Tensor) or not isinstance(result, torch.Tensor):
        return False
    if node.target is _aten.to.dtype:
        positional = node.args[2:]  # non_blocking, copy, memory_format
    else:
        positional = node.args[3:]
    if len(positional) >= 2 and positional[1] or len(positional) >= 3 and positional[2] is not None:
        return False
    if source.device.type == "meta":  # a capture on meta stand-ins: the run's devices are not the trace's
        return False
    return source.dtype == result.dtype and source.device == result.device


def drop_trace_assertions(gm: fx.GraphModule) -> int:
    """Remove dtype/device assertions and casts to a value's own dtype from ``gm``; returns how many nodes went."""
    graph = gm.graph
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
            dropped += 1
        elif _same_as_input(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            dropped += 1
    if dropped:
        gm.recompile()
    return dropped
