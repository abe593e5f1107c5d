"""``export_onnx``: a converted model to an ONNX file, verified in onnxruntime.

Pipeline: validate arguments (before any slow work, so a bad path or opset fails in
milliseconds) -> ``torch.export`` (non-strict, dynamic batch/sequence) -> the dynamo
ONNX exporter with our translations of ``torch.ops.attnres.*`` -> onnxscript optimiser
-> our fusions (:mod:`.fusions`: norms onnxruntime can fuse; an aggregation and its
RMSNorm as one call) -> the ``attnres`` functions attached where called -> readable names for
the dynamic axes -> save into a temporary directory next to the destination ->
``onnx.checker`` -> onnxruntime verification on new shapes -> ``os.replace`` into place
(external data first, the model file last), so the destination either holds a
complete, verified export or is left untouched.

Opset: the default is 18. It is the opset the PyTorch exporter's op library (torchlib)
is written in, so no version-conversion pass runs over the graph; the AttnRes
translations need nothing newer (``ReduceMean`` with axes as an input is opset 18);
and onnxruntime has run opset 18 since 1.14, so every onnxruntime 1.2x (and other
engines that stop at 18-20, such as older TensorRT parsers) loads it. The file's IR
version is the exporter's (10), readable by onnxruntime >= 1.18. Newer opsets up
to what both the exporter and the installed ``onnx`` support can be asked for; opsets
below 18 are refused because the exporter cannot convert its graphs down reliably.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import ExportError, NotExportableError, VerificationError
from ..passes.capture import dynamic_axes
from ..passes.lower import count_ops
from . import fusions
from . import verify as _verify
from .function import DOMAIN, DOMAIN_VERSION, functions_ir
from .runtime import Runtime, find_runtime
from .traceable import traceable_experts
from .translations import function_mode, translation_table
from .verify import DEFAULT_ATOL
from .verify import short_error as _short

DEFAULT_OPSET = 18
MIN_OPSET = 18
#: Above this many bytes of weights the model is written with external data. Protobuf
#: caps a message at 2 GiB; the margin leaves room for the graph itself.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def max_opset() -> int:
    """Highest opset both the PyTorch exporter and the installed ``onnx`` package know."""
    import onnx
    from torch.onnx import _constants

    return min(_constants.ONNX_MAX_OPSET, onnx.defs.onnx_opset_version())


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float, however deeply nested, replaced by ``None`` (JSON has no inf/NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


@dataclass
class ExportReport:
    """What was exported, where, and how closely onnxruntime matches PyTorch.

    ``max_rel_diff`` is ``max|onnx - torch| / max|torch|`` per output (worst output,
    worst provider); ``None`` when verification did not run. ``outputs`` has one entry
    per output (worst provider): ``name``, ``shape``, ``max_abs_diff``, ``max_rel_diff``,
    ``reference_max_abs`` (``max|torch|``, the scale the relative figure divides by; 0
    for an all-zero output, whose check is then vacuous and noted) and ``ok``.
    """

    onnx_path: str
    opset: int
    ir_version: int
    as_function: bool
    dynamic: bool
    attnres_ops: int
    onnx_functions: list[str]
    external_data: str | None
    file_bytes: int
    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, list[int | str]]
    export_seconds: float
    checker_passed: bool
    verified: bool
    verify_seconds: float | None = None
    verify_input_shapes: dict[str, list[int]] = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)
    runtime: str | None = None
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    rtol: float | None = None
    atol: float | None = None
    provider_results: list[_verify.ProviderResult] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    task: str = "default"
    task_verification: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (non-finite floats become ``None``)."""
        return json_safe(dataclasses.asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# --------------------------------------------------------------------------------------
# Argument checks (all before the export starts)


def _check_opset(opset: Any) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"opset must be an integer, got {opset!r}")
    top = max_opset()
    if opset < MIN_OPSET or opset > top:
        raise ExportError(
            f"opset {opset} is not supported: use an opset between {MIN_OPSET} and {top} "
            f"(default {DEFAULT_OPSET}, which onnxruntime >= 1.14 runs). Opsets below {MIN_OPSET} cannot be "
            "produced by the PyTorch exporter reliably; higher ones are unknown to the installed onnx/torch"
        )
    return opset


def _check_destination(path: Any) -> Path:
    """Resolve the destination and make sure its directory exists and accepts files.

    The directory is not created: a typo in a path should fail, not leave new
    directories behind (nothing at all is created when an export fails).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ExportError(f"path must be a file path, got {path!r}")
    dest = Path(path).expanduser().absolute()
    if dest.is_dir():
        raise ExportError(f"{dest} is a directory; pass a file path such as {dest / 'model.onnx'}")
    parent = dest.parent
    if not parent.exists():
        raise ExportError(f"cannot write {dest}: the directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ExportError(f"cannot write {dest}: {parent} is not a directory")
    try:  # the real test of writability (os.access is meaningless for root)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".attnres-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise ExportError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    return dest


# --------------------------------------------------------------------------------------
# Dynamic shapes


def default_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """``dynamic_shapes`` for torch.export: batch and sequence axes of every tensor input.

    Keyed by the names of ``forward``'s parameters, so ``*args``/``**kwargs`` parameters
    get the nested structure torch.export expects.
    """
    spec = lambda tree: pytree.tree_map(dynamic_axes, tree)  # noqa: E731
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no introspectable signature: positional inputs only
        if kwargs:
            raise ExportError(f"cannot map keyword inputs onto {type(model).__name__}.forward") from None
        return tuple(spec(a) for a in args)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ExportError(f"example_inputs do not match {type(model).__name__}.forward: {exc}") from exc
    return {name: spec(value) for name, value in bound.arguments.items()}


def _static_size_one_notes(args: tuple, kwargs: dict) -> list[str]:
    notes = []
    for i, t in enumerate(_verify.tensor_leaves((args, kwargs))):
        axes = dynamic_axes(t) or {}
        for axis in axes:
            if t.shape[axis] == 1:
                notes.append(
                    f"input {i} has size 1 on axis {axis} in the example, so torch.export keeps that axis static; "
                    "export with a size >= 2 there for a dynamic axis"
                )
    return notes


_SYMBOL = re.compile(r"\b(s\d+)\b")


def _rename_symbols(model, symbol_names: dict[str, str]) -> None:
    """Rename torch.export's ``s23``-style dims to ``batch``/``seq`` throughout the graph."""
    import onnx_ir as ir

    def rename(value) -> None:
        shape = value.shape
        if shape is None:
            return
        dims, changed = [], False
        for dim in shape:
            if isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str):
                if dim.value.isdigit():  # a size torch.export specialised, written as a "symbol"
                    dims.append(int(dim.value))
                    changed = True
                    continue
                new = _SYMBOL.sub(lambda m: symbol_names.get(m.group(1), m.group(1)), dim.value)
                changed |= new != dim.value
                dims.append(ir.SymbolicDim(new))
            else:
                dims.append(dim)
        if changed:
            value.shape = ir.Shape(dims)

    graph = model.graph
    for value in [*graph.inputs, *graph.outputs]:
        rename(value)
    for node in graph:
        for value in node.outputs:
            rename(value)


def _name_dynamic_axes(model, preferred: dict[str, dict[int, str]] | None = None) -> None:
    """Give each symbolic input dim a name: ``preferred[input][axis]``, else one from the axis it first appears on."""
    import onnx_ir as ir

    base = {0: "batch", 1: "seq"}
    preferred = preferred or {}
    names: dict[str, str] = {}
    used: set[str] = set()
    for value in model.graph.inputs:  # preferred names first, so a default name never takes one of them
        for axis, name in preferred.get(value.name, {}).items():
            dims = value.shape or ()
            if axis < len(dims) and isinstance(dims[axis], ir.SymbolicDim) and isinstance(dims[axis].value, str):
                if _SYMBOL.fullmatch(dims[axis].value) and dims[axis].value not in names:
                    names[dims[axis].value] = name
                    used.add(name)
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str) and _SYMBOL.fullmatch(dim.value):
                if dim.value in names:
                    continue
                stem = base.get(axis, f"dim{axis}")
                name, k = stem, 1
                while name in used:
                    name, k = f"{stem}_{k}", k + 1
                names[dim.value] = name
                used.add(name)
    _rename_symbols(model, names)  # also turns specialised "8"-style symbols into static sizes


def _rename_inputs(model, names: list[str]) -> None:
    """Name the graph's inputs in order (a task's interface: ``past_key_values.0.key``...)."""
    inputs = list(model.graph.inputs)
    if len(names) != len(inputs):
        raise ExportError(f"the exported graph has {len(inputs)} inputs, expected {len(names)} ({', '.join(names)})")
    for value, name in zip(inputs, names):
        value.name = name


# --------------------------------------------------------------------------------------
# Export


def _output_names(exported) -> list[str] | None:
    """Readable ONNX output names from the model's output structure.

    A Hugging Face ``ModelOutput`` gives ``logits``/``last_hidden_state``..., a tuple
    ``output_0``..., a single tensor ``output``; the exporter would otherwise name them
    after internal nodes (``layer_norm_11``), which deployment code cannot rely on.
    """
    try:
        spec = exported.call_spec.out_spec
        leaves = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        paths = pytree.tree_flatten_with_path(leaves)[0]
    except Exception:  # an output structure pytree cannot describe: keep the exporter's names
        return None
    if len(paths) == 1 and not paths[0][0]:
        return ["output"]
    names = []
    for path, _ in paths:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        name = re.sub(r"[^0-9A-Za-z_]+", "_", "_".join(parts)).strip("_") or "output"
        names.append(f"output_{name}" if name[0].isdigit() else name)
    return names if len(set(names)) == len(names) else None


def _rename_outputs(model, names: list[str] | None) -> None:
    """Apply :func:`_output_names` where no other value of the graph already has the name."""
    outputs = list(model.graph.outputs)
    if names is None or len(names) != len(outputs):
        return
    taken = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    for node in model.graph:
        taken.update(v.name for v in node.outputs if v not in outputs)
    if taken & set(names) or len({id(v) for v in outputs}) != len(outputs):
        return  # a clash, or one value returned twice: keep the exporter's names
    for value, name in zip(outputs, names):
        value.name = name


def _fix_function_opsets(model, opset: int) -> None:
    """Align the AttnRes function's default-domain opset with the model's.

    The function body is written against opset 18; every op it uses (Cast, CastLike,
    Mul, Div, Add, Pow, Sqrt, MatMul, ReduceMean/ReduceSum, Unsqueeze, Softmax,
    Concat, Constant) has the same semantics up to the newest supported opset, and
    runtimes want one version of a domain per model.
    """
    for function in model.functions.values():
        if function.domain == DOMAIN and "" in function.opset_imports:
            function.opset_imports[""] = opset
    if any(f.domain == DOMAIN for f in model.functions.values()):
        model.opset_imports[DOMAIN] = DOMAIN_VERSION


@functools.lru_cache(maxsize=4)
def _cached_registry(opset: int):
    """The exporter's op registry with our translations, built once per process.

    ``torch.onnx.export`` rebuilds the whole torchlib registry on every call (seconds of
    CPU); a process that exports several models (the CLI's batch runs, the test suite)
    pays that once here. Returns ``None`` when this torch's private exporter API does not
    look as expected, in which case the public ``torch.onnx.export`` is used.
    """
    try:
        from torch.onnx._internal.exporter import _core, _registration

        params = inspect.signature(_core.export).parameters
        if not {"registry", "opset_version", "dynamic_shapes", "optimize"} <= set(params):
            return None
        registry = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
        for target, function in translation_table(None).items():
            registry.register_op(target, function, is_complex=False)
        return registry
    except Exception:  # any drift in private API: fall back to the public path
        return None


def _warm_up(model, args, kwargs) -> None:
    """Run a converted model once on the example, so the program of this call exists before export traces it.

    A converted model captures a program per call signature on first use; it cannot do
    that while ``torch.export`` traces it with fake tensors. A module that merely holds a
    converted model (a wrapper giving it another signature) needs the same.
    """
    from ..runtime.converted import owners

    if owners(model):
        with torch.no_grad():
            try:
                model(*args, **kwargs)
            except Exception as exc:  # the model's own error on its example is the user's to see
                raise ExportError(f"the converted model fails on the example inputs: {_short(exc)}") from exc


def _runs_eagerly(model, args, kwargs) -> None:
    """Raise :class:`ExportError` (a user error) when ``model`` fails on its example inputs in PyTorch."""
    with torch.no_grad():
        try:
            model(*args, **kwargs)
        except Exception as exc:
            raise ExportError(f"{type(model).__name__} fails on the example inputs: {_short(exc)}") from exc


def _capture(model, args, kwargs, dynamic_shapes):
    """``torch.export`` the model ourselves (the exporter's own first step).

    Doing it here lets ``require_attnres`` refuse an unconverted model before the
    costly ONNX translation, and makes the capture one predictable strategy
    (non-strict, as ``convert`` uses) instead of the exporter's silent fallbacks.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(model, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # torch raises many kinds; the user needs the root cause
            _runs_eagerly(model, args, kwargs)  # a model failing on its own example is the user's to fix
            raise NotExportableError(
                f"{type(model).__name__} is not exportable to ONNX because torch.export could not capture it: "
                f"{_short(exc)}"
            ) from exc


def explicit_contiguous_copies(exported) -> int:
    """Give every ``reshape`` a contiguous input and make copying ``contiguous()`` calls explicit (returns how many).

    The ONNX exporter decomposes the captured program again, with size-oblivious shape
    reasoning (so that sizes 0 and 1 export). Under it, a ``contiguous()`` of a
    transposed tensor cannot prove the tensor non-contiguous and returns it unchanged,
    and a ``reshape`` may decompose into a ``view`` the strides do not allow:
    ``Cannot view a tensor with shape ... and strides ...``. Measured (torch 2.13,
    transformers 5.x): the *original* Swin and T5 fail this way (Swin's window
    partition/reverse; T5's ``attn.transpose(1, 2).contiguous()`` then ``reshape``);
    the converted T5 failed even once copying ``contiguous()`` calls were made explicit,
    because its captured program has no ``contiguous`` node between the transpose and
    the reshape (the original's capture has one; why the converted capture elides it
    was not established).

    An explicit ``clone(memory_format=contiguous_format)`` before each ``reshape`` keeps
    the values exactly (a reshape of a copy is the same tensor) and leaves no stride
    decision to the second decomposition; in ONNX, which has no strides, the copy is an
    ``Identity`` the optimiser removes. A ``contiguous()`` whose output strides differ
    from its input's (it copied during the trace) becomes the same ``clone``.
    """
    count = 0
    aten = torch.ops.aten
    graph = exported.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.contiguous.default:
            source, result = node.args[0].meta.get("val"), node.meta.get("val")
            if isinstance(source, torch.Tensor) and isinstance(result, torch.Tensor):
                if [str(s) for s in source.stride()] != [str(s) for s in result.stride()]:
                    node.target = aten.clone.default
                    node.args = (node.args[0],)
                    node.kwargs = {"memory_format": torch.contiguous_format}
                    count += 1
        elif node.target is aten.reshape.default and isinstance(node.args[0], torch.fx.Node):
            source = node.args[0]
            if not isinstance(source.meta.get("val"), torch.Tensor):
                continue
            with graph.inserting_before(node):
                copy = graph.call_function(aten.clone.default, (source,), {"memory_format": torch.contiguous_format})
            copy.meta = {k: v for k, v in source.meta.items() if k in ("val", "tensor_meta", "stack_trace")}
            if "val" in copy.meta:
                copy.meta["val"] = copy.meta["val"].clone(memory_format=torch.contiguous_format)
            copy.meta.pop("tensor_meta", None)
            node.replace_input_with(source, copy)
            count += 1
    if count:
        exported.graph_module.recompile()
    return count


_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")


def _not_exportable(name: str, exc: BaseException) -> NotExportableError:
    """The exporter's failure as a :class:`NotExportableError` naming the op it could not translate, if one."""
    reason = _short(exc)
    missing = _NO_FUNCTION.search(reason)
    if missing:
        reason = (
            f"it calls the op {missing.group(1)}, which has no ONNX translation in the PyTorch exporter "
            f"(exporter message: {reason})"
        )
    else:
        reason = f"torch.onnx.export failed: {reason}"
    return NotExportableError(f"{name} is not exportable to ONNX because {reason}")


def _torch_export(exported, opset, as_function, optimize, name: str = "the model"):
    """The ONNX translation of a captured program, optimised, with our function attached."""
    import onnxscript

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation/FutureWarnings are not the user's business
        try:
            registry = _cached_registry(opset)
            if registry is not None:
                from torch.onnx._internal.exporter import _core

                with function_mode(as_function):
                    program = _core.export(
                        exported, registry=registry, verbose=False, optimize=False, opset_version=opset
                    )
            else:
                program = torch.onnx.export(
                    exported,
                    (),
                    dynamo=True,
                    opset_version=opset,
                    custom_translation_table=translation_table(as_function),
                    optimize=False,
                    verbose=False,
                )
        except Exception as exc:  # torch raises many kinds; the user needs the root cause
            raise _not_exportable(name, exc) from exc
    if optimize:
        # what torch.onnx.export(optimize=True) runs; our function is not attached yet, so
        # inlining the exporter's own helper functions leaves the AttnRes call nodes alone
        onnxscript.optimizer.optimize_ir(program.model)
        fusions.run(program.model.graph)
    called = {node.op_type for node in program.model.graph if node.domain == DOMAIN}
    for function in functions_ir(called):
        program.model.functions[function.identifier()] = function
    _fix_function_opsets(program.model, opset)
    return program


def _save(program, dest: Path, external: bool) -> None:
    """Write the model (and ``<name>.data`` when external) to ``dest``."""
    program.save(str(dest), external_data=external)


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    as_function: bool = False,
    verify: bool = True,
    require_attnres: bool = False,
    external_data: bool | str = "auto",
    verify_inputs: Any = None,
    dynamic_shapes: Any = None,
    rtol: float | None = None,
    atol: float = DEFAULT_ATOL,
    optimize: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export ``model`` (usually the output of ``attnres_rewrite.convert``) to ONNX at ``path``.

    Args:
        model: the module to export; it is put in eval mode for the export and
            verification and restored afterwards.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword
            inputs (as for ``convert``).
        path: destination ``.onnx`` file; with external data ``<path>.data`` is written
            beside it. Written atomically: on any error nothing is left at ``path``.
        opset: default opset (see the module docstring for why 18 is the default).
        dynamic: export batch and sequence axes as dynamic (``Dim.AUTO``: axes the model
            pins stay static, and the report says so).
        as_function: wrap every AttnRes aggregation in the ONNX local function
            ``attnres.BlockAttnRes`` (body of standard ops) instead of inlining it; an
            aggregation read only by an RMSNorm becomes one ``attnres.BlockAttnResRMSNorm``
            call with it (:mod:`.fusions`).
        verify: run the file in onnxruntime (CPU, plus CUDA when available) on inputs of
            a different batch and sequence length and compare with PyTorch; raise
            :class:`ExportError` with the numbers above tolerance.
        require_attnres: raise instead of exporting a model that has no AttnRes op.
        external_data: ``"auto"`` (external above 1.8 GiB of weights), ``True`` or ``False``.
        verify_inputs: inputs for verification (same structure as ``example_inputs``);
            default: resampled from the example with the dynamic axes resized.
        dynamic_shapes: explicit ``torch.export`` dynamic shapes, overriding ``dynamic``.
        rtol, atol: verification passes when ``max|onnx - torch| <= atol + rtol * max|torch|``
            for every output; ``rtol`` defaults by parameter dtype (1e-4 for fp32).
        optimize: run the onnxscript optimiser (constant folding, dead-code removal) and
            our fusions (:mod:`.fusions`).
        seed: seed of the verification inputs.
        progress: called with a short description as each step starts (``"capture"``,
            ``"translate"``, ``"save"``, ``"check"``, ``"verify"``), for a CLI progress
            display; exports take seconds to minutes.
    """
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    opset = _check_opset(opset)
    _check_external_data(external_data)
    dest = _check_destination(path)
    runtime: Runtime | None = find_runtime() if verify else None
    args, kwargs = _verify.split_inputs(example_inputs)
    notes: list[str] = []
    if dynamic_shapes is None and dynamic:
        dynamic_shapes = default_dynamic_shapes(model, args, kwargs)
        notes += _static_size_one_notes(args, kwargs)
    if rtol is None:
        rtol = _verify.default_rtol(model)

    def verifier(report: ExportReport, staged: Path, input_dims: list) -> None:
        _run_verification(report, model, args, kwargs, verify_inputs, input_dims, staged, runtime, rtol, atol, seed)

    return export_file(
        model,
        args,
        kwargs,
        dest,
        opset=opset,
        dynamic=dynamic,
        dynamic_shapes=dynamic_shapes,
        as_function=as_function,
        require_attnres=require_attnres,
        external_data=external_data,
        optimize=optimize,
        notes=notes,
        verifier=verifier if runtime is not None else None,
        progress=progress,
    )


def _check_external_data(external_data: Any) -> None:
    if external_data not in (True, False, "auto"):
        raise ExportError(f"external_data must be True, False or 'auto', got {external_data!r}")


@dataclass
class IONames:
    """Names an export gives its graph: inputs and outputs in order, and per input its dynamic axes.

    ``axes`` maps an input name to ``{axis: name}``; a symbol first met on such an axis
    gets that name everywhere (outputs too, and in expressions such as ``past + seq``).
    """

    inputs: list[str] | None = None
    outputs: list[str] | None = None
    axes: dict[str, dict[int, str]] = field(default_factory=dict)


def export_file(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    dest: Path,
    *,
    opset: int,
    dynamic: bool,
    dynamic_shapes: Any,
    as_function: bool,
    require_attnres: bool,
    external_data: bool | str,
    optimize: bool,
    notes: list[str],
    verifier: Callable[[ExportReport, Path, list], None] | None,
    names: IONames | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """The export pipeline of :func:`export_onnx` on checked arguments (the module docstring lists the steps).

    ``verifier(report, staged_path, input_dims)`` checks the staged file and fills the
    report's verification fields, raising to keep the file from being written;
    ``None`` skips verification. Task exporters (:mod:`.decoder`) pass their own
    verifier and ``names``.
    """
    step = progress if progress is not None else (lambda _: None)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    tmpdir = None
    try:
        with traceable_experts(model, notes):
            start = time.perf_counter()
            step("capture")
            _warm_up(model, args, kwargs)
            exported = _capture(model, args, kwargs, dynamic_shapes)
            explicit_contiguous_copies(exported)
            attnres_ops = sum(count_ops(exported.graph_module).values())
            if attnres_ops == 0:
                if require_attnres:
                    raise ExportError(
                        f"{type(model).__name__} has no AttnRes op (torch.ops.attnres.*); convert it first with "
                        "attnres_rewrite.convert(model, example_inputs), or pass require_attnres=False to export it "
                        "as is"
                    )
                notes.append("the model has no AttnRes op (not converted?); exported as a plain model")
            step("translate")
            program = _torch_export(exported, opset, as_function, optimize, type(model).__name__)
            if names is not None and names.inputs is not None:
                _rename_inputs(program.model, names.inputs)
            outputs = names.outputs if names is not None and names.outputs is not None else _output_names(exported)
            _rename_outputs(program.model, outputs)
            if names is not None and names.outputs is not None:  # a task's interface: the names are the contract
                got = [v.name for v in program.model.graph.outputs]
                if got != names.outputs:
                    raise ExportError(
                        f"the exported graph's outputs cannot take the names {names.outputs} (it has {got}: a "
                        "different count, a name clash or one value returned twice)"
                    )
            _name_dynamic_axes(program.model, names.axes if names is not None else None)
            initializer_bytes = sum(
                v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None
            )
            external = external_data is True or (
                external_data == "auto" and initializer_bytes > EXTERNAL_DATA_THRESHOLD
            )

            tmpdir = Path(tempfile.mkdtemp(prefix=".attnres-export-", dir=dest.parent))
            staged = tmpdir / dest.name
            try:
                step("save")
                _save(program, staged, external)
            except OSError as exc:
                raise ExportError(f"writing the ONNX file failed: {exc.strerror or exc}") from exc
            export_seconds = time.perf_counter() - start

            import onnx

            try:
                step("check")
                onnx.checker.check_model(str(staged), full_check=True)
            except Exception as exc:  # onnx raises ValidationError / InferenceError
                raise ExportError(f"the exported model fails onnx.checker: {_short(exc)}") from exc
            header = onnx.load(str(staged), load_external_data=False)
            input_names = [v.name for v in header.graph.input]
            output_names = [v.name for v in header.graph.output]
            input_dims = _verify.input_dims(header)
            if dynamic and input_dims and not any(isinstance(d, str) for dims in input_dims for d in dims):
                notes.append("no input axis is dynamic in the exported graph: the model pins its input shapes")
            staged_data = tmpdir / f"{dest.name}.data"
            report = ExportReport(
                onnx_path=str(dest),
                opset=opset,
                ir_version=header.ir_version,
                as_function=as_function,
                dynamic=dynamic,
                attnres_ops=attnres_ops,
                onnx_functions=[f"{f.domain}.{f.name}" for f in header.functions],
                external_data=str(dest.parent / staged_data.name) if staged_data.exists() else None,
                file_bytes=staged.stat().st_size + (staged_data.stat().st_size if staged_data.exists() else 0),
                input_names=input_names,
                output_names=output_names,
                input_shapes=dict(zip(input_names, input_dims)),
                export_seconds=export_seconds,
                checker_passed=True,
                verified=False,
                notes=notes,
            )
            if verifier is not None:
                step("verify")
                verifier(report, staged, input_dims)

        if staged_data.exists():
            os.replace(staged_data, dest.parent / staged_data.name)
        os.replace(staged, dest)
        return report
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        for m, flag in was_training.items():
            m.training = flag


def _run_verification(report, model, args, kwargs, verify_inputs, input_dims, staged, runtime, rtol, atol, seed):
    """:func:`.verify.verify_file` on the staged file, into ``report``; raise when outside tolerance."""
    result = _verify.verify_file(
        str(staged),
        model,
        args,
        kwargs,
        input_dims,
        runtime,
        rtol=rtol,
        atol=atol,
        seed=seed,
        verify_inputs=verify_inputs,
    )
    report.verified = True
    report.verify_seconds = result.seconds
    report.verify_input_shapes = dict(zip(report.input_names, result.input_shapes))
    report.providers = result.providers
    report.notes.extend(result.notes)
    report.runtime = result.runtime
    report.provider_results = result.results
    report.rtol, report.atol = rtol, atol
    report.max_abs_diff = result.max_abs_diff
    report.max_rel_diff = result.max_rel_diff
    report.outputs = result.per_output()
    report.notes.extend(result.zero_reference_notes())
    if not result.ok:
        raise VerificationError(
            f"ONNX output differs from PyTorch beyond tolerance (rtol={rtol:g}, atol={atol:g}) on inputs "
            f"{report.verify_input_shapes}: " + "; ".join(result.failures) + ". No file was written"
        )
