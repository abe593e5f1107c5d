"""``attnres verify``: re-check a saved adapter (and an exported ONNX file) against MODEL.

Two checks, on fresh inputs (not the ones the model was traced with):

- adapter: the original model vs the model with the adapter applied. The default
  tolerance is what the conversion itself measured (report.json), so the check reads
  "this adapter on this model still behaves as it did when it was written"; a paper-mode
  conversion of a stream without pre-norm legitimately differs from the original, and a
  fine-tuned adapter should be checked with an explicit ``--rtol`` (or only ``--onnx``).
- onnx: the exported file in onnxruntime vs the converted PyTorch model; this must agree
  to float rounding whatever the adapter's weights.

Exit code 1 when a check fails, 2 for unusable input (missing files, foreign adapter).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import InvalidInputError
from .. import common, output
from ..guard import CheckFailed

ONNX_RTOL = 1e-4
ONNX_ATOL = 1e-5


def _adapter_rtol(adapter: Path) -> float:
    """Tolerance for the adapter check: twice what convert measured, else by mode."""
    try:
        recorded = json.loads((adapter / "report.json").read_text())
        return max(2.0 * float(recorded["max_rel_diff"]), 1e-5)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        mode = json.loads((adapter / "attnres_config.json").read_text()).get("mode", "paper")
    except (OSError, ValueError, AttributeError):
        mode = "paper"
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
    if onnx_path is not None and not onnx_path.is_file():
        raise InvalidInputError(f"no ONNX file {str(onnx_path)!r}; write one with `attnres export MODEL -o FILE.onnx`.")
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    converted = common.load_adapter(resolved, adapter)
    inputs = common.fresh_inputs(resolved.example_inputs, seed)
    checks: list[dict[str, Any]] = []
    with output.step("Checking the adapter against the original"):
        max_abs, max_rel = common.compare(resolved.model, converted, inputs)
    checks.append(
        _check(
            "adapter",
            max_abs,
            max_rel,
            atol if atol is not None else 0.0,
            rtol if rtol is not None else _adapter_rtol(adapter),
        )
    )
    if onnx_path is not None:
        with output.step(f"Checking {onnx_path} in onnxruntime"):
            max_abs, max_rel, providers = _onnx_diffs(onnx_path, converted, inputs)
        check = _check(
            "onnx", max_abs, max_rel, ONNX_ATOL if atol is None else atol, rtol if rtol is not None else ONNX_RTOL
        )
        checks.append({**check, "providers": providers})
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
        raise CheckFailed(
            "; ".join(f"{c['check']}: max rel diff {c['max_rel_diff']:.3e} > {c['rtol']:.1e}" for c in failed)
        )


def _word(check: dict[str, Any]) -> str:
    return "ok" if check["ok"] else "FAILED"


def _check(name: str, max_abs: float, max_rel: float, atol: float, rtol: float) -> dict[str, Any]:
    ok = max_abs <= atol or max_rel <= rtol
    return {"check": name, "max_abs_diff": max_abs, "max_rel_diff": max_rel, "atol": atol, "rtol": rtol, "ok": ok}


def _onnx_diffs(path: Path, converted, inputs: Any) -> tuple[float, float, list[str]]:
    """Run ``path`` in onnxruntime on ``inputs`` and compare with the converted PyTorch model."""
    import torch
    from torch.utils import _pytree as pytree

    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise InvalidInputError("--onnx needs onnxruntime: pip install 'attnres-rewrite[onnx]'.") from exc
    try:
        session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise InvalidInputError(f"{path} is not a loadable ONNX model: {str(exc).strip().splitlines()[0]}") from exc
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, dict) and set(names) <= set(inputs):
        tensors = [inputs[n] for n in names]
    else:
        tensors = [x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
    if len(tensors) != len(names):
        raise InvalidInputError(
            f"{path} takes {len(names)} inputs ({', '.join(names)}) but MODEL gives {len(tensors)}; export it from this MODEL."
        )
    try:
        got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)})
    except Exception as exc:
        raise InvalidInputError(
            f"{path} does not run on MODEL's inputs (exported from another model?): {str(exc).strip().splitlines()[0]}"
        ) from exc
    with torch.no_grad():
        expected = common.call(converted.eval(), inputs)
    ort_floats = [torch.from_numpy(x) for x in got if x.dtype.kind == "f"]
    try:
        max_abs, max_rel = common.max_diffs(expected, ort_floats)
    except RuntimeError as exc:
        raise InvalidInputError(
            f"{path} outputs do not match MODEL's outputs in number or shape; export it from this MODEL."
        ) from exc
    return max_abs, max_rel, session.get_providers()
