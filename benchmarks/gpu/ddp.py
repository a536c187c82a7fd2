"""Step 7 of the first run: DDP through torchrun, two processes on the one GPU (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from powergrad.rundir import read_metrics, read_summary

from .common import train, train_args
from .harness import Ctx, step
from .training import history_diff


def weights_diff(a: Path, b: Path) -> float:
    wa = torch.load(a / "last.pt", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", map_location="cpu", weights_only=True)["model"]
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel())


@step(budget_s=45)
def ddp(ctx: Ctx) -> None:
    """torchrun --nproc_per_node=2 on one GPU with POWERGRAD_DIST_BACKEND=gloo, so that DDP's
    code path (process group, gradient all-reduce, no_sync micro-batches, rank-0 writes) runs;
    the two processes' run matches one process's to float32 rounding."""
    # tests/test_distributed.py's recipe: digits, batch 4, an MLP (no batch norm, so one process
    # and two compute the same update); accum_steps=2 adds no_sync micro-batches.
    args = {
        "epochs": 1,
        "batch_size": 4,
        "lr": 0.01,
        "seed": 1,
        "accum_steps": 2,
    }
    if ctx.tiny:
        args["train_subset"] = 64
    one = train(ctx, "ddp-one-process", "digits", args)["out"]
    two, log = ctx.work / "ddp-two-processes", ctx.work / "ddp-torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "powergrad", *train_args("digits", {**args, "device": ctx.device.type}, two)]
    env = {**os.environ, "POWERGRAD_DIST_BACKEND": "gloo"}
    tic = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=max(ctx.left() - 5, 1)
        )
    ok = done.returncode == 0
    world = read_summary(two)["env"].get("world_size") if ok else None
    ctx.rec.row(
        run="torchrun --nproc_per_node=2",
        backend="gloo",
        world_size=world,
        wall_s=time.perf_counter() - tic,
    )
    ctx.rec.check(
        "torchrun with 2 processes on one device finishes, world size 2",
        ok and world == 2,
        "" if ok else f"exit {done.returncode}: {log.read_text(errors='replace')[-600:]}",
    )
    if not ok:
        return
    w, h = weights_diff(one, two), history_diff(read_metrics(one), read_metrics(two))
    # One process's batch-4 sums against two processes' batch-2 sums plus an all-reduce: ordered
    # differently, so equal to float32 rounding, not bitwise.
    ctx.rec.row(compare="2 processes vs 1", weights_max_abs_diff=w, metrics_max_rel_diff=h)
    ctx.rec.check(
        "2 processes match 1",
        w <= 1e-4 and h <= 1e-4,
        f"weights {w:.2e}, metrics {h:.2e} (<= 1e-4)",
    )
