"""Linear probe (``probe_layer=NAME``): softmax regression on a frozen model's features at one layer.

Seed 002 probed ResNet-18 at its last conv layer, at an intermediate one and on the raw input.
Features are globally average-pooled (a 4-D map becomes one number per channel, the usual
linear-probe practice) and fed to one nn.Linear named ``fc``; ``probe_layer=input`` probes the
flattened pixels instead (pooling them would leave one number per colour).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..errors import UserError


class Probe(nn.Module):
    def __init__(self, backbone: nn.Module, layer: str, num_classes: int, in_chans: int, img_size: int) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.layer = layer
        self._feats: torch.Tensor | None = None
        if layer != "input":
            names = [n for n, _ in backbone.named_modules() if n]
            if layer not in names:
                close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; layers include {', '.join(names[:5])}, ..."
                raise UserError(f"probe_layer: no layer {layer!r} in the model{hint}")
            backbone.get_submodule(layer).register_forward_hook(self._keep)
        with torch.no_grad():  # one dry run sizes the linear layer
            dim = self.features(torch.zeros(1, in_chans, img_size, img_size)).shape[1]
        self.fc = nn.Linear(dim, num_classes)

    def train(self, mode: bool = True) -> Probe:
        # The probed network is fixed: its BN statistics and dropout stay in eval mode always.
        super().train(mode)
        self.backbone.eval()
        return self

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._feats = output

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer == "input":
            return torch.flatten(x, 1)
        # The whole backbone runs (simple and works for any model); without grad it is cheap
        # next to training it.
        with torch.no_grad():
            self.backbone(x)
        f, self._feats = self._feats, None
        if not isinstance(f, torch.Tensor):
            raise UserError(f"probe_layer: layer {self.layer!r} does not output one tensor")
        return f.mean(dim=(2, 3)) if f.ndim == 4 else torch.flatten(f, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
