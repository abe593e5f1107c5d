"""GPT-J / NeoX-style parallel residual decoder: ``x = x + attn(ln1(x)) + mlp(ln2(x))``.

Attention and MLP of one layer read the same stream value, so per docs/spec.md section 2 they
are two sublayers with the same input (one aggregation feeds both). ``shared_norm``
gives GPT-J's single LayerNorm feeding both branches instead of NeoX's two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ._common import GeluMLP, SelfAttention, configure, random_tokens, seeded

KIND = "prenorm"
DYNAMIC_DIMS = ({0: "batch", 1: "seq"},)


@dataclass(frozen=True)
class Config:
    vocab: int = 97
    dim: int = 48
    layers: int = 3
    heads: int = 6
    hidden: int = 120
    rope: bool = True
    shared_norm: bool = False
    dropout: float = 0.1
    eps: float = 1e-5
    batch: int = 2
    seq: int = 7
    seed: int = 0


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.shared_norm = cfg.shared_norm
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.ln_2 = None if cfg.shared_norm else nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.heads, bias=True, causal=True, use_rope=cfg.rope, dropout=cfg.dropout)
        self.mlp = GeluMLP(cfg.dim, cfg.hidden, approximate="none")
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        a = self.ln_1(x)
        b = a if self.ln_2 is None else self.ln_2(x)
        return x + self.drop(self.attn(a)) + self.drop(self.mlp(b))


class ParallelLM(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.final_norm(x))


def build(**overrides: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = configure(Config(), overrides)
    with seeded(cfg.seed):
        model = ParallelLM(cfg).eval()
    return model, (random_tokens(cfg.seed + 1, cfg.batch, cfg.seq, cfg.vocab),)
