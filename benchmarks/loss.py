"""Loss forward + backward: power_grad_cross_entropy vs F.cross_entropy vs the reference hook.

Runs are interleaved (one of each per round) so that machine noise hits all three alike;
medians over --rounds. One JSON line per comparison.

    python benchmarks/loss.py [--n 4096] [--c 1000] [--rounds 30] [--alpha 0.3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from powergrad import power_grad_cross_entropy
from powergrad.reference import official_hook_cross_entropy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--c", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--ls", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    dev = torch.device(args.device)
    torch.manual_seed(0)
    z0 = torch.randn(args.n, args.c, device=dev) * 3
    t = torch.randint(0, args.c, (args.n,), device=dev)
    fns = {
        "cross_entropy": lambda z: F.cross_entropy(z, t, label_smoothing=args.ls),
        "power_grad": lambda z: power_grad_cross_entropy(z, t, args.alpha, args.ls),
        "reference_hook": lambda z: official_hook_cross_entropy(z, t, args.alpha, args.ls),
    }

    def once(fn) -> float:
        z = z0.clone().requires_grad_(True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(z).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():  # warm-up
        for _ in range(3):
            once(fn)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(once(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["cross_entropy"]
    for name in ("power_grad", "reference_hook"):
        print(json.dumps({
            "benchmark": "loss_fwd_bwd", "impl": name, "vs": "cross_entropy",
            "ratio": round(med[name] / base, 3), "median_ms": round(med[name] * 1e3, 3),
            "baseline_median_ms": round(base * 1e3, 3), "n": args.n, "c": args.c,
            "alpha": args.alpha, "rounds": args.rounds, "device": str(dev),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
        }))


if __name__ == "__main__":
    main()
