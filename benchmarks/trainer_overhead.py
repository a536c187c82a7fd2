"""Trainer overhead: powergrad's loop (``powergrad.train``) vs a bare PyTorch loop, same work.

Both sides train the same model (``create_model``, ResNet-20 by default) on the same synthetic
32x32 uint8 data held in memory (shuffled, gathered, normalised per batch), with the same SGD
(momentum 0.9, Nesterov, weight decay 5e-4 on weights, none on biases and norms) and a cosine
rate stepped per update. The bare loop has plain ``F.cross_entropy`` and no logging or metrics.

What is timed: the training steps of each epoch after the first (warm-up), on both sides; the
trainer's own ``epoch_s`` covers exactly its step loop (data, step, device-side metrics, flags).
Evaluation, checkpoints and the run directory are outside it; ``wall_ratio`` compares whole calls
(trainer: set-up, eval each epoch, checkpoints, plots; bare: set-up and the same eval each epoch)
as context. Variants run interleaved, one of each per round, in an order rotated each round;
medians over rounds.

    python benchmarks/trainer_overhead.py [--steps 10] [--epochs 3] [--rounds 5] [--batch-size 128]
        [--model resnet20] [--alphas 1,0.25] [--device cpu]

One JSON line per trainer variant (ratio to the bare loop; target >= 0.97).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import powergrad
from powergrad.config import load_config
from powergrad.models import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(recipe: dict, device: torch.device) -> tuple[list[float], float]:
    """(seconds per epoch of training steps, whole-call seconds): the plainest correct loop."""
    wall0 = time.perf_counter()
    cfg = load_config(None, recipe)
    torch.manual_seed(cfg.seed)
    # The same tensors as powergrad's synthetic source (data/sources.py) draws from the seed.
    k, s, n, m = (
        cfg.num_classes or 10,
        cfg.img_size,
        cfg.synthetic_size,
        max(1, cfg.synthetic_size // 4),
    )
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, 256, (n + m, 3, s, s), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, k, (n + m,), generator=g).to(device)
    train_x, train_y, test_x, test_y = x[:n], y[:n], x[n:], y[n:]
    mean, std = 0.5 * 255, 0.25 * 255

    torch.manual_seed(cfg.seed)
    model = create_model(cfg, k, 3, s).to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    steps = n // cfg.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    epoch_s = []
    for _ in range(cfg.epochs):
        model.train()
        _sync(device)
        tic = time.perf_counter()
        perm = torch.randperm(n, device=device)
        for i in range(steps):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = (train_x[idx].float() - mean) / std
            loss = F.cross_entropy(model(xb), train_y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        _sync(device)
        epoch_s.append(time.perf_counter() - tic)
        model.eval()  # the same evaluation as the trainer's, outside the timed steps
        with torch.no_grad():
            correct = sum(
                int(
                    (
                        model((test_x[i : i + cfg.batch_size].float() - mean) / std).argmax(1)
                        == test_y[i : i + cfg.batch_size]
                    ).sum()
                )
                for i in range(0, m, cfg.batch_size)
            )
        assert 0 <= correct <= m
    return epoch_s, time.perf_counter() - wall0


def trainer(recipe: dict, alpha: float, out: Path) -> tuple[list[float], float]:
    """(seconds per epoch of training steps, whole-call seconds) for powergrad.train."""
    wall0 = time.perf_counter()
    result = powergrad.train(recipe, out, overwrite=True, alpha=alpha)
    return [row["epoch_s"] for row in result.history], time.perf_counter() - wall0


def bookkeeping_s(batch_size: int, num_classes: int = 10, reps: int = 200) -> float:
    """Seconds per step of the loop's own per-step work, timed alone on the CPU with the loop's
    real objects: EpochStats.update (device-side metric sums), the non-finite flag, the per-update
    scheduler step. A noise-proof bound on the overhead, next to the end-to-end ratio."""
    from powergrad.engine.optim import create_optimizer, create_scheduler
    from powergrad.monitor import EpochStats

    cfg = load_config(None, {"dataset": "synthetic"})
    stats = EpochStats(torch.device("cpu"), logit_stats=True)
    opt = create_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = create_scheduler(opt, cfg, reps)
    logits, y = torch.randn(batch_size, num_classes), torch.randint(0, num_classes, (batch_size,))
    loss = torch.tensor(1.0)
    bad = torch.full((), -1, dtype=torch.long)
    tic = time.perf_counter()
    for step in range(reps):
        stats.update(loss, logits, y)
        bad = torch.where((bad < 0) & ~torch.isfinite(loss), step, bad)
        sched.step_update(step + 1)
        int(bad)
    return (time.perf_counter() - tic) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="training steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="the first is warm-up, not timed")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--alphas", default="1,0.25")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--only-bookkeeping", action="store_true", help="time only the loop's per-step work"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only_bookkeeping:
        print(
            json.dumps(
                {
                    "benchmark": "trainer_bookkeeping",
                    "seconds_per_step": round(bookkeeping_s(args.batch_size), 6),
                    "batch_size": args.batch_size,
                    "threads": torch.get_num_threads(),
                }
            )
        )
        return
    if args.epochs < 2:
        ap.error("--epochs must be at least 2 (the first is warm-up)")

    device = torch.device(args.device)
    recipe = {
        "model": args.model,
        "dataset": "synthetic",
        "synthetic_size": args.batch_size * args.steps,
        "img_size": 32,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "lr": 0.05,
        "sched": "cosine",
        "device": args.device,
        "seed": 0,
        "save_every": args.epochs,
    }
    alphas = [float(a) for a in args.alphas.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="pg-overhead-")
    out = Path(tmp.name)
    names = ["bare", *(f"trainer_alpha{a:g}" for a in alphas)]
    rate: dict[str, list[float]] = {k: [] for k in names}  # steps/s per round
    wall: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        for name in (
            names[r % len(names) :] + names[: r % len(names)]
        ):  # rotate: no variant always last
            if name == "bare":
                epoch_s, w = bare_loop(recipe, device)
            else:
                epoch_s, w = trainer(recipe, alphas[names.index(name) - 1], out / name)
            timed = epoch_s[1:]
            rate[name].append(args.steps * len(timed) / sum(timed))
            wall[name].append(w)
    tmp.cleanup()
    med = {k: statistics.median(v) for k, v in rate.items()}
    book = bookkeeping_s(args.batch_size)
    print(
        json.dumps(
            {
                "benchmark": "trainer_bookkeeping",
                "seconds_per_step": round(book, 6),
                "share_of_bare_step": round(book * med["bare"], 5),
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
            }
        )
    )
    for name in names[1:]:
        paired = [t / b for t, b in zip(rate[name], rate["bare"])]
        print(
            json.dumps(
                {
                    "benchmark": "trainer_overhead",
                    "impl": name,
                    "vs": "bare_loop",
                    "ratio": round(med[name] / med["bare"], 3),
                    "ratio_paired_median": round(statistics.median(paired), 3),
                    "steps_per_s": round(med[name], 3),
                    "bare_steps_per_s": round(med["bare"], 3),
                    "img_per_s": round(med[name] * args.batch_size, 1),
                    "wall_ratio": round(
                        statistics.median(wall["bare"]) / statistics.median(wall[name]), 3
                    ),
                    "spread": round((max(rate[name]) - min(rate[name])) / med[name], 3),
                    "timed": f"epochs 2..{args.epochs} of {args.steps} steps, eval excluded",
                    "model": args.model,
                    "batch_size": args.batch_size,
                    "rounds": args.rounds,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                }
            )
        )
    if not all(math.isfinite(v) for v in med.values()):
        raise SystemExit("non-finite timing")


if __name__ == "__main__":
    main()
