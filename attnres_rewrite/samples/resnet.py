"""ResNet with post-activation basic blocks: ``relu(x + f(x))`` on ``(B, C, H, W)``.

Not convertible (docs/spec.md section 2, ``post-activation``): the ReLU after every add breaks
the additive chain. The feature axis is axis 1 (channel-first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._common import configure, random_images, seeded

KIND = "postact"
DYNAMIC_DIMS = ({0: "batch"},)


@dataclass(frozen=True)
class Config:
    image: int = 16
    channels: int = 24
    blocks: int = 3
    classes: int = 11
    dropout: float = 0.1
    batch: int = 2
    seed: int = 0


class BasicBlock(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.drop(self.bn2(self.conv2(y)))
        return torch.relu(x + y)


class ResNet(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, cfg.channels, 3, padding=1, bias=False), nn.BatchNorm2d(cfg.channels), nn.ReLU()
        )
        self.layers = nn.Sequential(*(BasicBlock(cfg.channels, cfg.dropout) for _ in range(cfg.blocks)))
        self.fc = nn.Linear(cfg.channels, cfg.classes)
        self._randomise_bn_stats()

    def _randomise_bn_stats(self) -> None:
        """Non-trivial running statistics, so eval-mode BatchNorm is not an identity."""
        for mod in self.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)

    def forward(self, images: Tensor) -> Tensor:
        x = self.layers(self.stem(images))
        return self.fc(x.mean(dim=(2, 3)))


def build(**overrides: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = configure(Config(), overrides)
    with seeded(cfg.seed):
        model = ResNet(cfg).eval()
    return model, (random_images(cfg.seed + 1, cfg.batch, cfg.image),)
