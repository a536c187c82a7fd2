"""Does ``compile=true`` + ``channels_last=true`` train every built-in local model? (and how fast)

For each model in powergrad.models.MODELS: one short run of ``powergrad.train`` on synthetic
32x32 data with eager/contiguous, then channels_last, then compile + channels_last. Prints one
JSON line per model and mode: ok, the error if not, the training steps per second of the last
epoch (the first epoch holds torch.compile's compilation) and the final train loss.

    python benchmarks/compile_check.py [--models all] [--batch-size 32] [--steps 4] [--device cuda]

torch.compile on the CPU needs a C++ compiler (gcc). Timings here are a smoke-level context,
not a benchmark: use gpu_resnet50.py for the modes' speed on a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import powergrad
from powergrad.models import MODELS

MODES = {
    "eager": {},
    "channels_last": {"channels_last": True},
    "compile_channels_last": {"compile": True, "channels_last": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="all", help="comma-separated local model names, or all")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="training steps per epoch (2 epochs)")
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda where there is one (a GPU's modes are what this checks), else cpu",
    )
    args = ap.parse_args()
    names = sorted(MODELS) if args.models == "all" else args.models.split(",")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="pg-compile-") as tmp:
        for name in names:
            for mode, keys in MODES.items():
                recipe = {
                    "model": name,
                    "dataset": "synthetic",
                    "img_size": 32,
                    "epochs": 2,
                    "batch_size": args.batch_size,
                    "synthetic_size": args.batch_size * args.steps,
                    "device": args.device,
                    "lr": 0.01,
                    **keys,
                }
                row = {"benchmark": "compile_check", "model": name, "mode": mode}
                tic = time.perf_counter()
                try:
                    r = powergrad.train(recipe, Path(tmp) / f"{name}-{mode}", overwrite=True)
                    row.update(
                        ok=True,
                        steps_per_s=round(args.steps / r.history[-1]["epoch_s"], 2),
                        train_loss=round(r.final["train_loss"], 4),
                    )
                except Exception as e:  # report and go on: the point is the list of what breaks
                    failed += 1
                    row.update(
                        ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    )
                row.update(
                    wall_s=round(time.perf_counter() - tic, 1),
                    device=args.device,
                    torch=torch.__version__,
                )
                print(json.dumps(row), flush=True)
    if failed:
        raise SystemExit(f"{failed} model/mode runs failed")


if __name__ == "__main__":
    main()
