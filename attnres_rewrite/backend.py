"""The ``attnres`` torch.compile backend and :func:`compile`.

``torch.compile(model, backend="attnres")`` finds this module through the
``torch_dynamo_backends`` entry point, so no import of ``attnres_rewrite`` is needed
first. The backend lowers the ``block_attnres`` calls of the Dynamo graph (before
AOTAutograd, so the backward is derived from what the lowering emits) and hands the
result to Inductor with the caller's ``mode`` / options. Graphs without AttnRes calls
go to Inductor untouched. The lowering is chosen per device:

* CUDA: :func:`~.passes.lower.lower_two_phase`, the two-phase schedule (one
  ``block_phase1`` per block over the shared completed blocks, Triton kernels);
* CPU: :func:`~.passes.lower.decompose`, plain ATen ops that Inductor fuses with
  their neighbours (the custom ops are opaque to Inductor), compiled with
  ``realize_reads_threshold=1`` unless the caller sets it (see
  ``DECOMPOSE_INDUCTOR_DEFAULTS``). It needs no C++ compiler for a kernel of its own
  and its aggregation kernels cost about half of the opaque fused C++ op per forward
  (4.9 ms vs 9.0 ms, samples.llama d=256, 8 layers, B=4, T=256; benchmarks/README.md).

Options of our own (``options={...}`` of ``torch.compile``; removed before Inductor
sees the rest):

* ``lowering`` (``"auto"``, default; ``"two_phase"``, ``"decompose"`` or ``"single"``,
  which leaves the calls as they are): override the per-device choice;
* ``two_phase`` (bool, default True): ``False`` is ``lowering="single"``;
* ``report_hook`` (callable): receives a :class:`~.passes.lower.LoweringReport` per
  compiled graph, after Inductor has compiled it (tests and debugging).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from .passes.lower import LoweringReport, count_ops, decompose, lower_two_phase

log = logging.getLogger("attnres_rewrite")

OUR_OPTIONS = ("two_phase", "lowering", "report_hook")
# Inductor config the CPU decomposition needs, unless the caller sets it. A source of an
# aggregation is a sum of branch outputs (a block representation, a partial sum); with
# Inductor's default (realize a reused pointwise value once it reads more than 4
# buffers) those sums are recomputed inside every later aggregation, so the last
# block's kernels re-read every branch output of the model two or three times
# (forward AttnRes kernels 12.7 ms vs 4.8 ms at 1, samples.llama d=256, 8 layers,
# B=4, T=256; benchmarks/README.md). At 1 each sum is written once and read as a source.
DECOMPOSE_INDUCTOR_DEFAULTS = {"realize_reads_threshold": 1}
LOWERINGS = ("auto", "two_phase", "decompose", "single")

_state = {"seen_attnres": False, "warned": False}


def _warn_unconverted_once() -> None:
    """Log (once per process) that a graph without AttnRes went through the backend.

    Silent once any graph had AttnRes calls: a converted model split by graph breaks
    legitimately yields graphs without them.
    """
    if _state["warned"] or _state["seen_attnres"]:
        return
    _state["warned"] = True
    log.warning(
        "attnres backend: no AttnRes nodes (torch.ops.attnres.block_attnres) found; compiling with plain Inductor. "
        "Convert the model first: attnres_rewrite.convert(model, example_inputs, num_blocks=8), "
        "then torch.compile(converted, backend='attnres')."
    )


def _split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate our options from Inductor's config options."""
    ours, inductor = {}, {}
    for key, value in (options or {}).items():
        (ours if key in OUR_OPTIONS else inductor)[key] = value
    return ours, inductor


def _inductor_config(mode: str | None, options: dict[str, Any], dynamic: bool | None) -> dict[str, Any]:
    """Inductor config patches for ``mode`` plus ``options``, validated like torch.compile does."""
    wrapper = torch._TorchCompileInductorWrapper(mode, options, dynamic)
    return dict(wrapper.config)


def _recording_inner_compile(report: LoweringReport) -> Callable:
    """Wrap Inductor's per-graph compiler to record the ops of each AOTAutograd graph."""
    from torch._inductor.compile_fx import compile_fx_inner

    def inner(gm: fx.GraphModule, example_inputs, **kwargs):
        kind = "backward" if kwargs.get("is_backward") else "inference" if kwargs.get("is_inference") else "forward"
        report.aot_graphs.append((kind, count_ops(gm)))
        return compile_fx_inner(gm, example_inputs, **kwargs)

    return inner


def graph_device(gm: fx.GraphModule, example_inputs: list) -> str:
    """``"cuda"`` when any input of the graph lives on a CUDA device, else ``"cpu"``."""
    values = list(example_inputs)
    values += [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    if any(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in values):
        return "cuda"
    return "cpu"


def choose_lowering(lowering: str, two_phase: bool, device: str) -> str:
    """The lowering a graph on ``device`` gets (see the module doc)."""
    if lowering not in LOWERINGS:
        raise ValueError(f"attnres backend: lowering must be one of {LOWERINGS}, got {lowering!r}")
    if not two_phase:
        return "single"
    if lowering != "auto":
        return lowering
    return "two_phase" if device == "cuda" else "decompose"


def lowering_config(lowering: str, config: dict[str, Any]) -> dict[str, Any]:
    """Inductor config patches for a graph lowered by ``lowering``: the caller's, over our defaults."""
    return {**DECOMPOSE_INDUCTOR_DEFAULTS, **config} if lowering == "decompose" else dict(config)


def attnres_backend(
    gm: fx.GraphModule,
    example_inputs: list,
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    dynamic: bool | None = None,
    two_phase: bool = True,
    lowering: str = "auto",
    report_hook: Callable[[LoweringReport], None] | None = None,
):
    """Dynamo backend: lowering of AttnRes calls (per device), then Inductor.

    ``mode`` and the Inductor part of ``options`` are passed through exactly as
    ``torch.compile(backend="inductor", mode=..., options=...)`` would apply them.
    """
    ours, inductor_options = _split_options(options)
    two_phase = bool(ours.get("two_phase", two_phase))
    lowering = choose_lowering(ours.get("lowering", lowering), two_phase, graph_device(gm, example_inputs))
    report_hook = ours.get("report_hook", report_hook)

    config = lowering_config(lowering, _inductor_config(mode, inductor_options, dynamic))
    report = decompose(gm) if lowering == "decompose" else lower_two_phase(gm, two_phase=lowering == "two_phase")
    report.inductor_config = config
    if report.attnres_nodes:
        _state["seen_attnres"] = True
    else:
        _warn_unconverted_once()
    log.debug(
        "attnres backend: %d AttnRes calls, lowering %s, %d blocks two-phase",
        report.attnres_nodes,
        lowering,
        report.phase1_calls,
    )

    from torch._inductor.compile_fx import compile_fx

    if report_hook is None:
        return compile_fx(gm, example_inputs, config_patches=config)
    # A cache hit of AOTAutograd would skip Inductor's per-graph compiler, and with it
    # the record of the forward/backward graphs the hook is asking for.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = compile_fx(gm, example_inputs, inner_compile=_recording_inner_compile(report), config_patches=config)
    report_hook(report)
    return compiled


def compile(
    model: torch.nn.Module,
    *,
    two_phase: bool = True,
    lowering: str = "auto",
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    fullgraph: bool = False,
    dynamic: bool | None = None,
):
    """``torch.compile`` with the ``attnres`` backend; options as in :func:`attnres_backend`.

    A thin wrapper so users need not know the option plumbing of custom backends. For a
    converted model it returns a :class:`~.runtime.compiled.CompiledModel`: each program
    (the model's rewritten computation for one call signature) is compiled as one graph,
    so ``fullgraph=True`` holds; ``torch.compile(converted, backend="attnres")`` works
    too, with one graph break where the converted module picks its program.
    """
    opts = {"lowering": lowering, **(options or {}), "two_phase": two_phase}

    def backend(gm, example_inputs):
        return attnres_backend(gm, example_inputs, mode=mode, options=opts, dynamic=dynamic)

    backend.__name__ = "attnres"
    from .runtime.compiled import CompiledModel
    from .runtime.converted import is_converted

    if is_converted(model):
        return CompiledModel(model, lambda fn: torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=dynamic))
    return torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
