"""Image-folder input pipeline: decoded, augmented images per second into the training loop.

powergrad's loader (``create_loaders``, dataset=imagefolder: decode once in a Pool of workers
into a uint8 cache, then batched in-memory pad-crop + flip + normalise) vs torchvision
``ImageFolder`` + ``DataLoader`` (same workers, batch, shuffle; RandomCrop(32, padding=4,
reflect) + RandomHorizontalFlip + ToTensor + Normalize, decoding every image every epoch).

Rows:
- ``powergrad_first_epoch``: a fresh cache: scan, decode train and test into the cache, then one
  training epoch. Images per second = training images / all of that time. Twice: JPEGs through
  torchvision's decoder (the default) and through PIL alone.
- ``powergrad_cached``: later epochs (the steady state), compared with torchvision's epochs;
  interleaved with them, medians over --rounds.
- ``powergrad_cache_load``: a new process's set-up from the cache file, in seconds (context).

    python benchmarks/data_pipeline.py --data /tmp/cifar10 [--workers 2] [--batch-size 128]
        [--rounds 3] [--images 0] [--transforms v1]

--data defaults to $POWERGRAD_DATA (a folder with train/<class>/ and test/<class>/). --images N
times only the first N images of each epoch (0: the whole epoch). The consumer does nothing
with a batch but receive it (no model), so this is the pipeline's ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from itertools import islice

import torch
from torchvision import datasets, transforms
from torchvision.transforms import v2

from powergrad.config import load_config
from powergrad.data import create_loaders, folder

CIFAR_MEAN, CIFAR_STD = (
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
)  # what powergrad uses for folders


def torchvision_loader(
    root: str, workers: int, batch_size: int, kind: str
) -> torch.utils.data.DataLoader:
    if kind == "v1":
        tf = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
            ]
        )
    else:
        tf = v2.Compose(
            [
                v2.PILToTensor(),
                v2.RandomCrop(32, padding=4, padding_mode="reflect"),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(CIFAR_MEAN, CIFAR_STD),
            ]
        )
    ds = datasets.ImageFolder(os.path.join(root, "train"), transform=tf)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )


def time_epoch(loader, max_batches: int | None) -> tuple[int, float]:
    """(images, seconds) to receive one epoch (or its first max_batches batches)."""
    n = 0
    tic = time.perf_counter()
    for x, _ in islice(loader, max_batches):
        n += x.shape[0]
    return n, time.perf_counter() - tic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data",
        default=os.environ.get("POWERGRAD_DATA"),
        help="folder with train/ and test/ (default: $POWERGRAD_DATA)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--images", type=int, default=0, help="time the first N images of each epoch (0: all)"
    )
    ap.add_argument(
        "--transforms", choices=("v1", "v2"), default="v1", help="torchvision's transforms API"
    )
    args = ap.parse_args()
    if not args.data:
        ap.error("--data PATH or POWERGRAD_DATA is required (a folder with train/ and test/)")
    max_batches = args.images // args.batch_size if args.images else None

    cfg = load_config(
        None,
        {
            "dataset": "imagefolder",
            "data_dir": args.data,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "augment": "cifar",
            "device": "cpu",
        },
    )
    # The first epoch twice, each with a fresh cache: JPEGs through torchvision's decoder (the
    # default) and through PIL alone (the decoder's effect). The Pool's workers are forked, so
    # they inherit the switch.
    firsts = {}
    real_fast = folder._decode_jpeg_fast
    for decoder in ("pil", "torchvision"):
        folder._decode_jpeg_fast = real_fast if decoder == "torchvision" else (lambda data: None)
        cache = tempfile.TemporaryDirectory(prefix="pg-cache-")
        os.environ["POWERGRAD_CACHE"] = cache.name  # a fresh cache: the first epoch decodes
        tic = time.perf_counter()
        pg = create_loaders(cfg, torch.device("cpu"))
        setup_s = time.perf_counter() - tic
        n, epoch_s = time_epoch(
            pg.train, None
        )  # always the whole first epoch: the decode is for all of it
        firsts[decoder] = {
            "images": n,
            "setup_s": round(setup_s, 2),
            "epoch_s": round(epoch_s, 2),
            "img_per_s": round(n / (setup_s + epoch_s), 1),
            "jpeg_decoder": decoder,
        }
    tic = time.perf_counter()
    create_loaders(cfg, torch.device("cpu"))  # the cache file is there now
    cache_load_s = time.perf_counter() - tic

    tv = torchvision_loader(args.data, args.workers, args.batch_size, args.transforms)
    time_epoch(tv, 2)  # start the persistent workers
    rates: dict[str, list[float]] = {"torchvision": [], "powergrad": []}
    for r in range(args.rounds):
        pg.train.set_epoch(r + 1)
        n_tv, s_tv = time_epoch(tv, max_batches)
        n_pg, s_pg = time_epoch(pg.train, max_batches)
        rates["torchvision"].append(n_tv / s_tv)
        rates["powergrad"].append(n_pg / s_pg)
    cache.cleanup()
    med = {k: statistics.median(v) for k, v in rates.items()}
    common = {
        "workers": args.workers,
        "batch_size": args.batch_size,
        "train_images": len(pg.train) * args.batch_size,
        "timed_images_per_epoch": args.images or "all",
        "rounds": args.rounds,
        "torchvision_transforms": args.transforms,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(
        json.dumps(
            {
                "benchmark": "data_pipeline",
                "impl": "powergrad_cached",
                "vs": "torchvision_imagefolder",
                "ratio": round(med["powergrad"] / med["torchvision"], 2),
                "img_per_s": round(med["powergrad"], 1),
                "baseline_img_per_s": round(med["torchvision"], 1),
                **common,
            }
        )
    )
    for first in firsts.values():
        print(
            json.dumps(
                {
                    "benchmark": "data_pipeline",
                    "impl": "powergrad_first_epoch",
                    "vs": "torchvision_imagefolder",
                    "ratio": round(first["img_per_s"] / med["torchvision"], 2),
                    **first,
                    "baseline_img_per_s": round(med["torchvision"], 1),
                    **common,
                }
            )
        )
    print(
        json.dumps(
            {
                "benchmark": "data_pipeline",
                "impl": "powergrad_cache_load",
                "seconds": round(cache_load_s, 2),
                **common,
            }
        )
    )


if __name__ == "__main__":
    main()
