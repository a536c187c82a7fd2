"""Training images per second with 1 process against K processes (torchrun, nproc=K).

Runs the same recipe (batch_size is the global batch) alternately with 1 and K processes,
``--rounds`` times each, and reads ``train_img_s`` from each run's metrics.csv, skipping the first
epoch (warm-up). On the CPU each process gets OMP_NUM_THREADS = cores / K, so both sides use the
same cores. Prints one JSON line per run and one with the medians and their ratio.

    python benchmarks/distributed_throughput.py [--nproc 2] [--rounds 2] [--cores N]
        [--recipe dataset=synthetic model=resnet20_nobn ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = [
    "digits",
    "dataset=synthetic",
    "model=resnet20",
    "img_size=32",
    "synthetic_size=1024",
    "batch_size=128",
    "lr=0.05",
    "epochs=3",
    "device=cpu",
    "monitor.logit_stats=false",
]


def run_once(recipe: list[str], nproc: int, cores: int, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    cmd = [sys.executable, "-m", "powergrad", "train", *recipe, f"nproc={nproc}", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return statistics.median(float(row["train_img_s"]) for row in rows[1:] or rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--recipe", nargs="*", default=RECIPE)
    a = p.parse_args()
    speeds: dict[int, list[float]] = {1: [], a.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for k in (1, a.nproc):  # alternate, so a change in the machine's load hits both sides
                img_s = run_once(a.recipe, k, a.cores, Path(tmp) / f"r{r}_p{k}")
                speeds[k].append(img_s)
                print(
                    json.dumps({"nproc": k, "round": r, "train_img_s": round(img_s, 1)}), flush=True
                )
    one, many = statistics.median(speeds[1]), statistics.median(speeds[a.nproc])
    print(
        json.dumps(
            {
                "recipe": " ".join(a.recipe),
                "cores": a.cores,
                "img_s_1": round(one, 1),
                f"img_s_{a.nproc}": round(many, 1),
                "ratio": round(many / one, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
