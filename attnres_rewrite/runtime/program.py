"""A program: the rewritten, outlined graphs of one call signature, compiled to Python.

The graphs become plain Python functions (``torch.fx`` code generation) that read every
attribute of the live model when they run: a top function taking the traced module
as ``self``, and one function per layer call taking the layer as ``self``. Nothing is
copied out of the model, so dtype and device moves, FSDP's parameter swaps, weights
attached later and optimiser steps are all seen by the next call.

The functions come from :mod:`.codegen`: each graph has an eager function (ATen's C++
entry points, the AttnRes op without the dispatcher where nothing needs it) and a
traceable one that compilers and tracers see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from ..passes.outline import Outline
from .codegen import GraphCode, compile_graph
from .compiled import current_compiler

__all__ = ["LayerProgram", "Program"]


class LayerProgram:
    """What a layer runs when the top program calls it: passed as the layer's first argument.

    The layer's own ``forward`` (see :class:`~.converted.LayerForward`) recognises it and
    runs this graph instead of its Python code, with every module hook, wrapper and
    checkpoint around the call still in place.
    """

    __slots__ = ("path", "code")

    def __init__(self, path: str, code: GraphCode) -> None:
        self.path, self.code = path, code

    @property
    def source(self) -> str:
        return self.code.source

    def __call__(self, layer: nn.Module, *inputs: Any) -> Any:
        return self.code(layer, *inputs)

    def __repr__(self) -> str:
        return f"LayerProgram({self.path!r})"


@dataclass
class Program:
    """The compiled program of one call signature of one converted module."""

    top: GraphCode
    layers: list[LayerProgram]
    constants: tuple
    out_spec: pytree.TreeSpec
    guards: nn.Module | None
    signature: str  # the call it was captured for, for notes and errors
    static_axes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    capture_seconds: float = 0.0
    flat: fx.GraphModule | None = None  # the rewritten graph before outlining, for inspection and lowering
    outline: Outline | None = None  # the outlined graphs (top graph: pipeline stages are cut from it)
    compiled: dict = field(default_factory=dict)  # compiler -> the compiled top function

    @classmethod
    def compile(
        cls,
        outline: Outline,
        out_spec: pytree.TreeSpec,
        guards: nn.Module | None,
        signature: str,
        static_axes: list[str],
        notes: list[str],
        started: float,
    ) -> Program:
        layers = []
        for lg in outline.layers:
            layers.append(LayerProgram(lg.path, compile_graph(lg.graph, lg.path)))
        top = compile_graph(outline.top, "top")
        return cls(
            top=top,
            layers=layers,
            constants=tuple(outline.constants),
            out_spec=out_spec,
            guards=guards,
            signature=signature,
            static_axes=static_axes,
            notes=[*notes, *outline.notes],
            capture_seconds=time.perf_counter() - started,
            outline=outline,
        )

    def admits(self, tensors: tuple[Tensor, ...]) -> bool:
        """Do ``tensors`` satisfy the shape guards the trace made (static axes, ranges, equalities)?"""
        if self.guards is None:
            return True
        try:
            self.guards(*tensors)
        except AssertionError as exc:
            if "Guard failed" in str(exc):
                return False
            raise
        return True

    @property
    def source(self) -> str:
        """The top function's code (what tracebacks show)."""
        return self.top.source

    def run(self, module: nn.Module, attnres: nn.Module, tensors: tuple[Tensor, ...]) -> Any:
        top = self.top
        compiler = current_compiler()
        if compiler is not None:
            if compiler not in self.compiled:
                self.compiled[compiler] = compiler(self.top.traceable)
            top = self.compiled[compiler]
        flat = top(module, attnres, self.layers, self.constants, *tensors)
        return pytree.tree_unflatten(list(flat), self.out_spec)
