"""Time to a fixed test accuracy: the same recipe with alpha = 1 and with other alphas.

Trains ResNet-20 on an image folder (CIFAR-10 (JPEG) from ../shared/data, untarred) with
powergrad's own loop, once per alpha, and reports the first epoch whose test accuracy reaches
--target and the training seconds (sum of epoch_s, evaluation excluded) up to it. Runs are
sequential, so seconds carry the machine's noise; epochs do not.

    python benchmarks/time_to_accuracy.py --data /tmp/cifar10 [--alphas 1,0.5,0.25]
        [--epochs 8] [--subset 10000] [--target 0.6] [--out /tmp/pg-tta]

--data defaults to $POWERGRAD_DATA (a folder with train/<class>/ and test/<class>/).
One JSON line per alpha, then one "best" line comparing the fastest alpha with alpha = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

import powergrad


def first_reaching(history: list[dict], target: float) -> tuple[int | None, float | None]:
    """(epoch, cumulative training seconds) of the first epoch with test_acc >= target."""
    seconds = 0.0
    for row in history:
        seconds += row["epoch_s"]
        if row["test_acc"] >= target:
            return row["epoch"], seconds
    return None, None


def small_test_folder(src: Path, dst: Path, per_class: int) -> Path:
    """dst/train -> src/train, and dst/test/<class>/ linking the first per_class images of each."""
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / "train").exists():
        (dst / "train").symlink_to((src / "train").resolve())
    test = src / "test" if (src / "test").is_dir() else src / "val"
    for cls in sorted(p.name for p in test.iterdir() if p.is_dir()):
        (dst / "test" / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((test / cls).iterdir())[:per_class]:
            link = dst / "test" / cls / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        default=os.environ.get("POWERGRAD_DATA"),
        help="folder with train/ and test/ (default: $POWERGRAD_DATA)",
    )
    ap.add_argument(
        "--dataset", default="imagefolder", help="synthetic: no data needed (smoke test)"
    )
    ap.add_argument("--alphas", default="1,0.5,0.25")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--subset", type=int, default=10000, help="training images (0: all)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--target", type=float, default=0.6, help="test accuracy to reach")
    ap.add_argument(
        "--test-per-class",
        type=int,
        default=0,
        help="evaluate on the first N test images of each class (0: all)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", default=None, help="where the run directories go (default: a temp dir)"
    )
    args = ap.parse_args()
    if args.dataset == "imagefolder" and not args.data:
        ap.error("--data PATH or POWERGRAD_DATA is required (a folder with train/ and test/)")

    out = Path(args.out or tempfile.mkdtemp(prefix="pg-tta-"))
    data = args.data
    if args.test_per_class and args.dataset == "imagefolder":
        data = str(small_test_folder(Path(args.data), out / "data", args.test_per_class))
    recipe = {
        "model": args.model,
        "dataset": args.dataset,
        "data_dir": data,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "sched": "cosine",
        "workers": args.workers,
        "seed": args.seed,
        "device": "cpu" if not torch.cuda.is_available() else "auto",
        "train_subset": args.subset or None,
    }
    results = []
    for alpha in [float(a) for a in args.alphas.split(",")]:
        r = powergrad.train(recipe, out / f"alpha{alpha:g}", overwrite=True, alpha=alpha)
        if r.status != "finished":  # SIGTERM pre-empts the run cleanly: stop, do not time the rest
            raise SystemExit(f"run {r.run_dir} {r.status}")
        epoch, seconds = first_reaching(r.history, args.target)
        res = {
            "benchmark": "time_to_accuracy",
            "alpha": alpha,
            "target_test_acc": args.target,
            "epochs_to_target": epoch,
            "train_s_to_target": None if seconds is None else round(seconds, 1),
            "final_test_acc": round(r.final["test_acc"], 4),
            "best_test_acc": round(r.best["test_acc"], 4),
            "train_s_total": round(sum(h["epoch_s"] for h in r.history), 1),
            "wall_s": round(r.wall_s, 1),
            "model": args.model,
            "epochs": args.epochs,
            "train_images": args.subset or "all",
            "batch_size": args.batch_size,
            "lr": args.lr,
            "sched": "cosine",
            "dataset": args.dataset,
            "test_per_class": args.test_per_class or "all",
            "device": recipe["device"],
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "run_dir": str(r.run_dir),
        }
        print(json.dumps(res), flush=True)
        results.append(res)

    base = next((r for r in results if r["alpha"] == 1.0), None)
    reached = [r for r in results if r["epochs_to_target"] is not None]
    if base is not None and reached:
        best = min(reached, key=lambda r: (r["epochs_to_target"], r["train_s_to_target"]))
        print(
            json.dumps(
                {
                    "benchmark": "time_to_accuracy_best",
                    "target_test_acc": args.target,
                    "best_alpha": best["alpha"],
                    "best_epochs": best["epochs_to_target"],
                    "best_train_s": best["train_s_to_target"],
                    "alpha1_epochs": base["epochs_to_target"],
                    "alpha1_train_s": base["train_s_to_target"],
                }
            )
        )


if __name__ == "__main__":
    main()
