"""Distributed checkpoints of a converted model: ``torch.distributed.checkpoint`` (DCP) of model and optimizer.

A converted model's state dict is the original's names plus ``attnres.*``, so DCP saves
and loads it like any model: each rank writes its shards, and a load on another world
size (or another sharding) reshards on read. :func:`save_sharded` adds the conversion
(``attnres_model.json``, the plan) to the directory and :func:`load_sharded` checks it
against the model it loads into.

:func:`full_state_dict` gathers the whole model's weights on rank 0; it is what
:func:`attnres_rewrite.save_converted` uses when it is given a sharded model (every rank
calls it; rank 0 writes the directory).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AdapterError, InvalidInputError
from ..fileio import write_atomic

__all__ = ["save_sharded", "load_sharded", "full_state_dict", "is_sharded"]

_PLAN_FILE = "attnres_model.json"


def is_sharded(model: nn.Module) -> bool:
    """Does ``model`` hold ``DTensor`` parameters or buffers (FSDP2, tensor parallelism)?"""
    from ..runtime.distributed import is_distributed_tensor

    return any(is_distributed_tensor(t) for t in (*model.parameters(), *model.buffers()))


def _plan(model: nn.Module):
    from ..api import plan_of

    plan = plan_of(model)
    if plan is None:
        raise InvalidInputError(f"expected a model returned by attnres_rewrite.convert, got {type(model).__name__}")
    return plan


def _rank(group: Any = None) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def save_sharded(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
    process_group: Any = None,
) -> Path:
    """Save ``model`` (and ``optimizer``) with DCP: ``{"model": ..., "optim": ..., **extra}``; every rank calls it.

    The model state dict and the optimizer's are taken with
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` (names are the model's
    parameter names, wrappers' prefixes removed), so the checkpoint loads on any world
    size. ``extra``: more stateful entries (a step counter tensor, a data-loader state).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    plan = _plan(model)
    if optimizer is not None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    else:
        state = {"model": get_model_state_dict(model)}
    state.update(extra or {})
    target = Path(directory)
    dcp.save(state, checkpoint_id=str(target), process_group=process_group)
    if _rank(process_group) == 0:
        from .. import __version__

        info = {"format": 1, "versions": {"attnres_rewrite": __version__, "torch": torch.__version__}}
        text = json.dumps({**info, "plan": plan.to_dict(), "sharded": True}, indent=2)
        write_atomic(target / _PLAN_FILE, lambda p: Path(p).write_text(text))  # never a half-written plan
    return target


def load_sharded(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
    process_group: Any = None,
) -> dict[str, Any]:
    """Load what :func:`save_sharded` wrote into ``model`` (and ``optimizer``), resharding to this run's layout.

    ``model`` is the converted model, already sharded (or not) the way this run wants;
    its optimizer must have been built over its parameters. ``extra`` entries are
    loaded in place. Refuses a directory whose conversion differs from ``model``'s.
    Returns the loaded state (``extra`` included).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    from ..passes.plan import ConversionPlan

    target = Path(directory)
    plan = _plan(model)
    try:
        saved = ConversionPlan.from_dict(json.loads((target / _PLAN_FILE).read_text())["plan"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{target} has no readable {_PLAN_FILE}; write it with save_sharded ({exc})") from exc
    if replace(saved, notes=[]) != replace(plan, notes=[]):  # notes (how it was traced) may differ
        raise AdapterError(f"{target} holds another conversion than the model's (the plans differ)")
    if optimizer is not None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    else:
        state = {"model": get_model_state_dict(model)}
    state.update(extra or {})
    dcp.load(state, checkpoint_id=str(target), process_group=process_group)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
    return state


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's weights, gathered on rank 0 on the CPU (other ranks get ``{}``); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
