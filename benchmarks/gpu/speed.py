"""The second run: CIFAR-10 to 94% against airbench94, and the streaming loader at 224 px
against device JPEG decoding. (ResNet-50 compiled: benchmarks/gpu/resnet50.py.)"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from typing import Any

import torch

from .common import cifar_data, make_jpeg_folder, median_call_s, sync, train
from .harness import Ctx, step

TARGET = 0.94
RECIPE = "speed/cifar10-94"
# airbench94's own published time (KellerJordan/cifar10-airbench README), for when it is absent.
AIRBENCH_PUBLISHED = "94% in 2.6-3.8 s on one A100 (published, not measured here)"


def seconds_to(
    history: list[dict[str, Any]], target: float, compile_s: float
) -> tuple[float | None, int | None]:
    """Training seconds (epoch_s summed, less compile_s) to the first epoch at test acc >= target."""
    total = -compile_s
    for row in history:
        total += row["epoch_s"]
        if row["test_acc"] >= target:
            return total, row["epoch"]
    return None, None


def airbench_row(ctx: Ctx) -> float | None:
    """airbench94's seconds, same machine, same data; absent on a machine without it."""
    try:
        import airbench  # noqa: F401
    except ImportError:
        ctx.rec.row(impl="airbench94", status=f"not installed here: {AIRBENCH_PUBLISHED}")
        return None
    if not ctx.cuda or ctx.data is None or not ctx.enough(40, "airbench94"):
        ctx.rec.row(impl="airbench94", status="skipped: needs CUDA and CIFAR-10 (JPEG)")
        return None
    from benchmarks import airbench_cifar10 as ab

    ab.write_airbench_data(ctx.data, ctx.work / "airbench" / "cifar10")
    res = ab.run_airbench(ctx.work / "airbench")
    ctx.rec.row(impl="airbench94", seconds=res["seconds"], test_acc=res["test_acc"])
    return res["seconds"]


@step(budget_s=220)
def cifar94(ctx: Ctx) -> None:
    """Seconds to 94% CIFAR-10 (JPEG) test accuracy: speed/cifar10-94 (warm-up: the same
    configuration for one epoch, filling the compile caches; compile time reported apart)
    against airbench94 when it is installed."""
    data, real = cifar_data(ctx)
    airbench_s = airbench_row(ctx)
    over: dict[str, Any] = {**data}
    if ctx.tiny:
        over.update(
            epochs=2,
            warmup_epochs=1,
            batch_size=8,
            amp="none",
            workers=0,
            model_kwargs={"widths": [8, 8, 16, 16], "tta_flip": True},
        )
    if ctx.enough(5 if ctx.tiny else 120, "the warm-up epoch"):
        # Same configuration, one epoch: Inductor's caches (this run's TORCHINDUCTOR_CACHE_DIR)
        # then hold the compiled kernels; dynamo still traces the timed run's own model once.
        train(ctx, "cifar94-warmup", RECIPE, {**over, "epochs": 1, "warmup_epochs": 0})
    run = train(ctx, "cifar94", RECIPE, over)
    h = run["history"]
    steady = statistics.median([r["epoch_s"] for r in h[1:]] or [h[0]["epoch_s"]])
    compile_s = max(0.0, h[0]["epoch_s"] - steady)
    seconds, epoch = seconds_to(h, TARGET, compile_s)
    best = max(r["test_acc"] for r in h)
    ctx.rec.row(
        impl=RECIPE,
        seconds=seconds,
        epoch_reached=epoch,
        epochs=len(h),
        best_test_acc=best,
        compile_s_left_after_warmup=compile_s,
        steady_epoch_s=steady,
        peak_mem_gib=run["peak_mem_gib"],
        wall_s=run["wall_s"],
    )
    judged = real and not ctx.tiny
    ctx.rec.check(
        f"{RECIPE} reaches {TARGET:.0%}",
        seconds is not None if judged else None,
        f"best {best:.4f}",
        kind="target",
    )
    if airbench_s and seconds:
        ctx.rec.row(impl="ratio powergrad / airbench94", ratio=seconds / airbench_s)
        ctx.rec.check(
            "within 2x of airbench94",
            seconds / airbench_s <= 2.0,
            f"{seconds / airbench_s:.2f}x",
            kind="target",
        )


def resnet50_rate(ctx: Ctx) -> tuple[float | None, str]:
    """Images/s the ResNet-50 step consumes: resnet50_compiled's best mode in this run."""
    rows = [r for r in ctx.prior.get("resnet50_compiled", {}).get("rows", []) if "img_per_s" in r]
    if not rows:
        return None, "no resnet50_compiled result in this run"
    best = max(rows, key=lambda r: r["img_per_s"])
    return best["img_per_s"], f"resnet50_compiled, {best['mode']}"


@step(budget_s=60)
def stream(ctx: Ctx) -> None:
    """The streaming image-folder loader at 224 px (PIL decode, RandomResizedCrop, CPU workers)
    over 4 batches per worker, against the ResNet-50 step's images/s and torchvision's
    decode_jpeg on the device."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms import v2

    from powergrad.config import load_config
    from powergrad.data import FileDataset, StreamLoader, TrainBatchSampler, stream_transform
    from powergrad.data.folder import IMAGENET_MEAN, IMAGENET_STD, find_classes, scan_split

    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    workers = 0 if ctx.tiny else max(1, min(16, cores) - 1)
    side, batch, classes = (64, 4, 2) if ctx.tiny else (224, 128, 10)
    # Enough batches that every worker makes several: 10 batches on 15 workers timed the
    # workers' start, not their rate.
    batches = 4 if ctx.tiny else 4 * workers
    per_class = -(-batches * batch // classes)
    folder = ctx.work / "imagenet-like"
    make_jpeg_folder(
        folder, classes, per_class, 1, int(side * 1.6), workers=1 if ctx.tiny else min(16, cores)
    )
    samples = scan_split(folder / "train", find_classes(folder / "train"))
    cfg = load_config(None, {"workers": workers, "channels_last": True, "seed": 0})
    ds = FileDataset(samples, stream_transform("imagenet", side, train=True), False)
    sampler = TrainBatchSampler(len(samples), batch, 0, 0, 1)
    loader = StreamLoader(ds, sampler, cfg, IMAGENET_MEAN, IMAGENET_STD, ctx.device)
    for _ in loader:  # epoch 1 starts the (persistent) workers
        pass
    sampler.set_epoch(1)
    n, tic = 0, 0.0
    for k, (x, _) in enumerate(loader):
        if k == 0:  # timed from the first batch: the pipeline is full from there on
            sync(ctx.device)
            tic = time.perf_counter()
        else:
            n += x.shape[0]
    sync(ctx.device)
    loader_rate = n / (time.perf_counter() - tic)
    del loader
    ctx.rec.row(
        path="stream loader",
        img_per_s=loader_rate,
        workers=workers,
        cpu_cores=cores,
        batches=batches,
        batch_size=batch,
        img_size=side,
    )
    step_rate, source = resnet50_rate(ctx)
    ctx.rec.row(path=f"ResNet-50 step ({source})", img_per_s=step_rate)

    paths = [p for p, _ in samples[:batch]]
    crop = v2.RandomResizedCrop(side, antialias=True)

    def decode() -> list[torch.Tensor]:
        return decode_jpeg([read_file(p) for p in paths], device=ctx.device)

    def decode_crop() -> torch.Tensor:
        return torch.stack([crop(img) for img in decode()])

    for what, fn in {"decode_jpeg": decode, "decode_jpeg + RandomResizedCrop": decode_crop}.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", DeprecationWarning
                )  # torchvision points to TorchCodec
                s = median_call_s({what: fn}, ctx.device, 1 if ctx.tiny else 5, calls=1, warmup=1)[
                    what
                ]
        except Exception as e:  # noqa: BLE001 - recorded; the loader's figures stand
            ctx.rec.check(
                f"{what} on {ctx.device.type} runs", False, f"{type(e).__name__}: {str(e)[:300]}"
            )
            continue
        ctx.rec.row(
            path=f"{what} on {ctx.device.type} (file reads on the host)",
            img_per_s=len(paths) / s,
            batch_size=len(paths),
        )
    if step_rate:
        ctx.rec.row(
            path="verdict",
            bottleneck="loader" if loader_rate < step_rate else "model",
            loader_vs_step=loader_rate / step_rate,
        )
    ctx.rec.check(
        "the stream loader delivers full batches",
        n == (len(samples) // batch - 1) * batch,
        f"{n} images after the first batch of epoch 2",
    )
