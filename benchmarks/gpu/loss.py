"""Steps 1 and 2 of the first run: versions and device; the loss, exact and what it costs."""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

import powergrad
from powergrad import power_grad_cross_entropy

from .common import compile_for, median_call_s
from .harness import Ctx, step

ALPHA = 0.3


@step(budget_s=15)
def versions(ctx: Ctx) -> None:
    """Versions and device: what every other figure was measured on."""
    import torchvision

    info = {
        "device": torch.cuda.get_device_name(0) if ctx.cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torchvision": torchvision.__version__,
        "powergrad": powergrad.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "gpus": torch.cuda.device_count(),
        # the CPU's C++ loss op (powergrad.kernels) is off in the dry run, as it is on CUDA
        "cpu_loss_op": "off" if os.environ.get("POWERGRAD_CPU_KERNEL") == "0" else "on",
    }
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}")
        info["bf16"] = torch.cuda.is_bf16_supported()
    for name in ("timm", "scipy", "airbench"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "absent"
    ctx.rec.row(**info)
    ctx.rec.check("CUDA is available" if ctx.cuda else "dry run on the CPU", True, info["device"])


# ----------------------------------------------------------------------------- exactness


# The smallest positive (subnormal) value and the significand's bits of each dtype: one unit in
# the last place of x is max(2^(exponent(x) - bits + 1), tiny).
ULP = {
    torch.float16: (2.0**-24, 11),
    torch.bfloat16: (2.0**-133, 8),
    torch.float32: (2.0**-149, 24),
}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of dtype at each value of x (float64), subnormals included."""
    tiny, bits = ULP[dtype]
    exponent = torch.frexp(x.abs())[1].double() - 1  # x = m 2^e, 1 <= m < 2
    unit = torch.clamp(torch.pow(2.0, exponent - bits + 1), min=tiny)
    return torch.where(x == 0, torch.full_like(unit, tiny), unit)


def formula64(
    z: torch.Tensor, t: torch.Tensor, alpha: float, ls: float
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The definition in float64: mean smoothed cross-entropy, (softmax(alpha z) - q) / N, and
    the size of the terms of that difference, (softmax(alpha z) + q) / N."""
    z = z.double()
    n, c = z.shape
    q = F.one_hot(t, c).double() * (1 - ls) + ls / c
    loss = -(q * torch.log_softmax(z, 1)).sum(1).mean()
    p = torch.softmax(alpha * z, 1)
    return loss.item(), (p - q) / n, (p + q) / n


def exactness(
    device: torch.device, dtype: torch.dtype, ls: float, n: int, c: int, seed: int = 0
) -> dict[str, float | bool]:
    """The tampered loss on `device` against the float64 formula on the same (rounded) logits.

    The loss is computed in float32 for every input dtype: within 1e-5 relative. In float32 the
    gradient is within 1e-5 (relative, whole tensor) of the float64 one. In bf16 and fp16 it is
    computed in float32 and rounded once, so it is compared with the float64 gradient rounded to
    that dtype: apart by at most one unit in that dtype's last place plus float32's own error on
    the difference p - q (8 float32 epsilons of p + q: where p is close to q the difference
    cancels, and float32's absolute error is all that is left of it).
    A tolerance on the unrounded value would fail on rounding alone: at 4096 x 1000 most fp16
    gradients (~1/(N C)) are subnormal, where one rounding is a 10-50% relative error."""
    g = torch.Generator().manual_seed(seed)
    z0 = (torch.randn(n, c, generator=g) * 3).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    z = z0.to(device).requires_grad_()
    loss = power_grad_cross_entropy(z, t.to(device), ALPHA, ls)
    loss.backward()
    want_loss, want, terms = formula64(z0, t, ALPHA, ls)
    assert z.grad is not None
    grad = z.grad.double().cpu()
    want_rounded = want.to(dtype).double()
    allowed = ulp(want_rounded, dtype) + 8 * 2.0**-24 * terms
    ulps = ((grad - want_rounded).abs() / allowed).max().item()
    loss_err = abs(loss.item() - want_loss) / abs(want_loss)
    rel = ((grad - want).norm() / want.norm()).item()
    grad_ok = rel <= 1e-5 if dtype == torch.float32 else ulps <= 1
    return {
        "loss_rel_err": loss_err,
        "grad_err_vs_allowed": ulps,
        "grad_rel_err_unrounded": rel,
        "finite": bool(torch.isfinite(grad).all()),
        "grad_dtype_kept": z.grad.dtype == dtype,
        "ok": loss_err <= 1e-5
        and grad_ok
        and z.grad.dtype == dtype
        and bool(torch.isfinite(grad).all()),
    }


# ----------------------------------------------------------------------------- cost


def loss_calls(
    ctx: Ctx, z0: torch.Tensor, t: torch.Tensor, compiled: bool
) -> dict[str, Callable[[], None]]:
    """Forward + backward of cross-entropy and of the tampered loss on fresh leaves of z0."""
    losses: dict[str, Callable] = {
        "cross_entropy": lambda z: F.cross_entropy(z, t),
        "power_grad": lambda z: power_grad_cross_entropy(z, t, ALPHA),
    }
    if compiled:
        with compile_for(ctx):
            losses = {k: torch.compile(f, dynamic=False) for k, f in losses.items()}
    return {
        k: functools.partial(lambda f: f(z0.detach().requires_grad_()).backward(), f)
        for k, f in losses.items()
    }


@step(budget_s=70)
def loss(ctx: Ctx) -> None:
    """The loss: exact in fp32, bf16 and fp16 (dtype-rounded float64 reference); its forward +
    backward time against F.cross_entropy, eager and compiled, at 4096 x 1000 and 65536 x 1000."""
    n, c = (64, 10) if ctx.tiny else (4096, 1000)
    for dtype in ULP:
        for ls in (0.0, 0.1):
            r = exactness(ctx.device, dtype, ls, n, c)
            name = str(dtype).removeprefix("torch.")
            ctx.rec.row(part="exactness", dtype=name, label_smoothing=ls, n=n, c=c, **r)
            ctx.rec.check(
                f"exact, {name}, ls {ls}",
                bool(r["ok"]),
                f"loss {r['loss_rel_err']:.1e} (<= 1e-5); grad "
                + (
                    f"{r['grad_rel_err_unrounded']:.1e} relative (<= 1e-5)"
                    if dtype == torch.float32
                    else f"{r['grad_err_vs_allowed']:.2f} of the allowance from the rounded reference (<= 1)"
                ),
            )
    g = torch.Generator().manual_seed(1)
    # calls per timing: ~5-10 ms of GPU work per event pair at either size
    sizes = [(64, 10, 2), (256, 10, 2)] if ctx.tiny else [(4096, 1000, 50), (65536, 1000, 5)]
    rounds = 2 if ctx.tiny else 15
    for n, c, calls in sizes:
        z0 = torch.randn(n, c, generator=g).mul_(3).to(ctx.device)
        t = torch.randint(0, c, (n,), generator=g).to(ctx.device)
        for mode in ("eager", "compile"):
            if not ctx.enough(5 if mode == "eager" else 20, f"{mode} timing at {n} x {c}"):
                continue
            try:
                med = median_call_s(
                    loss_calls(ctx, z0, t, mode == "compile"), ctx.device, rounds, calls
                )
            except Exception as e:  # noqa: BLE001 - a compile failure is a finding: recorded
                ctx.rec.check(
                    f"fwd+bwd runs, {mode}, {n} x {c}", False, f"{type(e).__name__}: {str(e)[:300]}"
                )
                continue
            ratio = med["power_grad"] / med["cross_entropy"]
            ctx.rec.row(
                part="cost",
                mode=mode,
                n=n,
                c=c,
                dtype="float32",
                calls_per_timing=calls,
                rounds=rounds,
                cross_entropy_ms=med["cross_entropy"] * 1e3,
                power_grad_ms=med["power_grad"] * 1e3,
                ratio=ratio,
            )
            ctx.rec.check(
                f"power_grad <= 1.1x cross_entropy, {mode}, {n} x {c}",
                None if ctx.tiny else ratio <= 1.1,
                f"{ratio:.3f}x" + (" (dry run: not judged)" if ctx.tiny else ""),
                kind="target",
            )
