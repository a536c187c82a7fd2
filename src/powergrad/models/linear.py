"""The two flat models: softmax regression and a one-hidden-layer MLP, on raw pixels."""

from __future__ import annotations

from torch import nn


class SoftmaxRegression(nn.Sequential):
    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_features, num_classes)


class MLP(nn.Sequential):
    def __init__(self, num_classes: int, in_features: int, hidden: int = 256) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes)


def softmax_regression(num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    return SoftmaxRegression(num_classes, in_chans * img_size * img_size)


def mlp(num_classes: int, in_chans: int, img_size: int, hidden: int = 256) -> nn.Module:
    """model_kwargs: hidden (width of the hidden layer)."""
    return MLP(num_classes, in_chans * img_size * img_size, hidden)
