"""Softmax Gradient Tampering (SGT), a.k.a. the PowerGrad Transform (PGT).

Forward: ordinary cross-entropy, the value a user logs and compares (``F.cross_entropy``'s own,
to the last bit: PyTorch's ops in PyTorch's order on a log-softmax the forward keeps, as
cross-entropy's autograd keeps it). Backward: cross-entropy's own gradient on the logits with the
softmax p replaced by

    p'_i = p_i**alpha / sum_j p_j**alpha  ==  softmax(alpha * z)_i

because p_i is proportional to exp(z_i). Computing softmax(alpha * z) directly never forms a
power of a probability, so it is exact for any alpha, stable for logits of any size, and costs
one softmax. The incoming gradient (loss scale, accumulation factor, a user's multiplier) is
applied as is, so the result does not depend on the loss scale, unlike the official hook
(see :mod:`powergrad.reference`).

On the CPU, unweighted (N, C) float logits go through the same loss written as one C++ autograd
op (:mod:`powergrad.kernels`: the same forward ops, a fused backward); the autograd.Function
below is everything else (GPUs, class weights, (N, C, d...) input) and the reference the op is
tested against. Under torch.func's transforms (``grad``; ``vmap`` for per-sample gradients) a
second Function runs, as they require, without the in-place buffer reuse; a transform over
``grad`` (``jacrev(grad(...))``) differentiates the tampered gradient field itself.

alpha = 1 is plain cross-entropy; alpha = 0 sends the uniform distribution in place of p (over
the classes whose logit is finite: the limit alpha -> 0+, so a class masked with -inf stays out);
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

from powergrad.kernels import cpu_loss

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


def _per_class(w: Tensor, dim: int) -> Tensor:
    """Class weights (C,) as (1, C, 1, ...): broadcast over dim-dimensional (N, C, d...) rows."""
    return w.view(1, -1, *([1] * (dim - 2)))


def _cross_entropy_from_log_probs(
    log_p: Tensor, t: Tensor, w: Tensor | None, ls: float, reduction: str, ignore_index: int
) -> Tensor:
    """F.cross_entropy(z, ...) from log_p = log_softmax(z, 1), to the last bit.

    The same ATen ops in the same order as PyTorch's own composition of ``cross_entropy``
    (``aten/src/ATen/native/LossNLL.cpp``: the plain, label-smoothing and probability-target
    branches); tests/test_tamper.py compares the two with ``torch.equal`` on every branch.
    """
    c = log_p.shape[1]
    w_b = None if w is None else _per_class(w, log_p.dim())
    if t.is_floating_point():  # class probabilities
        q = t * (1 - ls) + ls / c if ls > 0 else t
        terms = log_p * q if w_b is None else log_p * q * w_b
        if reduction == "none":
            return -terms.sum(1)
        if reduction == "sum":
            return -terms.sum()
        return -terms.sum() / (log_p.numel() // c)
    nll = F.nll_loss(log_p, t, w, ignore_index=ignore_index, reduction=reduction)
    if ls == 0:
        return nll
    smooth = -log_p.sum(1) if w_b is None else -(log_p * w_b).sum(1)
    ignored = t == ignore_index
    smooth.masked_fill_(ignored, 0.0)
    if reduction == "mean":
        if w is None:
            total = (~ignored).sum()
        else:
            # (PyTorch 2.4 selected the counted rows' weights with masked_select, a host sync
            # on a GPU; later releases zero the ignored ones, as here.)
            total = w.gather(0, t.masked_fill(ignored, 0).flatten())
            total = total.masked_fill_(ignored.flatten(), 0).sum()
        smooth = smooth.sum() / total
    elif reduction == "sum":
        smooth = smooth.sum()
    return (1 - ls) * nll + smooth * (ls / c)


def _tampered_softmax_(log_p: Tensor, alpha: float) -> Tensor:
    """softmax(alpha * z) over dim 1, written over log_p = log_softmax(z, 1) (no new buffer).

    softmax(alpha * log_p) = softmax(alpha * z): the two differ by a constant in each row.
    In place on the forward's own buffer because a fresh (N, C) buffer costs its page faults on
    every step (4096 x 1000 fp32: torch.mul into a new buffer 4.1 ms against 0.56 ms in place;
    CPU, 1 thread, under load); the whole step went from 1.31x to 1.09x cross-entropy (default
    case, 2 threads, quiet; docs/performance.md).
    """
    if alpha == 0:  # the limit alpha -> 0+: 0 for the finite, -inf stays (0 * -inf is NaN)
        p = log_p.masked_fill_(log_p > -math.inf, 0.0)
    else:
        p = log_p.mul_(alpha)
    if torch.compiler.is_compiling() or _functorch_active():  # dynamo and vmap refuse out= on
        return torch.softmax(p, 1)  # a strided view; they choose the buffers themselves
    if p.dim() == 2 and p.shape[1] <= _TRANSPOSED_MAX_C:
        return torch.softmax(p.T, 0, out=p.T).T
    return torch.softmax(p, 1, out=p)


def _index_target_grad_(
    p: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ls: float,
    ignore_index: int,
    grad_out: Tensor,
    reduction: str,
) -> Tensor:
    """s * (m * p' - u) for class indices, in place on p = p' (see the module docstring).

    p is (N, C, d...) and target (N, d...); s and the per-row factors broadcast as (N, 1, d...).
    """
    c = p.shape[1]
    valid = target != ignore_index
    # Ignored rows have s = 0; any class index will do for them in the scatter below.
    safe = target.where(valid, 0).unsqueeze(1)
    s = grad_out * valid  # d(loss) / d(L_row), 0 on ignored rows
    if weight is None:  # m = 1, u = (1 - e) * onehot + e / C
        if reduction == "mean":  # W = number of counted rows (a tensor op: no host sync)
            s = s / valid.sum().clamp_min(1)
        s = s.unsqueeze(1)
        p.mul_(s)
        if ls:
            p.sub_(s * (ls / c))
        return p.scatter_add_(1, safe, s * -(1.0 - ls))
    w_y = weight[safe.squeeze(1)] * valid
    if reduction == "mean":  # W; 0 only if no counted row has weight: divide by 1 then
        total = w_y.sum()
        s = s / (total + (total == 0))
    s = s.unsqueeze(1)
    hot = (1.0 - ls) * w_y.unsqueeze(1)
    p.mul_(s * (hot + (ls / c) * weight.sum()))  # s * m
    if ls:
        p.addcmul_(s, _per_class(weight, p.dim()), value=-ls / c)
    return p.scatter_add_(1, safe, -(s * hot))


def _prob_target_grad_(
    p: Tensor, q: Tensor, weight: Tensor | None, ls: float, grad_out: Tensor, reduction: str
) -> Tensor:
    """s * (m * p' - u) for target distributions, in place on p = p'; p and q are (N, C, d...)."""
    c = p.shape[1]
    s = grad_out.unsqueeze(1) if reduction == "none" else grad_out
    if reduction == "mean":
        s = grad_out / (p.numel() // c)
    if weight is not None:
        u = (q if not ls else q * (1.0 - ls) + ls / c) * _per_class(weight, p.dim())
        return p.mul_(u.sum(1, keepdim=True) * s).addcmul_(u, s, value=-1.0)
    # Unweighted, u = (1 - e) * q + e / C is never built: m = (1 - e) * sum(q) + e (1 for
    # normalised targets, as mixup's and cutmix's are; it costs one read of q). Two or three
    # passes over p instead of five with u built and sub_/mul_ (4096 x 1000: 2.1 against 3.9 ms
    # without smoothing; CPU time, 1 thread, minimum of 30, under load).
    m = q.sum(1, keepdim=True) * (1.0 - ls) + ls
    p.mul_(m * s).addcmul_(q, s, value=-(1.0 - ls))
    return p.sub_(s * (ls / c)) if ls else p


class _PowerGradCrossEntropy(torch.autograd.Function):
    """F.cross_entropy forward; s * (m * softmax(alpha z) - u) backward.

    Batched input only ((N, C) or (N, C, d...)); the caller gives unbatched input a batch of 1.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, alpha, label_smoothing, reduction, ignore_index):
        log_p = torch.log_softmax(logits, 1)
        # The backward writes the gradient over log_p (cross-entropy's autograd keeps the same
        # buffer). It is held on ctx, not saved: a second backward (retain_graph=True) finds it
        # spent and recomputes it from the logits. Memory until the backward: log_p and the
        # logits, one (N, C) array more than cross-entropy holds if nothing else keeps the
        # logits alive (a training loop's `output` variable usually does).
        ctx.log_p = log_p
        ctx.save_for_backward(logits, target, weight)
        ctx.options = (alpha, label_smoothing, reduction, ignore_index)
        return _cross_entropy_from_log_probs(
            log_p, target, weight, label_smoothing, reduction, ignore_index
        )

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # the tampered backward is not the forward's gradient
            raise RuntimeError(
                "power_grad_cross_entropy has no second derivative: backward with "
                "create_graph=True is not supported"
            )
        logits, target, weight = ctx.saved_tensors
        alpha, ls, reduction, ignore_index = ctx.options
        log_p, ctx.log_p = ctx.log_p, None
        if log_p is None:  # a second backward through the same graph
            log_p = torch.log_softmax(logits, 1)
        p = _tampered_softmax_(log_p, alpha)
        if target.is_floating_point():
            grad = _prob_target_grad_(p, target, weight, ls, grad_out, reduction)
        else:
            grad = _index_target_grad_(p, target, weight, ls, ignore_index, grad_out, reduction)
        return grad, None, None, None, None, None, None


class _PowerGradCrossEntropyFunc(torch.autograd.Function):
    """The same loss under torch.func's transforms (grad, vjp, vmap: per-sample gradients).

    They need ``setup_context`` and no tensor held on ctx that is not saved, so this backward
    recomputes log_p from the saved logits instead of reusing the forward's buffer (the speed
    trick of the class above). ``generate_vmap_rule``: vmap runs the same ops per sample.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, alpha, label_smoothing, reduction, ignore_index):
        log_p = torch.log_softmax(logits, 1)
        return _cross_entropy_from_log_probs(
            log_p, target, weight, label_smoothing, reduction, ignore_index
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, *options = inputs
        ctx.save_for_backward(logits, target, weight)
        ctx.options = tuple(options)

    @staticmethod
    def backward(ctx, grad_out):
        logits, target, weight = ctx.saved_tensors
        alpha, ls, reduction, ignore_index = ctx.options
        # Fresh buffers at each step (clone): a transform over this backward (jacrev of grad)
        # differentiates it, and autograd needs the softmax's output as it was.
        p = _tampered_softmax_(torch.log_softmax(logits, 1).clone(), alpha).clone()
        if target.is_floating_point():
            grad = _prob_target_grad_(p, target, weight, ls, grad_out, reduction)
        else:
            grad = _index_target_grad_(p, target, weight, ls, ignore_index, grad_out, reduction)
        return grad, None, None, None, None, None, None


def _functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is running: its tensors are wrappers
    that neither the C++ op nor ``out=`` into a view accept."""
    return torch._C._are_functorch_transforms_active()


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

    Without a gradient to take (``torch.no_grad``, ``torch.inference_mode``, or logits that do
    not require grad) it is ``F.cross_entropy`` itself, so validation needs nothing special.

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
    # Class indices as int64 whatever their integer type (F.cross_entropy also takes uint8).
    if target.is_floating_point():
        t = target.to(z.dtype)
    else:
        t = target if target.dtype == torch.int64 else target.long()
    w = weight.to(z.dtype) if weight is not None else None
    device_type = "cpu" if z.is_cpu else z.device.type  # (z.device alone costs 0.3 us a call)
    if torch.is_autocast_enabled(device_type):  # entering the context costs ~3 us: only when on
        with torch.autocast(device_type=device_type, enabled=False):
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
    soft = t.is_floating_point()
    if (
        alpha == 1.0
        or not (z.requires_grad and torch.is_grad_enabled())
        or z.numel() == 0  # nothing to tamper with (and C = 0 is PyTorch's to judge)
        or (soft and (t.shape != z.shape or ignore_index >= 0))
    ):
        # Exactly plain cross-entropy, no gradient wanted, empty input, or input PyTorch
        # refuses (let it raise its own error): F.cross_entropy itself.
        return F.cross_entropy(
            z, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=ls
        )
    batched = z.dim() > 1
    if not batched:  # unbatched: a batch of one
        z, t = z.unsqueeze(0), t.unsqueeze(0)
    if _functorch_active():  # torch.func.grad, vmap, ...: the Function written for them
        loss = _PowerGradCrossEntropyFunc.apply(z, t, w, alpha, ls, reduction, ignore_index)
    elif (op := cpu_loss(z, w)) is not None:  # the C++ op on the CPU (kernels.py)
        loss = op(z, t, alpha, ls, reduction, ignore_index)
    else:
        loss = _PowerGradCrossEntropy.apply(z, t, w, alpha, ls, reduction, ignore_index)
    return loss if batched or reduction != "none" else loss.squeeze(0)


class PowerGradLoss(nn.Module):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` with softmax gradient tampering.

    It tampers whenever a gradient is being taken (autograd on and the logits requiring grad),
    whatever the module's train/eval mode; ``.train()`` and ``.eval()`` change nothing. Why not
    the mode: the forward value is cross-entropy's in both, and without a gradient there is
    nothing to tamper, so the mode could only ever decide what a backward pass gets. Frameworks
    do not keep it for you: Lightning 2.6 does not call ``.train()`` when ``fit`` starts, so a
    module left in ``.eval()`` would train a whole run on plain cross-entropy with no error, and
    fine-tuning with frozen batch norm keeps models in eval mode on purpose. Validation stays
    plain because every loop validates without gradients (``torch.no_grad``: powergrad's
    trainer, Lightning, Hugging Face's ``Trainer``, timm's ``validate``). For cross-entropy's own
    gradient (saliency maps, adversarial examples) use ``F.cross_entropy`` or ``alpha=1``.

    ``weight`` is a buffer, as in ``nn.CrossEntropyLoss``, so it follows ``.to(device)``.
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
            alpha=self.alpha,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            weight=self.weight,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, label_smoothing={self.label_smoothing}"
