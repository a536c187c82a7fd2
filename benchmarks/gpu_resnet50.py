"""A training step's images per second: eager vs channels-last vs torch.compile (ResNet-50, bf16).

The step is what powergrad's loop does per batch: autocast forward, the tampered loss
(PowerGradLoss, alpha 0.3), backward, SGD (Nesterov) step; synthetic 224x224 data already on
the device, so only the step is timed. Modes, interleaved in rounds, medians:
- ``eager``: plain eager PyTorch, contiguous (NCHW) memory: the baseline;
- ``channels_last``: the model and the batches in channels-last memory;
- ``compile``: channels-last plus ``torch.compile`` of the model (compiled before timing).
Then ``trainer``: ``powergrad.train`` with compile + channels_last on synthetic data of the same
size, its last epoch's images per second (its own overhead included), for the GPU defaults.

    python benchmarks/gpu_resnet50.py [--batch-size 256] [--img-size 224] [--amp bf16]
        [--steps 20] [--rounds 3] [--model resnet50] [--modes eager,channels_last,compile,trainer]

Needs a GPU for the figures it is meant for; on the CPU it runs (small sizes) as a smoke test.
One JSON line per mode, with its ratio to eager (target for compile: >= 1.3x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import powergrad
from powergrad import PowerGradLoss
from powergrad.config import load_config
from powergrad.models import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Step:
    """One model + optimiser in a memory format, optionally compiled; __call__ times n steps."""

    def __init__(self, args, device: torch.device, channels_last: bool, compile: bool) -> None:
        cfg = load_config(None, {"model": args.model, "dataset": "synthetic"})
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = create_model(cfg, 1000, 3, args.img_size).to(device, memory_format=fmt)
        self.forward = torch.compile(self.model) if compile else self.model
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-5
        )
        self.loss = PowerGradLoss(0.3)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
        self.x = x.to(device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        self.device = device
        self(2)  # warm-up (and compilation)

    def __call__(self, steps: int) -> float:
        self.model.train()
        _sync(self.device)
        tic = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                logits = self.forward(self.x)
            self.loss(logits.float(), self.y).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - tic


def trainer_img_per_s(
    args, device: torch.device, channels_last: bool = True, compile: bool = True
) -> float:
    with tempfile.TemporaryDirectory(prefix="pg-gpu-") as tmp:
        r = powergrad.train(
            {
                "model": args.model,
                "dataset": "synthetic",
                "img_size": args.img_size,
                "num_classes": 1000,
                "synthetic_size": args.batch_size * args.steps,
                "batch_size": args.batch_size,
                "epochs": 2,
                "amp": args.amp,
                "channels_last": channels_last,
                "compile": compile,
                "device": str(device),
                "alpha": 0.3,
                "lr": 0.01,
                "save_every": 2,
            },
            Path(tmp) / "run",
        )
    return r.history[-1]["train_img_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "none"))
    ap.add_argument("--steps", type=int, default=20, help="steps timed per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="eager,channels_last,compile,trainer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    modes = args.modes.split(",")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels

    steps = {
        m: Step(args, device, channels_last=m != "eager", compile=m == "compile")
        for m in modes
        if m in ("eager", "channels_last", "compile")
    }
    rates: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.rounds):
        for m, step in steps.items():
            rates[m].append(args.batch_size * args.steps / step(args.steps))
    med = {m: statistics.median(v) for m, v in rates.items()}
    if "trainer" in modes:
        med["trainer"] = trainer_img_per_s(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for m, v in med.items():
        print(
            json.dumps(
                {
                    "benchmark": "train_step_modes",
                    "impl": m,
                    "vs": "eager",
                    "ratio": round(v / med["eager"], 3) if "eager" in med else None,
                    "img_per_s": round(v, 1),
                    "model": args.model,
                    "batch_size": args.batch_size,
                    "img_size": args.img_size,
                    "amp": args.amp,
                    "steps": args.steps,
                    "rounds": args.rounds if m != "trainer" else 1,
                    "device": name,
                    "torch": torch.__version__,
                }
            )
        )


if __name__ == "__main__":
    main()
