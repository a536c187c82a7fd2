"""Loss forward + backward: power_grad_cross_entropy vs F.cross_entropy vs the reference hook.

power_grad is the loss as users get it (on the CPU, its backward is the fused kernel of
powergrad/kernels.py); power_grad_pytorch_ops is the same loss with the kernel switched off
(POWERGRAD_CPU_KERNEL=0: the backward GPUs run), so that the kernel's effect shows in one run.

One run covers every case: logits N x C of each --sizes, label smoothing 0 and --ls, class-index
and soft targets, each at the default thread count and at 1 and 2 threads (the default case,
no label smoothing at the default thread count, comes first). Within a case the three losses
run interleaved (one sample of each per round, the order rotating), so that machine noise hits
them alike; a sample times --calls-per-sample calls (enough for about 2 ms on the small sizes);
ratios are of medians over --rounds (4x as many for sizes whose loss takes well under 2 ms), of
wall time ("ratio") and of the process's CPU time ("cpu_ratio"), and of the fastest sample's CPU
time ("cpu_best_ratio", the steadiest of the three on a loaded machine, as timeit's minimum). Prints the thread count and the load average (as
``uptime``) with every result, one JSON line each.

    python benchmarks/loss.py [--sizes 4096x1000,256x10] [--rounds 30] [--alpha 0.3] [--ls 0.1]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from powergrad import kernels, power_grad_cross_entropy
from powergrad.reference import official_hook_cross_entropy

IMPLS = ("power_grad", "power_grad_pytorch_ops", "reference_hook")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in size.split("x")) for size in text.split(",")]  # type: ignore[misc]


def losses(alpha: float, ls: float) -> dict[str, Callable]:
    return {
        "cross_entropy": lambda z, t: F.cross_entropy(z, t, label_smoothing=ls),
        "power_grad": lambda z, t: power_grad_cross_entropy(z, t, alpha, ls),
        "power_grad_pytorch_ops": lambda z, t: power_grad_cross_entropy(z, t, alpha, ls),
        "reference_hook": lambda z, t: official_hook_cross_entropy(z, t, alpha, ls),
    }


@contextlib.contextmanager
def kernel_switch(name: str):
    """POWERGRAD_CPU_KERNEL=0 while power_grad_pytorch_ops runs (its backward reads it)."""
    before = os.environ.get(kernels.ENV_SWITCH)
    os.environ[kernels.ENV_SWITCH] = "0" if name == "power_grad_pytorch_ops" else "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[kernels.ENV_SWITCH]
        else:
            os.environ[kernels.ENV_SWITCH] = before


def sample(fn: Callable, z0: torch.Tensor, t: torch.Tensor, calls: int) -> tuple[float, float]:
    """Wall and CPU seconds per forward + backward, over `calls` calls on fresh leaves.

    CPU time (all threads of the process) leaves out the time this process waited for a core,
    so on a loaded machine it is the steadier of the two; with 2 threads it includes the time
    a thread spins at a barrier waiting for the other.
    """
    leaves = [z0.clone().requires_grad_(True) for _ in range(calls)]
    sync = torch.cuda.synchronize if z0.is_cuda else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for z in leaves:
        fn(z, t).backward()
    sync()
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def run_case(n: int, c: int, ls: float, soft: bool, threads: int, args) -> list[dict]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    z0 = (torch.randn(n, c, generator=gen) * 3).to(args.device)
    if soft:
        t = torch.softmax(torch.randn(n, c, generator=gen) * 3, 1).to(args.device)
    else:
        t = torch.randint(0, c, (n,), generator=gen).to(args.device)
    fns = losses(args.alpha, ls)
    # Enough calls per sample for ~2 ms, so that timer and scheduler noise stay small.
    once = min(sample(fns["cross_entropy"], z0, t, 1)[0] for _ in range(3))
    calls = max(1, min(200, round(2e-3 / max(once, 1e-7))))
    for name, fn in fns.items():  # warm-up (and the kernel's first load)
        with kernel_switch(name):
            sample(fn, z0, t, calls)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    names = list(fns)
    # Small sizes: 4x the rounds (each is ~2 ms a loss); their medians moved by 10-20% at 30.
    rounds = args.rounds if calls == 1 else 4 * args.rounds
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with kernel_switch(name):
                times[name].append(sample(fns[name], z0, t, calls))
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    cpu_best = {k: min(c for _, c in v) for k, v in times.items()}
    base = med["cross_entropy"]
    return [
        {
            "benchmark": "loss_fwd_bwd",
            "impl": name,
            "vs": "cross_entropy",
            "ratio": round(med[name] / base, 3),
            "median_ms": round(med[name] * 1e3, 4),
            "baseline_median_ms": round(base * 1e3, 4),
            "cpu_ratio": round(cpu[name] / cpu["cross_entropy"], 3),
            "cpu_best_ratio": round(cpu_best[name] / cpu_best["cross_entropy"], 3),
            "n": n,
            "c": c,
            "label_smoothing": ls,
            "target": "soft" if soft else "index",
            "threads": threads,
            "alpha": args.alpha,
            "rounds": rounds,
            "calls_per_sample": calls,
            "device": args.device,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
        }
        for name in IMPLS
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("4096x1000,256x10"),
        help="comma-separated NxC (default 4096x1000,256x10)",
    )
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument(
        "--ls", type=float, default=0.1, help="the label smoothing of the smoothed cases"
    )
    ap.add_argument(
        "--threads",
        default=None,
        help="comma-separated thread counts (default: the default count, then 1 and 2)",
    )
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    default_threads = torch.get_num_threads()
    threads = (
        [int(v) for v in args.threads.split(",")]
        if args.threads
        else list(dict.fromkeys([default_threads, 1, 2]))
    )
    # Without the op (no compiler, say), power_grad would silently be power_grad_pytorch_ops.
    op = "loaded" if kernels.load_cpu_kernel() is not None else "UNAVAILABLE"
    print(
        f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
        f"default threads {default_threads}, torch {torch.__version__}, "
        f"the loss's C++ op for the CPU: {op}",
        flush=True,
    )
    for (n, c), soft, ls, nthreads in itertools.product(
        args.sizes, (False, True), (0.0, args.ls), threads
    ):
        for row in run_case(n, c, ls, soft, nthreads, args):
            print(json.dumps(row), flush=True)
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
