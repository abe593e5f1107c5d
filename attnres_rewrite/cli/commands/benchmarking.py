"""``attnres bench``: latency of the original vs the converted model, eager and compiled.

The numbers answer the user's question "what does AttnRes cost me on this model, here":
forward latency (and with ``--train`` a full training step: forward, backward, SGD) on
the available device, median over ``--iters`` after ``--warmup`` untimed runs. The
original compiles with Inductor, the converted model with the ``attnres`` backend; a
compile that fails is reported in its row instead of aborting the other measurements.
Defaults are small so a bench on CPU finishes in seconds (compiling dominates).

Both models run in eval mode in every phase, the training step included: the converted
graph was traced in eval mode and keeps that behaviour (no dropout, batch-norm running
statistics) whatever ``.train()`` says, so a train-mode original would be timed doing
different, costlier work. The output says so (``module_mode``, and a note with ``--train``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import common, output

#: ``.training`` of both models in every timed phase (see the module doc).
MODULE_MODE = "eval"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], *, iters: int, warmup: int, device: torch.device) -> dict[str, float]:
    start = time.perf_counter()
    fn()  # first call: compilation for compiled models, allocation otherwise
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "first_call_s": first}


def _forward(model: nn.Module, inputs: Any) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return common.call(model, inputs)

    return run


def _train_step(model: nn.Module, inputs: Any) -> Callable[[], Any]:
    """One SGD step on a scalar made of all float outputs (what a fine-tuning loop costs)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    float_leaves = common.backend("api").float_leaves

    def run() -> Any:
        optimizer.zero_grad(set_to_none=True)
        loss = sum(x.float().square().mean() for x in float_leaves(common.call(model, inputs)))
        loss.backward()
        optimizer.step()

    return run


def _compile(model: nn.Module, converted: bool) -> nn.Module:
    if converted:
        return common.backend("backend").compile(model)
    return torch.compile(model)


def run(
    spec: str,
    *,
    adapter: Path | None,
    options: common.ConversionOptions,
    train: bool,
    compiled: bool,
    iters: int,
    warmup: int,
    device: str | None,
    batch: int | None,
    seq_len: int | None,
    seed: int,
    as_json: bool,
) -> None:
    dev = common.device_of(device)
    common.check_adapter_or_options(adapter, options)
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    # convert on the target device: the trace may bake device-specific constants into the graph
    resolved.model.to(dev)
    resolved.example_inputs = inputs = common.to_device(resolved.example_inputs, dev)
    converted = common.converted_model(resolved, adapter, options)
    models = {"original": resolved.model, "converted": converted}  # training steps run on copies
    phases = [("forward", _forward)] + ([("train", _train_step)] if train else [])
    rows: list[dict[str, Any]] = []
    for phase, make in phases:
        for how in ["eager"] + (["compiled"] if compiled else []):
            for name, base in models.items():
                model = base if phase == "forward" else common.copy_for_training(base)
                model.eval()  # also for "train": the converted graph was traced in eval mode (module doc)
                row: dict[str, Any] = {"model": name, "phase": phase, "mode": how}
                with output.step(f"Timing {phase} {how} {name}"):
                    try:
                        runner = _compile(model, name == "converted") if how == "compiled" else model
                        row.update(_time(make(runner, inputs), iters=iters, warmup=warmup, device=dev))
                    except Exception as exc:  # a failed compile is a result to report, not a reason to stop
                        if how == "eager":
                            raise
                        row["error"] = (
                            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                        )
                rows.append(row)
    payload = {
        "model": spec,
        "device": str(dev),
        "iters": iters,
        "warmup": warmup,
        "module_mode": MODULE_MODE,
        "params_original": common.count_params(resolved.model),
        "params_converted": common.count_params(converted),
        "results": rows,
        "overhead_pct": _overheads(rows),
    }
    if as_json:
        output.emit_json(payload)
        return
    output.table(
        f"{spec} on {dev} (median of {iters})",
        ["phase", "mode", "original ms", "converted ms", "overhead"],
        [
            [
                phase,
                how,
                _cell(rows, "original", phase, how),
                _cell(rows, "converted", phase, how),
                None if (pct := payload["overhead_pct"].get(f"{phase}_{how}")) is None else f"{pct:+.1f}%",
            ]
            for phase, how in dict.fromkeys((r["phase"], r["mode"]) for r in rows)
        ],
    )
    if train:
        output.note(
            "training steps timed with both models in eval mode (no dropout, frozen norm statistics): "
            "the converted graph was traced in eval mode and cannot switch to train behaviour."
        )
    for row in rows:
        if "error" in row:
            output.note(f"{row['phase']} {row['mode']} {row['model']} failed: {row['error']}")


def _find(rows: list[dict[str, Any]], model: str, phase: str, how: str) -> dict[str, Any]:
    return next(r for r in rows if r["model"] == model and r["phase"] == phase and r["mode"] == how)


def _cell(rows: list[dict[str, Any]], model: str, phase: str, how: str) -> Any:
    row = _find(rows, model, phase, how)
    return "failed" if "error" in row else round(row["median_ms"], 3)


def _overheads(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Converted vs original median latency, in percent, per phase and mode that both completed."""
    result = {}
    for phase, how in dict.fromkeys((r["phase"], r["mode"]) for r in rows):
        base, conv = _find(rows, "original", phase, how), _find(rows, "converted", phase, how)
        if "median_ms" in base and "median_ms" in conv and base["median_ms"] > 0:
            result[f"{phase}_{how}"] = 100.0 * (conv["median_ms"] / base["median_ms"] - 1.0)
    return result
