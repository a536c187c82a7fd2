"""The two GPU runs: their steps, in order. Each step states its time limit (@step(budget_s));
tests/test_gpu_harness.py holds each plan to harness.TIME_LIMIT_S, start-up included."""

from __future__ import annotations

from collections.abc import Callable

from .ddp import ddp
from .loss import loss, versions
from .resnet50 import resnet50_compiled, resnet50_memory_format
from .speed import cifar94, stream
from .training import resume, sync_probe, train_bf16, train_compiled

# What to learn first, with no second chance: is it correct on CUDA, is a step free of syncs,
# how fast is the real recipe with and without compile, does resume and DDP work; then speed.
FIRST: list[Callable] = [
    versions,
    loss,
    sync_probe,
    train_bf16,
    train_compiled,
    resume,
    ddp,
    resnet50_memory_format,
]
SECOND: list[Callable] = [cifar94, resnet50_compiled, stream]
PLANS = {"first": FIRST, "second": SECOND}
