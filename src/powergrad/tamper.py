"""Softmax Gradient Tampering (SGT), a.k.a. the PowerGrad Transform (PGT).

Forward: ordinary cross-entropy, the value a user logs and compares.
Backward: the softmax p in the logits' gradient (p - q) is replaced by

    p'_i = p_i**alpha / sum_j p_j**alpha  ==  softmax(alpha * z)_i

because p_i is proportional to exp(z_i). Computing softmax(alpha * z) directly never forms a
power of a probability, so it is exact for any alpha, stable for logits of any size, and costs
one softmax. The incoming gradient (loss scale, accumulation factor, a user's multiplier) is
applied as is, so the result does not depend on the loss scale, unlike the official hook
(see :mod:`powergrad.reference`).

alpha = 1 is plain cross-entropy; alpha = 0 sends 1/C - q; 0 < alpha < 1 is the paper's range;
alpha > 1 sharpens p and is outside the paper (allowed, untested by it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["power_grad_cross_entropy", "PowerGradLoss", "check_alpha"]

_REDUCTIONS = ("mean", "sum", "none")


def check_alpha(alpha: float) -> float:
    """Return alpha as a float, or raise ValueError naming the bad value."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(a) or a < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return a


class _PowerGradCrossEntropy(torch.autograd.Function):
    """Cross-entropy value forward, (softmax(alpha z) - q) backward, on 2-D float32 logits."""

    @staticmethod
    def forward(ctx, logits, target, alpha, label_smoothing, reduction, ignore_index):
        # The value is F.cross_entropy's own, so it matches it to the last bit.
        loss = F.cross_entropy(
            logits, target, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
        ctx.save_for_backward(logits, target)
        ctx.alpha, ctx.label_smoothing = alpha, label_smoothing
        ctx.reduction, ctx.ignore_index = reduction, ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        logits, target = ctx.saved_tensors
        alpha, ls, reduction = ctx.alpha, ctx.label_smoothing, ctx.reduction
        n, c = logits.shape
        grad = torch.softmax(logits * alpha if alpha != 1.0 else logits, dim=1)  # p'
        if target.is_floating_point():  # soft targets, smoothed as F.cross_entropy does
            q = target if ls == 0 else target * (1.0 - ls) + ls / c
            grad.sub_(q)
            weight = None
        else:
            valid = target != ctx.ignore_index
            safe = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
            if ls:
                grad.sub_(ls / c)
            grad.scatter_add_(1, safe, torch.full_like(safe, -(1.0 - ls), dtype=grad.dtype))
            weight = valid
        if weight is not None and not bool(weight.all()):
            grad.mul_(weight.unsqueeze(1))
        if reduction == "none":
            grad.mul_(grad_out.unsqueeze(1))
        elif reduction == "mean":
            count = n if weight is None else weight.sum().clamp_min(1)
            grad.mul_(grad_out / count)
        else:
            grad.mul_(grad_out)
        return grad, None, None, None, None, None


def power_grad_cross_entropy(
    logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Cross-entropy whose gradient on the logits is ``softmax(alpha * logits) - q``.

    Args:
        logits: ``(N, C)`` or ``(N, C, d1, ...)`` unnormalised scores, any float dtype.
        target: class indices ``(N, ...)`` or a probability distribution per row (same shape
            as ``logits``), as for :func:`torch.nn.functional.cross_entropy`.
        alpha: power applied to the softmax in the backward pass (1 = plain cross-entropy).
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        ignore_index: target index that contributes neither loss nor gradient.

    Returns:
        The loss, equal to ``F.cross_entropy(logits, target, ...)`` computed in float32 for
        low-precision logits; the gradient returned to ``logits`` has their dtype.
    """
    alpha = check_alpha(alpha)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, C, ...), got {tuple(logits.shape)}")
    if alpha == 1.0:  # exactly plain cross-entropy: let PyTorch do it
        return F.cross_entropy(
            logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
            target, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )

    # Work on (N*d, C) rows in float32; autocast is switched off so it cannot re-cast them.
    extra = logits.shape[2:]
    z = logits.movedim(1, -1).reshape(-1, logits.shape[1]) if extra else logits
    t = target
    if extra:
        t = target.movedim(1, -1).reshape(z.shape) if target.is_floating_point() else target.reshape(-1)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        zf = z if z.dtype == torch.float32 or z.dtype == torch.float64 else z.float()
        tf = t.to(zf.dtype) if t.is_floating_point() else t
        loss = _PowerGradCrossEntropy.apply(
            zf, tf, alpha, float(label_smoothing), reduction, ignore_index
        )
    if extra and reduction == "none":
        loss = loss.reshape(logits.shape[0], *extra)
    return loss


class PowerGradLoss(nn.Module):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` with softmax gradient tampering.

    Tampers only in training mode (``loss.train()``, the default); in eval mode it is plain
    cross-entropy, so validation losses stay comparable with alpha = 1 runs.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return power_grad_cross_entropy(
            logits, target, alpha=self.alpha if self.training else 1.0,
            label_smoothing=self.label_smoothing, reduction=self.reduction,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, label_smoothing={self.label_smoothing}"
