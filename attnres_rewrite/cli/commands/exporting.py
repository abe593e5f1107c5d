"""``attnres export``: ONNX export of the converted model, verified in onnxruntime.

The converted model comes from ``--adapter`` (the conversion the user saved) or is
converted on the fly with the conversion flags; the two are exclusive so an export can
never silently mix an adapter with different settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import common, destination, output


def run(
    spec: str,
    out: Path,
    *,
    adapter: Path | None,
    options: common.ConversionOptions,
    opset: int | None,
    as_function: bool,
    dynamic: bool,
    verify: bool,
    force: bool,
    batch: int | None,
    seq_len: int | None,
    seed: int,
    as_json: bool,
) -> None:
    destination.check_file(out, force=force)  # before any slow step
    common.check_adapter_or_options(adapter, options)
    if out.suffix != ".onnx":
        output.note(f"{out} does not end in .onnx; writing ONNX anyway")
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    converted = common.converted_model(resolved, adapter, options)
    onnx = common.backend("onnx")
    destination.check_file(out, force=force)  # again: FILE may have appeared while MODEL loaded
    with destination.writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    # --seed also seeds the verification inputs, as in `attnres verify --onnx`
    kwargs: dict[str, Any] = {"dynamic": dynamic, "as_function": as_function, "verify": verify, "seed": seed}
    if opset is not None:
        kwargs["opset"] = opset
    with output.step(f"Exporting to {out}" + (" and verifying in onnxruntime" if verify else "")) as update:
        report = onnx.export_onnx(converted, resolved.example_inputs, out, progress=update, **kwargs)
    payload = {"model": spec, "adapter": str(adapter) if adapter else None, **report.to_dict()}
    for line in payload.get("notes") or []:
        output.note(line)
    if as_json:
        output.emit_json(payload)
        return
    keys = ["onnx_path", "opset", "max_abs_diff", "max_rel_diff", "providers"]
    output.summary(f"Exported {spec}", [(k.replace("_", " "), payload.get(k)) for k in keys if k in payload])
