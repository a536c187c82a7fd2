"""ResNet-9: the small residual net that trained CIFAR-10 to 94% in DAWNBench's fastest entries.

Page (2018), "How to train your ResNet" (Myrtle.ai): a prep conv, then three stages (conv,
batch norm, ReLU, max-pool 2; stages 1 and 3 add a residual pair of convs), a global max-pool
and a linear head whose output is scaled by 1/8. ``tta_flip=True`` averages the logits of each
image and its mirror image in eval mode (test-time flip, as airbench does), so the trainer's
ordinary evaluation reports the flip-averaged accuracy; training is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        scale: float = 0.125,
        tta_flip: bool = False,
    ) -> None:
        super().__init__()
        w0, w1, w2, w3 = (int(w) for w in widths)
        self.features = nn.Sequential(
            conv_bn(in_chans, w0),
            conv_bn(w0, w1),
            nn.MaxPool2d(2),
            Residual(w1),
            conv_bn(w1, w2),
            nn.MaxPool2d(2),
            conv_bn(w2, w3),
            nn.MaxPool2d(2),
            Residual(w3),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(w3, num_classes, bias=False)
        self.scale, self.tta_flip = scale, tta_flip

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta_flip and not self.training:
            return 0.5 * (self.logits(x) + self.logits(x.flip(-1)))
        return self.logits(x)


def resnet9(num_classes: int, in_chans: int, img_size: int, **kwargs) -> nn.Module:
    """model_kwargs: widths (4 numbers), scale (of the logits), tta_flip (eval-mode mirror average)."""
    return ResNet9(num_classes, in_chans, **kwargs)
