"""What a converted model's captures need under ``torch.distributed``: sharded owners, wrapped layers.

A converted owner captures a program on the first call of each signature by tracing its
own code (:mod:`.converted`). Two things PyTorch's distributed stack does to a model
would make that trace wrong, and this module undoes them for the length of a capture:

* **Sharded parameters.** After ``fully_shard`` (FSDP2) the parameters of a layer are
  sharded ``DTensor``s between its calls; the layer's pre-forward hook gathers them, but
  a capture holds layer hooks back (they fire when the program calls the layer). When
  any tensor of the owner is a ``DTensor`` (or another tensor subclass), every parameter
  and buffer of the owner is replaced, during the trace only, by a ``meta`` tensor of
  its global shape and of the dtype the layer computes in (FSDP's
  ``MixedPrecisionPolicy.param_dtype`` when it casts, else the parameter's own), the
  call's tensors are traced on ``meta`` too, and the device constants the trace bakes
  in (``device=`` of factories, ``.to(device)``, metadata asserts) are set back to the
  compute device. Programs read parameters from the live module when they run, so
  FSDP's gathered parameters are what the layer graphs compute with.
* **Wrapped layers.** ``checkpoint_wrapper`` (and ``torch.compile``'s ``OptimizedModule``)
  put a wrapper at the layer's place in its ``nn.ModuleList``. A capture traces the
  innermost modules in their places (so module paths and parameter names are the
  plan's, and no checkpoint is traced), and a layer's :class:`~.converted.LayerForward`
  sits on the innermost module: the program calls the wrapper (which checkpoints,
  offloads, gathers), the wrapper calls the layer, the layer runs its graph.

:func:`sharded_states` keys programs by the dtype and device a sharded tensor *computes*
in, so a sharded and a gathered parameter (FSDP with ``reshard_after_forward=False`` leaves layers
gathered between calls) select the same program.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..errors import TraceError
from ..passes.call_inputs import CallInputs
from ..passes.outline import layer_paths

__all__ = [
    "WRAPPER_ATTRIBUTES",
    "innermost",
    "state_modules",
    "unwrapped_layers",
    "is_distributed_tensor",
    "compute_device",
    "sharded_states",
    "device_key",
    "StandIns",
    "meta_stand_ins",
    "retarget_devices",
]

#: Attributes under which wrappers keep the module they wrap: ``checkpoint_wrapper`` /
#: ``offload_wrapper`` (``ActivationWrapper``), ``torch.compile`` (``OptimizedModule``),
#: FSDP1 (``FullyShardedDataParallel``), DDP.
WRAPPER_ATTRIBUTES = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module", "module")


def innermost(module: nn.Module) -> nn.Module:
    """The module a chain of wrappers around ``module`` ends at (``module`` itself when unwrapped).

    A wrapper is recognised by holding exactly one child, under one of
    :data:`WRAPPER_ATTRIBUTES`; a model's own submodule named ``module`` with siblings
    is not a wrapper.
    """
    seen = set()
    while id(module) not in seen:
        seen.add(id(module))
        children = module._modules
        if len(children) != 1:
            break
        ((name, child),) = children.items()
        if name not in WRAPPER_ATTRIBUTES or child is None:
            break
        module = child
    return module


def state_modules(module: nn.Module, attnres: nn.Module) -> list[nn.Module]:
    """The modules whose state keys a converted owner's programs: its submodules and ``attnres``'s, wrappers left out.

    A ``checkpoint_wrapper`` holds no tensor of its own and its ``training`` follows the
    layer's, so wrapping a layer changes no program's key.
    """
    return [m for m in (*module.modules(), *attnres.modules()) if not _is_wrapper(m)]


def _is_wrapper(module: nn.Module) -> bool:
    children = module._modules
    return len(children) == 1 and next(iter(children)) in WRAPPER_ATTRIBUTES[:3]


@contextmanager
def unwrapped_layers(owner: nn.Module) -> Iterator[None]:
    """Within the block, each layer slot of ``owner`` holds the module its wrappers wrap."""
    swapped = []
    for path in sorted(layer_paths(owner)):
        parent_path, _, name = path.rpartition(".")
        parent = owner.get_submodule(parent_path) if parent_path else owner
        slot = parent._modules[name]
        inner = innermost(slot)
        if inner is not slot:
            swapped.append((parent, name, slot))
            parent._modules[name] = inner
    try:
        yield
    finally:
        for parent, name, slot in swapped:
            parent._modules[name] = slot


# --------------------------------------------------------------------------------------
# sharded parameters


def is_distributed_tensor(t: Any) -> bool:
    """A ``DTensor`` (FSDP2's sharded parameters, tensor parallelism) or another tensor subclass."""
    if not isinstance(t, Tensor):
        return False
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(t)


@dataclass(frozen=True)
class _Sharding:
    """How a sharded parameter computes: FSDP's compute dtype and device."""

    dtype: torch.dtype
    device: torch.device | None


def _fsdp_shardings(module: nn.Module, *, recurse: bool = True) -> dict[int, _Sharding]:
    """Sharded parameters of the FSDP2 groups at (and, with ``recurse``, below) ``module``, by ``id``: their compute dtype and device."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return {}
    out: dict[int, _Sharding] = {}
    for sub in module.modules() if recurse else (module,):
        if not isinstance(sub, FSDPModule):
            continue
        state = sub._get_fsdp_state()
        device = getattr(state, "_device", None)
        for group in getattr(state, "_fsdp_param_groups", ()):
            cast = getattr(group.mp_policy, "param_dtype", None)
            for fsdp_param in group.fsdp_params:
                param = fsdp_param.sharded_param
                dtype = cast if cast is not None and param.dtype.is_floating_point else param.dtype
                out[id(param)] = _Sharding(dtype, device)
    return out


def compute_device(module: nn.Module) -> torch.device | None:
    """The device FSDP2 computes ``module``'s sharded parameters on, when they agree on one."""
    devices = {s.device for s in _fsdp_shardings(module).values() if s.device is not None}
    return devices.pop() if len(devices) == 1 else None


def sharded_states(modules: list[nn.Module], tensors: Iterable[Tensor]) -> set[tuple]:
    """The ``(dtype, device key)`` pairs the sharded ``tensors`` compute in (their FSDP2 groups among ``modules``).

    A parameter that FSDP2 holds sharded is gathered before its layer runs, in the
    policy's ``param_dtype`` (when it casts) and on FSDP's compute device, which is what
    the pair says; so sharded and gathered states of one model key the same programs.
    The device key is :func:`device_key`'s, as the state key of plain tensors.
    """
    shardings: dict[int, _Sharding] = {}
    for module in modules:
        shardings.update(_fsdp_shardings(module, recurse=False))
    out = set()
    for t in tensors:
        sharding = shardings.get(id(t))
        if sharding is None:
            out.add((t.dtype, device_key(t.device)))
        else:
            out.add((sharding.dtype, device_key(sharding.device or t.device)))
    return out


def device_key(device: torch.device) -> int | str:
    """What a program's key records of a device: ``"meta"``, or the index ``Tensor.get_device`` gives (CPU: -1)."""
    if device.type == "meta":
        return "meta"
    if device.type == "cpu":
        return -1
    if device.index is not None:
        return device.index
    return torch.empty(0, device=device).get_device()  # the current device of that type


@dataclass
class StandIns:
    """A capture on ``meta`` stand-ins: the call to trace, and what to do with the graph afterwards."""

    args: tuple
    kwargs: dict
    device: torch.device
    trace_depth: str

    def finish(self, gm: fx.GraphModule, owner: nn.Module) -> None:
        """Give ``gm`` (traced on ``meta``) the compute device; refuse constants whose values ``meta`` lost.

        Called while the stand-ins are in place (and the layers unwrapped as they were
        traced): an attribute the graph reads that is not one of ``owner``'s tensors is a
        constant the trace made.
        """
        for node in gm.graph.nodes:
            if node.op != "get_attr" or isinstance(_read(owner, str(node.target)), Tensor):
                continue
            value = _read(gm, str(node.target))
            if isinstance(value, Tensor) and value.device.type == "meta":
                raise TraceError(
                    f"the traced code creates the tensor constant {node.target} on its parameters' device; traced "
                    "on meta (the parameters are sharded) it has no values. Create it on the inputs' device, or "
                    "call the model once before sharding it (that signature is then captured on real tensors)"
                )
        retarget_devices(gm, self.device)


def _read(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


@contextmanager
def meta_stand_ins(owner: nn.Module, args: tuple, kwargs: dict, trace_depth: str) -> Iterator[StandIns | None]:
    """When ``owner`` holds sharded tensors: within the block its tensors and the call's are ``meta`` stand-ins.

    Yields None (and changes nothing) for an owner of plain tensors. Otherwise every
    parameter and buffer of ``owner`` is swapped for a ``meta`` tensor of its global
    shape and compute dtype (tied tensors stay tied), restored when the block exits;
    the yielded :class:`StandIns` holds the call with ``meta`` tensors to trace, the
    compute device for :meth:`StandIns.finish`, and the trace depth (``"auto"``, which
    samples only models whose real weights are on ``meta``, becomes ``"full"``). Enter
    it before :func:`unwrapped_layers`: FSDP's policies sit on the wrappers.
    """
    holders = [
        (module, kind, key, value)
        for module in owner.modules()
        for kind in ("_parameters", "_buffers")
        for key, value in getattr(module, kind).items()
        if isinstance(value, Tensor)
    ]
    if not any(is_distributed_tensor(value) for *_, value in holders):
        yield None
        return
    shardings = _fsdp_shardings(owner)
    call = CallInputs.of(args, kwargs)
    device = _compute_device(call, holders, shardings)
    stand_in: dict[int, Tensor] = {}
    for _module, _kind, _key, value in holders:
        if id(value) not in stand_in:
            sharding = shardings.get(id(value))
            dtype = sharding.dtype if sharding is not None else value.dtype
            meta = torch.empty(tuple(value.shape), dtype=dtype, device="meta")
            if isinstance(value, nn.Parameter):
                meta = nn.Parameter(meta, requires_grad=value.requires_grad)
            stand_in[id(value)] = meta
    meta_args, meta_kwargs = call.rebuild(tuple(t.detach().to("meta") for t in call.tensors))
    try:
        for module, kind, key, value in holders:
            getattr(module, kind)[key] = stand_in[id(value)]
        yield StandIns(meta_args, meta_kwargs, device, "full" if trace_depth == "auto" else trace_depth)
    finally:
        for module, kind, key, value in holders:
            getattr(module, kind)[key] = value


def _compute_device(call: CallInputs, holders: list, shardings: dict[int, _Sharding]) -> torch.device:
    """Where the captured program runs: the call's tensors' device, else FSDP's compute device."""
    devices = {t.device for t in call.tensors if t.device.type != "meta"}
    if len(devices) == 1:
        return devices.pop()
    fsdp = {s.device for s in shardings.values() if s.device is not None}
    if len(fsdp) == 1:
        return fsdp.pop()
    plain = {value.device for *_, value in holders if not is_distributed_tensor(value) and value.device.type != "meta"}
    if len(plain) == 1:
        return plain.pop()
    raise TraceError(
        "cannot tell which device the sharded model computes on (its inputs are on "
        f"{', '.join(sorted(map(str, devices))) or 'no device'}); call it with inputs on its compute device"
    )


def retarget_devices(gm: fx.GraphModule, device: torch.device) -> int:
    """Replace every ``meta`` device constant in ``gm``'s graphs by ``device``; returns how many changed.

    Covers ``device=`` keyword arguments (factories, ``to``, ``_assert_tensor_metadata``)
    and the positional device of ``aten.to.device``, in ``gm`` and the graphs of its
    submodules (higher-order-op bodies), as ``torch.export.passes.move_to_device_pass``
    does for an ``ExportedProgram``.
    """
    changed = 0
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            if _is_meta(node.kwargs.get("device")):
                node.kwargs = {**node.kwargs, "device": device}
                changed += 1
            if node.target is torch.ops.aten.to.device and len(node.args) > 1 and _is_meta(node.args[1]):
                node.args = (node.args[0], device, *node.args[2:])
                changed += 1
        module.recompile()
    return changed


def _is_meta(device: Any) -> bool:
    return isinstance(device, (torch.device, str)) and torch.device(device).type == "meta"
