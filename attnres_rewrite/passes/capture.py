"""Capture: trace a model with ``torch.export`` (non-strict) into an FX graph.

Why ``torch.export``: it gives one flat aten graph with the original parameter names
(FQNs) and ``nn_module_stack`` metadata on every node, runs on fake tensors (so a
model whose weights live on the ``meta`` device traces without allocating them) and
its unlifted module is an ordinary trainable ``GraphModule``.

Batch and sequence axes are marked ``Dim.AUTO`` from the start, so the converted model
accepts other batch sizes and sequence lengths than the example; axes the model pins
(an image size, a mel-bin count) simply stay static.
"""

from __future__ import annotations

import inspect as _inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..errors import InvalidInputError, TraceError
from .sampled_trace import NotSampleable, RepeatedStack, find_repeated_stacks, sampled_layers, stitch

__all__ = ["Captured", "capture", "normalize_inputs", "dynamic_axes", "dynamic_shapes_for", "TRACE_DEPTHS"]

TRACE_DEPTHS = ("auto", "full", "sampled")


@dataclass
class Captured:
    """The traced model: the exported program and its unlifted, trainable module."""

    model: nn.Module
    args: tuple
    kwargs: dict
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


def dynamic_shapes_for(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Build the ``dynamic_shapes`` argument matching ``(args, kwargs)``."""
    spec_args = pytree.tree_map(dynamic_axes, args, is_leaf=lambda x: x is None)
    spec_kwargs = {k: pytree.tree_map(dynamic_axes, v, is_leaf=lambda x: x is None) for k, v in kwargs.items()}
    if not kwargs:
        return tuple(spec_args)
    try:
        names = list(_inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = []
    if len(names) < len(args):
        raise InvalidInputError("cannot mix positional and keyword example inputs for a forward taking *args")
    out = {names[i]: spec_args[i] for i in range(len(args))}
    out.update(spec_kwargs)
    return out


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def capture(model: nn.Module, example_inputs: Any, *, dynamic: bool = True, trace_depth: str = "auto") -> Captured:
    """Export ``model`` on ``example_inputs`` with dynamic batch/sequence axes.

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
    notes: list[str] = []
    if model.training:
        note = (
            "traced in training mode: dropout and other train-time behaviour are fixed into the graph, "
            "and .eval() on the result will not turn them off (call model.eval() before converting)"
        )
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=3)
    if trace_depth == "sampled" or (trace_depth == "auto" and _on_meta(model)):
        stacks = find_repeated_stacks(model)
        if stacks:
            captured = _capture_sampled(model, args, kwargs, dynamic, stacks, notes)
            if captured is not None:
                return captured
    program, dynamic = _trace(model, args, kwargs, dynamic, notes)
    return Captured(model, args, kwargs, program, program.module(), dynamic, notes)


def _on_meta(model: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))


def _trace(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, notes: list[str]):
    """``torch.export`` with dynamic axes, then static ones; returns ``(program, dynamic)``."""
    first_error: BaseException | None = None
    if dynamic:
        wide_args, wide_kwargs, widened = widen_unit_axes(args, kwargs)
        try:
            program = _export(model, wide_args, wide_kwargs, dynamic_shapes_for(model, wide_args, wide_kwargs))
        except (InvalidInputError, NotSampleable):
            raise
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported below
            first_error = exc
        else:
            if widened:
                notes.append(
                    f"the example has size 1 on {', '.join(widened)}, which torch.export would fix to 1; traced with "
                    "those axes repeated to size 2 so the converted model accepts any size there"
                )
            return program, True
    try:
        program = _export(model, args, kwargs, None)
    except Exception as exc:  # noqa: BLE001
        _raise_trace_error(model, args, kwargs, first_error or exc)
    if dynamic:
        notes.append(
            f"dynamic batch/sequence trace failed ({_first_line(first_error)}); traced with static shapes, "
            "the converted model only accepts the example's shapes"
        )
    return program, False


def widen_unit_axes(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[str]]:
    """The example with every size-1 dynamic axis repeated to size 2, and the axes widened.

    ``torch.export`` specialises a size-1 (or 0) axis to that constant even under
    ``Dim.AUTO``, so a batch-1 example would give a graph that only takes batch 1.
    Repeating the slice keeps the values valid inputs (token ids, masks, features).
    """
    widened: list[str] = []

    def widen(label: str, tree: Any) -> Any:
        def one(path, t: Any) -> Any:
            dims = dynamic_axes(t)
            for axis in dims or ():
                if t.shape[axis] == 1:
                    t = torch.cat([t, t], dim=axis)
                    widened.append(f"{label}{pytree.keystr(path)} axis {axis}")
            return t

        return pytree.tree_map_with_path(one, tree)

    wide_args = tuple(widen(f"argument {i}", a) for i, a in enumerate(args))
    wide_kwargs = {k: widen(k, v) for k, v in kwargs.items()}
    return wide_args, wide_kwargs, widened


def _capture_sampled(
    model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, stacks: list[RepeatedStack], notes: list[str]
) -> Captured | None:
    """Trace with the middle layers skipped and stitch; None (and a note) when that is not sound."""
    names = ", ".join(f"{s.path} ({s.depth} layers)" for s in stacks)
    attempt: list[str] = []
    try:
        with sampled_layers(model, stacks) as recorder:
            program, traced_dynamic = _trace(model, args, kwargs, dynamic, attempt)
        recorder.check(stacks)
        module = stitch(program.module(), stacks)
        _check_outputs(model, module, args, kwargs)
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
    return Captured(model, args, kwargs, program, module, traced_dynamic, notes, sampled=list(stacks))


def _check_outputs(model: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """With real weights, the stitched graph must compute what the model computes on the example."""
    if model.training or _on_meta(model):
        return  # dropout makes runs differ; meta tensors hold no values
    with torch.no_grad():
        want = [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, Tensor)]
        got = [t for t in pytree.tree_leaves(module(*args, **kwargs)) if isinstance(t, Tensor)]
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
        with torch.no_grad():
            model(*args, **kwargs)
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
