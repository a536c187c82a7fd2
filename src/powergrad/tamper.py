"""Softmax Gradient Tampering (SGT), a.k.a. the PowerGrad Transform (PGT).

Forward: ordinary cross-entropy, the value a user logs and compares (``F.cross_entropy``'s own,
to the last bit). Backward: cross-entropy's own gradient on the logits with the softmax p
replaced by

    p'_i = p_i**alpha / sum_j p_j**alpha  ==  softmax(alpha * z)_i

because p_i is proportional to exp(z_i). Computing softmax(alpha * z) directly never forms a
power of a probability, so it is exact for any alpha, stable for logits of any size, and costs
one softmax. The incoming gradient (loss scale, accumulation factor, a user's multiplier) is
applied as is, so the result does not depend on the loss scale, unlike the official hook
(see :mod:`powergrad.reference`).

alpha = 1 is plain cross-entropy; alpha = 0 sends the uniform distribution in place of p;
0 < alpha < 1 is the paper's range; alpha > 1 sharpens p and is outside the paper (allowed,
untested by it).

The gradient, derived from PyTorch's definition of ``F.cross_entropy``
-----------------------------------------------------------------------
Write l = log_softmax(z) for one row (one sample, or one pixel of an (N, C, d...) input),
w for the class weights (all ones when ``weight`` is None), e for the label smoothing and C for
the number of classes. PyTorch defines, for a class index y (ATen ``cross_entropy``, label
smoothing branch):

    L_row = v * [ (1 - e) * w_y * (-l_y)  +  (e / C) * sum_c w_c * (-l_c) ]

with v = 0 where y == ignore_index (the row then counts nowhere) and 1 elsewhere; and for a
target distribution q (a "soft" target; no ignore_index):

    L_row = -sum_c w_c * q'_c * l_c,      q' = (1 - e) * q + e / C.

Both are L_row = -sum_c u_c * l_c for a non-negative row vector u:

    index target:  u = (1 - e) * w_y * onehot(y) + (e / C) * w       (times v)
    soft target:   u = w * q'

Since d(-l_c)/dz_j = p_j - [c == j], the row's gradient is

    dL_row / dz = m * p - u,      m = sum_c u_c
    (index target: m = (1 - e) * w_y + (e / C) * sum_c w_c;  unweighted, normalised: m = 1).

The reductions multiply each row by s: ``"none"`` by the incoming gradient of that row,
``"sum"`` by the incoming gradient, ``"mean"`` by the incoming gradient divided by
W = sum over rows of v * w_y for index targets (PyTorch's weighted mean, which divides the
smoothing term by the same W) and by the number of rows for soft targets (PyTorch does not
weight that mean). The tampered gradient is this with p replaced by p':

    g_row = s * (m * p' - u).

At alpha = 1 it is cross-entropy's gradient; without weights and smoothing it is
s * (p' - onehot(y)). When every row is ignored, W = 0: PyTorch's loss is NaN and its gradient
zero, and so is this one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["power_grad_cross_entropy", "PowerGradLoss", "check_alpha"]

_REDUCTIONS = ("mean", "sum", "none")

# Up to this many classes, softmax(alpha * z) runs on the transposed view (softmax over dim 0
# of z.T: the same numbers through PyTorch's strided kernel, which vectorises across rows).
# PyTorch's last-dim kernel is slow on short rows that are not a multiple of the vector width:
# 256 x 10: 8.9 us against 40.6 us; 4096 x 10: 92 vs 559 us; 256 x 33: 17.7 vs 24.0 us; from
# 64 classes on it loses (256 x 64: 24.8 vs 14.0 us; 4096 x 1000: 12.7 vs 3.2 ms). CPU time,
# 1 thread, minimum over 20-300 calls, under load.
_TRANSPOSED_MAX_C = 40


def check_alpha(alpha: float) -> float:
    """Return alpha as a float, or raise ValueError naming the bad value."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(a) or a < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return a


def _tampered_softmax(z: Tensor, alpha: float) -> Tensor:
    """p' = softmax(alpha * z) over dim 1 of (M, C) rows, in a fresh buffer."""
    if z.shape[1] <= _TRANSPOSED_MAX_C:
        # Row-major again: a transposed gradient is cloned by autograd's AccumulateGrad anyway,
        # and in-place ops on it are slower (256 x 10, whole step: 93 against 99 us).
        return torch.softmax(torch.mul(z, alpha).T, 0).T.contiguous()
    p = torch.mul(z, alpha)
    # In place: one (M, C) buffer instead of two. Whole step at 4096 x 1000: 1.10x against 1.22x
    # cross-entropy's CPU time (1 thread, interleaved, under load).
    return torch.softmax(p, 1, out=p)


def _row_scale(grad_out: Tensor, reduction: str, counted: Tensor, total: Tensor | int) -> Tensor:
    """s, shape (M, 1): d(loss) / d(L_row). counted: v (0 on ignored rows); total: W for "mean"."""
    s = (grad_out.reshape(-1) if reduction == "none" else grad_out) * counted
    if reduction == "mean":
        s = s / total
    return s.unsqueeze(1)


def _index_target_grad(
    p: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ls: float,
    ignore_index: int,
    grad_out: Tensor,
    reduction: str,
) -> Tensor:
    """s * (m * p' - u) for class indices, in place on p = p' (see the module docstring)."""
    c = p.shape[1]
    valid = target != ignore_index
    # Ignored rows have s = 0; any class index will do for them in the scatter below.
    safe = target.where(valid, 0).unsqueeze(1)
    if weight is None:  # m = 1, u = (1 - e) * onehot + e / C
        # W = number of counted rows; none counted: zero gradient, as PyTorch (a tensor op: no sync).
        s = _row_scale(
            grad_out, reduction, valid, valid.sum().clamp_min(1) if reduction == "mean" else 1
        )
        p.mul_(s)
        if ls:
            p.sub_(s * (ls / c))
        return p.scatter_add_(1, safe, s * -(1.0 - ls))
    w_y = weight[safe.squeeze(1)] * valid
    total = (
        w_y.sum()
    )  # W; 0 only if no counted row has weight: divide by 1 then, as when unweighted
    s = _row_scale(grad_out, reduction, valid, total + (total == 0))
    hot = (1.0 - ls) * w_y.unsqueeze(1)
    p.mul_(s * (hot + (ls / c) * weight.sum()))  # s * m
    if ls:
        p.addcmul_(s, weight, value=-ls / c)
    return p.scatter_add_(1, safe, -(s * hot))


def _prob_target_grad(
    p: Tensor, q: Tensor, weight: Tensor | None, ls: float, grad_out: Tensor, reduction: str
) -> Tensor:
    """s * (m * p' - u) for target distributions, in place on p = p'."""
    rows, c = p.shape
    s = (
        grad_out.reshape(-1, 1)
        if reduction == "none"
        else grad_out / rows
        if reduction == "mean"
        else grad_out
    )
    if weight is not None:
        u = (q if not ls else q * (1.0 - ls) + ls / c) * weight
        return p.mul_(u.sum(1, keepdim=True) * s).addcmul_(u, s, value=-1.0)
    # Unweighted, u = (1 - e) * q + e / C is never built: m = (1 - e) * sum(q) + e (1 for
    # normalised targets, as mixup's and cutmix's are; it costs one read of q). Two or three
    # passes over p instead of five with u built and sub_/mul_ (4096 x 1000: 2.1 against 3.9 ms
    # without smoothing; CPU time, 1 thread, minimum of 30, under load).
    m = q.sum(1, keepdim=True) * (1.0 - ls) + ls
    p.mul_(m * s).addcmul_(q, s, value=-(1.0 - ls))
    return p.sub_(s * (ls / c)) if ls else p


def _as_rows(x: Tensor, classes: bool) -> Tensor:
    """(N, C, d...) -> (N*d..., C) if classes, (N, d...) -> (N*d...,) otherwise; (C,) -> (1, C)."""
    if x.dim() == (1 if classes else 0):  # unbatched
        return x.reshape(1, -1) if classes else x.reshape(1)
    if classes:
        return x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() > 2 else x
    return x.reshape(-1)


class _PowerGradCrossEntropy(torch.autograd.Function):
    """F.cross_entropy forward; s * (m * softmax(alpha z) - u) backward."""

    @staticmethod
    def forward(ctx, logits, target, weight, alpha, label_smoothing, reduction, ignore_index):
        # Nothing but the inputs is saved: the backward needs no (N, C) array of the forward.
        ctx.save_for_backward(logits, target, weight)
        ctx.options = (alpha, label_smoothing, reduction, ignore_index)
        return F.cross_entropy(
            logits,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )

    @staticmethod
    def backward(ctx, grad_out):
        logits, target, weight = ctx.saved_tensors
        alpha, ls, reduction, ignore_index = ctx.options
        z = _as_rows(logits, classes=True)
        p = _tampered_softmax(z, alpha)
        if target.is_floating_point():
            grad = _prob_target_grad(
                p, _as_rows(target, classes=True), weight, ls, grad_out, reduction
            )
        else:
            grad = _index_target_grad(
                p, _as_rows(target, classes=False), weight, ls, ignore_index, grad_out, reduction
            )
        if logits.dim() > 2:  # back to (N, C, d...)
            grad = grad.reshape(logits.shape[0], *logits.shape[2:], logits.shape[1]).movedim(-1, 1)
        return grad.reshape(logits.shape), None, None, None, None, None, None


def power_grad_cross_entropy(
    logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    weight: Tensor | None = None,
) -> Tensor:
    """Cross-entropy whose gradient on the logits has softmax(alpha * logits) in place of p.

    Args:
        logits: ``(N, C)``, ``(N, C, d1, ...)`` or unbatched ``(C,)`` unnormalised scores, any
            float dtype. As for ``F.cross_entropy``, input of two or more dimensions is batched:
            an unbatched ``(C, d1, ...)`` cannot be told from ``(N, C, ...)``.
        target: class indices ``(N, ...)`` (a scalar for unbatched logits) or a probability
            distribution per row (same shape as ``logits``), as for
            :func:`torch.nn.functional.cross_entropy`.
        alpha: power applied to the softmax in the backward pass (1 = plain cross-entropy).
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        ignore_index: target index that contributes neither loss nor gradient.
        weight: optional class weights ``(C,)``, as in :func:`torch.nn.functional.cross_entropy`.

    Returns:
        The loss, equal to ``F.cross_entropy(logits, target, ...)`` computed in float32 for
        low-precision logits; the gradient returned to ``logits`` has their dtype.
    """
    alpha = check_alpha(alpha)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if logits.dim() < 1:
        raise ValueError(
            f"logits must have shape (C,), (N, C) or (N, C, ...), got {tuple(logits.shape)}"
        )
    # fp32 inside for bf16/fp16 logits (autograd casts the gradient back); autocast is switched
    # off so that it cannot re-cast them.
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    t = target.to(z.dtype) if target.is_floating_point() else target
    w = weight.to(z.dtype) if weight is not None else None
    if torch.is_autocast_enabled(z.device.type):  # entering the context costs ~3 us: only when on
        with torch.autocast(device_type=z.device.type, enabled=False):
            return _cross_entropy(z, t, w, alpha, float(label_smoothing), reduction, ignore_index)
    return _cross_entropy(z, t, w, alpha, float(label_smoothing), reduction, ignore_index)


def _cross_entropy(
    z: Tensor,
    t: Tensor,
    w: Tensor | None,
    alpha: float,
    ls: float,
    reduction: str,
    ignore_index: int,
) -> Tensor:
    if alpha == 1.0 or not (z.requires_grad and torch.is_grad_enabled()):
        # Exactly plain cross-entropy (or no gradient wanted): let PyTorch do it.
        return F.cross_entropy(
            z, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=ls
        )
    return _PowerGradCrossEntropy.apply(z, t, w, alpha, ls, reduction, ignore_index)


class PowerGradLoss(nn.Module):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` with softmax gradient tampering.

    Tampers only in training mode (``loss.train()``, the default); in eval mode it is plain
    cross-entropy, so validation losses stay comparable with alpha = 1 runs. ``weight`` is a
    buffer, as in ``nn.CrossEntropyLoss``, so it follows ``.to(device)``.
    """

    weight: Tensor | None

    def __init__(
        self,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return power_grad_cross_entropy(
            logits,
            target,
            alpha=self.alpha if self.training else 1.0,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            weight=self.weight,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, label_smoothing={self.label_smoothing}"
