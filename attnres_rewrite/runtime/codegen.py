"""Graphs to Python: each graph of a program becomes two functions, one to run and one to trace.

A program runs its graphs op by op in Python, so at a decode step (one token per
sequence) the host work per op is the cost. Two things in the code that
``torch.fx`` generates cost more than they must there:

* an ATen call goes through ``OpOverload.__call__``, a Python frame around the
  overload's C++ entry point (about 0.3-2 us per op, ~400 ops per decode step of a
  4-layer Llama);
* ``attnres::block_attnres`` goes through the dispatcher and the ``custom_op`` autograd
  wrapper even when nothing needs them (:mod:`attnres_rewrite.kernels.eager`).

The *eager* function calls the C++ entry points (``OpOverload._op``, what
``OpOverload.__call__`` itself calls) and :func:`attnres_rewrite.kernels.eager.block_attnres`.
The *traceable* function calls the ``OpOverload`` objects, which is what Dynamo
traces and what ``attnres_rewrite.compile`` compiles. :class:`GraphCode` picks one per
call. The graphs themselves are left as they were: node targets are swapped only
while the code is generated.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx
from torch._ops import OpOverload

from ..kernels import eager as eager_ops
from ..passes.outline import strip_pytree_codegen

__all__ = ["GraphCode", "compile_graph"]

_counter = [0]


class _EntryPoint(functools.partial):
    """An ATen overload's C++ entry point under a name ``torch.fx`` can print (``aten_mul_Tensor``)."""


_ENTRY_POINTS: dict[OpOverload, _EntryPoint] = {}


def _entry_point(overload: OpOverload) -> _EntryPoint:
    fn = _ENTRY_POINTS.get(overload)
    if fn is None:
        fn = _EntryPoint(overload._op)
        fn.__module__ = overload.namespace  # fx names the global "<module>_<name>"
        fn.__name__ = f"{overload._opname}_{overload._overloadname}"
        _ENTRY_POINTS[overload] = fn
    return fn


def _traceable_target(target: Any) -> Any:
    if target is torch.ops.attnres.block_attnres.default:
        return eager_ops.block_attnres  # calls the op itself whenever anything traces
    return target


def _eager_target(target: Any) -> Any:
    new = _traceable_target(target)
    if new is target and type(target) is OpOverload:  # subclasses (TorchBind ops) do more in __call__
        return _entry_point(target)
    return new


@contextlib.contextmanager
def _targets_replaced(graph: fx.Graph, replace: Callable[[Any], Any]) -> Iterator[None]:
    swapped = []
    for node in graph.nodes:
        if node.op == "call_function":
            new = replace(node.target)
            if new is not node.target:
                swapped.append((node, node.target))
                node.target = new
    try:
        yield
    finally:
        for node, target in swapped:
            node.target = target


def _to_python(graph: fx.Graph, name: str) -> tuple[Callable, str]:
    code = graph.python_code(root_module="self")
    _counter[0] += 1
    filename = f"<attnres {name} #{_counter[0]}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)  # tracebacks show it
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace["forward"], code.src


class GraphCode:
    """A graph as ``forward(self, *placeholders)``: the eager function, or the traceable one under a tracer.

    ``source`` is the traceable function's code (ATen calls read ``torch.ops.aten.*``).
    """

    __slots__ = ("eager", "traceable", "source")

    def __init__(self, eager: Callable, traceable: Callable, source: str) -> None:
        self.eager, self.traceable, self.source = eager, traceable, source

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.traceable(*args)
        return self.eager(*args)


def compile_graph(graph: fx.Graph, name: str) -> GraphCode:
    """``graph`` (its placeholders and output flat) as Python; ``name`` labels its code in tracebacks."""
    strip_pytree_codegen(graph)
    with _targets_replaced(graph, _traceable_target):
        traceable, source = _to_python(graph, name)
    with _targets_replaced(graph, _eager_target):
        eager, _ = _to_python(graph, f"{name} eager")
    return GraphCode(eager, traceable, source)
