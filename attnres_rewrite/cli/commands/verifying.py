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

from ...errors import AttnResError, InvalidInputError
from .. import common, output
from ..guard import CheckFailed

ONNX_RTOL = 1e-4
ONNX_ATOL = 1e-5


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
    if onnx_path is not None and not onnx_path.is_file():
        raise InvalidInputError(f"no ONNX file {str(onnx_path)!r}; write one with `attnres export MODEL -o FILE.onnx`.")
    resolved = common.load_model(spec, batch=batch, seq_len=seq_len, seed=seed)
    converted = common.load_adapter(resolved, adapter)
    checks: list[dict[str, Any]] = []
    equivalence = common.equivalence(resolved, converted, seed)
    max_abs, max_rel = equivalence["max_abs"], equivalence["max_rel"]
    checks.append(
        _check(
            "adapter",
            max_abs,
            max_rel,
            atol if atol is not None else 0.0,
            rtol if rtol is not None else _adapter_rtol(adapter, converted.attnres_plan.mode),
        )
    )
    if onnx_path is not None:
        with output.step(f"Checking {onnx_path} in onnxruntime"):
            max_abs, max_rel, providers = _onnx_diffs(onnx_path, converted, resolved.example_inputs, seed)
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


def _onnx_diffs(path: Path, converted, example_inputs: Any, seed: int) -> tuple[float, float, list[str]]:
    """Run ``path`` in onnxruntime and compare with the converted PyTorch model.

    Uses the ONNX package's own verification pieces, so ``verify --onnx`` checks what
    ``export`` checked: inputs resized on every axis the file declares dynamic, every
    output compared, on every available provider.
    """
    import torch

    onnx_verify = common.backend("onnx.verify")
    runtime = common.backend("onnx.runtime").find_runtime()
    try:
        import onnx

        header = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: not an ONNX file
        raise InvalidInputError(
            f"{path} is not an ONNX model ({type(exc).__name__}); pass a file from `attnres export`."
        ) from exc
    dims = onnx_verify.input_dims(header)
    args, kwargs = onnx_verify.split_inputs(example_inputs)
    v_args, v_kwargs = onnx_verify.make_verify_inputs(args, kwargs, dims, seed=seed)
    feeds = onnx_verify.tensor_leaves((v_args, v_kwargs))
    with torch.no_grad():
        expected = onnx_verify.tensor_leaves(converted.eval()(*v_args, **v_kwargs))
    try:
        results = [onnx_verify.verify_on_provider(str(path), p, feeds, expected) for p in runtime.providers]
    except AttnResError:
        raise
    except Exception as exc:  # onnxruntime's own errors: wrong input names/shapes, i.e. another model's file
        raise InvalidInputError(
            f"{path} does not run on MODEL's inputs (exported from another model?): {str(exc).strip().splitlines()[0]}"
        ) from exc
    return max(r.max_abs_diff for r in results), max(r.max_rel_diff for r in results), list(runtime.providers)
