"""The inputs of one model call, flattened: tensors in, everything else a constant of the call.

Why flatten: ``torch.export`` binds ``dynamic_shapes`` to the forward's parameters, which
breaks on ``**kwargs`` (a keyword the example passes into ``forward(**kwargs)`` made
every axis static) and on pytree containers the model mutates during the trace (a
Hugging Face ``DynamicCache`` grows while it is traced). Tracing a forward that takes
only the tensor leaves, and rebuilds the original ``(args, kwargs)`` from them and the
call's plain values, sidesteps both: the export sees ``forward(*tensors)``, every axis of
every tensor can be marked dynamic, and the caller's own containers are never touched
(a fresh one is rebuilt from the leaves inside the trace).

The same flattening keys the converted model's per-signature programs
(:mod:`attnres_rewrite.runtime`): the structure, the plain values and, per tensor, its
dtype, device, rank and whether each axis has size 0, 1 or more.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..errors import InvalidInputError

__all__ = ["CallInputs", "register_cache_types", "PLAIN_TYPES"]

#: Non-tensor leaves a call may carry; they are baked into a capture as constants.
PLAIN_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


def _axis_bucket(size: int) -> int:
    """torch.export specialises axes of size 0 and 1, so a program traced at size >= 2 cannot take them.

    Written as comparisons so that a symbolic size (a call traced by ``torch.export``
    or Dynamo) only gains the guard ``size >= 2`` instead of being fixed to its value.
    """
    return 0 if size == 0 else 1 if size == 1 else 2


@dataclass
class CallInputs:
    """``(args, kwargs)`` as tensor leaves plus a structure with the plain values filled in."""

    spec: pytree.TreeSpec
    leaves: list[Any]
    tensor_positions: list[int]

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> CallInputs:
        register_cache_types(args, kwargs)
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        positions = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                positions.append(i)
            elif not isinstance(leaf, PLAIN_TYPES) and not isinstance(leaf, enum.Enum):
                raise InvalidInputError(
                    f"cannot capture a call with an input of type {type(leaf).__name__}: inputs must be tensors, "
                    "plain values (None, bool, int, float, str, dtype, device) or containers of them (tuple, list, "
                    "dict, dataclasses registered with torch.utils._pytree, Hugging Face caches)"
                )
        return cls(spec, leaves, positions)

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(self.leaves[i] for i in self.tensor_positions)

    def rebuild(self, tensors: tuple[Tensor, ...] | list[Tensor]) -> tuple[tuple, dict]:
        """The original ``(args, kwargs)`` with ``tensors`` in place of the tensor leaves (new containers)."""
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_positions, tensors, strict=True):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return args, kwargs

    def constants(self) -> tuple:
        """The plain values, by position: part of a call's signature."""
        tensor = set(self.tensor_positions)
        return tuple((i, leaf) for i, leaf in enumerate(self.leaves) if i not in tensor)

    def tensor_key(self) -> tuple:
        """Per tensor: dtype, device, rank and the 0/1/many bucket of each axis."""
        return tuple(
            (t.dtype, t.device, tuple(_axis_bucket(s) for s in t.shape))
            for t in (self.leaves[i] for i in self.tensor_positions)
        )

    def names(self) -> list[str]:
        """A readable name per leaf: ``input_ids``, ``0`` (first positional), ``cache.key_cache.0``."""
        flat, _ = pytree.tree_flatten_with_path(pytree.tree_unflatten(self.leaves, self.spec))
        out = []
        for path, _leaf in flat:
            parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path[1:]]
            out.append(".".join(parts) or "input")
        return out

    def describe(self) -> str:
        """``input_ids[2, 7], attention_mask[2, 7], use_cache=True``: for notes and errors."""
        parts = []
        for name, leaf in zip(self.names(), self.leaves):
            if isinstance(leaf, Tensor):
                parts.append(f"{name}{list(leaf.shape)}")
            elif leaf is not None:
                parts.append(f"{name}={leaf!r}")
        return ", ".join(parts) or "no inputs"


# --------------------------------------------------------------------------------------
# Hugging Face caches as pytree containers


_REGISTERED: set[type] = set()


def register_cache_types(*trees: Any) -> None:
    """Make Hugging Face's default caches flatten to their tensors; refuse other caches in ``trees``.

    Only when transformers is already imported (a model of it is being captured only
    then), so importing attnres_rewrite never imports transformers. A model may create
    and return a cache the call did not pass (``use_cache=True``), so both default
    caches are registered whatever the inputs hold: ``DynamicCache`` with transformers'
    own export support, ``EncoderDecoderCache`` (two dynamic caches) here.
    """
    if "transformers" not in sys.modules:
        return
    from transformers import cache_utils

    if cache_utils.DynamicCache not in _REGISTERED:
        _register_dynamic_cache()
        _register_encoder_decoder_cache(cache_utils.EncoderDecoderCache)
    types_seen = {type(x) for tree in trees for x in _walk(tree)}
    unsupported = [t for t in types_seen if issubclass(t, cache_utils.Cache) and t not in pytree.SUPPORTED_NODES]
    if unsupported:
        raise InvalidInputError(
            f"cannot capture a call with a {unsupported[0].__name__}: the converted model supports DynamicCache and "
            "EncoderDecoderCache (the default caches of generate); pass one of those, or use_cache=False"
        )


def _walk(tree: Any, depth: int = 0):
    """Objects in a call's containers (tuples, lists, dicts, a cache's own caches), without flattening them."""
    yield tree
    if depth > 4:
        return
    if isinstance(tree, (tuple, list)):
        for x in tree:
            yield from _walk(x, depth + 1)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _walk(x, depth + 1)
    else:
        for name in ("self_attention_cache", "cross_attention_cache"):
            inner = getattr(tree, name, None)
            if inner is not None and not isinstance(inner, Tensor):
                yield from _walk(inner, depth + 1)


def _register_dynamic_cache() -> None:
    from transformers import cache_utils
    from transformers.integrations.executorch import register_dynamic_cache_export_support

    if cache_utils.DynamicCache not in pytree.SUPPORTED_NODES:
        register_dynamic_cache_export_support()
    _REGISTERED.add(cache_utils.DynamicCache)


def _register_encoder_decoder_cache(cls: type) -> None:
    if cls in pytree.SUPPORTED_NODES:
        _REGISTERED.add(cls)
        return

    def flatten(cache):
        return [cache.self_attention_cache, cache.cross_attention_cache], None

    def flatten_with_keys(cache):
        children, context = flatten(cache)
        keys = [pytree.GetAttrKey("self_attention_cache"), pytree.GetAttrKey("cross_attention_cache")]
        return list(zip(keys, children)), context

    def unflatten(children, context):
        return cls(*children)

    pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__name__}",
        flatten_with_keys_fn=flatten_with_keys,
    )
    _REGISTERED.add(cls)
