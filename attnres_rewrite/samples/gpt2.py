"""GPT-2-style decoder: LayerNorm PreNorm, GELU MLP, learned positions.

One ``prenorm`` stream of ``2 * layers`` sublayers starting at ``wte(ids) + wpe(pos)``
(after embedding dropout) and ending before ``ln_f``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._common import GeluMLP, SelfAttention, configure, random_tokens, seeded

KIND = "prenorm"
DYNAMIC_DIMS = ({0: "batch", 1: "seq"},)


@dataclass(frozen=True)
class Config:
    vocab: int = 97
    dim: int = 60
    layers: int = 4
    heads: int = 5
    max_positions: int = 40
    dropout: float = 0.1
    eps: float = 1e-5
    batch: int = 2
    seq: int = 7
    seed: int = 0


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.heads, bias=True, causal=True, dropout=cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = GeluMLP(cfg.dim, 4 * cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT2LM(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.wte(ids) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build(**overrides: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = configure(Config(), overrides)
    with seeded(cfg.seed):
        model = GPT2LM(cfg).eval()
    return model, (random_tokens(cfg.seed + 1, cfg.batch, cfg.seq, cfg.vocab),)
