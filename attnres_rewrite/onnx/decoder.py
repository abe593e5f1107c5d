"""Decoder language models with their KV cache: ``--task text-generation-with-past``.

The file has the interface of ``optimum-cli export onnx --task text-generation-with-past``,
so existing onnxruntime generation loops drive it:

- inputs ``input_ids (batch_size, sequence_length)``, ``attention_mask (batch_size,
  past_sequence_length + sequence_length)``, ``position_ids (batch_size, sequence_length)``
  and, per layer ``i``, ``past_key_values.{i}.key`` / ``.value`` ``(batch_size, kv_heads,
  past_sequence_length, head_dim)``; the first step passes a past of length 0;
- outputs ``logits`` and ``present.{i}.key`` / ``.value`` (the past with this step's
  keys and values appended).

AttnRes mixes the outputs of earlier *layers* of the same token; it needs nothing from
earlier tokens, so nothing AttnRes-specific crosses steps and the cache is exactly the
model's own. The export wraps the model (converted or not) in :class:`DecoderWithPast`,
which rebuilds a ``DynamicCache`` from the flat past, calls the model with it and returns
the updated cache flat. The file is verified in onnxruntime by running a prompt (past of
length 0) and several decode steps, feeding the presents back, against the model's own
Hugging Face cache loop in PyTorch (:func:`verify_steps`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, VerificationError
from . import ort_ops
from . import verify as _verify
from .export import ExportReport, IONames, _check_destination, _check_external_data, _check_opset, export_file
from .runtime import find_runtime, open_session

TASK = "text-generation-with-past"
TASKS = ("default", TASK)


def _cache_support(task: str = TASK) -> None:
    """Make transformers' caches pytree nodes, so ``torch.export`` (and a converted owner's capture) can take them."""
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError as exc:  # pragma: no cover - transformers is an extra
        raise ExportError(f"--task {task} needs transformers (pip install transformers): {exc}") from exc
    register_dynamic_cache_export_support()


def _cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its cache by (``cache`` in transformers >= 5, else ``past_key_values``)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ExportError(
        f"{type(model).__name__} takes no KV cache (no 'cache' or 'past_key_values' argument); --task {TASK} "
        "needs a Hugging Face causal language model"
    )


def _layers_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _returned_cache(out: Any) -> Any:
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise ExportError("the model returned no KV cache with use_cache=True")


class DecoderWithPast(nn.Module):
    """``model`` with a flat KV cache: ``(input_ids, attention_mask, position_ids, past) -> (logits, *present)``.

    ``past`` is ``[key_0, value_0, key_1, value_1, ...]``; so is the present after ``logits``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cache_kwarg = _cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        cache = DynamicCache(pairs, config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        present = [t for kv in _layers_of(_returned_cache(out)) for t in kv]
        return (out.logits, *present)


def cache_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a Hugging Face decoder, from its config (else from a two-token run).

    The config is preferred: a run of a converted model with a new call signature
    captures a program first (seconds). The file's verification checks the shapes anyway.
    """
    cfg = getattr(model, "config", None)
    try:
        cfg = cfg.get_text_config(decoder=True)
        heads = cfg.num_attention_heads
        return (
            int(cfg.num_hidden_layers),
            int(getattr(cfg, "num_key_value_heads", None) or heads),
            int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        )
    except (AttributeError, TypeError):
        pass
    with torch.no_grad():
        out = model(input_ids=torch.zeros(2, 2, dtype=torch.long), use_cache=True)
    layers = _layers_of(_returned_cache(out))
    if not layers:
        raise ExportError(f"{type(model).__name__} returned an empty KV cache")
    key = layers[0][0]
    return len(layers), key.shape[1], key.shape[3]


def io_names(layers: int) -> IONames:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
    }
    axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in past})
    return IONames(
        inputs=["input_ids", "attention_mask", "position_ids", *past], outputs=["logits", *present], axes=axes
    )


def step_inputs(ids: torch.Tensor, past: list[torch.Tensor], mask: torch.Tensor) -> tuple:
    """The inputs of one step: ``ids`` after a past of ``past[0].shape[2]`` tokens, ``mask`` covering both."""
    start = past[0].shape[2]
    positions = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1).contiguous()
    return ids, mask, positions, past


def empty_past(batch: int, layers: int, heads: int, head_dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.zeros(batch, heads, 0, head_dim, dtype=dtype) for _ in range(2 * layers)]


def _reference_step(model: nn.Module, cache_kwarg: str, ids, mask, positions, cache):
    """One step of the model's own Hugging Face cache loop: ``(logits, cache)``."""
    kwargs = {cache_kwarg: cache} if cache is not None else {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    return out.logits, _returned_cache(out)


def verify_steps(
    path: str | Path,
    model: nn.Module,
    *,
    batch: int = 2,
    prompt: int = 6,
    steps: int = 3,
    rtol: float,
    atol: float,
    seed: int = 0,
    provider: str = "CPUExecutionProvider",
) -> dict[str, Any]:
    """Prompt (past of length 0) + ``steps`` decode steps in onnxruntime against the model's own cache loop.

    Each step's next tokens are the PyTorch logits' argmax (the same for both, so the
    runs stay aligned); the ONNX presents are fed back as the next past. Returns the
    worst ``max_abs_diff``, the reference magnitude and per step the logits figures;
    ``ok`` is false when a step's logits or presents differ beyond ``atol + rtol * max|torch|``.
    ``provider`` is a target of :func:`.runtime.open_session` (``ort_ops.FUSED_CPU`` included).
    """
    session = open_session(str(path), provider)
    layers, heads, head_dim = cache_geometry(model)
    dtype = next(model.parameters()).dtype
    cache_kwarg = _cache_kwarg(model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    past = empty_past(batch, layers, heads, head_dim, dtype)
    cache = None
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    for step in range(steps + 1):
        inputs = step_inputs(ids, past, mask)
        feeds = [t.numpy() for t in (*inputs[:3], *inputs[3])]
        got = session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))
        want_logits, cache = _reference_step(model, cache_kwarg, *inputs[:3], cache)
        want = [want_logits, *[t for kv in _layers_of(cache) for t in kv]]
        names = ["logits", *[o.name for o in session.get_outputs()][1:]]
        record = {
            "provider": provider,
            "step": step,
            "past_length": int(past[0].shape[2]),
            "input_length": int(ids.shape[1]),
        }
        for name, g, w in zip(names, got, want):
            w = w.detach().double().numpy()
            if g.shape != w.shape:
                failures.append(f"step {step} output {name!r}: shape {list(g.shape)}, PyTorch {list(w.shape)}")
                continue
            diff = float(np.abs(g.astype(np.float64) - w).max()) if w.size else 0.0
            scale = float(np.abs(w).max()) if w.size else 0.0
            if not _verify.within_tolerance(diff, scale, rtol=rtol, atol=atol):
                failures.append(f"step {step} output {name!r}: max abs diff {diff:.3g} (output max {scale:.3g})")
            if name == "logits":
                record.update(max_abs_diff=diff, reference_max_abs=scale)
            record["worst_max_abs_diff"] = max(record.get("worst_max_abs_diff", 0.0), diff)
        records.append(record)
        next_ids = want_logits[:, -1:].argmax(-1)
        past = [torch.from_numpy(np.ascontiguousarray(g)) for g in got[1:]]
        ids = next_ids
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
    return {"ok": not failures, "failures": failures, "steps": records}


def generate_greedy(
    path: str | Path,
    input_ids: torch.Tensor | np.ndarray,
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    provider: str | None = None,
) -> np.ndarray:
    """Greedy decoding in onnxruntime with a file of this task: ``(batch, prompt + new)`` token ids.

    The loop any optimum-style runner does: the prompt with an empty past, then one token
    per step, each step's presents fed back as the next past. Rows that produced
    ``eos_token_id`` keep producing it (as ``transformers``' ``generate`` pads them).
    ``provider`` defaults to the CPU, with the fused attnres kernel for a function-form
    file where it is available (``ort_ops.cpu_target``).
    """
    if max_new_tokens < 0:
        raise ExportError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    session = open_session(str(path), provider or ort_ops.cpu_target(path))
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    if names[:3] != ["input_ids", "attention_mask", "position_ids"] or not names[3:]:
        raise ExportError(f"{path} is not a {TASK} export (inputs: {', '.join(names)})")
    tokens = np.asarray(input_ids, dtype=np.int64)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ExportError(f"input_ids must be (batch, length >= 1), got shape {list(tokens.shape)}")
    batch = tokens.shape[0]
    dtype = np.float16 if "float16" in inputs[3].type else np.float32
    past = [np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=dtype) for i in inputs[3:]]
    step_ids = tokens
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        start = past[0].shape[2]
        length = step_ids.shape[1]
        feeds = {
            "input_ids": step_ids,
            "attention_mask": np.ones((batch, start + length), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (batch, length)).copy(),
        }
        feeds.update(zip(names[3:], past))
        logits, *past = session.run(None, feeds)
        nxt = logits[:, -1].argmax(-1).astype(np.int64)
        if eos_token_id is not None:
            nxt = np.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        step_ids = nxt[:, None]
    return tokens


def is_task_file(input_names: list[str]) -> bool:
    """Does an ONNX file with these inputs have this task's interface?"""
    return input_names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]


def greedy_reference(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding in PyTorch with the model's own KV cache: the loop :func:`generate_greedy` runs in onnxruntime."""
    cache_kwarg = _cache_kwarg(model)
    tokens, step_ids, cache = input_ids, input_ids, None
    for _ in range(max_new_tokens):
        start = tokens.shape[1] - step_ids.shape[1]
        mask = torch.ones(tokens.shape, dtype=torch.long)
        positions = torch.arange(start, tokens.shape[1]).expand(tokens.shape[0], -1)
        logits, cache = _reference_step(model, cache_kwarg, step_ids, mask, positions, cache)
        step_ids = logits[:, -1:].argmax(-1)
        tokens = torch.cat([tokens, step_ids], dim=1)
    return tokens


def compare_generation(
    path: str | Path, model: nn.Module, *, batch: int = 2, prompt: int = 5, max_new_tokens: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Greedy tokens of the file in onnxruntime vs the model in PyTorch, from the same random prompt.

    ``tokens_equal`` is the check (``exact`` conversions reproduce the original's tokens;
    near-tied logits can legitimately flip a token at float rounding otherwise);
    ``first_difference`` is the first generated position where they differ, or ``None``.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen)
    want = greedy_reference(model, ids, max_new_tokens).numpy()
    got = generate_greedy(path, ids.numpy(), max_new_tokens)
    differs = np.nonzero((got != want).any(axis=0))[0]
    return {
        "tokens_equal": bool(differs.size == 0),
        "first_difference": int(differs[0]) - prompt if differs.size else None,
        "prompt": ids.tolist(),
        "onnx_tokens": got[:, prompt:].tolist(),
        "torch_tokens": want[:, prompt:].tolist(),
    }


def raise_on_mismatch(result: dict[str, Any], what: str, rtol: float, atol: float) -> None:
    """:class:`VerificationError` naming the first failed steps of a ``verify_steps`` result that is not ok."""
    if not result["ok"]:
        raise VerificationError(
            f"ONNX {what} differs from PyTorch beyond tolerance (rtol={rtol:g}, atol={atol:g}): "
            + "; ".join(result["failures"][:4])
            + ". No file was written"
        )


def verify_on_targets(
    paths: list[Path], run: Callable[[str], dict[str, Any]], what: str, rtol: float, atol: float
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """``run(provider)`` (a ``verify_steps``) on each target of :func:`.verify.verification_targets` of ``paths``.

    Raises :class:`VerificationError` at the first target that differs; else returns the
    targets, their notes and every step record (each names its ``provider``).
    """
    targets, notes = _verify.verification_targets(paths, ["CPUExecutionProvider"])
    records: list[dict[str, Any]] = []
    for target in targets:
        result = run(target)
        raise_on_mismatch(result, f"{what} ({target})", rtol, atol)
        records += result["steps"]
    return targets, notes, records


def export_decoder_with_past(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int | None = None,
    as_function: bool = False,
    verify: bool = True,
    rtol: float | None = None,
    atol: float = _verify.DEFAULT_ATOL,
    optimize: bool = True,
    external_data: bool | str = "auto",
    steps: int = 3,
    seed: int = 0,
    require_attnres: bool = True,
    progress=None,
) -> ExportReport:
    """Export a Hugging Face causal LM (converted or not) with its KV cache (module docstring).

    The report's ``task_verification`` holds the per-step figures of :func:`verify_steps`;
    the file is written only when every step matches.
    """
    from .export import DEFAULT_OPSET

    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    opset = _check_opset(DEFAULT_OPSET if opset is None else opset)
    _check_external_data(external_data)
    dest = _check_destination(path)
    _cache_support()
    runtime = find_runtime() if verify else None
    if rtol is None:
        rtol = _verify.default_rtol(model)
    wrapper = DecoderWithPast(model).eval()
    layers, heads, head_dim = cache_geometry(model)
    dtype = next(model.parameters()).dtype
    # sizes > 1 everywhere, so that torch.export keeps every axis symbolic (a past of 0 runs in the file)
    gen = torch.Generator().manual_seed(seed)
    batch, seq, past_len = 2, 3, 4
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    past = [torch.randn(batch, heads, past_len, head_dim, generator=gen).to(dtype) for _ in range(2 * layers)]
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    args = step_inputs(ids, past, mask)
    from torch.export import Dim

    auto = {0: Dim.AUTO, 1: Dim.AUTO}
    dynamic_shapes = (auto, auto, auto, [{0: Dim.AUTO, 2: Dim.AUTO} for _ in past])
    notes: list[str] = [
        "AttnRes mixes earlier layers of the same token and keeps no state across tokens: the KV cache is the "
        "model's own"
    ]

    def verifier(report: ExportReport, staged: Path, input_dims: list) -> None:
        def run(target: str) -> dict[str, Any]:
            return verify_steps(staged, model, steps=steps, rtol=rtol, atol=atol, seed=seed, provider=target)

        targets, target_notes, records = verify_on_targets([staged], run, "decoder with past", rtol, atol)
        report.verified = True
        report.rtol, report.atol = rtol, atol
        report.providers = targets
        report.notes += target_notes
        report.runtime = f"{runtime.distribution} {runtime.version}"
        report.task_verification = records
        report.max_abs_diff = max(r.get("worst_max_abs_diff", 0.0) for r in records)
        report.max_rel_diff = max(
            r["max_abs_diff"] / r["reference_max_abs"] for r in records if r.get("reference_max_abs")
        )

    report = export_file(
        wrapper,
        args,
        {},
        dest,
        opset=opset,
        dynamic=True,
        dynamic_shapes=dynamic_shapes,
        as_function=as_function,
        require_attnres=require_attnres,
        external_data=external_data,
        optimize=optimize,
        notes=notes,
        verifier=verifier if runtime is not None else None,
        names=io_names(layers),
        progress=progress,
    )
    report.task = TASK
    return report
