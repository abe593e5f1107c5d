"""Encoder-decoder models with their KV cache: ``--task text2text-generation-with-past``.

The directory has the layout and names of ``optimum-cli export onnx --task
text2text-generation-with-past --no-post-process`` (optimum's three-file layout, before
it merges the two decoders), so seq2seq onnxruntime loops written for it drive the files:

- ``encoder_model.onnx``: ``input_ids``, ``attention_mask`` ``(batch_size,
  encoder_sequence_length)`` -> ``last_hidden_state``;
- ``decoder_model.onnx``, the first decoder step (no past): ``input_ids`` (decoder ids,
  ``(batch_size, decoder_sequence_length)``), ``encoder_attention_mask``,
  ``encoder_hidden_states`` -> ``logits``, ``present.{i}.decoder.key`` / ``.value`` (the
  self-attention cache) and ``present.{i}.encoder.key`` / ``.value`` (the cross-attention
  keys and values of the encoder output, computed once here);
- ``decoder_with_past_model.onnx``, every later step: the same inputs plus
  ``past_key_values.{i}.decoder.key`` / ``.value`` ``(batch_size, heads,
  past_decoder_sequence_length, head_dim)`` and ``past_key_values.{i}.encoder.key`` /
  ``.value`` ``(batch_size, heads, encoder_sequence_length_out, head_dim)`` -> ``logits``
  and ``present.{i}.decoder.key`` / ``.value`` only (the encoder part does not change, so
  the caller keeps the first step's).

Why two decoder files rather than one file with an empty past on the first step:
transformers decides per layer whether to compute the cross-attention keys and values
or to reuse the cached ones (``EncoderDecoderCache.is_updated``, set from whether the
cross cache is empty). That is a Python branch on a shape, which ``torch.export``
resolves once; a single graph would either always recompute them (then the encoder
past is useless) or never (then the first step has nothing to read). Each of the two
graphs has exactly one branch taken, which is also what optimum exports.

AttnRes mixes the outputs of earlier *layers* of the same token and keeps nothing
across tokens, so nothing AttnRes-specific crosses steps: the caches are the model's
own. The files are verified together in onnxruntime (:func:`verify_steps`): the
encoder against PyTorch's, then the ONNX chain (ONNX encoder output into the first
decoder step, its presents fed back into the decoder with past for several steps)
against the model's own cache loop in PyTorch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from . import ort_ops
from . import verify as _verify
from .decoder import _cache_support, _returned_cache, verify_on_targets
from .export import (
    ExportReport,
    IONames,
    _check_external_data,
    _check_opset,
    _run_verification,
    export_file,
    json_safe,
)
from .runtime import find_runtime, open_session

TASK = "text2text-generation-with-past"
ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
DECODER_WITH_PAST_FILE = "decoder_with_past_model.onnx"
#: The files of the task, in the order they are exported (and replaced in the directory).
FILES = (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)
DECODER_INPUTS = ["input_ids", "encoder_attention_mask", "encoder_hidden_states"]


# --------------------------------------------------------------------------------------
# What the task needs of a model


def check_model(model: nn.Module) -> None:
    """Refuse, before any slow step, a model that is not a Hugging Face encoder-decoder LM.

    An :class:`ExportError` (a user mistake, exit 2): the model is fine, the task is
    the wrong one for it, and the message names the right one where there is one.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "is_encoder_decoder"):
        raise ExportError(
            f"{name} is not exportable with --task {TASK} because it is not a Hugging Face model (no config); "
            "the task needs an encoder-decoder language model such as T5"
        )
    if not config.is_encoder_decoder:
        kind = "a decoder-only language model" if _can_generate(model) else "not an encoder-decoder model"
        hint = "; use --task text-generation-with-past" if _can_generate(model) else ""
        raise ExportError(
            f"{name} is not exportable with --task {TASK} because it is {kind} (config.is_encoder_decoder is "
            f"false); the task needs an encoder-decoder language model such as T5{hint}"
        )
    if not _can_generate(model) or not callable(getattr(model, "get_encoder", None)):
        raise ExportError(
            f"{name} is not exportable with --task {TASK} because it has no language-model head (it cannot "
            f"generate); export its ...ForConditionalGeneration class, e.g. T5ForConditionalGeneration"
        )


def _can_generate(model: nn.Module) -> bool:
    can = getattr(type(model), "can_generate", None)
    return bool(can()) if callable(can) else False


def decoder_start_token(model: nn.Module) -> int:
    """The id every decoded sequence starts with, found as ``generate`` finds it.

    ``decoder_start_token_id`` of the generation config, then of the config; failing
    both, ``bos_token_id`` (mBART's configs have no start token and start from BOS).
    """
    sources = (getattr(model, "generation_config", None), model.config)
    for name in ("decoder_start_token_id", "bos_token_id"):
        for source in sources:
            value = getattr(source, name, None)
            if isinstance(value, int):
                return value
    raise ExportError(f"{type(model).__name__} has no decoder_start_token_id (nor bos_token_id) in its config")


# --------------------------------------------------------------------------------------
# The wrapped model: flat tensors in and out


class Seq2SeqEncoder(nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state``: the model's encoder, as ``generate`` runs it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state


class Seq2SeqDecoder(nn.Module):
    """One decoder step with a flat cache: ``(input_ids, encoder_attention_mask, encoder_hidden_states, past)``.

    ``past`` is empty on the first step (then the output is ``logits`` and per layer the
    self-attention key, value and the cross-attention key, value) or, later, per layer
    ``[self key, self value, cross key, cross value]`` (then the output is ``logits`` and
    per layer the self-attention key and value). The full model is called with
    ``encoder_outputs``, so its own code (the LM head and T5's scaling of it included) runs.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states, past: list[torch.Tensor]):
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
            attention_mask=encoder_attention_mask,
            decoder_input_ids=input_ids,
            use_cache=True,
            **{_cache_kwarg(self.model): build_cache(self.model, past)},
        )
        return (out.logits, *flat_presents(_returned_cache(out), with_encoder=not past))


def _cache_kwarg(model: nn.Module) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def build_cache(model: nn.Module, past: list[torch.Tensor]):
    """An ``EncoderDecoderCache`` from a flat past (empty: both caches empty, so the first step fills them)."""
    from transformers import DynamicCache, EncoderDecoderCache

    config = model.config
    if not past:
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    layers = range(0, len(past), 4)
    own = DynamicCache([(past[i], past[i + 1]) for i in layers], config=config)
    cross = DynamicCache([(past[i + 2], past[i + 3]) for i in layers], config=config)
    return EncoderDecoderCache(own, cross)


def flat_presents(cache: Any, *, with_encoder: bool) -> list[torch.Tensor]:
    """The cache flat, per layer ``[self key, self value]`` (+ ``[cross key, cross value]`` when ``with_encoder``)."""
    flat: list[torch.Tensor] = []
    for own, cross in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
        flat += [own.keys, own.values]
        if with_encoder:
            flat += [cross.keys, cross.values]
    return flat


# --------------------------------------------------------------------------------------
# Names


def _kv(prefix: str, layers: int, parts: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{i}.{part}.{kv}" for i in range(layers) for part in parts for kv in ("key", "value")]


def encoder_io_names() -> IONames:
    axes = {name: {0: "batch_size", 1: "encoder_sequence_length"} for name in ("input_ids", "attention_mask")}
    return IONames(inputs=["input_ids", "attention_mask"], outputs=["last_hidden_state"], axes=axes)


def decoder_io_names(layers: int, *, with_past: bool) -> IONames:
    """optimum's names: presents of both caches without a past, of the decoder's own with one."""
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
        "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
        "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
    }
    if not with_past:
        presents = _kv("present", layers, ("decoder", "encoder"))
        return IONames(inputs=list(DECODER_INPUTS), outputs=["logits", *presents], axes=axes)
    past = _kv("past_key_values", layers, ("decoder", "encoder"))
    for name in past:
        axes[name] = {
            0: "batch_size",
            2: "past_decoder_sequence_length" if ".decoder." in name else "encoder_sequence_length",
        }
    presents = _kv("present", layers, ("decoder",))
    return IONames(inputs=[*DECODER_INPUTS, *past], outputs=["logits", *presents], axes=axes)


# --------------------------------------------------------------------------------------
# Running the files


@dataclass
class Sessions:
    """onnxruntime sessions of the three files (CPU)."""

    encoder: Any
    decoder: Any
    decoder_with_past: Any

    @classmethod
    def open(cls, paths: dict[str, Path | str], provider: str | None = None) -> Sessions:
        """``provider`` defaults to the CPU, with the fused attnres kernel for function-form files where it is
        available (``ort_ops.cpu_target``)."""
        opened = [open_session(str(paths[name]), provider or ort_ops.cpu_target(paths[name])) for name in FILES]
        names = [i.name for i in opened[1].get_inputs()]
        if [i.name for i in opened[0].get_inputs()] != ["input_ids", "attention_mask"] or names != DECODER_INPUTS:
            raise ExportError(f"{paths[ENCODER_FILE]} and its decoders are not a {TASK} export")
        return cls(*opened)

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def decode(self, ids: np.ndarray, mask: np.ndarray, hidden: np.ndarray, past: list[np.ndarray]) -> list:
        """One step: the first (``past`` empty) in ``decoder_model``, later ones in ``decoder_with_past_model``."""
        feeds = dict(zip(DECODER_INPUTS, (ids, mask, hidden)))
        if not past:
            return self.decoder.run(None, feeds)
        names = [i.name for i in self.decoder_with_past.get_inputs()][len(DECODER_INPUTS) :]
        feeds.update(zip(names, past))
        return self.decoder_with_past.run(None, feeds)


def next_past(past: list[np.ndarray], presents: list[np.ndarray]) -> list[np.ndarray]:
    """The past of the next step: a first step's presents as they are, else the new self-attention presents
    interleaved with the unchanged cross-attention part of ``past``."""
    if not past:
        return list(presents)
    merged: list[np.ndarray] = []
    for layer in range(len(presents) // 2):
        merged += [presents[2 * layer], presents[2 * layer + 1], past[4 * layer + 2], past[4 * layer + 3]]
    return merged


def paths_in(directory: str | Path) -> dict[str, Path]:
    directory = Path(directory)
    return {name: directory / name for name in FILES}


def generate_greedy(
    directory: str | Path,
    input_ids: torch.Tensor | np.ndarray,
    max_new_tokens: int,
    *,
    decoder_start_token_id: int,
    attention_mask: torch.Tensor | np.ndarray | None = None,
    eos_token_id: int | None = None,
) -> np.ndarray:
    """Greedy decoding in onnxruntime with a directory of this task: ``(batch, 1 + max_new_tokens)`` decoder ids.

    The loop optimum's seq2seq runner does: the encoder once, the first step (the start
    token) in ``decoder_model.onnx``, then one token per step in
    ``decoder_with_past_model.onnx``, the self-attention presents fed back and the
    cross-attention ones kept. Like ``transformers``' ``generate`` for encoder-decoder
    models, the result starts with ``decoder_start_token_id``; rows that produced
    ``eos_token_id`` keep producing it.
    """
    if max_new_tokens < 0:
        raise ExportError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ExportError(f"input_ids must be (batch, length >= 1), got shape {list(ids.shape)}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    sessions = Sessions.open(paths_in(directory))
    hidden = sessions.encode(ids, mask)
    batch = ids.shape[0]
    tokens = np.full((batch, 1), decoder_start_token_id, dtype=np.int64)
    past: list[np.ndarray] = []
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        logits, *presents = sessions.decode(tokens[:, -1:], mask, hidden, past)
        past = next_past(past, presents)
        nxt = logits[:, -1].argmax(-1).astype(np.int64)
        if eos_token_id is not None:
            nxt = np.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
    return tokens


def _reference_step(model: nn.Module, ids, mask, hidden, cache):
    """One step of the model's own Hugging Face cache loop in PyTorch: ``(logits, cache)``."""
    from transformers.modeling_outputs import BaseModelOutput

    kwargs = {_cache_kwarg(model): cache} if cache is not None else {}
    with torch.no_grad():
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            decoder_input_ids=ids,
            use_cache=True,
            **kwargs,
        )
    return out.logits, _returned_cache(out)


def _encode(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state


def greedy_reference(
    model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """Greedy decoding in PyTorch with the model's own cache: the loop :func:`generate_greedy` runs in onnxruntime."""
    hidden = _encode(model, input_ids, mask)
    tokens = torch.full((input_ids.shape[0], 1), decoder_start_token(model), dtype=torch.long)
    cache = None
    for _ in range(max_new_tokens):
        logits, cache = _reference_step(model, tokens[:, -1:], mask, hidden, cache)
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens


def _prompt(model: nn.Module, batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random encoder ids and a mask whose last row ends in two padding positions (when long enough)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and length > 3:
        mask[-1, -2:] = 0
    return ids, mask


def compare_generation(
    directory: str | Path,
    model: nn.Module,
    *,
    batch: int = 2,
    prompt: int = 6,
    max_new_tokens: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy tokens of the files in onnxruntime vs the model in PyTorch, from the same random prompt and mask.

    ``tokens_equal`` is the check; ``first_difference`` the first generated position
    where they differ (``None`` when equal); the tokens are the generated ones (after
    the start token).
    """
    ids, mask = _prompt(model, batch, prompt, seed)
    want = greedy_reference(model, ids, mask, max_new_tokens).numpy()
    got = generate_greedy(
        directory,
        ids.numpy(),
        max_new_tokens,
        decoder_start_token_id=decoder_start_token(model),
        attention_mask=mask.numpy(),
    )
    differs = np.nonzero((got != want).any(axis=0))[0]
    return {
        "tokens_equal": bool(differs.size == 0),
        "first_difference": int(differs[0]) - 1 if differs.size else None,
        "prompt": ids.tolist(),
        "attention_mask": mask.tolist(),
        "onnx_tokens": got[:, 1:].tolist(),
        "torch_tokens": want[:, 1:].tolist(),
    }


def _compare(
    name: str, got: np.ndarray, want: torch.Tensor, rtol: float, atol: float
) -> tuple[float, float, str | None]:
    """``(max_abs_diff, max|torch|, failure or None)`` of one output."""
    w = want.detach().double().numpy()
    if got.shape != w.shape:
        return float("inf"), 0.0, f"output {name!r}: shape {list(got.shape)}, PyTorch {list(w.shape)}"
    diff = float(np.abs(got.astype(np.float64) - w).max()) if w.size else 0.0
    scale = float(np.abs(w).max()) if w.size else 0.0
    if _verify.within_tolerance(diff, scale, rtol=rtol, atol=atol):
        return diff, scale, None
    return diff, scale, f"output {name!r}: max abs diff {diff:.3g} (output max {scale:.3g})"


def _compared(
    record: dict[str, Any], names: list[str], got: list, want: list, rtol: float, atol: float, failures: list[str]
) -> dict[str, Any]:
    """``record`` with the first output's ``max_abs_diff`` / ``reference_max_abs`` and the worst output's diff.

    Appends to ``failures`` one line per output beyond tolerance (or a count mismatch).
    """
    where = record["file"] + (f" step {record['step']}" if record["step"] is not None else "")
    if len(got) != len(want):
        failures.append(f"{where}: {len(got)} outputs, PyTorch {len(want)}")
    worst = 0.0
    for index, (name, g, w) in enumerate(zip(names, got, want)):
        diff, scale, failure = _compare(name, g, w, rtol, atol)
        if failure:
            failures.append(f"{where} {failure}")
        if index == 0:
            record.update(max_abs_diff=diff, reference_max_abs=scale)
        worst = max(worst, diff)
    record["worst_max_abs_diff"] = worst
    return record


def verify_steps(
    paths: dict[str, Path | str],
    model: nn.Module,
    *,
    batch: int = 2,
    prompt: int = 6,
    decoder_prompt: int = 3,
    steps: int = 3,
    rtol: float,
    atol: float,
    seed: int = 0,
    provider: str = "CPUExecutionProvider",
) -> dict[str, Any]:
    """The three files chained in onnxruntime against the model's own cache loop in PyTorch.

    The encoder runs on a random prompt whose last row is padded (so the masks matter);
    its ONNX output feeds the first decoder step (``decoder_prompt`` tokens from the
    start token, no past), whose presents feed ``steps`` one-token steps of the decoder
    with past. PyTorch runs the same chain from its own encoder output. Each step's next
    token is the PyTorch argmax (the same for both, so the runs stay aligned). Every
    output (encoder state, logits, presents) must be within ``atol + rtol * max|torch|``.
    Returns ``ok``, ``failures`` and one record per file run: the logits' (the encoder
    state's) ``max_abs_diff`` next to ``reference_max_abs`` and the worst output's diff.
    ``provider`` is a target of :func:`.runtime.open_session` (``ort_ops.FUSED_CPU`` included).
    """
    sessions = Sessions.open(paths, provider)
    ids, mask = _prompt(model, batch, prompt, seed)
    failures: list[str] = []
    want_hidden = _encode(model, ids, mask)
    hidden = sessions.encode(ids.numpy(), mask.numpy())
    record = {"provider": provider, "file": ENCODER_FILE, "step": None, "input_length": prompt}
    records = [_compared(record, ["last_hidden_state"], [hidden], [want_hidden], rtol, atol, failures)]
    gen = torch.Generator().manual_seed(seed + 1)
    start = torch.full((batch, 1), decoder_start_token(model), dtype=torch.long)
    tail = torch.randint(0, model.config.vocab_size, (batch, decoder_prompt - 1), generator=gen)
    step_ids = torch.cat([start, tail], dim=1)
    past: list[np.ndarray] = []
    cache = None
    for step in range(steps + 1):
        session = sessions.decoder_with_past if past else sessions.decoder
        got = sessions.decode(step_ids.numpy(), mask.numpy(), hidden, past)
        want_logits, cache = _reference_step(model, step_ids, mask, want_hidden, cache)
        want = [want_logits, *flat_presents(cache, with_encoder=not past)]
        record = {
            "provider": provider,
            "file": DECODER_WITH_PAST_FILE if past else DECODER_FILE,
            "step": step,
            "past_length": int(past[0].shape[2]) if past else 0,
            "input_length": int(step_ids.shape[1]),
        }
        records.append(_compared(record, [o.name for o in session.get_outputs()], got, want, rtol, atol, failures))
        past = next_past(past, [np.ascontiguousarray(g) for g in got[1:]])
        step_ids = want_logits[:, -1:].argmax(-1)
    return {"ok": not failures, "failures": failures, "steps": records}


# --------------------------------------------------------------------------------------
# Export


@dataclass
class Seq2SeqExportReport:
    """The three files of the task and how the chain matched PyTorch in onnxruntime.

    ``files`` holds each file's :class:`ExportReport` (the encoder's with its own check
    on new shapes, ``outputs`` with ``reference_max_abs``); ``task_verification`` one
    record per file run of :func:`verify_steps`; ``max_abs_diff`` / ``max_rel_diff``
    are the worst of them (the relative figure over the logits and the encoder state).
    """

    onnx_dir: str
    task: str
    layout: list[str]
    files: list[ExportReport]
    opset: int
    attnres_ops: int
    verified: bool
    export_seconds: float
    verify_seconds: float | None = None
    rtol: float | None = None
    atol: float | None = None
    providers: list[str] = field(default_factory=list)
    runtime: str | None = None
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    task_verification: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = [f.to_dict() for f in self.files]
        return json_safe(data)

    def to_json(self, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent)


def _example(model: nn.Module, seed: int) -> tuple[tuple, tuple]:
    """Example inputs of the two decoder graphs, every dynamic size distinct and > 1.

    ``torch.export`` gives equal sizes one symbol (and keeps 0 and 1 static), so batch 2,
    decoder length 3, past decoder length 4 and encoder length 5 stay independent axes.
    The past's shapes come from an eager first step (heads and head size of the model).
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    batch, seq, past_len, enc_len = 2, 3, 4, 5
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, enc_len, dtype=torch.long)
    hidden = _encode(model, torch.randint(0, model.config.vocab_size, (batch, enc_len), generator=gen), mask)
    with torch.no_grad():
        first = Seq2SeqDecoder(model)(ids[:, :1], mask, hidden, [])
    past = []
    for i in range(1, len(first), 4):
        own, cross = first[i].shape, first[i + 2].shape
        past += [torch.randn(batch, own[1], past_len, own[3], generator=gen).to(dtype) for _ in range(2)]
        past += [torch.randn(batch, cross[1], enc_len, cross[3], generator=gen).to(dtype) for _ in range(2)]
    return (ids, mask, hidden, []), (ids, mask, hidden, past)


def _decoder_dynamic_shapes(past: list[torch.Tensor]) -> tuple:
    from torch.export import Dim

    auto = {0: Dim.AUTO, 1: Dim.AUTO}
    return (auto, auto, auto, [{0: Dim.AUTO, 2: Dim.AUTO} for _ in past])


def _check_directory(path: Any) -> Path:
    """The destination directory: it must exist (a typo should fail, not create directories) and be a directory."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ExportError(f"path must be a directory path, got {path!r}")
    dest = Path(path).expanduser().absolute()
    if not dest.is_dir():
        raise ExportError(f"cannot write into {dest}: it is not an existing directory; create it first")
    return dest


def export_seq2seq_with_past(
    model: nn.Module,
    directory: str | Path,
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
) -> Seq2SeqExportReport:
    """Export a Hugging Face encoder-decoder LM (converted or not) into ``directory`` (module docstring).

    The three files are exported into a temporary directory inside ``directory``,
    verified together, and only then moved into place one by one (each an atomic
    rename), so a failed export or a failed check leaves ``directory`` as it was.
    Other files in ``directory`` are left alone.
    """
    from .export import DEFAULT_OPSET

    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_model(model)
    opset = _check_opset(DEFAULT_OPSET if opset is None else opset)
    _check_external_data(external_data)
    dest = _check_directory(directory)
    _cache_support(TASK)
    runtime = find_runtime() if verify else None
    if rtol is None:
        rtol = _verify.default_rtol(model)
    common = dict(
        opset=opset,
        dynamic=True,
        as_function=as_function,
        require_attnres=require_attnres,
        external_data=external_data,
        optimize=optimize,
        progress=progress,
    )
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".attnres-export-", dir=dest))
    was_training = {m: m.training for m in model.modules()}
    model.eval()  # the eager runs before the exports capture eval-mode programs, the ones the exports use
    try:
        staged = paths_in(staging)
        first_args, past_args = _example(model, seed)
        reports = [_export_encoder(model, staged[ENCODER_FILE], runtime, rtol, atol, seed, common)]
        layers = len(past_args[3]) // 4
        reports.append(_export_decoder(model, first_args, staged[DECODER_FILE], layers, None, common))
        verification: dict[str, Any] = {}

        def verifier(report: ExportReport, path: Path, input_dims: list) -> None:
            chain = {**staged, DECODER_WITH_PAST_FILE: path}
            verification.update(_verify_chain(chain, model, runtime, rtol, atol, steps, seed))

        checked = verifier if runtime is not None else None
        reports.append(_export_decoder(model, past_args, staged[DECODER_WITH_PAST_FILE], layers, checked, common))
        _move_into(staging, dest, reports)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for module, flag in was_training.items():
            module.training = flag
    return _report(dest, reports, verification, opset, time.perf_counter() - started, runtime, rtol, atol)


def _export_decoder(model: nn.Module, args: tuple, path: Path, layers: int, verifier, common: dict) -> ExportReport:
    """``decoder_model.onnx`` (``args`` with an empty past) or ``decoder_with_past_model.onnx``."""
    past = args[3]
    return export_file(
        Seq2SeqDecoder(model),
        args,
        {},
        path,
        dynamic_shapes=_decoder_dynamic_shapes(past),
        notes=[],
        verifier=verifier,
        names=decoder_io_names(layers, with_past=bool(past)),
        **common,
    )


def _export_encoder(model, path: Path, runtime, rtol: float, atol: float, seed: int, common: dict) -> ExportReport:
    """``encoder_model.onnx``, checked on its own against PyTorch's encoder on new shapes (as ``export_onnx`` does)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=gen)
    args = (ids, torch.ones(2, 5, dtype=torch.long))
    wrapper = Seq2SeqEncoder(model)
    from torch.export import Dim

    def verifier(report: ExportReport, staged: Path, input_dims: list) -> None:
        _run_verification(report, wrapper, args, {}, None, input_dims, staged, runtime, rtol, atol, seed)

    auto = {0: Dim.AUTO, 1: Dim.AUTO}
    return export_file(
        wrapper,
        args,
        {},
        path,
        dynamic_shapes=(auto, auto),
        notes=[],
        verifier=verifier if runtime is not None else None,
        names=encoder_io_names(),
        **common,
    )


def _verify_chain(paths, model, runtime, rtol: float, atol: float, steps: int, seed: int) -> dict[str, Any]:
    """:func:`verify_steps` on the staged files; raise :class:`VerificationError` (nothing written) on a mismatch."""
    started = time.perf_counter()

    def run(target: str) -> dict[str, Any]:
        return verify_steps(paths, model, steps=steps, rtol=rtol, atol=atol, seed=seed, provider=target)

    targets, notes, records = verify_on_targets(list(paths.values()), run, "encoder-decoder", rtol, atol)
    return {
        "steps": records,
        "providers": targets,
        "target_notes": notes,
        "seconds": time.perf_counter() - started,
        "runtime": f"{runtime.distribution} {runtime.version}",
    }


def _move_into(staging: Path, dest: Path, reports: list[ExportReport]) -> None:
    """Rename each staged file (its external data first) into ``dest`` and point its report there."""
    for report in reports:
        name = Path(report.onnx_path).name
        data = staging / f"{name}.data"
        if data.exists():
            os.replace(data, dest / data.name)
            report.external_data = str(dest / data.name)
        os.replace(staging / name, dest / name)
        report.onnx_path = str(dest / name)


def _report(dest, reports, verification, opset, seconds, runtime, rtol, atol) -> Seq2SeqExportReport:
    records = verification.get("steps", [])
    relative = [r["max_abs_diff"] / r["reference_max_abs"] for r in records if r.get("reference_max_abs")]
    notes = [
        f"optimum's three-file layout: {ENCODER_FILE}, {DECODER_FILE} (first step, no past) and "
        f"{DECODER_WITH_PAST_FILE} (later steps; the encoder past is the first step's)",
        "AttnRes mixes earlier layers of the same token and keeps no state across tokens: the KV cache is the "
        "model's own",
        *verification.get("target_notes", []),
    ]
    for report in reports:
        report.task = TASK
        notes += [n for n in report.notes if n not in notes]
    return Seq2SeqExportReport(
        onnx_dir=str(dest),
        task=TASK,
        layout=list(FILES),
        files=reports,
        opset=opset,
        attnres_ops=sum(r.attnres_ops for r in reports),
        verified=bool(records),
        export_seconds=seconds,
        verify_seconds=verification.get("seconds"),
        rtol=rtol if records else None,
        atol=atol if records else None,
        providers=verification.get("providers", []) if records else [],
        runtime=verification.get("runtime"),
        max_abs_diff=max((r["worst_max_abs_diff"] for r in records), default=None),
        max_rel_diff=max(relative, default=None),
        task_verification=records,
        notes=notes,
    )
