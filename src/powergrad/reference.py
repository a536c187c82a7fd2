"""The official code's gradient hook, kept as a reference for tests and benchmarks only.

Never use this for training. It re-creates the approach of the official implementation
(a 2021 fork of timm) from its description: a hook on the logits that tries to recover p from
the incoming gradient, ``g = grad / N; p = g + q; p = p**alpha; p /= p.sum(-1);
return (p - q) * N``. The recovery is only right when the gradient reaching the logits carries a
factor of exactly N**2 (N = per-device batch), which the official recipe met by coincidence (AMP
loss scale 2**16 with 256 images per GPU). At loss scale 1 it is wrong by orders of magnitude;
at 2 N**2 it recovers 2p - q, which goes negative and gives NaN under a fractional power.
:func:`powergrad.power_grad_cross_entropy` is exact at any scale.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["official_hook_cross_entropy"]


def _target_distribution(target: Tensor, num_classes: int, label_smoothing: float) -> Tensor:
    q = F.one_hot(target, num_classes).float() if not target.is_floating_point() else target
    return q * (1.0 - label_smoothing) + label_smoothing / num_classes


def official_hook_cross_entropy(
    logits: Tensor, target: Tensor, alpha: float, label_smoothing: float = 0.0
) -> Tensor:
    """Mean cross-entropy whose logits carry the official (scale-dependent) tampering hook."""
    n, c = logits.shape
    q = _target_distribution(target, c, label_smoothing).to(logits.dtype)

    def hook(grad: Tensor) -> Tensor:
        p = grad / n + q  # right only if grad == (p - q) * n: a loss scale of exactly n**2
        p = p**alpha
        p = p / p.sum(-1, keepdim=True)
        return (p - q) * n

    z = logits.view_as(logits)  # a fresh node, so the hook sees only this loss's gradient
    if z.requires_grad:
        z.register_hook(hook)
    return F.cross_entropy(z, target, label_smoothing=label_smoothing)
