"""What the steps share: timing on the device, the trainer through its CLI, generated data."""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from powergrad.cli import main as powergrad_cli
from powergrad.rundir import read_metrics, read_summary

from .harness import Ctx

CIFAR_RECIPE = "cifar10/resnet20-jpeg"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_call_s(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    rounds: int,
    calls: int,
    warmup: int = 3,
) -> dict[str, float]:
    """Median seconds per call of each fn. One timing is `calls` calls back to back between one
    pair of CUDA events (one call per pair would measure the launch overhead, not the kernels);
    rounds interleave the fns so that clock drift hits all alike. A synchronised host clock on
    the CPU."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                for _ in range(calls):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3 / calls)
            else:
                tic = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - tic) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def compile_for(ctx: Ctx) -> Iterator[None]:
    """The dry run compiles with the "aot_eager" backend: dynamo and AOTAutograd trace forward
    and backward as on the GPU (the C++ loss op is off there too, see harness.child_env), without
    minutes of C++ code generation on a small machine. On CUDA: torch.compile as it is."""
    if ctx.cuda:
        yield
        return
    real = torch.compile
    torch.compile = functools.partial(real, backend="aot_eager")  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = real  # type: ignore[assignment]


def cli_value(v: Any) -> str:
    """key=value as the CLI reads it (YAML): JSON is YAML, strings go as they are."""
    return v if isinstance(v, str) else json.dumps(v)


def train_args(recipe: str | None, overrides: dict[str, Any], out: Path) -> list[str]:
    keys = [f"{k}={cli_value(v)}" for k, v in overrides.items()]
    return ["train", *([recipe] if recipe else []), *keys, "--out", str(out), "--overwrite"]


def train(ctx: Ctx, name: str, recipe: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """`powergrad train` (its CLI's main, in this process) into ctx.work/name: the run's metric
    rows, summary, peak device memory (GiB) and wall seconds. A non-zero exit raises."""
    out = ctx.work / name
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    args = train_args(recipe, {"device": ctx.device.type, **overrides}, out)
    tic = time.perf_counter()
    with compile_for(ctx):
        code = powergrad_cli(args)
    wall = time.perf_counter() - tic
    if code != 0:
        raise RuntimeError(f"powergrad {' '.join(args)} exited {code}")
    return {
        "history": read_metrics(out),
        "summary": read_summary(out),
        "peak_mem_gib": torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None,
        "wall_s": wall,
        "out": out,
    }


def cifar_data(ctx: Ctx) -> tuple[dict[str, Any], bool]:
    """Overrides that point a recipe at CIFAR-10 (JPEG), or (no data) at generated JPEGs of the
    same size; True if real."""
    if ctx.data is not None:
        return {"dataset": "imagefolder", "data_dir": str(ctx.data), "img_size": 32}, True
    folder = ctx.work / "generated-cifar"
    if not (folder / "train").is_dir():
        per_class = (16, 4) if ctx.tiny else (1000, 200)
        make_jpeg_folder(folder, 10 if not ctx.tiny else 3, *per_class, side=32)
    ctx.rec.note(f"no CIFAR-10 data: generated JPEGs in {folder.name}; accuracy not judged")
    return {"dataset": "imagefolder", "data_dir": str(folder), "img_size": 32}, False


def write_jpegs(job: tuple[str, int, int, int, int]) -> None:
    """Smooth random images (low-frequency noise, upsampled) at a size drawn per image: closer to
    photos for a JPEG decoder than white noise, which decodes slower than any photo."""
    from PIL import Image

    folder, label, count, side, seed = job
    rng = np.random.default_rng(seed)
    tint = np.array([(label * 67) % 256, (label * 131) % 256, (label * 29) % 256], dtype=np.float32)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = (int(side * rng.uniform(0.8, 1.25)) for _ in range(2))
        small = rng.normal(0, 50, (max(2, h // 16), max(2, w // 16), 3)) + tint
        img = Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (h, w, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(
            f"{folder}/{i:05d}.jpg", quality=90
        )


def make_jpeg_folder(
    root: Path, classes: int, train_per_class: int, test_per_class: int, side: int, workers: int = 1
) -> Path:
    """root/{train,test}/cNN/*.jpg; the class sets a mean colour, so it is learnable."""
    jobs = [
        (str(root / split / f"c{k:02d}"), k, n, side, 1000 * k + (split == "test"))
        for split, n in (("train", train_per_class), ("test", test_per_class))
        for k in range(classes)
    ]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(write_jpegs, jobs)
    else:
        for job in jobs:
            write_jpegs(job)
    return root
