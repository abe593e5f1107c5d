"""Pieces shared by the sample models: config overrides, seeding, attention.

The samples are fixtures for the rewrite passes, so their building blocks are the
ones real checkpoints use (``F.scaled_dot_product_attention``, ``nn.LayerNorm``, a
hand-written RMSNorm) rather than anything the passes would special-case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

C = TypeVar("C")


def configure(defaults: C, overrides: dict[str, Any]) -> C:
    """Apply keyword overrides to a config dataclass, naming the valid keys on a typo."""
    names = {f.name for f in dataclasses.fields(defaults)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{type(defaults).__name__}: unknown override(s) {unknown}; valid keys are {sorted(names)}")
    return dataclasses.replace(defaults, **overrides)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic parameter init that leaves the caller's global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_tokens(seed: int, batch: int, seq: int, vocab: int) -> Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=generator(seed))


def random_images(seed: int, batch: int, size: int) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=generator(seed))


class RMSNorm(nn.Module):
    """Llama-style RMSNorm, written out as HF does (fp32 statistics, gain after the cast)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope(q: Tensor, k: Tensor, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Rotary embedding computed from the sequence length (no cached table to outgrow)."""
    seq, head_dim = q.shape[-2], q.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=q.device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, device=q.device, dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, T, d)``: fused QKV, SDPA, output projection."""

    def __init__(
        self, dim: int, heads: int, *, bias: bool, causal: bool, use_rope: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if use_rope and (dim // heads) % 2:
            raise ValueError(f"RoPE needs an even head size, got {dim // heads}")
        self.heads, self.causal, self.use_rope, self.dropout = heads, causal, use_rope, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, dim = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        if self.use_rope:
            q, k = rope(q, k)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str = "tanh") -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))
