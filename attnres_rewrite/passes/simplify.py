"""Simplify: drop the dtype assertions ``torch.export`` adds around each cast of a captured graph.

``torch.export`` records each ``x.to(dtype)`` of the model's code as an
``aten._assert_tensor_metadata`` (the dtype and device ``x`` had in the trace) followed
by the ``aten.to``. In a converted program they cost a dispatch each (4.6 us, 22 per
decode step of a 4-layer Llama). Without autocast they cannot fail: a program only runs
for the dtypes and devices it was captured with
(:func:`attnres_rewrite.runtime.converted.state_key`). Under autocast they could fail
where the model is fine: a program captured without autocast (captures are made with it
off, :func:`.capture.autocast_off`) also runs under it, and there a value the trace saw
in fp32 may be a bf16 matmul output.

The casts themselves stay. A cast to the dtype a value had in the trace looks like a
no-op, but under autocast (or on a capture made on meta stand-ins and retargeted to the
compute device) it is a real one.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["drop_trace_assertions"]


def drop_trace_assertions(gm: fx.GraphModule) -> int:
    """Remove ``aten._assert_tensor_metadata`` nodes from ``gm``; returns how many went."""
    graph = gm.graph
    dropped = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            if not node.users:
                graph.erase_node(node)
                dropped += 1
    if dropped:
        gm.recompile()
    return dropped
