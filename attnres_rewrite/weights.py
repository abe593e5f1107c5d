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
    """
    from .runtime.converted import is_converted, owners

    if not isinstance(converted, nn.Module) or not is_converted(converted):
        raise InvalidInputError(
            f"converted must be a model returned by attnres_rewrite.convert, got {type(converted).__name__}"
        )
    source = _named_tensors(weights)
    target = _target_device(source, device)
    holders = _holders(converted)
    _check_names(source, holders, strict)
    plan = {}  # name -> new tensor, computed in full before anything is assigned
    missing = []
    for name, current in holders.items():
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
        elif current.device.type != "meta":
            plan[name] = current.to(target)
        elif name.startswith("attnres.") and name.endswith((".query", ".key_gain")):
            init = torch.zeros if name.endswith(".query") else torch.ones
            plan[name] = init(current.shape, dtype=current.dtype, device=target)
        else:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise InvalidInputError(
            f"no weights for {shown}. Pass the original model built with real weights (it also carries the "
            "non-persistent buffers a state dict leaves out, such as rotary-embedding tables), or a state dict "
            "holding every one of these names"
        )
    shared: dict[int, Tensor] = {}  # tied weights (one Parameter under two names) stay tied
    for name, tensor in plan.items():
        old = holders[name]
        if id(old) not in shared:
            shared[id(old)] = nn.Parameter(tensor, old.requires_grad) if isinstance(old, nn.Parameter) else tensor
        _assign(converted, name, shared[id(old)])
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


def _holders(gm: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``gm`` by name (non-persistent buffers included)."""
    return {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}


def _assign(gm: nn.Module, name: str, tensor: Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if isinstance(tensor, nn.Parameter):
        owner._parameters[attr] = tensor
    else:
        owner._buffers[attr] = tensor
