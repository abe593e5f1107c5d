"""A converted model on PyTorch's distributed engine: which modules to shard, checkpoint, save and pipeline.

Nothing here is a distributed runtime. A converted model is the user's model whose layers
are still called as modules (see :mod:`attnres_rewrite.runtime.converted`), so
``DistributedDataParallel``, FSDP2's ``fully_shard``, ``checkpoint_wrapper`` and
``torch.distributed.checkpoint`` apply to it as they do to the original; these helpers
name the modules to apply them to and fill the gaps a converted model has:

* :func:`layer_modules`, :func:`shard` (``fully_shard`` per layer, then the root) and
  :func:`checkpoint_layers` (``checkpoint_wrapper`` per layer), in :mod:`.layers`;
* :func:`save_sharded` / :func:`load_sharded` (``torch.distributed.checkpoint`` of the
  model and its optimizer, any world size on load) and :func:`full_state_dict` (the
  gathered weights, what ``save_converted`` writes from a sharded run), in
  :mod:`.checkpoint`;
* :mod:`.pipeline`: stages for ``torch.distributed.pipelining`` whose boundaries carry
  the Block AttnRes state, each completed block sent once per pair of ranks.

docs/distributed.md is the recipe and what was measured.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "layer_modules": "layers",
    "shard": "layers",
    "checkpoint_layers": "layers",
    "save_sharded": "checkpoint",
    "load_sharded": "checkpoint",
    "full_state_dict": "checkpoint",
    "is_sharded": "checkpoint",
    "PipelineSplit": "pipeline",
    "split_pipeline": "pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
