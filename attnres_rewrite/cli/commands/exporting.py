"""``attnres export``: ONNX export of the converted model, verified in onnxruntime.

The converted model comes from ``--adapter`` (the conversion the user saved) or is
converted on the fly with the conversion flags; the two are exclusive so an export can
never silently mix an adapter with different settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import InvalidInputError
from .. import common, destination, output


def run(
    spec: str,
    out: Path,
    *,
    adapter: Path | None,
    options: common.ConversionOptions,
    task: str = "default",
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
    tasks = ("default", "text-generation-with-past")
    if task not in tasks:
        raise InvalidInputError(f"--task {task!r} is not known; use one of: {', '.join(tasks)}")
    with_past = task == "text-generation-with-past"
    if with_past:
        if out.suffix == ".onnx":
            raise InvalidInputError(f"--task {task} writes a directory (model.onnx inside); -o {out} names a file")
        if not dynamic:
            raise InvalidInputError(f"--task {task} needs dynamic axes (the past grows each step); drop --static")
    # the task writes DIR/model.onnx beside whatever DIR holds: only that file is ever replaced
    target = out / "model.onnx" if with_past else out
    destination.check_file(target, force=force)  # before any slow step
    common.check_adapter_or_options(adapter, options)
    if not with_past and out.suffix != ".onnx":
        output.note(f"{out} does not end in .onnx; writing ONNX anyway")
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    converted = common.converted_model(resolved, adapter, options)
    onnx = common.backend("onnx")
    destination.check_file(target, force=force)  # again: FILE may have appeared while MODEL loaded
    with destination.writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    # --seed also seeds the verification inputs, as in `attnres verify --onnx`
    kwargs: dict[str, Any] = {"as_function": as_function, "verify": verify, "seed": seed}
    if opset is not None:
        kwargs["opset"] = opset
    with output.step(f"Exporting to {target}" + (" and verifying in onnxruntime" if verify else "")) as update:
        if with_past:
            report = onnx.export_decoder_with_past(converted, target, progress=update, **kwargs)
        else:
            report = onnx.export_onnx(
                converted, resolved.example_inputs, target, dynamic=dynamic, progress=update, **kwargs
            )
    payload = {"model": spec, "adapter": str(adapter) if adapter else None, **report.to_dict()}
    for line in payload.get("notes") or []:
        output.note(line)
    if as_json:
        output.emit_json(payload)
        return
    keys = ["onnx_path", "opset", "max_abs_diff", "max_rel_diff", "providers"]
    output.summary(f"Exported {spec}", [(k.replace("_", " "), payload.get(k)) for k in keys if k in payload])
