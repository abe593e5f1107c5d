"""The layer modules of a converted model, and the per-layer recipes: FSDP2 sharding, activation checkpointing.

The layers are the members of the outermost ``nn.ModuleList``/``nn.Sequential`` of each
converted stream owner (``model.model.layers.*`` of a Hugging Face causal LM, ``layers.*``
of the samples): what the owner's program calls as modules. Sharding or wrapping them
is what makes each layer's all-gather, recomputation or offload happen when that layer
runs.

Where the AttnRes parameters go: ``attnres.<stream>.{query,key_gain}`` are two
``(A + 1, d)`` tensors per stream (a few KB to a few MB), one row per aggregation, and
*every* layer reads its rows, which the layer's own program selects. They belong to the
root's FSDP group: gathered once when the root's forward starts (with the embedding and
the head), sharded along rows like any root parameter between steps (so is their
optimizer state), reduce-scattered once in the backward. Put in a layer's group they
would force that layer's gather whenever any layer runs; split per layer they would no
longer be the plan's parameters (names, adapters, checkpoints). Treat them like norm
gains in the optimizer: no weight decay (queries start at zero, gains at one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import InvalidInputError

__all__ = ["layer_modules", "shard", "checkpoint_layers"]


def _check(converted: nn.Module) -> dict:
    from ..runtime.converted import owners

    found = owners(converted) if isinstance(converted, nn.Module) else {}
    if not found:
        raise InvalidInputError(
            f"expected a model returned by attnres_rewrite.convert, got {type(converted).__name__} with no "
            "converted stream owner"
        )
    return found


def _index(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def layer_modules(converted: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every layer the converted owners call, in model order.

    ``module`` is what sits at the path now: a ``checkpoint_wrapper`` or an FSDP module
    when one was applied (they call the layer, which runs its part of the program).
    """
    from ..passes.outline import layer_paths

    out = []
    for owner_path in _check(converted):
        owner = converted.get_submodule(owner_path) if owner_path else converted
        for path in sorted(layer_paths(owner), key=_index):
            full = f"{owner_path}.{path}" if owner_path else path
            out.append((full, converted.get_submodule(full)))
    return out


def shard(
    converted: nn.Module,
    *,
    mesh: Any = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
    offload_policy: Any = None,
) -> nn.Module:
    """FSDP2: ``fully_shard`` on every layer, then on the whole model (which takes the rest, ``attnres`` included).

    The arguments are ``fully_shard``'s. With ``mp_policy=MixedPrecisionPolicy(param_dtype=
    torch.bfloat16)`` the layers compute in bf16 and the program of such a call is
    captured in bf16 (the AttnRes statistics stay fp32, SPEC). Apply
    :func:`checkpoint_layers` first to checkpoint activations as well. Returns
    ``converted`` (sharded in place, as ``fully_shard`` does).
    """
    from torch.distributed.fsdp import fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    for _path, layer in layer_modules(converted):
        fully_shard(layer, **kwargs)
    fully_shard(converted, **kwargs)
    return converted


def checkpoint_layers(converted: nn.Module, wrapper: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """Wrap every layer in ``checkpoint_wrapper`` (or ``wrapper``): its activations are recomputed in the backward.

    The wrapper takes the layer's place in its ``nn.ModuleList``; the program calls the
    wrapper, the wrapper calls the layer. State-dict names do not change
    (``checkpoint_wrapper`` strips its own prefix). What a checkpointed layer keeps for the
    backward is its inputs: the completed blocks (shared by every layer, kept once) and
    its partial sum (docs/distributed.md has the measurements). Returns ``converted``.
    """
    if wrapper is None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        wrapper = checkpoint_wrapper
    for path, layer in layer_modules(converted):
        parent_path, _, name = path.rpartition(".")
        parent = converted.get_submodule(parent_path) if parent_path else converted
        parent._modules[name] = wrapper(layer)
    return converted
