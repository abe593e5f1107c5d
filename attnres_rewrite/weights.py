"""Attaching real weights to a model converted on the ``meta`` device.

Why this is more than ``load_state_dict(assign=True)``: non-persistent buffers
(rotary-embedding tables) are not in a checkpoint's state dict, so a state dict alone
leaves them on ``meta``; the AttnRes parameters of a fresh conversion are defined by
their initial values (zero queries, unit key gains), so they are created on the target
device without a checkpoint; tied weights (one parameter under two names) must stay
tied; and the programs captured on ``meta`` (whose graphs create meta tensors) are
dropped, so the next call captures on the weights' device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .errors import InvalidInputError
from .runtime.distributed import is_distributed_tensor

__all__ = ["attach_weights"]


def attach_weights(
    converted: nn.Module,
    weights: nn.Module | Mapping[str, Tensor],
    *,
    device: torch.device | str | None = None,
    strict: bool = True,
) -> nn.Module:
    """Give a converted model its real weights, by name; its next call captures on their device.

    ``weights``: the original model built with real weights (its parameters and all
    buffers, non-persistent ones included, are taken by name), or a state dict (for
    example from ``safetensors.torch.load_file``). Names are the original model's
    parameter names; ``attnres.*`` parameters missing from ``weights`` are created at
    their initial values (zero queries, unit gains). ``device`` defaults to the
    weights' device. Weights are cast to the converted model's dtypes, floating point
    to floating point only.

    Like ``load_state_dict(strict=True)``, names in ``weights`` that the model does not
    have are refused (``strict=False`` ignores them); weights none of whose names match
    are always refused. Every tensor the converted model holds must end up on a real
    device. On any refusal nothing is changed and the error lists what is wrong.

    A model sharded with FSDP2 (converted on ``meta``, then ``fully_shard``) is materialised
    here: once every tensor it holds on ``meta`` has a value (from ``weights``, or the
    initial AttnRes values), ``to_empty`` gives it memory on FSDP's compute device (or
    ``device``) and each rank copies its shard of the weights into FSDP's own sharded
    parameters (``weights`` are the full tensors, on every rank). Do not call
    ``to_empty`` first: after it the model's non-persistent buffers (rotary tables) hold
    garbage that no check can tell from values. Shards of a model already materialised
    that ``weights`` do not name keep their values (``attnres.*`` shards are set to their
    initial values).
    """
    from .runtime.converted import is_converted, owners
    from .runtime.distributed import compute_device

    if not isinstance(converted, nn.Module) or not is_converted(converted):
        raise InvalidInputError(
            f"converted must be a model returned by attnres_rewrite.convert, got {type(converted).__name__}"
        )
    source = _named_tensors(weights)
    holders = _holders(converted)
    sharded = any(is_distributed_tensor(t) for t in holders.values())
    fsdp_device = compute_device(converted) if sharded and device is None else None
    target = fsdp_device or _target_device(source, device)
    _check_names(source, holders, strict)
    plan = {}  # name -> new tensor, computed in full before anything is assigned
    missing = []
    for name, current in holders.items():
        empty = _on_meta(current)
        if name in source:
            new = source[name]
            if tuple(new.shape) != tuple(current.shape):
                raise InvalidInputError(
                    f"{name}: the weights have shape {tuple(new.shape)}, the converted model {tuple(current.shape)}"
                )
            if new.is_floating_point() != current.is_floating_point():
                raise InvalidInputError(
                    f"{name}: the weights are {new.dtype}, the converted model holds {current.dtype}; "
                    "integer and floating-point tensors are not cast into each other"
                )
            plan[name] = new.to(device=target, dtype=current.dtype)
        elif (
            name.startswith("attnres.")
            and name.endswith((".query", ".key_gain"))
            and (empty or is_distributed_tensor(current))
        ):
            init = torch.zeros if name.endswith(".query") else torch.ones
            plan[name] = init(current.shape, dtype=current.dtype, device=target)
        elif empty:
            missing.append(name)
        elif is_distributed_tensor(current):
            continue  # a shard FSDP holds keeps its values
        else:
            plan[name] = current.to(target)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise InvalidInputError(
            f"no weights for {shown}. Pass the original model built with real weights (it also carries the "
            "non-persistent buffers a state dict leaves out, such as rotary-embedding tables), or a state dict "
            "holding every one of these names"
        )
    if sharded and any(_on_meta(t) for t in holders.values()):
        converted.to_empty(device=target)  # FSDP2 materialises its shards; every value is assigned below
        holders = _holders(converted)
    paths = _holder_paths(converted)
    shared: dict[int, Tensor] = {}  # tied weights (one Parameter under two names) stay tied
    for name, tensor in plan.items():
        old = holders[name]
        if is_distributed_tensor(old):  # FSDP keeps its own parameter object: this rank's shard is copied in
            if id(old) not in shared:
                shared[id(old)] = _copy_shard(old, tensor)
            continue
        if id(old) not in shared:
            shared[id(old)] = nn.Parameter(tensor, old.requires_grad) if isinstance(old, nn.Parameter) else tensor
        _assign(converted, paths[name], shared[id(old)])
    for forward in owners(converted).values():
        forward.programs.clear()
    return converted


def _check_names(source: dict[str, Tensor], holders: dict[str, Tensor], strict: bool) -> None:
    unexpected = sorted(set(source) - set(holders))
    if len(unexpected) == len(source):
        shown = ", ".join(unexpected[:4])
        raise InvalidInputError(
            f"none of the {len(source)} weight names match the converted model (e.g. {shown}); the weights belong "
            "to another model or carry a prefix (strip it, e.g. 'model.' from a wrapper's state dict)"
        )
    if unexpected and strict:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        raise InvalidInputError(
            f"the weights hold names the converted model does not have: {shown}; pass strict=False to ignore them"
        )


def _named_tensors(weights: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(weights, nn.Module):
        out = _holders(weights)
    elif isinstance(weights, Mapping):
        out = dict(weights)
    else:
        raise InvalidInputError(f"weights must be an nn.Module or a state dict, got {type(weights).__name__}")
    bad = [k for k, v in out.items() if not isinstance(v, Tensor)]
    if bad:
        raise InvalidInputError(f"weights must map names to tensors; {bad[:3]} are not tensors")
    on_meta = [k for k, v in out.items() if v.device.type == "meta"]
    if on_meta:
        raise InvalidInputError(f"the weights themselves are on the meta device ({', '.join(on_meta[:3])}, ...)")
    return {k: v.detach() for k, v in out.items()}


def _target_device(source: dict[str, Tensor], device: torch.device | str | None) -> torch.device:
    if device is not None:
        target = torch.device(device)
    else:
        devices = {v.device for v in source.values()}
        if len(devices) > 1:
            raise InvalidInputError(
                f"the weights are on several devices ({', '.join(sorted(map(str, devices)))}); pass device="
            )
        target = devices.pop() if devices else torch.device("cpu")
    if target.type == "meta":
        raise InvalidInputError("device must be a real device (cpu, cuda, ...), not meta")
    return target


#: Path components wrappers insert (checkpoint_wrapper, torch.compile, FSDP1); names are matched without them,
#: as the wrappers' own state dicts are.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def _canonical(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _holder_paths(gm: nn.Module) -> dict[str, str]:
    """Canonical name -> the attribute path of every parameter and buffer of ``gm``."""
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    return {_canonical(n): n for n in names}


def _holders(gm: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``gm`` by canonical name (non-persistent buffers included)."""
    tensors = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    return {_canonical(n): t for n, t in tensors.items()}


def _on_meta(t: Tensor) -> bool:
    """No values yet: on ``meta`` (for a ``DTensor``, its local shard)."""
    local = t.to_local() if is_distributed_tensor(t) and hasattr(t, "to_local") else t
    return local.device.type == "meta"


@torch.no_grad()
def _copy_shard(sharded: Tensor, full: Tensor) -> Tensor:
    """Copy this rank's part of ``full`` into the ``DTensor`` ``sharded``, in place (every rank holds ``full``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(sharded, DTensor):
        raise InvalidInputError(f"cannot attach weights to a {type(sharded).__name__} parameter (only DTensor shards)")
    local = sharded.to_local()
    part = distribute_tensor(full.to(local.device), sharded.device_mesh, sharded.placements, src_data_rank=None)
    local.copy_(part.to_local())
    return sharded


def _assign(gm: nn.Module, name: str, tensor: Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if isinstance(tensor, nn.Parameter):
        owner._parameters[attr] = tensor
    else:
        owner._buffers[attr] = tensor
