"""Cheap read-only views of a model's weights for the monitors and the paper's figures."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def filter_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-filter (output channel) L2 norm of every Conv2d weight, keyed by the conv's name.

    Float32 tensors on the weights' device; a filter whose norm collapses to ~0 is "dead"
    (the paper's zeroed-out filters in BN-free nets).
    """
    return {
        name: m.weight.detach().float().flatten(1).norm(dim=1)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
