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
PLAIN_TYPES = (type(None), bool, int, float, str, type, torch.dtype, torch.device, torch.memory_format, torch.layout)


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
                    "dict, classes registered with torch.utils._pytree, Hugging Face caches)"
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
            out.append(".".join(p for p in parts if p != "__dict__") or "input")
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

#: transformers cache classes whose whole state (``vars``) is tensors, plain values and
#: containers of them: registered as pytree nodes that flatten to that state.
_CACHE_CLASSES = (
    "DynamicCache", "StaticCache", "EncoderDecoderCache",
    "DynamicLayer", "DynamicSlidingWindowLayer", "DynamicIndexedLayer",
    "StaticLayer", "StaticSlidingWindowLayer", "StaticIndexedLayer",
    "LinearAttentionLayer", "LinearAttentionAndFullAttentionLayer", "LinearAttentionAndSlidingWindowAttentionLayer",
    "LinearAttentionAndStaticFullAttentionLayer", "LinearAttentionAndStaticSlidingWindowAttentionLayer",
    "DummyLayer",
)  # fmt: skip

_REGISTERED: set[type] = set()


def register_cache_types(*trees: Any) -> None:
    """Make Hugging Face's caches flatten to their state; refuse other caches in ``trees``.

    A cache is an object whose attributes are tensors (keys, values, recurrent states),
    flags and sizes; it flattens to that state (its ``vars``) and is rebuilt from it
    without calling its constructor. That covers every layer kind (attention,
    sliding-window, the recurrent states of state-space models) with one rule, where
    transformers' own export support knows plain attention layers only. Registered only
    when transformers is already imported (a model of it is being captured only then),
    and for all of them at once: a model may create and return a cache the call did
    not pass (``use_cache=True``).
    """
    if "transformers" not in sys.modules:
        return
    from transformers import cache_utils

    if not _REGISTERED:
        for name in _CACHE_CLASSES:
            cls = getattr(cache_utils, name, None)
            if isinstance(cls, type):
                _register_state(cls)
    types_seen = {type(x) for tree in trees for x in _walk(tree)}
    unsupported = [t for t in types_seen if issubclass(t, cache_utils.Cache) and t not in pytree.SUPPORTED_NODES]
    if unsupported:
        raise InvalidInputError(
            f"cannot capture a call with a {unsupported[0].__name__}: the converted model supports DynamicCache, "
            "StaticCache and EncoderDecoderCache (the caches of generate); pass one of those, or use_cache=False"
        )


def _walk(tree: Any, depth: int = 0):
    """Objects in a call's containers (tuples, lists, dicts), without flattening them."""
    yield tree
    if depth > 4:
        return
    if isinstance(tree, (tuple, list)):
        for x in tree:
            yield from _walk(x, depth + 1)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _walk(x, depth + 1)


def _register_state(cls: type) -> None:
    """Register ``cls`` as a pytree node: tensor-bearing attributes are children, the rest is context.

    Plain attributes (flags, sizes, the device and dtype a layer records) must not become
    leaves: ``torch.export`` allows only tensors among a program's outputs. As context
    they are part of the call's signature, which is what they are (an initialised layer
    traces differently from an empty one).
    """
    _REGISTERED.add(cls)
    if cls in pytree.SUPPORTED_NODES:  # registered before us (transformers' own export support): keep it
        return

    def split(obj: Any) -> tuple[dict, tuple]:
        children, plain = {}, []
        for name, value in vars(obj).items():
            if _holds_tensors(value):
                children[name] = value
            else:
                plain.append((name, _freeze(value)))
        return children, tuple(plain)

    def flatten(obj: Any) -> tuple[list, tuple]:
        children, plain = split(obj)
        return [children], plain

    def flatten_with_keys(obj: Any) -> tuple[list, tuple]:
        children, plain = split(obj)
        return [(pytree.GetAttrKey("__dict__"), children)], plain

    def unflatten(children: list, plain: tuple) -> Any:
        obj = object.__new__(cls)
        obj.__dict__.update({name: _thaw(value) for name, value in plain})
        obj.__dict__.update(children[0])
        return obj

    pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )


def _holds_tensors(value: Any) -> bool:
    """Tensors, or cache objects (even empty ones: their structure, not their identity, is what counts)."""
    if isinstance(value, Tensor) or type(value) in _REGISTERED:
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensors(v) for v in value.values())
    return False


_FROZEN = object()  # marks a container turned into a hashable tuple


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a plain value (dicts and lists of flags become tuples)."""
    if isinstance(value, dict):
        return (_FROZEN, "dict", tuple((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return (_FROZEN, type(value).__name__, tuple(_freeze(v) for v in value))
    hash(value)  # a plain attribute that cannot key a signature is a bug to surface, not to hide
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 3 and value[0] is _FROZEN:
        kind, items = value[1], value[2]
        if kind == "dict":
            return {k: _thaw(v) for k, v in items}
        return (list if kind == "list" else tuple)(_thaw(v) for v in items)
    return value
