"""ResNet-50 at 224 px, bf16: eager against channels-last (first run, last step, if time is
left), and compiled + channels-last (second run). The steps of benchmarks/gpu_resnet50.py."""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.gpu_resnet50 import Step

from .common import compile_for
from .harness import Ctx, step

MODES = {"eager": (False, False), "channels_last": (True, False), "compile": (True, True)}


def shape(ctx: Ctx, steps: int) -> argparse.Namespace:
    if ctx.tiny:
        return argparse.Namespace(
            model="resnet20", img_size=16, batch_size=4, steps=1, rounds=1, amp="none"
        )
    torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels
    return argparse.Namespace(
        model="resnet50", img_size=224, batch_size=128, steps=steps, rounds=3, amp="bf16"
    )


def compare(ctx: Ctx, modes: list[str], steps: int, setup_s: dict[str, float]) -> dict[str, float]:
    """Images/s of each mode (median of interleaved rounds of `steps` steps), one row each."""
    args = shape(ctx, steps)
    built = {}
    for mode in modes:
        if ctx.enough(setup_s[mode] if not ctx.tiny else 1, f"mode {mode}"):
            cl, comp = MODES[mode]
            with compile_for(ctx):
                built[mode] = Step(args, ctx.device, channels_last=cl, compile=comp)
    rates: dict[str, list[float]] = {m: [] for m in built}
    for _ in range(args.rounds):
        for m, run in built.items():
            rates[m].append(args.batch_size * args.steps / run(args.steps))
    med = {m: statistics.median(v) for m, v in rates.items()}
    for m, v in med.items():
        ctx.rec.row(
            mode=m,
            img_per_s=v,
            vs_eager=v / med["eager"] if "eager" in med else None,
            model=args.model,
            batch_size=args.batch_size,
            img_size=args.img_size,
            amp=args.amp,
            steps=args.steps,
            rounds=args.rounds,
        )
    if ctx.cuda:
        ctx.rec.row(part="memory", peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
    return med


@step(budget_s=40)
def resnet50_memory_format(ctx: Ctx) -> None:
    """ResNet-50 eager against channels-last (bf16, batch 128, 224 px, synthetic): which memory
    format the CUDA default should be."""
    med = compare(ctx, ["eager", "channels_last"], 10, {"eager": 12, "channels_last": 12})
    if len(med) == 2:
        r = med["channels_last"] / med["eager"]
        ctx.rec.check(
            "channels-last >= 1.1x eager",
            None if ctx.tiny else r >= 1.1,
            f"{r:.3f}x",
            kind="target",
        )


@step(budget_s=150)
def resnet50_compiled(ctx: Ctx) -> None:
    """ResNet-50 compiled + channels-last against eager channels-last (bf16, batch 128, 224 px):
    is compile worth its minute."""
    med = compare(ctx, ["channels_last", "compile"], 20, {"channels_last": 15, "compile": 120})
    if len(med) == 2:
        r = med["compile"] / med["channels_last"]
        ctx.rec.check(
            "compile >= 1.1x channels-last",
            None if ctx.tiny else r >= 1.1,
            f"{r:.3f}x",
            kind="target",
        )
