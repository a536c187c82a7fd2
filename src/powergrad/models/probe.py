"""Linear probe (``probe_layer=NAME``): softmax regression on a frozen model's features at one layer.

Seed 002 probed ResNet-18 at its last conv layer, at an intermediate one and on the raw input.
The probe is ``fc((pool(features) - feat_mean) / feat_std)``:

- features come from a forward hook on the named module; the hook stops the forward pass there,
  so probing ``layer2`` costs the network up to ``layer2`` only;
- ``pool``: ``avg`` averages a 4-D map over space (a 3-D token map over tokens), the usual
  linear-probe practice; ``flatten`` keeps every number; ``auto`` is avg for layers and flatten
  for ``probe_layer=input`` (averaging pixels would leave one number per colour);
- ``feat_mean`` / ``feat_std`` are buffers: zero and one until the probe workflow
  (powergrad.probe) sets them from the training set. Unscaled features are what kept seed
  002's intermediate probe at 10% (docs/workflows.md).

``head_module()`` is the part that trains: the same ``fc`` and buffers without the backbone, fed
with cached features. Its state dict is the probe's state dict minus ``backbone.*``.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..errors import UserError

POOLS = ("auto", "avg", "flatten")


class _StopForward(Exception):
    """Raised by the hook once the probed layer has run: the rest of the network is not needed."""


def layer_names(model: nn.Module, depth: int = 2) -> list[str]:
    """Module names up to ``depth`` dots deep (``layer3``, ``layer3.1``, ``features.16``), for messages."""
    return [n for n, _ in model.named_modules() if n and n.count(".") < depth]


def unknown_layer(layer: str, model: nn.Module) -> UserError:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
    shown = layer_names(model)
    listing = ", ".join(shown[:60]) + (
        f", ... ({len(names)} modules in all)" if len(shown) > 60 or len(names) > len(shown) else ""
    )
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    return UserError(
        f"probe_layer: no layer {layer!r} in the model; {hint}valid names: input, {listing}"
    )


def pool_features(f: torch.Tensor, pool: str, is_input: bool) -> torch.Tensor:
    """(N, ...) layer output -> (N, D) features."""
    if pool == "auto":
        pool = "flatten" if is_input else "avg"
    if pool == "avg" and f.ndim == 4:
        return f.mean(dim=(2, 3))
    if pool == "avg" and f.ndim == 3:  # (N, tokens, C): timm ViT blocks
        return f.mean(dim=1)
    return torch.flatten(f, 1)


class ProbeHead(nn.Module):
    """Standardise, then one linear layer: what trains on cached features."""

    feat_mean: torch.Tensor  # buffers, declared for type checkers
    feat_std: torch.Tensor

    def __init__(self, fc: nn.Linear, feat_mean: torch.Tensor, feat_std: torch.Tensor) -> None:
        super().__init__()
        self.fc = fc
        self.register_buffer("feat_mean", feat_mean)
        self.register_buffer("feat_std", feat_std)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc((f - self.feat_mean) / self.feat_std)


class Probe(nn.Module):
    feat_mean: torch.Tensor  # buffers, declared for type checkers
    feat_std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        layer: str,
        num_classes: int,
        in_chans: int,
        img_size: int,
        pool: str = "auto",
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise UserError(f"probe_pool: must be one of {', '.join(POOLS)}; got {pool!r}")
        self.backbone = backbone.eval().requires_grad_(False)
        self.layer, self.pool = layer, pool
        self._feats: torch.Tensor | None = None
        if layer != "input":
            if layer not in dict(backbone.named_modules()) or not layer:
                raise unknown_layer(layer, backbone)
            backbone.get_submodule(layer).register_forward_hook(self._keep)
        with torch.no_grad():  # one dry run sizes the linear layer
            dim = self.features(torch.zeros(1, in_chans, img_size, img_size)).shape[1]
        self.fc = nn.Linear(dim, num_classes)
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))

    def train(self, mode: bool = True) -> Probe:
        # The probed network is fixed: its BN statistics and dropout stay in eval mode always.
        super().train(mode)
        self.backbone.eval()
        return self

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._feats = output
        raise _StopForward

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, unstandardised features of a batch of images: (N, D)."""
        if self.layer == "input":
            return pool_features(x, self.pool, is_input=True)
        try:
            self.backbone(x)
        except _StopForward:
            pass
        f, self._feats = self._feats, None
        if not isinstance(f, torch.Tensor):
            raise UserError(f"probe_layer: layer {self.layer!r} does not output one tensor")
        return pool_features(f, self.pool, is_input=False)

    def head_module(self) -> ProbeHead:
        """The trainable part, sharing this probe's fc and standardisation buffers."""
        return ProbeHead(self.fc, self.feat_mean, self.feat_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.features(x) - self.feat_mean) / self.feat_std)
