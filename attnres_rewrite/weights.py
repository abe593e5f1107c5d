"""Attaching real weights to a model converted on the ``meta`` device.

Why this is more than ``load_state_dict(assign=True)``: ``torch.export`` records the
device of every tensor the forward creates (``arange``, ``ones``, ``.to(device)``
and the metadata asserts around them), so a graph traced on ``meta`` keeps creating
meta tensors after its weights moved to the CPU or a GPU. Non-persistent buffers
(rotary-embedding tables) are not in a checkpoint's state dict, and the AttnRes
parameters of a fresh conversion are defined by their initial values (zero queries,
unit key gains), so they can be created on the target device without a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, fx, nn

from .errors import InvalidInputError

__all__ = ["attach_weights", "retarget_devices"]


def attach_weights(
    converted: fx.GraphModule,
    weights: nn.Module | Mapping[str, Tensor],
    *,
    device: torch.device | str | None = None,
) -> fx.GraphModule:
    """Give a converted model its real weights, by name, and move its graph to their device.

    ``weights``: the original model built with real weights (its parameters and all
    buffers, non-persistent ones included, are taken by name), or a state dict (for
    example from ``safetensors.torch.load_file``). Names are the original model's
    parameter names; ``attnres.*`` parameters missing from ``weights`` are created at
    their initial values (zero queries, unit gains). ``device`` defaults to the
    weights' device. Every tensor the converted model holds must end up on a real
    device, else nothing is changed and the error lists what is missing.
    """
    if not isinstance(converted, fx.GraphModule):
        raise InvalidInputError(f"converted must be the GraphModule convert() returned, got {type(converted).__name__}")
    source = _named_tensors(weights)
    target = _target_device(source, device)
    holders = _holders(converted)
    plan = {}  # name -> new tensor, computed in full before anything is assigned
    missing = []
    for name, current in holders.items():
        if name in source:
            new = source[name]
            if tuple(new.shape) != tuple(current.shape):
                raise InvalidInputError(
                    f"{name}: the weights have shape {tuple(new.shape)}, the converted model {tuple(current.shape)}"
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
    retarget_devices(converted, target)
    return converted


def retarget_devices(gm: fx.GraphModule, device: torch.device) -> int:
    """Replace every device constant in ``gm``'s graph by ``device``; returns how many changed.

    Covers ``device=`` keyword arguments (factories, ``to``, metadata asserts) and the
    positional device of ``aten.to.device``, like ``torch.export.passes.move_to_device_pass``
    does for an ExportedProgram.
    """
    changed = 0
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if isinstance(node.kwargs.get("device"), (torch.device, str)) and node.kwargs["device"] != device:
                node.kwargs = {**node.kwargs, "device": device}
                changed += 1
            if node.op == "call_function" and node.target is torch.ops.aten.to.device and node.args[1] != device:
                node.args = (node.args[0], device, *node.args[2:])
                changed += 1
        module.recompile()
    return changed


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
