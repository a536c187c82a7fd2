"""The trainer's speed with bf16 autocast and channels-last against fp32 NCHW, side by side.

Issue 24 asks, before its study's plan, what ``amp=bf16 channels_last=true`` buys a ResNet-20 run
through the trainer on this CPU (it has AMX and bf16 instructions), so that the plan can decide
the precision of every arm. Each variant trains the same recipe through ``powergrad.train``
(ResNet-20, batch 128, SGD, cosine; ``augment=cifar``) on in-memory synthetic 32x32 images,
alternating variants each round in a rotated order; what is compared is the trainer's own
``train_img_s`` of each epoch after the first (the first pays for warm-up), median over rounds.

    python benchmarks/trainer_precision.py [--rounds 3] [--epochs 3] [--size 4096] [--threads 2]

Prints the thread count and `uptime` first, then one JSON line per variant with its ratio to fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

import powergrad
from powergrad.rundir import read_metrics

VARIANTS = {
    "fp32": {},
    "bf16": {"amp": "bf16"},
    "bf16+channels_last": {"amp": "bf16", "channels_last": True},
}


def recipe(size: int, epochs: int) -> dict:
    return {
        "dataset": "synthetic",
        "synthetic_size": size,
        "img_size": 32,
        "num_classes": 10,
        "model": "resnet20",
        "augment": "cifar",
        "epochs": epochs,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "sched": "cosine",
        "workers": 0,
    }


def images_per_s(base: dict, extra: dict, out: Path) -> float:
    """Median train_img_s of the epochs after the first: the trainer's own step-loop rate."""
    powergrad.train({**base, **extra}, out, overwrite=True)
    rates = [float(r["train_img_s"]) for r in read_metrics(out)[1:]]
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096, help="synthetic images per epoch")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"threads {torch.get_num_threads()}; uptime: {uptime}", flush=True)
    base = recipe(args.size, args.epochs)
    names = list(VARIANTS)
    rates: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # order rotated
                rates[name].append(images_per_s(base, VARIANTS[name], Path(tmp) / name))
    ref = statistics.median(rates["fp32"])
    for name in names:
        med = statistics.median(rates[name])
        line = {
            "variant": name,
            "img_s_median": round(med, 1),
            "img_s_rounds": [round(x, 1) for x in rates[name]],
            "ratio_to_fp32": round(med / ref, 3),
        }
        print(json.dumps(line), flush=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime after: {uptime}")


if __name__ == "__main__":
    main()
