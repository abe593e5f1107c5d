"""The converted model at run time: the user's own model, with the streams' owners dispatching.

Conversion leaves the model's class, attributes, submodules and parameters as they
are. It adds the ``attnres`` submodule (queries, key-norm gains, the plan) and replaces
the ``forward`` of each module that owns a converted stream (``model.model`` of a
Hugging Face causal LM, the ``encoder`` and ``decoder`` of T5, the model itself for a
hand-written one) by a :class:`ConvertedForward` instance attribute. Everything
outside those modules (a language-model head, the loss, ``generate``) runs the model's
own Python.

A :class:`ConvertedForward` keys each call by its signature (argument structure,
plain values, per tensor dtype, device, rank and 0/1/many sizes, and the module's
train/eval flags and parameter dtypes and devices). The first call of a signature is
captured with ``torch.export``, checked against the plan, rewritten and outlined into a
:class:`~.program.Program`; later calls whose shapes pass the program's guards reuse it.
Layers (members of the owner's ``nn.ModuleList``) are still called as modules: their
``forward`` becomes a :class:`LayerForward` that runs the layer's part of the program
when the program calls it, and the layer's own code otherwise.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..errors import AttnResError, NotConvertibleError, TraceError
from ..kernels.checks import PLAIN_TENSOR_TYPES
from ..passes.call_inputs import CallInputs
from ..passes.capture import Captured, capture_call, prefix_module_paths, static_axes
from ..passes.detect import Detection, detect
from ..passes.outline import Outline, layer_paths, outline
from ..passes.plan import ConversionPlan, plan_mismatch
from ..passes.rewrite import AttnResParameters, rewrite
from ..passes.simplify import drop_trace_assertions
from .caches import hand_back_caches
from .distributed import (
    innermost,
    is_distributed_tensor,
    meta_stand_ins,
    sharded_states,
    state_modules,
    unwrapped_layers,
)
from .program import LayerProgram, Program

__all__ = ["ConvertedForward", "LayerForward", "ProgramCache", "tracing", "install", "owners", "is_converted"]

log = logging.getLogger("attnres_rewrite")

#: Programs kept per call kind before the oldest is dropped (each costs a capture to rebuild).
MAX_PROGRAMS_PER_KIND = 8

_TRACING = [0]  # > 0 while a capture runs: dispatchers run the model's own code


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


@contextmanager
def tracing(module: nn.Module) -> Iterator[None]:
    """Within the block the model's own code runs: dispatchers pass through, HF checkpointing is off.

    A capture traces the model as written. What the program does around each call at
    run time is left out of the trace: gradient checkpointing (a recompute in the
    backward) and the forward hooks of the module itself and of its layers (FSDP's
    gathers, user hooks), which fire when the program calls those modules, once per call.
    Hooks of modules inside a layer are traced into the program like the rest of its code.
    """
    flags = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    called = [module, *(module.get_submodule(p) for p in sorted(layer_paths(module)))]
    saved = [(m, name, getattr(m, name)) for m in called for name in _HOOK_DICTS if getattr(m, name, None)]
    _TRACING[0] += 1
    for m in flags:
        m.gradient_checkpointing = False
    for m, name, _ in saved:
        setattr(m, name, OrderedDict())
    try:
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)
        for m in flags:
            m.gradient_checkpointing = True
        _TRACING[0] -= 1


def _class_forward(module: nn.Module):
    return type(module).forward.__get__(module)


class _ForwardOverride:
    """Shared behaviour of the two instance ``forward`` overrides: original signature, identity."""

    is_attnres_forward = True  # sampled tracing compares layers' forward overrides; ours are all alike

    module: nn.Module

    @property
    def original_forward(self):
        """The class's own forward, bound: what this override stands in for."""
        return _class_forward(self.module)

    @property
    def __signature__(self) -> inspect.Signature:
        # Trainer, generate and export read forward's parameters
        return inspect.signature(self.original_forward)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.original_forward.__doc__

    @property
    def __code__(self):
        # torch.export names the traced frame after forward's code object
        return self.original_forward.__code__

    @property
    def __name__(self) -> str:
        return "forward"


class LayerForward(_ForwardOverride):
    """A layer's ``forward``: the layer's program when the converted module calls it, else the layer's own code."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], LayerProgram):
            program, inputs, layer = args[0], args[1:], self.module
            if _hf_checkpointing(layer):
                return layer._gradient_checkpointing_func(functools.partial(program, layer), *inputs)
            return program(layer, *inputs)
        return self.original_forward(*args, **kwargs)


def _hf_checkpointing(layer: nn.Module) -> bool:
    """Hugging Face's ``gradient_checkpointing_enable()`` asks this layer to recompute in the backward."""
    return (
        getattr(layer, "gradient_checkpointing", False) is True
        and layer.training
        and torch.is_grad_enabled()
        and callable(getattr(layer, "_gradient_checkpointing_func", None))
    )


class ProgramCache:
    """Programs by call kind; within a kind, the first whose guards admit the call's shapes wins.

    A program holds no reference to the model it was captured from (it reads the module
    it is called with), so deep copies of a converted model share one cache. Pickling
    drops it: the restored model captures again.
    """

    def __init__(self) -> None:
        self.kinds: dict[Any, list[Program]] = {}
        self.warned = False

    def __getstate__(self) -> dict:
        return {"kinds": {}, "warned": False}

    def __len__(self) -> int:
        return sum(len(v) for v in self.kinds.values())

    def __iter__(self) -> Iterator[Program]:
        for programs in self.kinds.values():
            yield from programs

    def find(self, kind: Any, tensors: tuple[Tensor, ...]) -> Program | None:
        for program in self.kinds.get(kind, ()):
            if program.admits(tensors):
                return program
        return None

    def add(self, kind: Any, program: Program, owner: str) -> None:
        programs = self.kinds.setdefault(kind, [])
        programs.append(program)
        if len(programs) > MAX_PROGRAMS_PER_KIND:
            programs.pop(0)
            if not self.warned:
                self.warned = True
                warnings.warn(
                    f"attnres: {owner or 'the model'} was captured more than {MAX_PROGRAMS_PER_KIND} times for calls "
                    f"that differ only in shape; the traced code fixes {', '.join(program.static_axes) or 'some axes'}, "
                    "so every new size costs a capture. Pad inputs to a few sizes to avoid it.",
                    UserWarning,
                    stacklevel=4,
                )

    def clear(self) -> None:
        self.kinds.clear()


def _is_fake(tensors: tuple[Tensor, ...]) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) for t in tensors) or torch.compiler.is_compiling()


_STRUCTURE = [0]  # bumped whenever any module registers a submodule, parameter or buffer (see _watch_structure)


def _watch_structure() -> None:
    """Count submodule, parameter and buffer registrations, so a converted module re-lists its state only then.

    Global registration hooks, installed once, on first conversion: they make the
    per-call state key a pass over cached lists instead of a walk of the module tree.
    Replacing a parameter in place (``.data``, ``.to()``, FSDP2's swaps into an existing
    slot) registers nothing and needs nothing: the key reads every tensor on each call.
    """
    if _STRUCTURE[0] == 0:
        _STRUCTURE[0] = 1

        def bump(module: nn.Module, name: str, value: Any) -> None:
            _STRUCTURE[0] += 1

        torch.nn.modules.module.register_module_module_registration_hook(bump)
        torch.nn.modules.module.register_module_parameter_registration_hook(bump)
        torch.nn.modules.module.register_module_buffer_registration_hook(bump)


def tensor_slots(modules: list[nn.Module]) -> list[dict]:
    """The parameter and buffer dictionaries of ``modules`` (what :func:`state_key` reads).

    Empty ones too: a tensor written straight into one (``_parameters[name] = ...``, no
    registration) is still read.
    """
    return [d for m in modules for d in (m._parameters, m._buffers)]


def state_key(modules: list[nn.Module], slots: list[dict] | None = None) -> tuple:
    """What of the modules' state a trace bakes in: train/eval flags, and the dtypes and devices of their tensors.

    Read on every call: each tensor's dtype and device index, no ``torch.device`` built.
    ``modules`` come from :func:`~.distributed.state_modules` (wrappers around layers left
    out), ``slots`` from :func:`tensor_slots` of them (computed here when not given); a
    parameter FSDP2 holds sharded counts as the dtype and device it is gathered in.
    """
    training = tuple([m.training for m in modules])
    kinds = set()
    sharded = []
    for slot in tensor_slots(modules) if slots is None else slots:
        for t in slot.values():
            if t is None:
                continue
            if type(t) not in PLAIN_TENSOR_TYPES and is_distributed_tensor(t):
                sharded.append(t)  # FSDP2's DTensor: keyed by what it computes in (runtime.distributed)
            else:
                kinds.add((t.dtype, t.device.type if t.is_meta else t.get_device()))
    if sharded:
        kinds |= sharded_states(modules, sharded)
    return training, frozenset(kinds)


Slots = list[tuple[dict, str, nn.Module]]


def _slots_to(root: nn.Module, path: str) -> tuple[Slots, nn.Module]:
    """The ``_modules`` entries leading from ``root`` to the innermost module at ``path``, and that module."""
    hops: Slots = []
    module = root
    for name in path.split(".") if path else ():
        child = module._modules[name]
        hops.append((module._modules, name, child))
        module = child
    inner = innermost(module)
    while module is not inner:  # through the wrappers: each holds exactly one child
        ((name, child),) = module._modules.items()
        hops.append((module._modules, name, child))
        module = child
    return hops, module


def _in_place(hops: Slots, layer: nn.Module) -> bool:
    return (
        all(slots.get(name) is child for slots, name, child in hops)
        and type(vars(layer).get("forward")) is LayerForward
    )


class ConvertedForward(_ForwardOverride):
    """The ``forward`` of a module that owns converted streams: runs the program of each call's signature."""

    def __init__(self, module: nn.Module, path: str, attnres: AttnResParameters) -> None:
        self.module = module
        self.path = path
        self.attnres = attnres
        self.programs = ProgramCache()
        self.last: Program | None = None  # the program of the latest call (inspection, tests)
        vars(self).update(self._empty_caches())
        _watch_structure()

    @staticmethod
    def _empty_caches() -> dict[str, tuple]:
        """Per-owner caches, each keyed by the structure version it was filled at (0: never).

        ``_modules``: (version, the modules the state key reads, their tensor slots);
        ``_layers``: (version, the latest program, its layers with their ``_modules`` slots).
        """
        return {"_modules": (0, [], []), "_layers": (0, None, [])}

    def modules(self) -> list[nn.Module]:
        """The module's submodules and the AttnRes module, listed again only after a registration."""
        return self._listed()[1]

    def _listed(self) -> tuple[int, list[nn.Module], list[dict]]:
        if self._modules[0] != _STRUCTURE[0] or not self._modules[1]:
            listed = state_modules(self.module, self.attnres)  # checkpoint wrappers left out
            self._modules = (_STRUCTURE[0], listed, tensor_slots(listed))
        return self._modules

    def _install_layer_forwards(self, program: Program) -> None:
        """:func:`install_layer_forwards`, skipped while the latest program's layers are still in their slots.

        A layer's slots are the ``_modules`` entries from the owner down to it, through
        wrappers: a layer swapped in by a direct ``_modules`` write (``ModuleList.insert``,
        quantization's module swaps) registers nothing, so the slots themselves are compared.
        """
        version, last, layers = self._layers
        if last is program and version == _STRUCTURE[0] and all(_in_place(hops, m) for hops, m in layers):
            return
        install_layer_forwards(self.module, program)
        layers = [_slots_to(self.module, lp.path) for lp in program.layers]
        self._layers = (_STRUCTURE[0], program, layers)

    def __deepcopy__(self, memo: dict) -> ConvertedForward:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.module = copy.deepcopy(self.module, memo)
        new.path = self.path
        new.attnres = copy.deepcopy(self.attnres, memo)
        new.programs = self.programs  # programs read the module they run on: a copy can share them
        new.last = None
        vars(new).update(self._empty_caches())
        return new

    def __getstate__(self) -> dict:
        return {**vars(self), "programs": ProgramCache(), "last": None, **self._empty_caches()}

    def __setstate__(self, state: dict) -> None:
        vars(self).update({**self._empty_caches(), **state})
        _watch_structure()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _TRACING[0]:
            return self.original_forward(*args, **kwargs)
        program, tensors = self.program_for(args, kwargs)
        output = program.run(self.module, self.attnres, tensors)
        return hand_back_caches(args, kwargs, output)

    @torch._dynamo.disable
    def program_for(self, args: tuple, kwargs: dict) -> tuple[Program, tuple[Tensor, ...]]:
        """The program of this call (captured now if none fits) and the call's tensors."""
        call = CallInputs.of(args, kwargs)
        kind = self.kind(call)
        tensors = call.tensors
        program = self.programs.find(kind, tensors)
        if program is None:
            if _is_fake(tensors):
                raise TraceError(
                    f"{self.path or type(self.module).__name__} has no program for a call like this one "
                    f"({call.describe()}) and cannot capture one while being traced; call the converted model once "
                    "on real inputs of this kind first (attnres_rewrite.export_onnx does that for you)"
                )
            program = self.capture(call, args, kwargs)
            self.programs.add(kind, program, self.path)
        # a copy made before the capture shares its program, not its layers' overrides
        self._install_layer_forwards(program)
        self.last = program
        return program, tensors

    def capture(self, call: CallInputs, args: tuple, kwargs: dict) -> Program:
        """Trace this call, check the streams against the plan, rewrite, outline and compile."""
        started = time.perf_counter()
        depth = self.attnres.trace_depth
        # a sharded owner is traced on meta stand-ins, wrapped layers unwrapped (runtime.distributed)
        with meta_stand_ins(self.module, args, kwargs, depth) as stand_ins, unwrapped_layers(self.module):
            if stand_ins is not None:
                args, kwargs, depth = stand_ins.args, stand_ins.kwargs, stand_ins.trace_depth
            with tracing(self.module):
                try:
                    captured = capture_call(self.module, args, kwargs, trace_depth=depth)
                except AttnResError as exc:
                    raise type(exc)(f"could not capture {self._where(call)}: {exc}") from exc
            gm = captured.take_module()
            if stand_ins is not None:
                stand_ins.finish(gm, self.module)
        prefix_module_paths(gm, self.path)
        return self.build(captured, gm, detect(gm), started)

    def build(self, captured: Captured, gm: fx.GraphModule, detection: Detection, started: float) -> Program:
        """The program of ``gm``, a capture of this module whose module paths are whole-model paths.

        ``detection`` ran on ``gm``; ``gm`` is consumed.
        """
        plan = self.attnres.plan
        mine = replace(plan, streams=[s for s in plan.streams if (s.owner or "") == self.path])
        problem = plan_mismatch(mine, detection)
        if problem is not None:
            raise NotConvertibleError(
                f"the residual streams of {self._where(captured.inputs)} differ from the converted ones: {problem}. "
                "A call that changes the model's structure (another depth, a skipped layer) cannot run the conversion"
            )
        rewrite(gm, detection, mine, self.attnres)
        drop_trace_assertions(gm)
        flat = copy_graph_module(gm)
        outlined = outline(gm, self.module, self.path)
        install_layer_forwards(self.module, outlined)
        program = Program.compile(
            outlined,
            captured.program.call_spec.out_spec,
            getattr(gm, "_guards_fn", None),
            captured.inputs.describe(),
            static_axes(captured),
            list(captured.notes),
            started,
        )
        program.flat = flat
        log.info("attnres: captured %s in %.2f s", self._where(captured.inputs), program.capture_seconds)
        return program

    def adopt(self, captured: Captured, gm: fx.GraphModule, detection: Detection) -> Program:
        """Turn the capture conversion made of this module into its first program (no second trace)."""
        started = time.perf_counter()
        program = self.build(captured, gm, detection, started)
        self.programs.add(self.kind(captured.inputs), program, self.path)
        return program

    def kind(self, call: CallInputs) -> tuple:
        """What a program is keyed by: the call's structure, plain values and tensor metadata, the module's state."""
        _, modules, slots = self._listed()
        return call.spec, call.constants(), call.tensor_key(), state_key(modules, slots)

    def _where(self, call: CallInputs) -> str:
        return f"{self.path or type(self.module).__name__} (a call with {call.describe()})"


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph and the same attributes (weights are shared, not copied)."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    graph._codegen = gm.graph._codegen
    return fx.GraphModule(gm, graph, class_name="AttnResGraph")


def install_layer_forwards(module: nn.Module, outlined: Outline | Program) -> None:
    """Give each outlined layer a :class:`LayerForward` (once; the override itself is stateless).

    A layer under wrappers (``checkpoint_wrapper``) gets it on the innermost module: the
    program calls the wrapper, which calls the layer. Checked on every call: deep copies
    share programs, so a copy made before a program was captured (and the copy sharded
    or wrapped since) gets its overrides when it first runs that program.
    """
    for layer_graph in outlined.layers:
        layer = innermost(module.get_submodule(layer_graph.path))  # under checkpoint_wrapper & co: the wrapped layer
        if not isinstance(vars(layer).get("forward"), LayerForward):
            layer.forward = LayerForward(layer)


def install(model: nn.Module, plan: ConversionPlan, attnres: AttnResParameters, trace_depth: str = "auto") -> None:
    """Make ``model`` converted: register ``attnres`` and dispatch in each stream owner's forward."""
    attnres.plan = plan
    attnres.trace_depth = trace_depth
    model.attnres = attnres
    config = getattr(model, "config", None)
    if _is_hf_config(config):
        from ..saving import hf_plan_record

        config.attnres = hf_plan_record(plan)  # save_pretrained (Trainer's checkpoints too) records the conversion
    for path in sorted({s.owner or "" for s in plan.streams}):
        owner = model.get_submodule(path) if path else model
        if isinstance(vars(owner).get("forward"), ConvertedForward):
            raise AttnResError(f"{path or 'the model'} is already converted")
        owner.forward = ConvertedForward(owner, path, attnres)


def _is_hf_config(config: Any) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(config, transformers.PretrainedConfig)


def owners(model: nn.Module) -> dict[str, ConvertedForward]:
    """The converted modules of ``model`` by path, with their dispatchers."""
    out = {}
    for path, module in model.named_modules():
        forward = vars(module).get("forward")
        if isinstance(forward, ConvertedForward):
            out[path] = forward
    return out


def is_converted(model: nn.Module) -> bool:
    return isinstance(getattr(model, "attnres", None), AttnResParameters) and bool(owners(model))
