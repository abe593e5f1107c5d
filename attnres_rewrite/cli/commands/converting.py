"""``attnres convert``: convert, check equivalence on fresh inputs, write adapter + report.json.

The adapter and the report are written into a temporary sibling directory that replaces
DIR only once everything is on disk, so an interrupted or failed run never leaves a
half-written adapter where ``verify``/``export`` would pick it up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from attnres_rewrite import __version__

from ...fileio import atomic_directory
from .. import common, destination, output
from ..guard import CheckFailed

PAPER_MODE_HINT = 1e-3  # rel. difference above which paper mode is worth a hint about --mode exact


def _static_axes(converted) -> list[str]:
    """Input axes the captured programs fixed (a new size there costs a new capture), e.g. ``ids axis 1 = 7``."""
    found = []
    for owner, programs in common.backend("api").programs(converted).items():
        for program in programs:
            found += [f"{owner}: {axis}" if owner else axis for axis in program.static_axes]
    return sorted(set(found))


def run(
    spec: str,
    out: Path,
    options: common.ConversionOptions,
    *,
    force: bool,
    batch: int | None,
    seq_len: int | None,
    seed: int,
    as_json: bool,
    whole_model: bool = False,
    check_inputs: Path | None = None,
    write_on_failed_check: bool = False,
) -> None:
    destination.check_directory(out, force=force, model_spec=spec)  # before any slow step
    given_inputs = common.read_check_inputs(check_inputs) if check_inputs is not None else None
    start = time.perf_counter()
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    converted = common.convert(resolved, options)
    check = common.equivalence(resolved, converted, seed, given_inputs)
    max_abs, max_rel = check["max_abs"], check["max_rel"]
    failure = check_failure(check, options.mode, _dtype(converted))
    report: dict[str, Any] = {
        "report_format": common.backend("api").REPORT_FORMAT,
        "model": spec,
        "mode": options.mode,
        **common.plan_summary(converted),
        "params_original": common.count_params(resolved.model),
        "params_added": common.count_params(converted.attnres),
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "max_ref": check["max_ref"],
        "check_inputs": check["inputs"],
        "check_input_shapes": check["input_shapes"],
        "check_inconclusive": check["inconclusive"],
        "check_passed": failure is None,
        "check_failure": failure,
        "outputs_finite": check["finite"],
        "stream_rms": check["stream_rms"],
        "static_axes": _static_axes(converted),
        "adapter": str(out),
        "files": [*common.ADAPTER_FILES, destination.REPORT_NAME],
        "attnres_version": __version__,
        "torch_version": torch.__version__,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if check["inputs"] == "example":
        output.warn(
            "the equivalence check ran on the example inputs themselves: resampled inputs failed in the model "
            "(e.g. token ids that must match other inputs); pass --check-inputs FILE to check on other inputs"
        )
    if report["static_axes"]:
        output.warn(
            f"the model's code fixes input axes ({', '.join(report['static_axes'])}): any other size there is "
            "traced again on first use (one torch.export trace per size), and ONNX exports keep them static"
        )
    if failure is not None and not write_on_failed_check:
        if as_json:
            output.emit_json(report | {"adapter": None, "files": []})
        raise CheckFailed(
            f"the equivalence check failed: {failure}. Nothing was written to {out}; pass "
            "--write-on-failed-check to write it anyway."
        )
    api = common.backend("api")
    destination.check_directory(out, force=force, model_spec=spec)  # again: DIR may have changed meanwhile
    with output.step(f"Writing {out}"), destination.writing(out), atomic_directory(out) as tmp:
        api.save_adapter(converted, tmp)
        if whole_model:  # the whole converted model beside the adapter: attnres_rewrite.load_converted(out)
            report["files"] += common.backend("saving").write_converted(converted, tmp)
        (tmp / destination.REPORT_NAME).write_text(json.dumps(output.jsonable(report), indent=2) + "\n")
    if failure is not None:
        output.warn(f"the equivalence check failed ({failure}); written anyway (--write-on-failed-check)")
    hint = paper_mode_hint(options.mode, max_rel, common.plan_of(converted), check["stream_rms"])
    if hint:
        output.note(hint)
    if as_json:
        output.emit_json(report)
        return
    output.summary(
        f"Converted {spec} -> {out}",
        [
            ("streams converted", report["num_streams_converted"]),
            ("sublayers", report["num_sublayers"]),
            ("blocks", report["num_blocks"]),
            ("mode", report["mode"]),
            ("params added", f"{report['params_added']:,}"),
            ("max abs diff", max_abs),
            ("max rel diff", max_rel),
        ],
    )


#: ``exact`` mode's gate: max|converted - original| <= ATOL + rtol x max|original|, rtol by
#: the model's dtype (looser than ONNX's float-rounding check: a deep model's sums reorder).
EXACT_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}
EXACT_ATOL = 1e-6


def check_failure(check: dict[str, Any], mode: str, dtype: torch.dtype) -> str | None:
    """Why convert's own equivalence check fails, or None.

    Any mode fails on non-finite outputs and on an inconclusive check (the original's
    output does not vary with its input, so equality proves nothing). ``exact`` mode
    promises the original's function, so a difference beyond rounding fails too;
    ``paper`` mode changes the function by design (see :func:`paper_mode_hint`).
    """
    if not check["finite"]:
        return "the converted model's outputs hold NaN or infinite values"
    if check["inconclusive"]:
        return f"inconclusive: {check['reason']}"
    rtol = EXACT_RTOL.get(dtype, EXACT_RTOL[torch.float32])
    if mode == "exact" and not check["max_abs"] <= EXACT_ATOL + rtol * check["max_ref"]:
        return (
            f"exact mode differs from the original: max abs diff {check['max_abs']:.3e} > {EXACT_ATOL:.0e} + "
            f"{rtol:.0e} x max|original| {check['max_ref']:.3e} (does the model draw random numbers or keep state "
            "between calls?)"
        )
    return None


def paper_mode_hint(mode: str, max_rel: float, plan, stream_rms: float | None) -> str | None:
    """What a paper-mode gap means for this model's streams, or None when there is no gap worth a word."""
    if mode != "paper" or not max_rel > PAPER_MODE_HINT:
        return None
    exact = "use --mode exact to start fine-tuning from the original's function"
    additive = [s.name for s in plan.streams if s.kind != "prenorm"]
    if additive:
        return (
            f"paper mode changes this model's outputs (max rel. diff {max_rel:.2e}): expected for streams without "
            f"pre-norm ({', '.join(additive)}); {exact}."
        )
    eps = ", ".join(sorted({f"{s.eps:g}" for s in plan.streams}))
    rms = f"{stream_rms:.3g}" if stream_rms is not None else "unknown"
    return (
        f"paper mode changes this model's outputs (max rel. diff {max_rel:.2e}) although its streams are pre-norm: "
        f"the gap is the norms' eps against the activations (stream RMS {rms}, key-norm eps {eps}); it shrinks "
        f"as activations grow large against eps (trained weights, or a smaller --eps); {exact}."
    )


def _dtype(converted) -> torch.dtype:
    return next((p.dtype for p in converted.parameters() if p.is_floating_point()), torch.float32)
