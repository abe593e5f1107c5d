"""Compiling a converted model: its programs go through ``torch.compile``, its dispatch stays Python.

``torch.compile(converted)`` works as is, with one graph break where a stream owner
picks the program of a call (a dictionary lookup keyed by the call's signature, which
Dynamo does not trace). :class:`CompiledModel`, what :func:`attnres_rewrite.compile`
returns for a converted model, compiles each program instead: the whole rewritten
computation of a call (all layers, every AttnRes aggregation) is one Dynamo frame, so
``fullgraph=True`` holds and the two-phase lowering sees every block at once. The model
is not changed: programs run compiled only inside a call of the wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["CompiledModel", "current_compiler", "compiling_with"]

_COMPILER: list[Callable | None] = [None]


def current_compiler() -> Callable | None:
    """The compiler programs use in the current call (None: run eagerly)."""
    return _COMPILER[0]


@contextmanager
def compiling_with(compiler: Callable) -> Iterator[None]:
    saved = _COMPILER[0]
    _COMPILER[0] = compiler
    try:
        yield
    finally:
        _COMPILER[0] = saved


class CompiledModel(nn.Module):
    """A converted model whose programs run through ``compiler`` (``torch.compile`` with options).

    Parameters, state dict and attributes are the model's (``compiled.model``); calls
    take the same arguments and return the same outputs as the model.
    """

    def __init__(self, model: nn.Module, compiler: Callable[[Callable], Callable]) -> None:
        super().__init__()
        self.model = model
        self.compiler = compiler

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with compiling_with(self.compiler):
            return self.model(*args, **kwargs)
