"""Two 1-thread runs side by side against one 2-thread run: which trains more images a second?

Section 2h of docs/results.md runs its 88+ ResNet-20 runs as `powergrad sweep --workers 2` (each
worker one torch thread) on a 2-core machine. This is the measurement behind that choice: the
same recipe as ``benchmarks/trainer_precision.py`` (ResNet-20, batch 128, ``augment=cifar``, in
memory synthetic 32x32 images), bf16 autocast with channels-last by default, the trainer's own
``train_img_s`` (median of the epochs after the first). First one run with ``--threads`` threads,
then ``--threads`` runs of one thread each at the same time; their rates add up.

    python benchmarks/parallel_runs.py [--threads 2] [--size 3072] [--epochs 3] [--fp32]

Prints the thread count and `uptime` first, then one JSON line per layout and their ratio. Run it
with nothing else running: the layouts share the machine's cores by design.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def one_run(threads: int, size: int, epochs: int, fp32: bool) -> subprocess.Popen:
    """A child process training once with ``threads`` threads; prints its rate last."""
    extra = {} if fp32 else {"amp": "bf16", "channels_last": True}
    code = f"""
import sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
import trainer_precision as tp
torch.set_num_threads({threads})
with tempfile.TemporaryDirectory() as t:
    print(tp.images_per_s(tp.recipe({size}, {epochs}), {extra!r}, Path(t) / "r"))
"""
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def rate(procs: list[subprocess.Popen]) -> float:
    """The images a second of runs that ran at the same time, added up."""
    total = 0.0
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a run failed (exit {p.returncode})")
        total += float(out.strip().splitlines()[-1])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--size", type=int, default=3072, help="synthetic images per epoch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fp32", action="store_true", help="fp32 NCHW instead of bf16 + channels-last")
    args = ap.parse_args()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"threads {args.threads}; uptime: {uptime}", flush=True)
    together = rate([one_run(args.threads, args.size, args.epochs, args.fp32)])
    apart = rate([one_run(1, args.size, args.epochs, args.fp32) for _ in range(args.threads)])
    for layout, img_s in (
        (f"1 run x {args.threads} threads", together),
        (f"{args.threads} runs x 1 thread", apart),
    ):
        print(json.dumps({"layout": layout, "img_s": round(img_s, 1)}))
    print(f"ratio: {apart / together:.2f}x")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime after: {uptime}")


if __name__ == "__main__":
    main()
