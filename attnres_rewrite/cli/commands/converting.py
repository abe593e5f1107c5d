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
from .. import common, output

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
) -> None:
    common.ensure_output_free(out, force=force, kind="directory")  # before any slow step
    start = time.perf_counter()
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    converted = common.convert(resolved, options)
    check = common.equivalence(resolved, converted, seed)
    max_abs, max_rel = check["max_abs"], check["max_rel"]
    report: dict[str, Any] = {
        "model": spec,
        "mode": options.mode,
        **common.plan_summary(converted),
        "params_original": common.count_params(resolved.model),
        "params_added": common.count_params(converted.attnres),
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "check_input_shapes": check["input_shapes"],
        "outputs_finite": check["finite"],
        "notes": list(common.plan_of(converted).notes),
        "static_axes": _static_axes(converted),
        "adapter": str(out),
        "files": [*common.ADAPTER_FILES, "report.json"],
        "attnres_version": __version__,
        "torch_version": torch.__version__,
        "seconds": round(time.perf_counter() - start, 3),
    }
    api = common.backend("api")
    with output.step(f"Writing {out}"), atomic_directory(out) as tmp:
        api.save_adapter(converted, tmp)
        if whole_model:  # the whole converted model beside the adapter: attnres_rewrite.load_converted(out)
            report["files"] += common.backend("saving").write_converted(converted, tmp)
        (tmp / "report.json").write_text(json.dumps(output.jsonable(report), indent=2) + "\n")
    if report["static_axes"]:
        output.note(
            f"the model's code fixes input axes ({', '.join(report['static_axes'])}): each other size there is "
            "captured again on first use (a torch.export trace each)"
        )
    if options.mode == "paper" and max_rel > PAPER_MODE_HINT:
        output.note(
            f"paper mode changes this model's outputs (max rel. diff {max_rel:.2e}): expected for streams without "
            "pre-norm; use --mode exact to start fine-tuning from the original's function."
        )
    if as_json:
        output.emit_json(report)
        return
    output.summary(
        f"Converted {spec} -> {out}",
        [
            ("streams converted", report["streams_converted"]),
            ("sublayers", report["sublayers"]),
            ("blocks", report["blocks"]),
            ("mode", report["mode"]),
            ("params added", f"{report['params_added']:,}"),
            ("max abs diff", max_abs),
            ("max rel diff", max_rel),
        ],
    )
