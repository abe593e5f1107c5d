"""Putting a model into a form ``torch.export`` and the ONNX exporter can translate, for one export.

Mixture-of-experts layers of current transformers dispatch their expert computation
through ``config._experts_implementation``. The default, ``grouped_mm``, runs on CPU
through the custom op ``transformers::grouped_mm_fallback``, which the PyTorch ONNX
exporter has no translation for (``No ONNX function found for
transformers.grouped_mm_fallback``); ``eager`` loops over the experts that received
tokens, a data-dependent loop ``torch.export`` cannot trace with dynamic shapes.
``batched_mm`` gathers each token's expert weights and multiplies in one batched
matmul: the same function in standard ops, and it traces. So for the duration of an
export the model is switched to ``batched_mm`` where it offers
``set_experts_implementation``, and switched back afterwards.

A converted model's programs bake in the code path they were captured with, and the
experts setting is not part of a program's call kind. The owners' program caches are
therefore set aside during the export (the warm-up captures programs with the
traceable path) and put back afterwards, so PyTorch calls after the export run the
programs of the user's own setting again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["TRACEABLE_EXPERTS", "traceable_experts", "untraceable_experts"]

#: Expert implementations ``torch.export`` traces into standard ops, preferred first.
TRACEABLE_EXPERTS = ("batched_mm",)


def _expert_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose forward dispatches on ``config._experts_implementation`` (transformers' ``@use_experts_implementation``)."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "_is_expert_parallel") and hasattr(getattr(m, "config", None), "_experts_implementation")
    ]


def untraceable_experts(model: nn.Module) -> list[str]:
    """The experts implementations in ``model`` that do not export (empty for a model without experts)."""
    return sorted({str(m.config._experts_implementation) for m in _expert_modules(model)} - set(TRACEABLE_EXPERTS))


def _switchable_models(model: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face models in ``model`` (the model itself, or ones a wrapper holds)."""
    found: list[nn.Module] = []
    covered: set[int] = set()
    for m in model.modules():  # pre-order: an outer model comes before the models inside it
        if id(m) in covered:
            continue
        if callable(getattr(m, "set_experts_implementation", None)) and callable(
            getattr(m, "get_experts_implementation", None)
        ):
            found.append(m)
            covered.update(id(x) for x in m.modules())
    return found


@contextmanager
def traceable_experts(model: nn.Module, notes: list[str]) -> Iterator[None]:
    """Within the block, every experts layer of ``model`` uses a traceable implementation (module docstring).

    Does nothing for a model without such layers or whose layers already use one. A
    model that has untraceable experts but no ``set_experts_implementation`` is left
    as is: its export fails with the exporter's reason, which the caller reports.
    """
    before = untraceable_experts(model)
    hf_models = _switchable_models(model)
    if not before or not hf_models:
        yield
        return
    from ..runtime.converted import ProgramCache, owners

    saved = [(m, m.get_experts_implementation()) for m in hf_models]
    dispatchers = list(owners(model).values())
    caches = [(d, d.programs, d.last) for d in dispatchers]
    try:
        for m in hf_models:
            m.set_experts_implementation(TRACEABLE_EXPERTS[0])
        for d in dispatchers:
            d.programs, d.last = ProgramCache(), None
        notes.append(
            f"the experts layers use {', '.join(before)}, which does not export to ONNX (a custom op or a "
            f"data-dependent loop); exported with experts_implementation={TRACEABLE_EXPERTS[0]!r}, the same function "
            "in standard ops (the model's own setting is restored)"
        )
        yield
    finally:
        for m, setting in saved:
            m.set_experts_implementation(setting)
        for d, programs, last in caches:
            d.programs, d.last = programs, last
