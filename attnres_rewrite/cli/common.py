"""Steps several commands share: load MODEL, convert or apply an adapter, compare, write outputs.

The API modules are imported here lazily, inside the functions, so ``attnres --help`` and
argument errors stay fast and a command whose backend is missing fails with a clear
message instead of breaking every other command.
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..adapter import CONFIG_NAME, WEIGHTS_NAME
from ..errors import AdapterError, AttnResError, InvalidInputError
from . import output
from .sources import ResolvedModel, resolve

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)


def backend(module: str) -> Any:
    """Import ``attnres_rewrite.<module>``, failing clearly where that part is not built yet."""
    try:
        return importlib.import_module(f"attnres_rewrite.{module}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(f"attnres_rewrite.{module}"):
            raise RuntimeError(f"attnres_rewrite.{module} is not available in this installation") from exc
        raise


@dataclass
class ConversionOptions:
    """The ``--blocks/--block-size/--full/--mode/--eps`` flags, validated once for every command."""

    blocks: int | None = None
    block_size: int | None = None
    full: bool = False
    mode: str = "paper"
    eps: float | None = None
    trace_depth: str = "auto"  # how the model is traced, not a conversion setting: allowed with --adapter
    layers_per_block: int | None = None

    def __post_init__(self) -> None:
        chosen = [
            flag
            for flag, on in (
                ("--blocks", self.blocks),
                ("--block-size", self.block_size),
                ("--full", self.full),
                ("--layers-per-block", self.layers_per_block),
            )
            if on
        ]
        if len(chosen) > 1:
            raise InvalidInputError(f"{' and '.join(chosen)} are alternatives; pass only one of them.")
        if self.eps is not None and not 0 < self.eps < math.inf:
            raise InvalidInputError(f"--eps must be a positive finite number (e.g. 1e-6), got {self.eps}.")

    @property
    def given(self) -> bool:
        """Whether any conversion flag differs from its default (they conflict with --adapter)."""
        partition = self.blocks or self.block_size or self.full or self.layers_per_block
        return bool(partition or self.mode != "paper" or self.eps is not None)

    def kwargs(self) -> dict[str, Any]:
        return {
            "num_blocks": self.blocks,
            "block_size": self.block_size,
            "full": self.full,
            "layers_per_block": self.layers_per_block,
            "mode": self.mode,
            "eps": self.eps,
            "trace_depth": self.trace_depth,
        }


def load_model(spec: str, *, batch: int | None, seq_len: int | None, seed: int) -> ResolvedModel:
    with output.step(f"Loading {spec}"):
        resolved = resolve(spec, batch=batch, seq_len=seq_len, seed=seed)
    if resolved.note:
        output.note(resolved.note)
    return resolved


def convert(resolved: ResolvedModel, options: ConversionOptions) -> nn.Module:
    api = backend("api")
    with output.step("Converting residual streams"):
        # convert works on a copy, so resolved.model stays the unconverted reference
        converted = api.convert(resolved.model, resolved.example_inputs, **options.kwargs())
    for line in plan_of(converted).notes:
        output.note(line)
    return converted


def plan_of(converted: nn.Module):
    """The conversion plan a converted model carries (``converted.attnres.plan``)."""
    return backend("api").plan_of(converted)


def check_adapter_dir(directory: Path) -> None:
    """Reject a path that is not an adapter before the API reads it, with the fix in the message.

    Commands call it once, first thing (before the slow model load); :func:`load_adapter`
    does not repeat it.
    """
    if not directory.is_dir():
        raise AdapterError(f"no adapter directory {str(directory)!r}; create one with `attnres convert MODEL -o DIR`.")
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise AdapterError(
            f"{directory} is not an attnres adapter (missing {', '.join(missing)}); "
            "pass the directory written by `attnres convert`."
        )


def load_adapter(resolved: ResolvedModel, directory: Path) -> nn.Module:
    """Apply the adapter in ``directory`` (already accepted by :func:`check_adapter_dir`)."""
    api = backend("api")
    with output.step(f"Applying adapter {directory}"):
        try:
            return api.load_adapter(resolved.model, resolved.example_inputs, directory)
        except AttnResError:
            raise
        except (ValueError, KeyError, OSError) as exc:  # unreadable JSON/safetensors surface as these
            raise AdapterError(f"cannot load adapter {directory}: {type(exc).__name__}: {exc}") from exc


def check_adapter_or_options(adapter: Path | None, options: ConversionOptions) -> None:
    """Before any slow step: ``--adapter`` excludes the conversion flags and must name an adapter."""
    if adapter is None:
        return
    if options.given:
        raise InvalidInputError(
            "--adapter carries its own conversion settings; drop --blocks/--block-size/--full/--mode/--eps."
        )
    check_adapter_dir(adapter)


def converted_model(resolved: ResolvedModel, adapter: Path | None, options: ConversionOptions) -> nn.Module:
    """Apply ``--adapter`` or convert on the fly (after :func:`check_adapter_or_options`)."""
    if adapter is not None:
        return load_adapter(resolved, adapter)
    return convert(resolved, options)


def call(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on example inputs that are positional (tuple) or keyword (dict) arguments."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def equivalence(resolved: ResolvedModel, converted: nn.Module, seed: int, check_inputs: Any = None) -> dict[str, Any]:
    """The API's check on fresh inputs (other batch and sequence sizes than the trace), or on ``check_inputs``."""
    api = backend("api")
    with output.step("Checking equivalence on " + ("the given inputs" if check_inputs is not None else "fresh inputs")):
        report = api.equivalence(
            resolved.model, converted, resolved.example_inputs, seed=seed, check_inputs=check_inputs
        )
    return report.to_dict()


def read_check_inputs(path: Path) -> Any:
    """``--check-inputs FILE``: tensors named by forward's keywords, or ``0``, ``1``, ... for positional arguments.

    A safetensors file (no code runs when it is read); read before MODEL loads, so a
    bad file costs milliseconds.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    fix = "write one with safetensors.torch.save_file({'input_ids': ids, ...}, FILE)"
    if not path.is_file():
        raise InvalidInputError(f"--check-inputs {str(path)!r} is not a file; {fix}.")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidInputError(f"--check-inputs {str(path)!r} is not a safetensors file ({exc}); {fix}.") from exc
    if not tensors:
        raise InvalidInputError(f"--check-inputs {str(path)!r} holds no tensor; {fix}.")
    positional = sorted(k for k in tensors if k.isdigit())
    if positional and len(positional) != len(tensors):
        raise InvalidInputError(
            f"--check-inputs {str(path)!r} mixes positional ({', '.join(positional)}) and keyword tensors; "
            "name them all by forward's keywords, or all 0, 1, ..."
        )
    if positional:
        if sorted(int(k) for k in positional) != list(range(len(positional))):
            raise InvalidInputError(
                f"--check-inputs {str(path)!r}: positional tensors must be named 0..{len(positional) - 1}, "
                f"got {', '.join(positional)}"
            )
        return tuple(tensors[str(i)] for i in range(len(positional)))
    return dict(tensors)


def plan_summary(converted: nn.Module) -> dict[str, Any]:
    """The report fields describing what was converted (:data:`~attnres_rewrite.api.REPORT_FORMAT` names)."""
    plan = plan_of(converted)
    streams = [
        {
            "name": s.name,
            "kind": s.kind,
            "sublayers": list(s.sublayers),
            "num_sublayers": s.num_sublayers,
            "blocks": s.blocks,
            "num_blocks": s.num_blocks,
            "eps": s.eps,
            "owner": s.owner,
        }
        for s in plan.streams
    ]
    return {
        "num_streams_converted": len(streams),
        "num_sublayers": sum(s.num_sublayers for s in plan.streams),
        "num_blocks": sum(s.num_blocks for s in plan.streams),
        "streams": streams,
        "notes": list(plan.notes),
    }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def device_of(name: str | None) -> torch.device:
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise InvalidInputError(f"--device {name!r} is not a device; use cpu or cuda.") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError("--device cuda but no CUDA device is available; use --device cpu.")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(tree: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def copy_for_training(model: nn.Module) -> nn.Module:
    """An independent copy, so a timed training step never changes the model other steps use."""
    return copy.deepcopy(model)
