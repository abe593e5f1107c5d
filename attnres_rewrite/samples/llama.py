"""Llama-style decoder: RMSNorm PreNorm, SwiGLU MLP, causal SDPA with RoPE.

One ``prenorm`` stream of ``2 * layers`` sublayers from the token embedding to the
final RMSNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ._common import RMSNorm, SelfAttention, SwiGLU, configure, random_tokens, seeded

KIND = "prenorm"
DYNAMIC_DIMS = ({0: "batch", 1: "seq"},)


@dataclass(frozen=True)
class Config:
    vocab: int = 97
    dim: int = 48
    layers: int = 3
    heads: int = 4
    hidden: int = 132
    rope: bool = True
    dropout: float = 0.1
    eps: float = 1e-5
    batch: int = 2
    seq: int = 7
    seed: int = 0


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.heads, bias=False, causal=True, use_rope=cfg.rope, dropout=cfg.dropout)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x)))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class LlamaLM(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build(**overrides: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = configure(Config(), overrides)
    with seeded(cfg.seed):
        model = LlamaLM(cfg).eval()
    return model, (random_tokens(cfg.seed + 1, cfg.batch, cfg.seq, cfg.vocab),)
