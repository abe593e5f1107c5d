"""Hugging Face KV caches across a program call: the caller's cache object is the one updated.

A program sees a cache as its tensors (:mod:`~attnres_rewrite.passes.call_inputs`) and
returns a new cache object built from the grown tensors. The model's own code updates
the cache it was given in place, and callers rely on that (``generate`` keeps the
object it passed; a hand-written decode loop keeps reusing one). So after each call the
new state is moved into the caller's object and that object is what the output holds.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["hand_back_caches"]


def _cache_base() -> type | None:
    module = sys.modules.get("transformers.cache_utils")
    return getattr(module, "Cache", None)


def _caches_in(args: tuple, kwargs: dict, base: type) -> list[Any]:
    found = [x for x in (*args, *kwargs.values()) if isinstance(x, base)]
    return list({id(x): x for x in found}.values())


def _move_state(src: Any, dst: Any) -> None:
    """Make ``dst`` hold ``src``'s state (same class), keeping ``dst``'s identity and its layers' identities."""
    if type(src) is not type(dst):
        raise TypeError(f"cannot update a {type(dst).__name__} from a {type(src).__name__}")
    inner = ("self_attention_cache", "cross_attention_cache")
    if all(hasattr(src, name) for name in inner):
        for name in inner:
            _move_state(getattr(src, name), getattr(dst, name))
        dst.is_updated = dict(getattr(src, "is_updated", {}))
        return
    src_layers, dst_layers = getattr(src, "layers", None), getattr(dst, "layers", None)
    if isinstance(src_layers, list) and isinstance(dst_layers, list):
        if len(src_layers) == len(dst_layers) and all(type(a) is type(b) for a, b in zip(src_layers, dst_layers)):
            for a, b in zip(src_layers, dst_layers):
                vars(b).update(vars(a))
        else:
            dst.layers = src_layers
        return
    vars(dst).update(vars(src))


def hand_back_caches(args: tuple, kwargs: dict, output: Any) -> Any:
    """Move the caches in ``output`` into the caches the caller passed; ``output`` then holds the caller's."""
    base = _cache_base()
    if base is None:
        return output
    given = _caches_in(args, kwargs, base)
    if not given:
        return output

    def swap(value: Any) -> Any:
        for cache in given:
            if value is not cache and type(value) is type(cache):
                _move_state(value, cache)
                return cache
        return value

    if isinstance(output, dict):  # a ModelOutput (an OrderedDict whose items mirror its attributes)
        for key, value in list(output.items()):
            if isinstance(value, base):
                output[key] = swap(value)
        return output
    if isinstance(output, tuple) and any(isinstance(v, base) for v in output):
        items = [swap(v) if isinstance(v, base) else v for v in output]
        return type(output)(items) if type(output) is tuple else type(output)(*items)
    return output
