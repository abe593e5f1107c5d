"""BERT-style post-norm encoder: ``x = norm(x + attn(x)); x = norm(x + mlp(x))``.

Not convertible (docs/spec.md section 2, ``post-norm``): every add is re-normalised, so there
is no additive chain longer than one add. The tool must say so, not rewrite it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._common import GeluMLP, SelfAttention, configure, random_tokens, seeded

KIND = "postnorm"
DYNAMIC_DIMS = ({0: "batch", 1: "seq"},)


@dataclass(frozen=True)
class Config:
    vocab: int = 97
    dim: int = 36
    layers: int = 2
    heads: int = 3
    hidden: int = 100
    max_positions: int = 40
    classes: int = 5
    dropout: float = 0.1
    eps: float = 1e-12
    batch: int = 2
    seq: int = 7
    seed: int = 0


class Layer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg.dim, cfg.heads, bias=True, causal=False, dropout=cfg.dropout)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = GeluMLP(cfg.dim, cfg.hidden, approximate="none")
        self.out_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x)))
        return self.out_norm(x + self.drop(self.mlp(x)))


class BertClassifier(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab, cfg.dim)
        self.position = nn.Embedding(cfg.max_positions, cfg.dim)
        self.embed_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.pooler = nn.Linear(cfg.dim, cfg.dim)
        self.classifier = nn.Linear(cfg.dim, cfg.classes)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.embed_norm(self.word(ids) + self.position(pos)))
        for layer in self.layers:
            x = layer(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def build(**overrides: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = configure(Config(), overrides)
    with seeded(cfg.seed):
        model = BertClassifier(cfg).eval()
    return model, (random_tokens(cfg.seed + 1, cfg.batch, cfg.seq, cfg.vocab),)
