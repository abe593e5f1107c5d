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

SEQ2SEQ = "text2text-generation-with-past"
TASKS = ("default", "text-generation-with-past", SEQ2SEQ)
#: The files a directory task writes into ``-o DIR`` (``onnx.seq2seq.FILES`` for the seq2seq task), the only
#: files of DIR an export ever replaces; kept here so the checks run before the ONNX packages are imported.
DIRECTORY_FILES: dict[str, tuple[str, ...]] = {
    "text-generation-with-past": ("model.onnx",),
    SEQ2SEQ: ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"),
}


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
    if task not in TASKS:
        raise InvalidInputError(f"--task {task!r} is not known; use one of: {', '.join(TASKS)}")
    files = DIRECTORY_FILES.get(task)
    if files is not None:
        if out.suffix == ".onnx":
            raise InvalidInputError(
                f"--task {task} writes a directory ({', '.join(files)} inside); -o {out} names a file"
            )
        if not dynamic:
            raise InvalidInputError(f"--task {task} needs dynamic axes (the past grows each step); drop --static")
    # a directory task writes its files beside whatever DIR holds: only those files are ever replaced
    targets = [out / name for name in files] if files is not None else [out]
    _check_targets(targets, force)  # before any slow step
    common.check_adapter_or_options(adapter, options)
    if files is None and out.suffix != ".onnx":
        output.note(f"{out} does not end in .onnx; writing ONNX anyway")
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    onnx = common.backend("onnx")
    if task == SEQ2SEQ:
        onnx.seq2seq.check_model(resolved.model)  # a decoder-only or encoder-only model: refused before converting
    converted = common.converted_model(resolved, adapter, options)
    _check_targets(targets, force)  # again: a file may have appeared while MODEL loaded
    with destination.writing(targets[0]):
        targets[0].parent.mkdir(parents=True, exist_ok=True)
    # --seed also seeds the verification inputs, as in `attnres verify --onnx`
    kwargs: dict[str, Any] = {"as_function": as_function, "verify": verify, "seed": seed}
    if opset is not None:
        kwargs["opset"] = opset
    where = out if files is not None and len(files) > 1 else targets[0]
    with output.step(f"Exporting to {where}" + (" and verifying in onnxruntime" if verify else "")) as update:
        if task == SEQ2SEQ:
            report = onnx.export_seq2seq_with_past(converted, out, progress=update, **kwargs)
        elif files is not None:
            report = onnx.export_decoder_with_past(converted, targets[0], progress=update, **kwargs)
        else:
            report = onnx.export_onnx(
                converted, resolved.example_inputs, targets[0], dynamic=dynamic, progress=update, **kwargs
            )
    payload = {"model": spec, "adapter": str(adapter) if adapter else None, **report.to_dict()}
    for line in payload.get("notes") or []:
        output.note(line)
    if as_json:
        output.emit_json(payload)
        return
    keys = ["onnx_dir" if task == SEQ2SEQ else "onnx_path", "opset", "max_abs_diff", "max_rel_diff", "providers"]
    output.summary(f"Exported {spec}", [(k.replace("_", " "), payload.get(k)) for k in keys if k in payload])


def _check_targets(targets: list[Path], force: bool) -> None:
    """:func:`destination.check_file` for each file the export writes (``--force`` replaces only ONNX models)."""
    for target in targets:
        destination.check_file(target, force=force)


def write_ort_ops(out: Path, *, force: bool, as_json: bool) -> None:
    """``attnres ort-ops``: the onnxruntime op library (``onnx.ort_ops``) copied to ``out`` for deployment."""
    ort_ops, function = common.backend("onnx.ort_ops"), common.backend("onnx.function")
    with output.step(f"Writing the onnxruntime op library to {out}"):
        path = ort_ops.write_library(out, force=force)
    payload = {
        "library": str(path),
        "domain": function.DOMAIN,
        "ops": list(function.FUNCTION_NAMES),
        "built_for": "this machine's CPU (-march=native)",
        "usage": f"options.register_custom_ops_library({str(path)!r})",
    }
    if as_json:
        output.emit_json(payload)
        return
    output.summary("onnxruntime op library", [(k.replace("_", " "), v) for k, v in payload.items()])
