"""Adapters: the AttnRes part of a converted model, saved apart from the base weights.

A directory holds ``attnres_config.json`` (plan + versions) and ``attnres.safetensors``
(only the ``attnres.*`` parameters). Loading converts a freshly built original model
with the *saved* plan and loads the weights. Given example inputs, it first traces the
model and checks its streams against the plan (names, sublayer module paths, feature
size); without them the check happens at the model's first call, which captures its
program anyway. Files are written to temporaries and renamed, so a failed save leaves
no half-written adapter.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterError, AttnResError, InvalidInputError
from .fileio import write_atomic

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_adapter", "load_adapter"]

CONFIG_NAME = "attnres_config.json"
WEIGHTS_NAME = "attnres.safetensors"
ADAPTER_FORMAT = 1


def _versions() -> dict[str, str]:
    from . import __version__

    return {"attnres_rewrite": __version__, "torch": torch.__version__}


def save_adapter(converted: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the AttnRes config and weights of ``converted`` (a result of :func:`convert`) to ``directory``."""
    from safetensors.torch import save_file

    from .api import plan_of

    plan = plan_of(converted)
    params = getattr(converted, "attnres", None)
    if plan is None or params is None:
        raise InvalidInputError(
            "save_adapter needs a model returned by attnres_rewrite.convert (it has no attnres.plan)"
        )
    tensors = {f"attnres.{k}": v.detach() for k, v in params.state_dict().items()}
    if any(t.device.type == "meta" for t in tensors.values()):
        raise InvalidInputError("the AttnRes parameters are on the meta device; materialise them before saving")
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    missing = set(plan.parameter_names()) - set(tensors)
    if missing:
        raise InvalidInputError(f"converted model lacks AttnRes parameters {sorted(missing)}")
    config = {"format": ADAPTER_FORMAT, "versions": _versions(), "plan": plan.to_dict()}
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_atomic(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return out


def _read(directory: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """The adapter's plan and weights, each checked strictly: a tampered file is refused, never applied."""
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterError(f"adapter file {p} is missing; save one with save_adapter(converted, directory)")
    plan = _read_config(cfg_path)
    return plan, _read_weights(w_path, plan)


_CONFIG_KEYS = {"format", "versions", "plan"}


def _read_config(path: Path) -> Any:
    """``attnres_config.json``: a JSON object of exactly our keys holding a valid plan."""
    from .passes.plan import ConversionPlan

    fix = "save the adapter again with save_adapter / `attnres convert`"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers JSON and UTF-8 decoding errors
        raise AdapterError(f"{path} is not a valid AttnRes adapter config: {exc}; {fix}") from exc
    if not isinstance(config, dict):
        raise AdapterError(
            f"{path} is not a valid AttnRes adapter config: expected a JSON object, got {type(config).__name__}; {fix}"
        )
    unknown, missing = sorted(set(config) - _CONFIG_KEYS), sorted(_CONFIG_KEYS - set(config))
    if unknown or missing:
        raise AdapterError(
            f"{path} is not a valid AttnRes adapter config: "
            + (f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}")
            + f"; {fix}"
        )
    if isinstance(config["format"], bool) or config["format"] != ADAPTER_FORMAT:
        raise AdapterError(f"{path}: adapter format {config['format']!r} is not {ADAPTER_FORMAT}; {fix}")
    versions = config["versions"]
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise AdapterError(f"{path}: 'versions' must map package names to version strings; {fix}")
    try:
        return ConversionPlan.from_dict(config["plan"])
    except AttnResError as exc:
        raise AdapterError(f"{path} is not a valid AttnRes adapter config: {exc}; {fix}") from exc


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _read_weights(path: Path, plan: Any) -> dict[str, torch.Tensor]:
    """``attnres.safetensors``: exactly the plan's parameters, float, of the planned shape, finite.

    safetensors parses no code (never pickle); anything it cannot read is a broken file.
    """
    from safetensors.torch import load_file

    try:
        weights = load_file(path)
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, unknown dtypes...: all "not readable"
        raise AdapterError(f"{path} is not a readable safetensors file: {exc}") from exc
    expected = {sp.query: sp for sp in plan.streams} | {sp.key_gain: sp for sp in plan.streams}
    if set(weights) != set(expected):
        raise AdapterError(
            f"{path} does not hold the plan's parameters: missing {sorted(set(expected) - set(weights))}, "
            f"unexpected {sorted(set(weights) - set(expected))}"
        )
    for name, tensor in weights.items():
        sp = expected[name]
        if tensor.dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"{path}: {name} has dtype {tensor.dtype}; AttnRes parameters are floating point")
        if tuple(tensor.shape) != (sp.num_rows, sp.dim):
            raise AdapterError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the plan needs {(sp.num_rows, sp.dim)} "
                f"({sp.num_rows} rows of stream {sp.name!r}, feature size {sp.dim})"
            )
        planned = getattr(torch, sp.dtype)  # the stream's dtype, which the values are cast to when loaded
        if not bool(torch.isfinite(tensor).all()) or not bool(torch.isfinite(tensor.to(planned)).all()):
            raise AdapterError(f"{path}: {name} holds NaN or infinite values (in {tensor.dtype} or in {sp.dtype})")
    return weights


def load_adapter(
    model: nn.Module,
    example_inputs: Any,
    directory: str | os.PathLike,
    *,
    trace_depth: str = "auto",
    inplace: bool = False,
) -> nn.Module:
    """A copy of a freshly built ``model`` converted as the adapter in ``directory`` says, with its AttnRes weights.

    ``example_inputs`` (may be None) lets the streams be checked against the adapter
    before anything is returned; an adapter saved before plans recorded the module that
    owns each stream needs them. ``inplace=True`` converts ``model`` itself (no copy).
    ``trace_depth`` as in :func:`attnres_rewrite.convert`.
    """
    from .api import apply_plan, is_converted
    from .passes.capture import capture
    from .passes.detect import detect, stream_owner
    from .passes.plan import plan_mismatch

    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist")
    plan, weights = _read(directory)
    if not isinstance(model, nn.Module):
        raise AdapterError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_converted(model):
        raise AdapterError("the model is already converted; load the adapter onto the original model")
    target = model if inplace else copy.deepcopy(model)
    if example_inputs is not None:
        captured = capture(target, example_inputs, trace_depth=trace_depth)
        module = captured.take_module()
        detection = detect(module, target)
        problem = plan_mismatch(plan, detection, kinds=True)
        if problem is not None:
            raise AdapterError(f"the adapter does not fit this model: {problem}")
        found = {s.name: s for s in detection.streams}
        for sp in plan.streams:
            if sp.owner is None:
                sp.owner = stream_owner(found[sp.name])
        try:
            apply_plan(target, captured, module, detection, plan, trace_depth)
        except AttnResError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise AdapterError(f"could not apply the adapter's plan: {exc}") from exc
    else:
        if any(sp.owner is None for sp in plan.streams):
            raise AdapterError(
                f"{directory} does not record which module owns each stream (an older adapter); "
                "pass example_inputs so the model can be traced"
            )
        install_plan(target, plan, trace_depth)
    _load_weights(target, weights)
    return target


def install_plan(model: nn.Module, plan, trace_depth: str = "auto") -> None:
    """Convert ``model`` in place by a saved ``plan`` without tracing it (the first call checks the streams).

    The AttnRes parameters start at their initial values, in the dtype and on the
    device of the model's first floating-point parameter; load saved ones afterwards.
    """
    from .passes.rewrite import make_parameters
    from .runtime.converted import install

    missing = [sp.name for sp in plan.streams if sp.owner is None]
    if missing:
        raise AdapterError(f"the plan does not record which module owns stream {missing[0]!r}; convert with a trace")
    for sp in plan.streams:
        if sp.owner:
            try:
                model.get_submodule(sp.owner)
            except AttributeError:
                raise AdapterError(f"stream {sp.name!r} belongs to {sp.owner!r}, which this model lacks") from None
    like = next((p for p in model.parameters() if p.is_floating_point()), None)
    install(model, plan, make_parameters(plan, like=like), trace_depth)


def _load_weights(converted: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = converted.attnres.state_dict()
    want = {f"attnres.{k}": v for k, v in params.items()}
    if set(want) != set(weights):
        raise AdapterError(
            f"adapter weights do not match the plan: missing {sorted(set(want) - set(weights))}, "
            f"unexpected {sorted(set(weights) - set(want))}"
        )
    for k, v in want.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise AdapterError(f"{k}: shape {tuple(weights[k].shape)} in the adapter, {tuple(v.shape)} in the model")
    state = {k[len("attnres.") :]: weights[k].to(dtype=params[k[len("attnres.") :]].dtype) for k in want}
    assign = any(p.device.type == "meta" for p in converted.attnres.parameters())
    converted.attnres.load_state_dict(state, assign=assign)
