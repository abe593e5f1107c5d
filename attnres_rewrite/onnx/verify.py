"""Checking an exported ONNX model against the PyTorch model it came from.

Why new shapes: a model exported with dynamic axes can still hide a size that was
baked in during tracing (a reshape to the example's sequence length, a mask built for
batch 2). Running the check on the export example would not see it, so verification
draws inputs whose dynamic axes (those the ONNX graph declares symbolic) differ from
the example's, with values resembling the example's (token ids drawn from the ids it
contains, floats with its mean and spread), and compares every output.

Relative difference: per output, ``max|onnx - torch| / max|torch|``. An element-wise
ratio is meaningless near zero, and a model output's scale is what a 1e-4 tolerance
is meant to be relative to. The pass criterion (:func:`within_tolerance`) is per
output: ``max|onnx - torch| <= atol + rtol * max|torch|``.

:func:`verify_file` is the one check: ``export_onnx`` runs it on the file it is about
to write, ``attnres verify --onnx`` on a file written earlier, so both draw the same
inputs (same seed, same fallback levels) and apply the same criterion.

Why not ``attnres_rewrite.api.fresh_inputs``: that one compares two PyTorch models
and has no graph to consult, so it guesses the sequence axis from tensor ranks and
invents values (masks of ones, ids below the example's maximum). Here the ONNX graph
says which axes are dynamic and which are tied together, and values are resampled
from the example; expressing either through the other would lose one of the two.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..errors import ExportError
from . import ort_ops
from .runtime import Runtime, open_session

#: Relative tolerance of verification by dtype of the model's floating parameters.
DEFAULT_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 2e-2, torch.bfloat16: 5e-2}
DEFAULT_ATOL = 1e-6


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


@dataclass
class Verification:
    """What :func:`verify_file` measured: per provider and output, against ``rtol``/``atol``.

    ``input_shapes`` are the shapes fed to the ONNX graph, in its input order;
    ``notes`` say where the inputs backed off from resizing every dynamic axis and
    which advertised providers could not be used.
    """

    rtol: float
    atol: float
    runtime: str
    providers: list[str]
    input_shapes: list[list[int]]
    results: list[ProviderResult]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        """Worst output on the worst provider; NaN when any output has NaN on one side only."""
        if any(np.isnan(r.max_abs_diff) for r in self.results):
            return float("nan")
        return max((r.max_abs_diff for r in self.results), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        if any(np.isnan(r.max_abs_diff) for r in self.results):
            return float("nan")
        return max((r.max_rel_diff for r in self.results), default=0.0)

    @property
    def failures(self) -> list[str]:
        """One line per output outside tolerance, with its numbers."""
        return [
            f"{r.provider} output {d.name!r}: max abs diff {d.max_abs_diff:.3g}, max rel diff {d.max_rel_diff:.3g} "
            f"(output max {d.torch_max_abs:.3g})"
            for r in self.results
            for d in r.outputs
            if not within_tolerance(d.max_abs_diff, d.torch_max_abs, rtol=self.rtol, atol=self.atol)
        ]

    @property
    def ok(self) -> bool:
        return not self.failures

    def per_output(self) -> list[dict[str, Any]]:
        """One entry per output, worst provider: the differences next to the reference's magnitude.

        ``reference_max_abs`` is ``max|torch|`` of that output: a relative difference of 0
        against an all-zero reference (``reference_max_abs == 0``) shows only that ONNX is
        zero too, which :meth:`zero_reference_notes` says.
        """
        worst: dict[str, dict[str, Any]] = {}
        for r in self.results:
            for d in r.outputs:
                ok = within_tolerance(d.max_abs_diff, d.torch_max_abs, rtol=self.rtol, atol=self.atol)
                entry = {
                    "name": d.name,
                    "shape": d.shape,
                    "max_abs_diff": d.max_abs_diff,
                    "max_rel_diff": d.max_rel_diff,
                    "reference_max_abs": d.torch_max_abs,
                    "ok": ok,
                    "provider": r.provider,
                }
                old = worst.get(d.name)
                if old is None or (old["ok"] and not ok) or (old["ok"] == ok and _worse(d.max_abs_diff, old)):
                    worst[d.name] = entry
        return list(worst.values())

    def zero_reference_notes(self) -> list[str]:
        """A note per output that PyTorch returned as all zeros (its check is vacuous)."""
        return [
            f"output {o['name']!r} is all zeros in PyTorch on the verification inputs (reference_max_abs 0): "
            "its check shows only that onnxruntime returns zeros too"
            for o in self.per_output()
            if o["reference_max_abs"] == 0 and np.prod(o["shape"] or [1]) > 0
        ]


def _worse(max_abs: float, old: dict[str, Any]) -> bool:
    return bool(np.isnan(max_abs) or max_abs > old["max_abs_diff"])


def within_tolerance(max_abs: float, scale: float, *, rtol: float, atol: float) -> bool:
    """The pass criterion of every ONNX check: ``max|onnx - torch| <= atol + rtol * max|torch|``.

    Applied per output (``scale`` is that output's largest finite magnitude); NaN fails.
    """
    return bool(max_abs <= atol + rtol * scale)


def default_rtol(model: torch.nn.Module) -> float:
    """:data:`DEFAULT_RTOL` for the dtype of the model's first floating parameter (fp32 without one)."""
    for p in model.parameters():
        if p.is_floating_point():
            return DEFAULT_RTOL.get(p.dtype, DEFAULT_RTOL[torch.float32])
    return DEFAULT_RTOL[torch.float32]


def short_error(exc: BaseException, limit: int = 600) -> str:
    """The root cause of an exporter error (its messages run to pages).

    Follows explicit causes (``raise ... from``) down to the innermost one, which is
    where torch puts the actual reason; implicit contexts are mostly noise.
    """
    seen = set()
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    text = str(exc).strip()
    for marker in ("\n\nFor more information", "\n\nThe error above"):
        text = text.split(marker)[0]
    msg = f"{type(exc).__name__}: {text}"
    return msg if len(msg) <= limit else msg[:limit] + " ..."


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
    Graph-driven, unlike ``api.fresh_inputs`` (the module doc says why both exist).
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


def reference_run(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    input_dims: Sequence[Sequence[int | str | None]],
    seed: int = 0,
) -> tuple[tuple[Any, ...], dict[str, Any], Any, list[str]]:
    """PyTorch outputs on resized inputs, backing off where the model cannot take them.

    The ONNX graph can declare an axis symbolic that the model still pins (a mel-bin
    count that only a guard of the captured module enforces): then only the batch is
    resized, and as a last resort nothing (new values, example shapes). Returns
    ``(args, kwargs, outputs, notes)``; a note records any back-off, since it means the
    graph claims more freedom than the model has.
    """
    failures = []
    for level in RESIZE_LEVELS:
        v_args, v_kwargs = make_verify_inputs(args, kwargs, input_dims, seed=seed, resize=level)
        with torch.no_grad():
            try:
                expected = model(*v_args, **v_kwargs)
            except Exception as exc:  # the model's own shape checks, guards of a captured module
                failures.append(f"{level}: {short_error(exc, 200)}")
                continue
        notes = []
        if failures:
            resized = {"batch": "the batch axis only", "none": "the example's shapes"}[level]
            notes.append(
                "the PyTorch model does not run with every dynamic axis of the ONNX graph resized "
                f"({failures[0]}); verified with {resized}"
            )
        return v_args, v_kwargs, expected, notes
    raise ExportError("the PyTorch model failed on every verification input: " + "; ".join(failures))


def verification_targets(paths: Sequence[str | Any], providers: Sequence[str]) -> tuple[list[str], list[str]]:
    """The providers to verify ``paths`` on, and notes: ``providers``, plus the fused attnres kernel on CPU
    (:data:`ort_ops.FUSED_CPU`) when a file calls ``attnres`` functions (the function form).

    Both paths of such a file are checked: the function's body (any onnxruntime) and the
    kernel that :func:`ort_ops.register` puts in its place. Where the library cannot be
    built, a note says the kernel was not checked and why.
    """
    targets = list(providers)
    if not any(ort_ops.has_attnres_nodes(p) for p in paths):
        return targets, []
    reason = ort_ops.unavailable_reason()
    if reason is not None:
        return targets, [f"the attnres functions were checked as their bodies only, not the fused kernels ({reason})"]
    return targets + [ort_ops.FUSED_CPU], []


def verify_file(
    path: str,
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    input_dims: Sequence[Sequence[int | str | None]],
    runtime: Runtime,
    *,
    rtol: float,
    atol: float,
    seed: int = 0,
    verify_inputs: Any = None,
) -> Verification:
    """Run the ONNX file at ``path`` on every provider of ``runtime`` and compare with ``model``.

    Inputs: ``verify_inputs`` when given, else drawn from the example ``(args, kwargs)``
    with the graph's symbolic axes (``input_dims``) resized, backing off as
    :func:`reference_run` describes. ``model`` runs as it is (callers put it in eval
    mode). Raises :class:`ExportError` when PyTorch or onnxruntime cannot run the
    inputs; numbers outside tolerance are not raised but listed in ``failures``.
    """
    start = time.perf_counter()
    notes: list[str] = []
    if verify_inputs is None:
        v_args, v_kwargs, expected, notes = reference_run(model, args, kwargs, input_dims, seed)
    else:
        v_args, v_kwargs = split_inputs(verify_inputs)
        with torch.no_grad():
            try:
                expected = model(*v_args, **v_kwargs)
            except Exception as exc:
                raise ExportError(f"the PyTorch model failed on verify_inputs: {short_error(exc)}") from exc
    feeds = tensor_leaves((v_args, v_kwargs))
    expected = tensor_leaves(expected)
    providers, target_notes = verification_targets([path], runtime.providers)
    results = []
    for provider in providers:
        try:
            results.append(verify_on_provider(path, provider, feeds, expected))
        except ExportError:
            raise
        except Exception as exc:  # onnxruntime errors (load failure, shape mismatch at run time)
            raise ExportError(f"onnxruntime ({provider}) could not run the exported model: {short_error(exc)}") from exc
    return Verification(
        rtol=rtol,
        atol=atol,
        runtime=f"{runtime.distribution} {runtime.version}",
        providers=providers,
        input_shapes=[list(t.shape) for t in feeds],
        results=results,
        notes=notes + list(runtime.notes) + target_notes,
        seconds=time.perf_counter() - start,
    )
