"""Resolve the MODEL argument shared by every command into a model and its example inputs.

Three schemes, tried in this order so that an existing directory always wins:

- ``samples:NAME``: a bundled sample (``samples.get``), the zero-setup path of the README;
- a local Hugging Face model directory (``config.json``; see :mod:`.hf`);
- ``package.module:factory``: a zero-argument callable returning a model or a
  ``(model, example_inputs)`` pair; the current directory is importable, as with ``python -m``.

Every failure a user can cause becomes a :class:`ModelSourceError` whose message names
the problem and the fix, so the CLI prints one line and exits with code 2. Nothing is
ever downloaded and no remote code is ever run.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelSourceError

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
FORMS = "samples:NAME, a local Hugging Face model directory, or package.module:factory"


@dataclass
class ResolvedModel:
    """A model ready for the API (eval mode, CPU) and the example inputs to trace it with.

    ``convert``/``load_adapter`` trace the model without modifying it (the converted
    graph shares its parameters), so ``model`` also serves as the reference to compare with.
    """

    source: str
    kind: str  # "sample" | "hf" | "factory"
    model: nn.Module
    example_inputs: Any  # tuple of positional args or dict of keyword args
    note: str = ""


def resolve(spec: str, *, batch: int | None = None, seq_len: int | None = None, seed: int = 0) -> ResolvedModel:
    """Turn a MODEL argument into a :class:`ResolvedModel` (eval mode, seeded, on CPU)."""
    if batch is not None and batch < 1:
        raise ModelSourceError(f"--batch must be at least 1, got {batch}.")
    if seq_len is not None and seq_len < 1:
        raise ModelSourceError(f"--seq-len must be at least 1, got {seq_len}.")
    torch.manual_seed(seed)  # random-weight models (samples, configs without weights) rebuild identically
    path = Path(spec).expanduser()
    if spec.startswith("samples:"):
        resolved = _from_sample(spec, spec.removeprefix("samples:"), batch=batch, seq_len=seq_len)
    elif path.is_dir():
        from .hf import load_directory

        model, inputs, note = load_directory(path, batch=batch, seq_len=seq_len)
        resolved = ResolvedModel(spec, "hf", model, inputs, note)
    elif _FACTORY.match(spec):
        resolved = _from_factory(spec, batch=batch, seq_len=seq_len)
    else:
        raise ModelSourceError(_explain_unknown(spec, path))
    resolved.model.eval()
    return resolved


def _explain_unknown(spec: str, path: Path) -> str:
    """The one-line reason for a MODEL that matches no scheme, with the likely fix."""
    if path.is_file():
        return f"MODEL {spec!r} is a file; expected {FORMS}. For a Hugging Face model pass the directory holding config.json."
    scheme = spec.split(":", 1)[0] if ":" in spec else ""
    if scheme and "/" not in scheme and len(scheme) > 1:
        return f"unknown MODEL scheme {scheme + ':'!r} in {spec!r}; expected {FORMS}."
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return (
            f"no directory {spec!r}; attnres never downloads models. Download it first "
            f"(e.g. `hf download {spec} --local-dir DIR`) and pass DIR."
        )
    return f"no such directory {spec!r}; expected {FORMS}."


def _from_sample(spec: str, name: str, *, batch: int | None, seq_len: int | None) -> ResolvedModel:
    from .. import samples

    names = sorted(samples.SAMPLES)
    if name not in samples.SAMPLES:
        raise ModelSourceError(f"unknown sample {name!r}; available: {', '.join(names)} (e.g. samples:{names[0]}).")
    sizes = {k: v for k, v in (("batch", batch), ("seq", seq_len)) if v is not None}
    try:
        model, inputs = samples.get(name, **sizes)
    except TypeError as exc:  # samples name the valid keys; a vision sample has no sequence axis
        if sizes and "unknown override" in str(exc):
            raise ModelSourceError(f"sample {name!r} has no sequence axis: drop --seq-len.") from exc
        raise
    return ResolvedModel(spec, "sample", model, inputs)


def _import_factory(spec: str) -> Any:
    module_name, _, attr_path = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:  # `attnres convert mymodels:build` should find ./mymodels.py, like `python -m`
        sys.path.insert(0, cwd)
    obj: Any = _import_user_module(module_name, spec)
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ModelSourceError(f"module {module_name!r} has no attribute {attr_path!r} (MODEL {spec!r}).")
        obj = getattr(obj, part)
    return obj


def _import_user_module(module_name: str, spec: str) -> Any:
    """Import the user's module; whatever its code raises at import is the user's to fix, not a bug of ours."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if not exc.name or module_name == exc.name or module_name.startswith(exc.name + "."):
            raise ModelSourceError(
                f"cannot import module {module_name!r} for MODEL {spec!r}: no such module. "
                "Run from the directory that contains it or install it; expected package.module:factory."
            ) from exc
        raise ModelSourceError(
            f"importing {module_name!r} for MODEL {spec!r} failed: it imports {exc.name!r}, which is not installed; "
            "install it or fix the import."
        ) from exc
    except (Exception, SystemExit) as exc:  # SyntaxError, NameError, a sys.exit() at import...
        raise ModelSourceError(
            f"importing {module_name!r} for MODEL {spec!r} raised {type(exc).__name__}: {_first_line(exc)}; "
            "fix that module (rerun with --debug for the traceback)."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _from_factory(spec: str, *, batch: int | None, seq_len: int | None) -> ResolvedModel:
    factory = _import_factory(spec)
    if isinstance(factory, nn.Module) or not callable(factory):
        raise ModelSourceError(
            f"{spec!r} is a {type(factory).__name__}, not a factory; point at a zero-argument function "
            "returning a model or (model, example_inputs)."
        )
    try:
        made = factory()
    except Exception as exc:  # the user's code failed: report it as theirs, traceback under --debug
        raise ModelSourceError(f"factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        return ResolvedModel(spec, "factory", made[0], made[1])
    if isinstance(made, nn.Module):
        from .hf import example_inputs_for, is_transformers_model

        if is_transformers_model(made):  # a PreTrainedModel knows its config: build inputs as for a directory
            made.eval()
            return ResolvedModel(spec, "factory", made, example_inputs_for(made, batch=batch, seq_len=seq_len))
        raise ModelSourceError(
            f"factory {spec!r} returned a {type(made).__name__} without example inputs; "
            "return (model, example_inputs) instead."
        )
    raise ModelSourceError(
        f"factory {spec!r} returned {type(made).__name__}; expected an nn.Module or a (model, example_inputs) pair."
    )
