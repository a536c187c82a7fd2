"""The in-memory loader: the whole data set as one uint8 tensor on the device (airbench style).

Batches are gathered by index and augmented as whole-batch tensor ops (pad-and-crop by gather,
flip by where, random-resized-crop by one grid_sample), so the hot loop has no per-sample Python.
Augmentation parameters are drawn per *global* batch from a generator seeded by
(seed, epoch, step) and then sliced, so they do not depend on the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from . import sampling

AUGMENTS = ("auto", "none", "cifar", "imagenet", "flip")

# Store a resized copy only below this many bytes of uint8; above it, resize each batch on the
# device instead (CIFAR at 224 px would be 60k * 3 * 224 * 224 = 9 GB).
MEMORY_LIMIT_BYTES = 2 * 1024**3


@dataclass
class Arrays:
    """A data set held in memory: uint8 (N, C, H, W) images and int64 (N,) labels per split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # what "auto" means for this data set
    bad_images: int = 0
    # Set by builders that decode only what the run uses (image folders): the train arrays hold
    # the run's train then val examples, at these indices, and the test arrays its test_subset.
    used: tuple[torch.Tensor, torch.Tensor | None] | None = None


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 (N, C, H, W) images, in chunks to bound memory."""
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8, device=x.device)
    for i in range(0, x.shape[0], chunk):
        xf = F.interpolate(
            x[i : i + chunk].float(),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        out[i : i + chunk] = xf.round_().clamp_(0, 255).to(torch.uint8)
    return out


def fits_in_memory(n: int, chans: int, size: int) -> bool:
    return n * chans * size * size <= MEMORY_LIMIT_BYTES


class Transform(Protocol):
    """What the memory loaders call on each batch: BatchTransform, or none (the linear probe)."""

    def draw(self, gen: torch.Generator, n: int, side: int) -> dict[str, torch.Tensor]: ...

    def __call__(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor: ...


class BatchTransform:
    """uint8 batch -> augmented, resized, normalised float32 batch, all as batch tensor ops."""

    def __init__(
        self,
        augment: str,
        out_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels_last: bool,
        device: torch.device,
    ) -> None:
        self.augment = augment
        self.out_size = out_size
        # Normalise in 0..255 units: one subtract and one divide on the uint8-valued floats.
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.channels_last = channels_last

    def draw(self, gen: torch.Generator, n: int, side: int) -> dict[str, torch.Tensor]:
        """Random parameters for a global batch of n images of side `side` (drawn on the CPU)."""
        p: dict[str, torch.Tensor] = {}
        if self.augment in ("cifar", "flip", "imagenet"):
            p["flip"] = torch.rand(n, generator=gen) < 0.5
        if self.augment == "cifar":
            pad = cifar_pad(side)
            p["dy"] = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
            p["dx"] = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        if self.augment == "imagenet":
            # RandomResizedCrop's defaults: area in (0.08, 1), aspect ratio in (3/4, 4/3).
            area = torch.empty(n).uniform_(0.08, 1.0, generator=gen)
            logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
            w = (area * logr.exp()).sqrt().clamp(max=1.0)
            h = (area / logr.exp()).sqrt().clamp(max=1.0)
            p["w"], p["h"] = w, h
            p["cx"] = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
            p["cy"] = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
        return p

    def __call__(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if params:
            params = {k: v.to(x.device, non_blocking=True) for k, v in params.items()}
            if "dx" in params:  # the pad comes from the shape: reading a device tensor would sync
                x = _pad_crop(x, cifar_pad(x.shape[-1]), params["dy"], params["dx"])
            if "flip" in params and "w" not in params:
                x = torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(3), x)
        xf = x.float()
        if params and "w" in params:
            xf = _resized_crop(xf, params, self.out_size)
        elif xf.shape[-1] != self.out_size or xf.shape[-2] != self.out_size:
            xf = F.interpolate(
                xf,
                size=(self.out_size, self.out_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        xf = (xf - self.mean) / self.std
        if self.channels_last:
            xf = xf.contiguous(memory_format=torch.channels_last)
        return xf


def cifar_pad(side: int) -> int:
    """The CIFAR recipe's 4 px of padding on 32 px, scaled with the stored image size."""
    return max(1, side // 8)


def _pad_crop(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Reflect-pad by `pad` and crop back to the original size at per-image offsets (dy, dx)."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    # Every crop is a view of (b, c, 2p+1, 2p+1, h, w) windows; one indexing op copies the chosen
    # one per image. 1.8x faster than two gathers with int64 index tensors (CIFAR batch of 128,
    # 1 CPU thread: 20 vs 35 ms on the shared, loaded 2-core machine), same output.
    windows = xp.unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(x.shape[0], device=x.device), :, dy, dx]


def _resized_crop(x: torch.Tensor, p: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """A batched RandomResizedCrop + flip: one affine grid per image, one grid_sample."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.where(p["flip"], -p["w"], p["w"])
    theta[:, 0, 2] = p["cx"]
    theta[:, 1, 1] = p["h"]
    theta[:, 1, 2] = p["cy"]
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class MemoryTrainLoader:
    """Shuffled, augmented batches of this rank's slice of each global batch."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        transform: Transform,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y, self.transform = x, y, transform
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sampling.steps_per_epoch(len(self.y), self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = sampling.global_batches(
            len(self.y), self.batch_size, self.seed, self.epoch, self.world_size
        )
        for step, gidx in enumerate(batches):
            sl = sampling.rank_slice(len(gidx), self.rank, self.world_size)
            gen = torch.Generator().manual_seed(sampling.step_seed(self.seed, self.epoch, step))
            params = self.transform.draw(gen, len(gidx), self.x.shape[-1])
            params = {k: v[sl] for k, v in params.items()}
            idx = gidx[sl].to(self.x.device, non_blocking=True)
            yield self.transform(self.x[idx], params), self.y[idx]


class MemoryEvalLoader:
    """This rank's indices r::world_size of an eval split, in order, no augmentation."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        transform: Transform,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y, self.transform, self.batch_size = x, y, transform, batch_size
        self.idx = sampling.eval_indices(len(y), rank, world_size).to(x.device)

    def __len__(self) -> int:
        return math.ceil(len(self.idx) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.idx), self.batch_size):
            idx = self.idx[i : i + self.batch_size]
            yield self.transform(self.x[idx]), self.y[idx]
