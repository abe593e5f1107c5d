"""Hand-written sample models that the rewrite passes and tests run on (``samples:NAME`` on the CLI).

They live inside the package, as ``attnres_rewrite.samples``, so that installing
attnres-rewrite adds no top-level ``samples`` module to site-packages and a user's own
``samples`` package on ``sys.path`` cannot shadow them (or be shadowed by them).

Each module ``attnres_rewrite/samples/<name>.py`` exposes ``build(**overrides) -> (model, example_inputs)``
(the model in ``eval()`` mode with deterministic weights, ``example_inputs`` a tuple of
positional arguments), ``KIND`` (the docs/spec.md section 2 classification its stream should
get: ``prenorm``, ``postnorm`` or ``postact``) and ``DYNAMIC_DIMS`` (per input, the
axes that may vary: batch, and sequence for token models).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from ..errors import ModelSourceError
from . import bert, gpt2, llama, parallel, resnet, vit

_MODULES: dict[str, ModuleType] = {
    "llama": llama,
    "gpt2": gpt2,
    "parallel": parallel,
    "vit": vit,
    "bert": bert,
    "resnet": resnet,
}

SAMPLES: dict[str, Callable[..., tuple[nn.Module, tuple[Tensor, ...]]]] = {
    name: mod.build for name, mod in _MODULES.items()
}


def module(name: str) -> ModuleType:
    """The sample's module (its ``Config`` dataclass, ``KIND``, ``DYNAMIC_DIMS``)."""
    if name not in _MODULES:
        raise ModelSourceError(f"unknown sample {name!r}; available samples: {', '.join(SAMPLES)}")
    return _MODULES[name]


def get(name: str, **overrides: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Build sample ``name``; ``overrides`` change its config (e.g. ``layers=2, dropout=0.0``)."""
    return module(name).build(**overrides)


def kind(name: str) -> str:
    """The classification the detector should give the sample's stream."""
    return module(name).KIND


def dynamic_shapes(name: str) -> tuple[dict[int, Any], ...]:
    """``dynamic_shapes`` for ``torch.export.export``: ``Dim.AUTO`` on each varying axis."""
    from torch.export import Dim

    return tuple({axis: Dim.AUTO for axis in dims} for dims in module(name).DYNAMIC_DIMS)
