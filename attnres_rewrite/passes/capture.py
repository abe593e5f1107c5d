"""Capture: trace a model with ``torch.export`` (non-strict) into an FX graph.

Why ``torch.export``: it gives one flat aten graph with the original parameter names
(FQNs) and ``nn_module_stack`` metadata on every node, runs on fake tensors (so a
model whose weights live on the ``meta`` device traces without allocating them) and
its unlifted module is an ordinary trainable ``GraphModule``.

The model is traced through a forward that takes only the call's tensors
(:class:`~.call_inputs.CallInputs`), so every tensor axis can be marked dynamic
whatever the forward's signature (``**kwargs`` included) and containers such as a
Hugging Face cache are rebuilt inside the trace instead of being mutated. Axes are
``Dim.AUTO``: those the model pins (a head count, an image size) become static, and the
exported program's guards say which (the converted model checks them per call and
captures again where a call does not fit).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..errors import InvalidInputError, TraceError
from .call_inputs import CallInputs
from .sampled_trace import NotSampleable, RepeatedStack, find_repeated_stacks, sampled_layers, stitch

__all__ = [
    "Captured",
    "capture",
    "capture_call",
    "normalize_inputs",
    "dynamic_axes",
    "capture_axes",
    "prefix_module_paths",
    "static_axes",
    "TRACE_DEPTHS",
]

TRACE_DEPTHS = ("auto", "full", "sampled")


@dataclass
class Captured:
    """The traced model: the exported program and its unlifted, trainable module.

    The graph's placeholders are ``inputs.tensors`` in order; ``program.call_spec.out_spec``
    rebuilds the model's output structure from the graph's outputs.
    """

    model: nn.Module
    args: tuple
    kwargs: dict
    inputs: CallInputs
    program: torch.export.ExportedProgram
    module: torch.fx.GraphModule
    dynamic: bool = True
    notes: list[str] = field(default_factory=list)
    sampled: list[RepeatedStack] = field(default_factory=list)  # stacks traced at three layers, then stitched
    _module_taken: bool = False

    def take_module(self) -> torch.fx.GraphModule:
        """A GraphModule no one else rewrites: the traced one first, then fresh copies of the program.

        The rewrite consumes the graph it is given, so converting one capture several
        times (tests, benchmarks, adapters) needs a new unlifted module each time.
        """
        if not self._module_taken:
            self._module_taken = True
            return self.module
        module = self.program.module()
        return stitch(module, self.sampled) if self.sampled else module


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Turn ``example_inputs`` (tensor, tuple/list of positional args, or dict of kwargs) into ``(args, kwargs)``."""
    if isinstance(example_inputs, Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, dict):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise InvalidInputError(f"example_inputs dict keys must be argument names (str), got {bad!r}")
        args, kwargs = (), dict(example_inputs)
    else:
        raise InvalidInputError(
            "example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments, "
            f"got {type(example_inputs).__name__}"
        )
    leaves = pytree.tree_leaves((args, kwargs))
    if not any(isinstance(x, Tensor) for x in leaves):
        raise InvalidInputError("example_inputs contain no tensor; pass the inputs the model's forward takes")
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.dtype.is_floating_point and leaf.device.type != "meta":
            if not torch.isfinite(leaf).all():
                raise InvalidInputError("example_inputs contain NaN or infinite values")
    return args, kwargs


def dynamic_axes(t: Any) -> dict[int, Any] | None:
    """Dynamic axes of one input leaf: batch always; the sequence axis of token-like inputs.

    (B, T) integer/bool tensors are token ids or masks, (B, T, d) floats are embeddings.
    ``Dim.AUTO`` lets torch.export keep an axis static where the model pins it (an image
    size, a mel-bin count) instead of failing. The ONNX exporter uses the same rule.
    """
    from torch.export import Dim

    if not isinstance(t, Tensor) or t.dim() == 0:
        return None
    dims = {0: Dim.AUTO}
    if (t.dim() == 2 and not t.is_floating_point()) or (t.dim() == 3 and t.is_floating_point()):
        dims[1] = Dim.AUTO
    return dims


def capture_axes(t: Tensor) -> dict[int, Any]:
    """Axes a capture marks ``Dim.AUTO``: every axis but the feature (last) axis of a float tensor.

    Integer and boolean tensors (token ids, masks, positions) are dynamic throughout;
    floats keep their last axis, the feature size the weights fix anyway. A KV cache
    ``(B, H, T, D)`` then has a dynamic batch and length; axes the model pins become
    static in the trace and are checked by the program's guards.
    """
    from torch.export import Dim

    last = t.dim() - 1 if t.is_floating_point() and t.dim() >= 2 else t.dim()
    return {axis: Dim.AUTO for axis in range(last)}


@contextmanager
def tensor_forward(model: nn.Module, inputs: CallInputs) -> Iterator[None]:
    """Within the block, ``model.forward`` takes the call's tensors only and rebuilds the rest.

    The forward it wraps is the model's own (an instance override a converted model
    installs unwraps to the class's forward, see :mod:`attnres_rewrite.runtime`).
    """
    had = "forward" in vars(model)
    saved = vars(model).get("forward")
    inner = getattr(saved, "original_forward", None) or model.forward

    def forward(*tensors: Tensor) -> Any:
        args, kwargs = inputs.rebuild(tensors)
        return inner(*args, **kwargs)

    object.__setattr__(model, "forward", forward)
    try:
        yield
    finally:
        if had:
            object.__setattr__(model, "forward", saved)
        else:
            object.__delattr__(model, "forward")


@contextmanager
def autocast_off() -> Iterator[None]:
    """Trace as without autocast, whatever the caller has on.

    A trace under autocast records the casts it makes (the residual adds become mixed
    ``bf16 + fp32`` adds behind casts, which detection does not recognise as a stream),
    and the program would depend on a state its key does not hold. Traced without it,
    the graph's ATen calls meet autocast again when a program runs under it, as the
    original model's would.
    """
    with ExitStack() as stack:
        for device in ("cpu", "cuda", "xpu", "mps"):
            if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _export(model: nn.Module, inputs: CallInputs, dynamic: bool) -> torch.export.ExportedProgram:
    # a view (ids[:, :-1], a rank's rows) would be traced with guards on its base's sizes, which a later call's
    # plain tensor has no base to answer (AttributeError on None._base); trace a copy instead
    tensors = tuple(
        t if t._base is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs.tensors
    )
    shapes = (tuple(capture_axes(t) for t in tensors),) if dynamic else None
    with warnings.catch_warnings(), tensor_forward(model, inputs), autocast_off():
        warnings.simplefilter("ignore")
        return torch.export.export(model, tensors, strict=False, dynamic_shapes=shapes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def capture(model: nn.Module, example_inputs: Any, *, dynamic: bool = True, trace_depth: str = "auto") -> Captured:
    """Export ``model`` on ``example_inputs`` with dynamic axes (see :func:`capture_axes`).

    Falls back to static shapes when the dynamic trace fails (the result then only
    accepts the example's shapes; a note says so). Raises :class:`InvalidInputError`
    when the model does not even run eagerly on the inputs, :class:`TraceError` when
    it runs but cannot be traced.

    ``trace_depth``: ``"full"`` traces every layer; ``"sampled"`` traces three layers of
    each repeated layer stack and replicates the middle one (see
    :mod:`.sampled_trace`), falling back to a full trace, with a note, when the model
    does not allow it; ``"auto"`` samples only when the model's weights are on the
    ``meta`` device (a 7B-shape model then captures in seconds instead of a minute).
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if trace_depth not in TRACE_DEPTHS:
        raise InvalidInputError(f"trace_depth must be one of {', '.join(TRACE_DEPTHS)}, got {trace_depth!r}")
    args, kwargs = normalize_inputs(example_inputs)
    return capture_call(model, args, kwargs, dynamic=dynamic, trace_depth=trace_depth)


def capture_call(
    model: nn.Module, args: tuple, kwargs: dict, *, dynamic: bool = True, trace_depth: str = "auto"
) -> Captured:
    """:func:`capture` of one call ``model(*args, **kwargs)`` as it was made (no input checks beyond types)."""
    inputs = CallInputs.of(args, kwargs)
    notes: list[str] = []
    if trace_depth == "sampled" or (trace_depth == "auto" and _on_meta(model)):
        stacks = find_repeated_stacks(model)
        if stacks:
            captured = _capture_sampled(model, args, kwargs, inputs, dynamic, stacks, notes)
            if captured is not None:
                return captured
    program, dynamic = _trace(model, args, kwargs, inputs, dynamic, notes)
    return Captured(model, args, kwargs, inputs, program, program.module(), dynamic, notes)


def _on_meta(model: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))


def _trace(model: nn.Module, args: tuple, kwargs: dict, inputs: CallInputs, dynamic: bool, notes: list[str]):
    """``torch.export`` with dynamic axes, then static ones; returns ``(program, dynamic)``."""
    first_error: BaseException | None = None
    if dynamic:
        try:
            return _export(model, inputs, True), True
        except (InvalidInputError, NotSampleable):
            raise
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported below
            first_error = exc
    try:
        program = _export(model, inputs, False)
    except (InvalidInputError, NotSampleable):
        raise
    except Exception as exc:  # noqa: BLE001
        _raise_trace_error(model, args, kwargs, first_error or exc)
    if dynamic:
        notes.append(
            f"dynamic trace failed ({_first_line(first_error)}); traced with static shapes, so each new input "
            "shape is captured again"
        )
    return program, False


def _capture_sampled(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    inputs: CallInputs,
    dynamic: bool,
    stacks: list[RepeatedStack],
    notes: list[str],
) -> Captured | None:
    """Trace with the middle layers skipped and stitch; None (and a note) when that is not sound."""
    names = ", ".join(f"{s.path} ({s.depth} layers)" for s in stacks)
    attempt: list[str] = []
    try:
        with sampled_layers(model, stacks) as recorder:
            program, traced_dynamic = _trace(model, args, kwargs, inputs, dynamic, attempt)
        recorder.check(stacks)
        module = stitch(program.module(), stacks)
        _check_outputs(model, module, inputs)
    except NotSampleable as exc:
        notes.append(f"sampled trace of {names} not used ({exc}); traced every layer")
        return None
    except (InvalidInputError, TraceError):
        notes.append(f"sampled trace of {names} failed; traced every layer")
        return None
    notes.extend(attempt)
    notes.append(
        f"sampled trace: traced layers 0, 1 and the last of {names} and replicated layer 1's graph for the others "
        "(trace_depth='full' traces every layer)"
    )
    return Captured(model, args, kwargs, inputs, program, module, traced_dynamic, notes, sampled=list(stacks))


def _check_outputs(model: nn.Module, module: nn.Module, inputs: CallInputs) -> None:
    """With real weights, the stitched graph must compute what the model computes on the example."""
    if model.training or _on_meta(model):
        return  # dropout makes runs differ; meta tensors hold no values
    with torch.no_grad(), tensor_forward(model, inputs):
        want = [t for t in pytree.tree_leaves(model(*inputs.tensors)) if isinstance(t, Tensor)]
        got = [t for t in pytree.tree_leaves(module(*inputs.tensors)) if isinstance(t, Tensor)]
    if len(want) != len(got):
        raise NotSampleable("the stitched graph returns another number of tensors than the model")
    for a, b in zip(want, got):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise NotSampleable("the stitched graph's outputs differ in shape or dtype from the model's")
        if a.dtype.is_floating_point:
            scale = a.double().abs().max().item() if a.numel() else 0.0
            if not torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6 * max(scale, 1.0), equal_nan=True):
                raise NotSampleable("the stitched graph's outputs differ from the model's on the example inputs")
        elif not torch.equal(a, b):
            raise NotSampleable("the stitched graph's outputs differ from the model's on the example inputs")


def _raise_trace_error(model: nn.Module, args: tuple, kwargs: dict, exc: BaseException) -> None:
    """Tell a wrong example input apart from an untraceable model, and say what to try."""
    try:
        with torch.no_grad(), tensor_forward(model, CallInputs.of(args, kwargs)):
            model(*CallInputs.of(args, kwargs).tensors)
    except Exception as eager:  # noqa: BLE001
        raise InvalidInputError(
            f"the model fails on the example inputs even without tracing ({_first_line(eager)}); "
            "pass inputs of the type and shape its forward expects"
        ) from eager
    raise TraceError(
        f"torch.export could not trace the model ({_first_line(exc)}). Data-dependent Python control flow, "
        "calls into non-PyTorch code and .item()/.tolist() on tensors break tracing. Try: put the model in eval(), "
        "disable caches (use_cache=False), replace data-dependent branches with torch.cond/torch.where, or wrap "
        "the traceable core of the model in its own nn.Module and convert that."
    ) from exc


def prefix_module_paths(gm: torch.fx.GraphModule, prefix: str) -> None:
    """Make the ``nn_module_stack`` paths of a submodule's trace paths of the whole model.

    A converted model traces the module that owns a stream (``model.model`` of a
    language model), so its graph names modules relative to it; detection names streams
    and sublayers by path, and a plan holds whole-model paths.
    """
    if not prefix:
        return
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (f"{prefix}.{value[0]}" if value[0] else prefix, *value[1:]) for key, value in stack.items()
            }


def static_axes(captured: Captured) -> list[str]:
    """Axes the trace was asked to keep dynamic but the model fixed (``input_ids axis 1 = 7``)."""
    call = captured.inputs
    if not captured.dynamic:
        return ["every axis (the dynamic trace failed)"]
    placeholders = [n for n in captured.program.graph.nodes if n.op == "placeholder"]
    user = placeholders[len(placeholders) - len(call.tensor_positions) :]
    names = call.names(_positional_names(captured.model))
    out = []
    for node, position in zip(user, call.tensor_positions):
        val = node.meta.get("val")
        tensor = call.leaves[position]
        if not isinstance(val, Tensor):
            continue
        for axis in capture_axes(tensor):
            if tensor.shape[axis] >= 2 and _fixed(val.shape[axis], captured.program.range_constraints):
                out.append(f"{names[position]} axis {axis} = {tensor.shape[axis]}")
    return out


def _fixed(size: Any, ranges: dict) -> bool:
    """A traced size that is a constant, or a symbol whose only allowed value is one (a guard ``T == 5``)."""
    if isinstance(size, int):
        return True
    expr = size.node.expr
    if expr.is_number:
        return True
    bounds = ranges.get(expr)
    return bounds is not None and bounds.lower == bounds.upper


def _positional_names(model: nn.Module) -> list[str]:
    """forward's positional parameter names (empty when its signature cannot be read)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]
