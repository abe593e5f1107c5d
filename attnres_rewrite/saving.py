"""Whole converted models as directories: every weight (base and AttnRes) in safetensors, the plan in JSON.

A directory holds ``model.safetensors`` (or its shards and index), with the AttnRes
parameters under their ``attnres.*`` names next to the model's own, and
``attnres_model.json`` (format, versions, plan, what kind of model it is). For a Hugging
Face model it is what ``save_pretrained`` writes (``config.json``, whose ``attnres``
entry records the plan, ``generation_config.json``, the weights), so a directory that
``transformers.Trainer`` or ``converted.save_pretrained`` wrote loads too, and plain
``from_pretrained`` still reads the base model out of it.

Loading never unpickles: only ``.safetensors`` files are read (an index naming anything
else is refused), and a Hugging Face model is built from its own ``config.json`` with
``trust_remote_code=False``. Saving stages everything in a temporary directory that
replaces the destination only once complete.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterError, InvalidInputError

__all__ = ["MODEL_CONFIG_NAME", "save_converted", "write_converted", "load_converted", "hf_plan_record"]

MODEL_CONFIG_NAME = "attnres_model.json"
MODEL_FORMAT = 1
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _is_hf(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def hf_plan_record(plan) -> dict[str, Any]:
    """The ``attnres`` entry a converted Hugging Face model's config carries (and ``config.json`` records)."""
    from .passes.plan import PLAN_FORMAT

    return {"format": PLAN_FORMAT, "plan": plan.to_dict()}


def save_converted(converted: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``converted`` (from :func:`~attnres_rewrite.convert`) as a directory :func:`load_converted` reads.

    Refuses an existing non-empty ``directory`` unless ``overwrite``; then it is replaced
    as a whole, only once the new one is complete.

    A model sharded with FSDP2 (``DTensor`` parameters) is saved whole, as one unsharded
    model would be: every rank of its mesh calls ``save_converted``, the weights are
    gathered on global rank 0 (on the CPU) and rank 0 writes the directory; the call
    returns on every rank once it is written (and raises on every rank if it failed).
    """
    from .distributed.checkpoint import is_sharded

    _check_saveable(converted)
    target = Path(directory)
    if is_sharded(converted):
        return _save_gathered(converted, target, overwrite)
    _write_directory(converted, target, overwrite)
    return target


def _write_directory(converted: nn.Module, target: Path, overwrite: bool, state_dict: dict | None = None) -> None:
    from .fileio import atomic_directory

    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise InvalidInputError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    with atomic_directory(target) as tmp:
        write_converted(converted, tmp, state_dict=state_dict)


def _save_gathered(converted: nn.Module, target: Path, overwrite: bool) -> Path:
    """:func:`save_converted` of a sharded model: gather on global rank 0, which writes; everyone learns the outcome."""
    import torch.distributed as dist

    from .distributed.checkpoint import full_state_dict
    from .runtime.distributed import is_distributed_tensor

    mesh = next(t.device_mesh for t in converted.parameters() if is_distributed_tensor(t))
    group = mesh.get_group() if mesh.ndim == 1 else None
    if 0 not in dist.get_process_group_ranks(group or dist.group.WORLD):
        raise InvalidInputError("save_converted of a sharded model writes from global rank 0, which must hold shards")
    state = full_state_dict(converted)  # collective over the mesh
    failure: list[str | None] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            _write_directory(converted, target, overwrite, state_dict=state)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            failure = [f"{type(exc).__name__}: {exc}"]
            error = exc
    dist.broadcast_object_list(failure, src=0, group=group)
    if failure[0] is not None:
        if error is not None:
            raise error
        raise InvalidInputError(f"rank 0 could not write {target}: {failure[0]}")
    return target


def _check_saveable(converted: nn.Module) -> None:
    from .api import plan_of

    if plan_of(converted) is None:
        raise InvalidInputError(
            "save_converted needs a model returned by attnres_rewrite.convert (it has no attnres.plan)"
        )
    if any(t.device.type == "meta" for t in converted.state_dict().values()):
        raise InvalidInputError("the model has weights on the meta device; attach real weights before saving it")


def write_converted(converted: nn.Module, directory: Path, *, state_dict: dict | None = None) -> list[str]:
    """The files of :func:`save_converted`, written into the existing (staging) ``directory``; returns their names.

    For callers that stage a directory of their own (the CLI writes the adapter, the
    report and the whole model into one). ``state_dict``: the weights to write instead of
    the model's own (the gathered weights of a sharded model).
    """
    from . import __version__
    from .api import plan_of

    _check_saveable(converted)
    before = set(os.listdir(directory))
    hf = _is_hf(converted)
    if hf:
        # safetensors; config.json carries the plan (set at conversion)
        converted.save_pretrained(directory, **({} if state_dict is None else {"state_dict": state_dict}))
    elif state_dict is None:
        from safetensors.torch import save_model

        save_model(converted, str(directory / _SINGLE), metadata={"format": "pt"})
    else:
        from safetensors.torch import save_file

        tied = _tied_names(converted)  # saved once, under the first name, as save_model does
        weights = {k: v.contiguous() for k, v in state_dict.items() if k not in tied}
        save_file(weights, str(directory / _SINGLE), metadata={"format": "pt"})
    info = {
        "format": MODEL_FORMAT,
        "versions": {"attnres_rewrite": __version__, "torch": torch.__version__},
        "model": {"class": f"{type(converted).__module__}.{type(converted).__qualname__}", "huggingface": hf},
        "plan": plan_of(converted).to_dict(),
    }
    (directory / MODEL_CONFIG_NAME).write_text(json.dumps(info, indent=2))
    return sorted(set(os.listdir(directory)) - before)


def load_converted(
    directory: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    inplace: bool = False,
    trace_depth: str = "auto",
    **from_pretrained: Any,
) -> nn.Module:
    """The converted model saved in ``directory``, ready to run, train or generate.

    A Hugging Face model is rebuilt from the directory itself (``model`` may be left
    out; ``from_pretrained`` keyword arguments such as ``dtype`` pass through). Any other
    model needs a freshly built instance of its class as ``model``; it is copied first
    unless ``inplace``.
    """
    from .adapter import install_plan
    from .passes.plan import ConversionPlan

    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"no converted-model directory {directory}; write one with attnres_rewrite.save_converted")
    plan = ConversionPlan.from_dict(_read_plan(directory))
    if model is None:
        target = _from_pretrained(directory, from_pretrained)
        state = _attnres_tensors(directory)
    else:
        if from_pretrained:
            raise InvalidInputError(f"{', '.join(from_pretrained)}: only for a Hugging Face model built from directory")
        target = model if inplace else copy.deepcopy(model)
        state = _read_safetensors(directory)
    install_plan(target, plan, trace_depth)
    _load(target, state, partial=model is None)
    return target


def _read_plan(directory: Path) -> dict[str, Any]:
    path = directory / MODEL_CONFIG_NAME
    try:
        if path.is_file():
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
                raise AdapterError(f"{path}: not a format-{MODEL_FORMAT} attnres model description")
            return data["plan"]
        config = directory / "config.json"
        if config.is_file():
            record = json.loads(config.read_text()).get("attnres")
            if isinstance(record, dict) and "plan" in record:
                return record["plan"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"cannot read the conversion recorded in {directory}: {exc}") from exc
    raise AdapterError(
        f"{directory} holds no converted model (no {MODEL_CONFIG_NAME}, and no 'attnres' entry in config.json); "
        "write one with attnres_rewrite.save_converted(converted, directory)"
    )


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a directory: the single file or the shards its index names."""
    index = directory / _INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AdapterError(f"{index} is not a valid safetensors index: {exc}") from exc
        bad = [n for n in names if not n.endswith(".safetensors") or "/" in n or "\\" in n]
        if bad:
            raise AdapterError(f"{index} names {bad[0]!r}: only .safetensors files in the directory are loaded")
        return [directory / n for n in names]
    if (directory / _SINGLE).is_file():
        return [directory / _SINGLE]
    raise AdapterError(f"{directory} has no {_SINGLE} (or {_INDEX}); only safetensors weights are loaded")


def _read_safetensors(directory: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        out[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"{path} is not a readable safetensors file: {exc}") from exc
    return out


def _attnres_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return _read_safetensors(directory, prefix="attnres.")


def _from_pretrained(directory: Path, kwargs: dict[str, Any]) -> nn.Module:
    """The base model of a Hugging Face directory, by its own class, with no remote code and no pickles."""
    try:
        import transformers
    except ImportError as exc:
        raise AdapterError(
            "loading a Hugging Face model needs transformers (pip install 'attnres-rewrite[hf]')"
        ) from exc
    _weight_files(directory)  # refuses pickled weights before transformers sees them
    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise AdapterError(
            f"{directory}/config.json names no transformers model class ({names or 'no architectures'}); "
            "build the model yourself and pass it as model="
        )
    # the AttnRes tensors are loaded below, once the plan is installed; transformers must not call them unused
    saved = cls.__dict__.get("_keys_to_ignore_on_load_unexpected", None)
    cls._keys_to_ignore_on_load_unexpected = [*(cls._keys_to_ignore_on_load_unexpected or []), r"^attnres\."]
    try:
        return cls.from_pretrained(
            directory, trust_remote_code=False, use_safetensors=True, local_files_only=True, **kwargs
        ).eval()
    finally:
        if saved is None:
            del cls._keys_to_ignore_on_load_unexpected
        else:
            cls._keys_to_ignore_on_load_unexpected = saved


def _load(target: nn.Module, state: dict[str, torch.Tensor], *, partial: bool) -> None:
    """Load ``state`` into ``target``: every tensor of it (``partial``: the AttnRes ones) must be there."""
    own = target.state_dict()
    wanted = {k for k in own if k.startswith("attnres.")} if partial else set(own)
    missing = sorted(wanted - set(state))
    tied = _tied_names(target)
    missing = [k for k in missing if k not in tied]
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise AdapterError(
            f"the saved weights do not match the model: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise AdapterError(f"{key}: shape {tuple(value.shape)} saved, {tuple(own[key].shape)} in the model")
        if value.is_floating_point() != own[key].is_floating_point():
            raise AdapterError(f"{key}: {value.dtype} saved, {own[key].dtype} in the model")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterError(f"{key}: the saved tensor holds NaN or infinite values")
    assign = any(t.device.type == "meta" for t in own.values())
    with torch.no_grad():
        target.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False, assign=assign)


def _tied_names(model: nn.Module) -> set[str]:
    """Second and later names of parameters shared under several names (saved once)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        else:
            seen[id(tensor)] = name
    return tied
