"""Checking an exported ONNX model against the PyTorch model it came from.

Why new shapes: a model exported with dynamic axes can still hide a size that was
baked in during tracing (a reshape to the example's sequence length, a mask built for
batch 2). Running the check on the export example would not see it, so verification
draws inputs whose dynamic axes (those the ONNX graph declares symbolic) differ from
the example's, with values resembling the example's (token ids drawn from the ids it
contains, floats with its mean and spread), and compares every output.

Relative difference: per output, ``max|onnx - torch| / max|torch|``. An element-wise
ratio is meaningless near zero, and a model output's scale is what a 1e-4 tolerance
is meant to be relative to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..errors import ExportError
from .runtime import open_session


@dataclass
class OutputDiff:
    """Difference of one output between onnxruntime and PyTorch."""

    name: str
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float
    torch_max_abs: float


@dataclass
class ProviderResult:
    """Verification on one onnxruntime execution provider."""

    provider: str
    max_abs_diff: float
    max_rel_diff: float
    outputs: list[OutputDiff] = field(default_factory=list)


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Normalise ``example_inputs`` to ``(args, kwargs)``.

    Accepts what ``attnres_rewrite.convert`` accepts: a tensor, a tuple/list of
    positional inputs, or a dict of keyword inputs.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ExportError(
        "example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs; "
        f"got {type(example_inputs).__name__}"
    )


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """Tensors of a nested structure in pytree order (the exporter's input/output order)."""
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def input_dims(onnx_model) -> list[list[int | str | None]]:
    """Each graph input's dims: ``int`` for a static size, ``str`` for a symbolic one."""
    dims = []
    for value in onnx_model.graph.input:
        shape = value.type.tensor_type.shape
        dims.append([d.dim_param if d.HasField("dim_param") else d.dim_value for d in shape.dim])
    return dims


def _new_size(axis: int, size: int) -> int:
    """A size different from the example's: one more on the batch axis, shorter elsewhere.

    Sequences get shorter where possible because a longer one can exceed a model's
    position table; batch grows because a batch of one may be special-cased.
    """
    if axis == 0:
        return size + 1
    return size - 3 if size >= 6 else size + 1


#: How much of the input to resize, from the most to the least demanding check.
RESIZE_LEVELS = ("all", "batch", "none")


def symbolic_sizes(
    input_dims: Sequence[Sequence[int | str | None]], examples: Sequence[torch.Tensor], resize: str = "all"
) -> dict:
    """Map each symbolic dimension name of the ONNX inputs to a new size.

    ``input_dims[i]`` lists input ``i``'s dims (int for static, str for symbolic). One
    name always gets one size, so axes tied together in the graph stay equal.
    ``resize="batch"`` changes only symbols first seen on axis 0, ``"none"`` nothing.
    """
    sizes: dict[str, int] = {}
    if resize == "none":
        return sizes
    for dims, example in zip(input_dims, examples):
        for axis, dim in enumerate(dims):
            if isinstance(dim, str) and dim not in sizes and axis < example.dim():
                sizes[dim] = _new_size(axis, int(example.shape[axis])) if axis == 0 or resize == "all" else None
    return {name: size for name, size in sizes.items() if size is not None}


def resample_like(example: torch.Tensor, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """A tensor of ``shape`` whose values look like ``example``'s.

    Integer and bool tensors draw from the values the example holds (valid token ids,
    a 0/1 mask stays a mask); floating tensors are normal with the example's mean and
    standard deviation.
    """
    shape = tuple(int(s) for s in shape)
    if example.numel() == 0:
        return torch.zeros(shape, dtype=example.dtype)
    if example.is_floating_point():
        flat = example.detach().float().flatten()
        std = float(flat.std()) if flat.numel() > 1 else 0.0
        out = torch.randn(shape, generator=generator) * std + float(flat.mean())
        return out.to(example.dtype)
    flat = example.detach().flatten()
    index = torch.randint(0, flat.numel(), shape, generator=generator)
    return flat[index].reshape(shape)


def make_verify_inputs(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    input_dims: Sequence[Sequence[int | str | None]],
    seed: int = 0,
    resize: str = "all",
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """New ``(args, kwargs)`` with the symbolic ONNX axes resized (see module doc).

    ``resize`` is one of :data:`RESIZE_LEVELS`; values are resampled at every level.
    """
    examples = tensor_leaves((args, kwargs))
    if len(examples) != len(input_dims):
        raise ExportError(
            f"the ONNX model has {len(input_dims)} inputs but the example has {len(examples)} tensors; "
            "pass verify_inputs= explicitly"
        )
    sizes = symbolic_sizes(input_dims, examples, resize)
    generator = torch.Generator().manual_seed(seed)
    replacements = {}
    for example, dims in zip(examples, input_dims):
        shape = [sizes.get(d, example.shape[a]) if isinstance(d, str) else example.shape[a] for a, d in enumerate(dims)]
        replacements[id(example)] = resample_like(example, shape, generator)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    new = [replacements.get(id(x), x) if isinstance(x, torch.Tensor) else x for x in leaves]
    new_args, new_kwargs = pytree.tree_unflatten(new, spec)
    return tuple(new_args), dict(new_kwargs)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()  # numpy has no bfloat16; onnxruntime reads it through ml_dtypes only
    return t.numpy()


def compare_outputs(
    names: Sequence[str], onnx_outputs: Sequence[np.ndarray], torch_outputs: Sequence[torch.Tensor]
) -> list[OutputDiff]:
    """Per-output absolute and relative (to the output's max magnitude) differences."""
    if len(onnx_outputs) != len(torch_outputs):
        raise ExportError(
            f"the ONNX model returned {len(onnx_outputs)} outputs but PyTorch returned {len(torch_outputs)} tensors"
        )
    diffs = []
    for name, got, want in zip(names, onnx_outputs, torch_outputs):
        want_np = np.asarray(_to_numpy(want), dtype=np.float64)
        got_np = np.asarray(got, dtype=np.float64)
        if got_np.shape != want_np.shape:
            raise ExportError(
                f"output {name!r}: ONNX shape {list(got_np.shape)} differs from PyTorch shape {list(want_np.shape)}"
            )
        if want_np.size == 0:
            diffs.append(OutputDiff(name, list(want_np.shape), 0.0, 0.0, 0.0))
            continue
        same = (got_np == want_np) | (np.isnan(got_np) & np.isnan(want_np))  # equal infs, NaN on both sides
        with np.errstate(invalid="ignore"):
            err = np.where(same, 0.0, np.abs(got_np - want_np))
        # NaN on one side only (or inf against a finite value) is never within tolerance
        max_abs = float("nan") if np.isnan(err).any() else float(err.max())
        finite = np.abs(want_np[np.isfinite(want_np)])
        scale = float(finite.max()) if finite.size else 0.0
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        diffs.append(OutputDiff(name, list(want_np.shape), max_abs, rel, scale))
    return diffs


def run_onnx(path: str, provider: str, feeds: Sequence[torch.Tensor]) -> tuple[list[str], list[np.ndarray]]:
    """Run the model at ``path`` on one provider; inputs are fed in graph order."""
    session = open_session(path, provider)
    inputs = session.get_inputs()
    if len(inputs) != len(feeds):
        raise ExportError(f"the ONNX model expects {len(inputs)} inputs, verification prepared {len(feeds)}")
    feed = {meta.name: _to_numpy(t) for meta, t in zip(inputs, feeds)}
    names = [o.name for o in session.get_outputs()]
    return names, session.run(None, feed)


def verify_on_provider(
    path: str, provider: str, feeds: Sequence[torch.Tensor], torch_outputs: Sequence[torch.Tensor]
) -> ProviderResult:
    names, outs = run_onnx(path, provider, feeds)
    diffs = compare_outputs(names, outs, torch_outputs)
    max_abs = max((d.max_abs_diff for d in diffs), default=0.0)
    max_rel = max((d.max_rel_diff for d in diffs), default=0.0)
    if any(np.isnan(d.max_abs_diff) for d in diffs):
        max_abs = max_rel = float("nan")
    return ProviderResult(provider, max_abs, max_rel, diffs)
