"""Seed 003's Tiny ImageNet network: conv stages, then two linear layers.

Each stage is conv3x3 -> batch norm -> leaky ReLU -> max-pool 2. An adaptive average pool before
the linear layers fixes their input size, so the same net runs on 8x8 digits and 64x64 Tiny
ImageNet (max-pools use ceil_mode so a 1x1 map stays 1x1 instead of vanishing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        pool: int = 2,
        dropout: float = 0.0,
        slope: float = 0.01,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for w in widths:
            layers += [
                nn.Conv2d(cin, w, 3, padding=1, bias=False),  # bias is redundant before BN
                nn.BatchNorm2d(w),
                nn.LeakyReLU(slope),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc1 = nn.Linear(cin * pool * pool, hidden)
        self.act = nn.LeakyReLU(slope)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(self.drop(self.act(self.fc1(x))))


def convnet(num_classes: int, in_chans: int, img_size: int, **kwargs) -> nn.Module:
    """model_kwargs: widths (list), hidden, pool, dropout, slope."""
    if "widths" in kwargs:
        kwargs["widths"] = tuple(int(w) for w in kwargs["widths"])
    return ConvNet(num_classes, in_chans, **kwargs)
