"""A program: the rewritten, outlined graphs of one call signature, compiled to Python.

The graphs become plain Python functions (``torch.fx`` code generation) that read every
attribute of the live model when they run: a top function taking the traced module
as ``self``, and one function per layer call taking the layer as ``self``. Nothing is
copied out of the model, so dtype and device moves, FSDP's parameter swaps, weights
attached later and optimiser steps are all seen by the next call.
"""

from __future__ import annotations

import linecache
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from ..passes.outline import Outline, strip_pytree_codegen
from .compiled import current_compiler

__all__ = ["LayerProgram", "Program", "compile_graph"]

_counter = [0]


def compile_graph(graph: fx.Graph, name: str) -> tuple[Callable, str]:
    """The graph as a Python function ``forward(self, *placeholders)``, and its source (tracebacks show it)."""
    strip_pytree_codegen(graph)
    code = graph.python_code(root_module="self")
    _counter[0] += 1
    filename = f"<attnres {name} #{_counter[0]}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace["forward"], code.src


class LayerProgram:
    """What a layer runs when the top program calls it: passed as the layer's first argument.

    The layer's own ``forward`` (see :class:`~.converted.LayerForward`) recognises it and
    runs this graph instead of its Python code, with every module hook, wrapper and
    checkpoint around the call still in place.
    """

    __slots__ = ("path", "fn", "source")

    def __init__(self, path: str, fn: Callable, source: str) -> None:
        self.path, self.fn, self.source = path, fn, source

    def __call__(self, layer: nn.Module, *inputs: Any) -> Any:
        return self.fn(layer, *inputs)

    def __repr__(self) -> str:
        return f"LayerProgram({self.path!r})"


@dataclass
class Program:
    """The compiled program of one call signature of one converted module."""

    top: Callable
    layers: list[LayerProgram]
    constants: tuple
    out_spec: pytree.TreeSpec
    guards: nn.Module | None
    signature: str  # the call it was captured for, for notes and errors
    static_axes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    capture_seconds: float = 0.0
    source: str = ""
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
            layers.append(LayerProgram(lg.path, *compile_graph(lg.graph, lg.path)))
        top, source = compile_graph(outline.top, "top")
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
            source=source,
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

    def run(self, module: nn.Module, attnres: nn.Module, tensors: tuple[Tensor, ...]) -> Any:
        top = self.top
        compiler = current_compiler()
        if compiler is not None:
            if compiler not in self.compiled:
                self.compiled[compiler] = compiler(self.top)
            top = self.compiled[compiler]
        flat = top(module, attnres, self.layers, self.constants, *tensors)
        return pytree.tree_unflatten(list(flat), self.out_spec)
