"""ViT-style encoder: conv patch embedding, cls token, PreNorm blocks with layer-scale.

One ``prenorm`` stream of ``2 * layers`` sublayers whose branches end in a per-channel
layer-scale (``gamma * f(norm(x))``), the scalar-scaling case of docs/spec.md section 2. The
image size is fixed by the position table, so only the batch axis is dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._common import GeluMLP, SelfAttention, configure, random_images, seeded

KIND = "prenorm"
DYNAMIC_DIMS = ({0: "batch"},)


@dataclass(frozen=True)
class Config:
    image: int = 16
    patch: int = 4
    dim: int = 60
    layers: int = 2
    heads: int = 3
    hidden: int = 156
    classes: int = 11
    layer_scale: float = 0.1
    pool: str = "cls"  # "cls" or "mean"
    dropout: float = 0.1
    eps: float = 1e-6
    batch: int = 2
    seed: int = 0


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.heads, bias=True, causal=False, dropout=cfg.dropout)
        self.ls1 = LayerScale(cfg.dim, cfg.layer_scale)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = GeluMLP(cfg.dim, cfg.hidden, approximate="none")
        self.ls2 = LayerScale(cfg.dim, cfg.layer_scale)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop(self.ls2(self.mlp(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        if cfg.image % cfg.patch:
            raise ValueError(f"image size {cfg.image} is not a multiple of patch size {cfg.patch}")
        if cfg.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {cfg.pool!r}")
        self.pool = cfg.pool
        tokens = (cfg.image // cfg.patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, cfg.dim) * 0.02)
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, d)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat((cls, x), dim=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.head(pooled)


def build(**overrides: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = configure(Config(), overrides)
    with seeded(cfg.seed):
        model = ViT(cfg).eval()
    return model, (random_images(cfg.seed + 1, cfg.batch, cfg.image),)
