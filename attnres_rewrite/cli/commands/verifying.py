"""``attnres verify``: re-check a saved adapter (and an exported ONNX file) against MODEL.

Two checks, on fresh inputs (not the ones the model was traced with):

- adapter: the original model vs the model with the adapter applied. The default
  tolerance is what the conversion itself measured (report.json), so the check reads
  "this adapter on this model still behaves as it did when it was written"; a paper-mode
  conversion of a stream without pre-norm legitimately differs from the original, and a
  fine-tuned adapter should be checked with an explicit ``--rtol`` (or only ``--onnx``).
- onnx: the exported file in onnxruntime vs the converted PyTorch model; this must agree
  to float rounding whatever the adapter's weights. It is the check ``export`` runs
  (``onnx.verify.verify_file``: same inputs for the same ``--seed``, same fallbacks, same
  default tolerances), so a file ``export`` accepted passes here on the same model.

A file of ``export --task text-generation-with-past`` (or its directory) gets that
export's own check instead (a prompt with an empty past, then decode steps, logits and
presents per step) and greedy decoding in onnxruntime vs PyTorch from one prompt: the
tokens must be equal. A directory of ``export --task text2text-generation-with-past``
(or one of its three files) gets that export's chained check (encoder, first decoder
step, decoder with past) and greedy decoding from one padded prompt, tokens equal.

Both checks pass when ``max abs diff <= atol + rtol * max|reference|`` (per output for
onnx): the criterion of ``export_onnx``.

Exit code 1 when a check fails, 2 for unusable input (missing files, foreign adapter).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import ExportError, InvalidInputError
from .. import common, output
from ..guard import CheckFailed
from .exporting import DIRECTORY_FILES, SEQ2SEQ

#: The files of a ``--task text2text-generation-with-past`` directory (``onnx.seq2seq.FILES``), as export writes them.
SEQ2SEQ_FILES = DIRECTORY_FILES[SEQ2SEQ]


def _seq2seq_directory(path: Path) -> Path | None:
    """The seq2seq export directory ``path`` is or holds a file of; ``None`` when it is neither.

    Decided from file names only (no ONNX import) so a wrong path fails before MODEL
    loads; a directory with the encoder but not both decoders is refused.
    """
    directory = path if path.is_dir() else path.parent if path.name in SEQ2SEQ_FILES else None
    if directory is None or not (directory / SEQ2SEQ_FILES[0]).is_file():
        return None
    missing = [name for name in SEQ2SEQ_FILES if not (directory / name).is_file()]
    if missing:
        raise InvalidInputError(
            f"{directory} holds {SEQ2SEQ_FILES[0]} but not {', '.join(missing)}: an incomplete "
            "`attnres export --task text2text-generation-with-past` directory; export it again."
        )
    return directory


def _adapter_rtol(adapter: Path, mode: str) -> float:
    """Tolerance for the adapter check: twice what convert measured, else by the plan's mode."""
    try:
        recorded = json.loads((adapter / "report.json").read_text())
        return max(2.0 * float(recorded["max_rel_diff"]), 1e-5)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return 1e-4 if mode == "exact" else 1e-3


def run(
    spec: str,
    adapter: Path,
    *,
    onnx_path: Path | None,
    atol: float | None,
    rtol: float | None,
    batch: int | None,
    seq_len: int | None,
    seed: int,
    as_json: bool,
) -> None:
    common.check_adapter_dir(adapter)
    seq2seq_dir = _seq2seq_directory(onnx_path) if onnx_path is not None else None
    if seq2seq_dir is not None:
        onnx_path = seq2seq_dir  # the directory of `export --task text2text-generation-with-past`
    elif onnx_path is not None and onnx_path.is_dir() and (onnx_path / "model.onnx").is_file():
        onnx_path = onnx_path / "model.onnx"  # the directory of `export --task text-generation-with-past`
    # before the slow steps: a missing or foreign file fails first
    header = _onnx_header(onnx_path / SEQ2SEQ_FILES[0] if seq2seq_dir else onnx_path) if onnx_path else None
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    converted = common.load_adapter(resolved, adapter)
    checks: list[dict[str, Any]] = []
    equivalence = common.equivalence(resolved, converted, seed)
    checks.append(
        _check(
            "adapter",
            equivalence["max_abs"],
            equivalence["max_rel"],
            equivalence["max_ref"],
            atol if atol is not None else 0.0,
            rtol if rtol is not None else _adapter_rtol(adapter, common.plan_of(converted).mode),
        )
    )
    if onnx_path is not None:
        with output.step(f"Checking {onnx_path} in onnxruntime"):
            if seq2seq_dir is not None:
                checks.append(_seq2seq_check(onnx_path, converted.eval(), seed, atol, rtol))
            else:
                checks.append(_onnx_check(onnx_path, header, converted, resolved.example_inputs, seed, atol, rtol))
        for line in checks[-1]["notes"]:
            output.note(line)
    payload = {"model": spec, "adapter": str(adapter), "onnx": str(onnx_path) if onnx_path else None}
    payload.update(ok=all(c["ok"] for c in checks), checks=checks)
    if as_json:
        output.emit_json(payload)
    else:
        output.table(
            f"Verify {spec} with {adapter}",
            ["check", "max abs diff", "max rel diff", "tolerance (abs / rel)", "result"],
            [
                [c["check"], c["max_abs_diff"], c["max_rel_diff"], f"{c['atol']:.1e} / {c['rtol']:.1e}", _word(c)]
                for c in checks
            ],
        )
    failed = [c for c in checks if not c["ok"]]
    if failed:
        raise CheckFailed("; ".join(f"{c['check']}: {_why(c)}" for c in failed))


def _word(check: dict[str, Any]) -> str:
    return "ok" if check["ok"] else "FAILED"


def _why(check: dict[str, Any]) -> str:
    if check.get("failures"):
        return "; ".join(check["failures"]) + f" (atol {check['atol']:.1e}, rtol {check['rtol']:.1e})"
    return (
        f"max abs diff {check['max_abs_diff']:.3e} > {check['atol']:.1e} + {check['rtol']:.1e} x "
        f"max|original| {check['max_ref']:.3e} (max rel diff {check['max_rel_diff']:.3e})"
    )


def _check(name: str, max_abs: float, max_rel: float, max_ref: float, atol: float, rtol: float) -> dict[str, Any]:
    """The adapter check: ``export_onnx``'s criterion (``onnx.verify.within_tolerance``) over all outputs.

    Written out rather than imported so ``verify`` without ``--onnx`` needs no ONNX package.
    """
    ok = bool(max_abs <= atol + rtol * max_ref)  # NaN fails
    return {
        "check": name,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "max_ref": max_ref,
        "atol": atol,
        "rtol": rtol,
        "ok": ok,
    }


def _generation_check(decoder, path: Path, model, seed: int, atol: float, rtol: float) -> dict[str, Any]:
    """A ``--task text-generation-with-past`` file: ``export``'s step check, then greedy tokens vs PyTorch."""
    try:
        steps = decoder.verify_steps(str(path), model, rtol=rtol, atol=atol, seed=seed)
        generation = decoder.compare_generation(str(path), model, seed=seed)
    except (ExportError, RuntimeError, ValueError) as exc:  # another model's file: shapes or names do not fit
        raise InvalidInputError(f"{path} does not run with MODEL (exported from another model?): {exc}") from exc
    return _steps_check(decoder.TASK, steps, generation, atol, rtol)


def _seq2seq_check(directory: Path, model, seed: int, atol: float | None, rtol: float | None) -> dict[str, Any]:
    """A ``--task text2text-generation-with-past`` directory: ``export``'s chained check, then greedy tokens."""
    seq2seq = common.backend("onnx.seq2seq")
    onnx_verify = common.backend("onnx.verify")
    rtol = onnx_verify.default_rtol(model) if rtol is None else rtol
    atol = onnx_verify.DEFAULT_ATOL if atol is None else atol
    try:
        seq2seq.check_model(model)
        steps = seq2seq.verify_steps(seq2seq.paths_in(directory), model, rtol=rtol, atol=atol, seed=seed)
        generation = seq2seq.compare_generation(directory, model, seed=seed)
    except (ExportError, RuntimeError, ValueError) as exc:  # another model's files: shapes or names do not fit
        raise InvalidInputError(f"{directory} does not run with MODEL (exported from another model?): {exc}") from exc
    return _steps_check(seq2seq.TASK, steps, generation, atol, rtol)


def _steps_check(task: str, steps: dict[str, Any], generation: dict[str, Any], atol: float, rtol: float) -> dict:
    """The ``onnx`` check of a task export from its per-step records and its greedy-token comparison."""
    records = steps["steps"]
    max_abs = max(r["worst_max_abs_diff"] for r in records)
    failures = list(steps["failures"])
    if not generation["tokens_equal"]:
        failures.append(
            f"greedy tokens differ from PyTorch from generated position {generation['first_difference']}: "
            f"onnx {generation['onnx_tokens']}, torch {generation['torch_tokens']}"
        )
    return {
        "check": "onnx",
        "task": task,
        "max_abs_diff": max_abs,
        "max_rel_diff": max(r["max_abs_diff"] / r["reference_max_abs"] for r in records if r["reference_max_abs"]),
        "max_ref": max(r["reference_max_abs"] for r in records),
        "atol": atol,
        "rtol": rtol,
        "ok": not failures,
        "failures": failures,
        "steps": records,
        "generation": generation,
        "notes": [],
    }


def _onnx_header(path: Path) -> Any:
    """The ONNX model in ``path`` without its weights: a missing or foreign file fails before MODEL loads."""
    if not path.is_file():
        raise InvalidInputError(f"no ONNX file {str(path)!r}; write one with `attnres export MODEL -o FILE.onnx`.")
    try:
        import onnx
    except ImportError as exc:
        raise InvalidInputError("verify --onnx needs the onnx package: pip install 'attnres-rewrite[onnx]'.") from exc
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: not an ONNX file
        raise InvalidInputError(
            f"{path} is not an ONNX model ({type(exc).__name__}); pass a file from `attnres export`."
        ) from exc


def _onnx_check(
    path: Path, header: Any, converted, example_inputs: Any, seed: int, atol: float | None, rtol: float | None
) -> dict[str, Any]:
    """Run ``path`` in onnxruntime against the converted PyTorch model: ``export``'s own verification.

    ``onnx.verify.verify_file`` with ``export_onnx``'s defaults (rtol by parameter dtype,
    atol 1e-6) unless ``--rtol``/``--atol`` are given; ``header`` is :func:`_onnx_header`'s.
    """
    onnx_verify = common.backend("onnx.verify")
    runtime = common.backend("onnx.runtime").find_runtime()
    args, kwargs = onnx_verify.split_inputs(example_inputs)
    dims = onnx_verify.input_dims(header)
    rtol = onnx_verify.default_rtol(converted) if rtol is None else rtol
    atol = onnx_verify.DEFAULT_ATOL if atol is None else atol
    model = converted.eval()
    decoder = common.backend("onnx.decoder")
    if decoder.is_task_file([v.name for v in header.graph.input]):
        return _generation_check(decoder, path, model, seed, atol, rtol)
    try:
        result = onnx_verify.verify_file(str(path), model, args, kwargs, dims, runtime, rtol=rtol, atol=atol, seed=seed)
    except ExportError as exc:  # onnxruntime or the model refuse the inputs: another model's file
        raise InvalidInputError(f"{path} does not run on MODEL's inputs (exported from another model?): {exc}") from exc
    return {
        "check": "onnx",
        "max_abs_diff": result.max_abs_diff,
        "max_rel_diff": result.max_rel_diff,
        "atol": atol,
        "rtol": rtol,
        "ok": result.ok,
        "failures": result.failures,
        "outputs": result.per_output(),
        "providers": result.providers,
        "input_shapes": result.input_shapes,
        "notes": [*result.notes, *result.zero_reference_notes()],
    }
