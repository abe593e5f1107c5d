"""Build a model and example inputs from a local Hugging Face model directory.

The directory is read offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``) with
``trust_remote_code=False``: a directory that needs remote code is refused rather than
executed. Weights are loaded only from ``*.safetensors`` (no pickle); a directory with
just a config gets seeded random weights, which is enough to inspect, convert and export
the architecture.

Example inputs are derived from the model's ``main_input_name`` and config (token ids
for text models, ``pixel_values`` for vision, ``input_features``/``input_values`` for
speech, plus ``decoder_input_ids`` for encoder-decoders), then checked with one forward
pass so that a guess that does not fit the model is reported as a user-facing error.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelSourceError

DEFAULT_BATCH = 2
DEFAULT_SEQ_LEN = 16
_FIX = "pass a package.module:factory that returns (model, example_inputs) instead"


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never touch the network
    try:
        import transformers
    except ImportError as exc:
        raise ModelSourceError(
            "Hugging Face model directories need transformers: pip install 'attnres-rewrite[hf]'."
        ) from exc
    transformers.logging.set_verbosity_error()  # its warnings and progress bars would drown the CLI's own stderr
    if hasattr(transformers.logging, "disable_progress_bar"):
        transformers.logging.disable_progress_bar()
    return transformers


def is_transformers_model(model: nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    return any(
        c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__
    )


def load_directory(path: Path, *, batch: int | None, seq_len: int | None) -> tuple[nn.Module, dict[str, Any], str]:
    """Model (eval, fp32), example inputs and a note on where the weights came from."""
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} has no config.json; expected a Hugging Face model directory (save_pretrained).")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # unknown model_type, remote code required, broken JSON: all the user's to fix
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"cannot load {path / 'config.json'}: {reason}") from exc
    if hasattr(config, "use_cache"):
        config.use_cache = False  # KV caches are inference state, not part of the residual stream
    cls = _model_class(transformers, config)
    weights = sorted(path.glob("*.safetensors"))
    _check_shard_indexes(path)  # before transformers follows an index to a pickle
    try:
        if weights:
            model = cls.from_pretrained(
                path,
                config=config,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=torch.float32,
            )
            note = f"weights from {len(weights)} safetensors file(s)"
        else:
            if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
                raise ModelSourceError(
                    f"{path} has pickled weights only; attnres loads only *.safetensors. "
                    "Re-save with model.save_pretrained(dir, safe_serialization=True)."
                )
            model = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
            note = "no weights in the directory: random weights built from config.json"
    except ModelSourceError:
        raise
    except Exception as exc:
        raise ModelSourceError(f"cannot build {cls.__name__} from {path}: {exc}") from exc
    model = model.float().eval()
    return model, example_inputs_for(model, batch=batch, seq_len=seq_len), note


def _check_shard_indexes(path: Path) -> None:
    """Every shard a ``*.safetensors.index.json`` names must be a safetensors file in ``path``.

    transformers reads the index and then loads each shard by its extension, so an index
    pointing at ``pytorch_model.bin`` would reach ``torch.load`` (unpickling) although
    only safetensors were asked for; and a name such as ``../x.safetensors`` would read
    outside the directory. Such a directory is refused before transformers sees it.
    (``pytorch_model.bin.index.json`` and other indexes are not read with
    ``use_safetensors=True``, so a directory shipping both formats still loads.)
    """
    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelSourceError(f"{index} is not a valid shard index: {exc}; re-save the model.") from exc
        if not isinstance(weight_map, dict):
            raise ModelSourceError(f"{index} has no 'weight_map' object; re-save the model with save_pretrained.")
        for shard in sorted({str(v) for v in weight_map.values()}):
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise ModelSourceError(
                    f"{index} points at {shard!r}; attnres loads only *.safetensors files inside {path} (never "
                    "pickled weights). Re-save with model.save_pretrained(dir, safe_serialization=True)."
                )
            if not (path / shard).is_file():
                raise ModelSourceError(f"{index} lists {shard!r}, which is not in {path}; copy the complete model.")


def _model_class(transformers, config):
    """The class named in ``architectures`` if transformers has it, else ``AutoModel``."""
    for name in getattr(config, "architectures", None) or []:
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # an optional dependency of that model family is missing
            cls = None
        if cls is not None:
            return cls
    if type(config) not in transformers.AutoModel._model_mapping:
        kind = getattr(config, "model_type", "?")
        raise ModelSourceError(f"no model class for config model_type {kind!r} in transformers; {_FIX}.")
    return transformers.AutoModel


def example_inputs_for(model: nn.Module, *, batch: int | None, seq_len: int | None) -> dict[str, torch.Tensor]:
    """Keyword inputs for ``model.forward`` derived from its config, validated by one forward pass."""
    config = model.config
    batch = batch or DEFAULT_BATCH
    seq_len = seq_len or DEFAULT_SEQ_LEN
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        _check_positions(config, seq_len)
        inputs = {"input_ids": _token_ids(text, batch, seq_len)}
    elif main == "pixel_values":
        inputs = {"pixel_values": _pixels(config, batch)}
    elif main == "input_features":
        inputs = {"input_features": _features(config, batch, seq_len)}
    elif main == "input_values":
        stride = math.prod(getattr(config, "conv_stride", None) or [320])
        inputs = {"input_values": torch.randn(batch, (seq_len + 1) * stride)}
    else:
        raise ModelSourceError(f"{type(model).__name__} takes {main!r}, an input kind attnres cannot build; {_FIX}.")
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = _token_ids(text, batch, min(seq_len, _limit(text, "max_target_positions")))
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as exc:
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in inputs.items())
        raise ModelSourceError(
            f"{type(model).__name__} rejected the example inputs built from its config ({shapes}): "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; "
            f"adjust --batch/--seq-len or {_FIX}."
        ) from exc
    return inputs


def _limit(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def _check_positions(config, seq_len: int) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = _limit(text, "max_position_embeddings", "n_positions", "max_source_positions")
    if seq_len > limit:
        raise ModelSourceError(f"--seq-len {seq_len} exceeds the model's {limit} positions; pass --seq-len {limit}.")


def _token_ids(config, batch: int, seq_len: int) -> torch.Tensor:
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ModelSourceError(f"the config has no vocab_size to build token ids from; {_FIX}.")
    return torch.randint(0, vocab, (batch, seq_len))


def _pixels(config, batch: int) -> torch.Tensor:
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None) or 224
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return torch.randn(batch, getattr(vision, "num_channels", 3), height, width)


def _features(config, batch: int, seq_len: int) -> torch.Tensor:
    if hasattr(config, "num_mel_bins"):  # Whisper: fixed-length log-mel input, two stride-2 convs
        return torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions)
    if hasattr(config, "input_feat_per_channel"):  # Speech2Text: (batch, frames, features), 4x subsampling
        features = config.input_feat_per_channel * getattr(config, "input_channels", 1)
        return torch.randn(batch, 4 * seq_len, features)
    raise ModelSourceError(f"cannot tell the input_features shape from a {type(config).__name__}; {_FIX}.")
