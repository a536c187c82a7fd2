"""Data sets and loaders: one registry, one entry point (create_loaders).

Every loader yields (x, y) already on the device: x float32 normalised (B, C, H, W), y int64.
``cfg.batch_size`` is the global batch; see powergrad.data.sampling for how it is sharded.
Small data sets live on the device as uint8 (powergrad.data.memory); large image folders stream
(powergrad.data.folder).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import Config
from ..errors import UserError, extra

with extra("train"):  # numpy, torchvision, PIL, scikit-learn
    from . import sampling
    from .folder import (
        EvalBatchSampler,
        FileDataset,
        Folders,
        StreamLoader,
        TrainBatchSampler,
        build_imagefolder,
        stream_transform,
    )
    from .memory import (
        AUGMENTS,
        Arrays,
        BatchTransform,
        MemoryEvalLoader,
        MemoryTrainLoader,
        fits_in_memory,
        resize_uint8,
    )
    from .sources import (
        build_cifar10,
        build_cifar100,
        build_digits,
        build_fashion_mnist,
        build_mnist,
        build_synthetic,
        build_tiny_imagenet,
    )

__all__ = [
    "DATASETS",
    "DataInfo",
    "Loaders",
    "TrainLoader",
    "EvalLoader",
    "create_loaders",
    "check_checkpoint_classes",
]

log = logging.getLogger("powergrad")

DATASETS: dict[str, Callable[[Config], Arrays | Folders]] = {
    "digits": build_digits,
    "cifar10": build_cifar10,
    "cifar100": build_cifar100,
    "mnist": build_mnist,
    "fashion_mnist": build_fashion_mnist,
    "imagefolder": build_imagefolder,
    "tiny_imagenet": build_tiny_imagenet,
    "synthetic": build_synthetic,
}


class EvalLoader(Protocol):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...


class TrainLoader(EvalLoader, Protocol):
    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class DataInfo:
    num_classes: int
    in_chans: int
    img_size: int  # side of the (square) images the model receives
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    num_train: int
    num_test: int
    bad_images: int = 0  # images skipped because unreadable (skip_bad_images=true)
    num_val: int = 0  # held out of train (val_fraction)

    def describe(self, dataset: str) -> str:
        """One line for the start of a run: what the model will see."""
        val = f", {self.num_val} validation" if self.num_val else ""
        return (
            f"data: {dataset}, {self.num_classes} classes, {self.in_chans}x{self.img_size}x{self.img_size}: "
            f"{self.num_train} train{val}, {self.num_test} test images"
        )


@dataclass
class Loaders:
    train: TrainLoader  # len() = steps per epoch; call .set_epoch(epoch) before each epoch
    test: EvalLoader  # this rank's shard of the test (or val folder) split
    val: EvalLoader | None  # held out of train when cfg.val_fraction > 0
    info: DataInfo


def create_loaders(
    cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1
) -> Loaders:
    """Build the train, test (and val) loaders of cfg.dataset for process `rank` of `world_size`."""
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset {cfg.dataset!r}; valid: {', '.join(sorted(DATASETS))}")
    if cfg.augment not in AUGMENTS:
        raise UserError(f"augment: must be one of {', '.join(AUGMENTS)}; got {cfg.augment!r}")
    sampling.per_rank_batch(cfg.batch_size, world_size)  # fail before loading anything
    device = torch.device(device)
    source = DATASETS[cfg.dataset](cfg)
    found = len(source.class_names)
    if (
        cfg.num_classes is not None and cfg.num_classes != found
    ):  # synthetic makes num_classes classes
        raise UserError(
            f"num_classes={cfg.num_classes} contradicts the data: {cfg.dataset} has {found} classes; "
            "drop num_classes (it is read from the data)"
        )
    if isinstance(source, Folders):
        loaders = _stream_loaders(source, cfg, device, rank, world_size)
    else:
        loaders = _memory_loaders(source, cfg, device, rank, world_size)
    if loaders.info.num_train < cfg.batch_size and rank == 0:
        log.warning(
            "warning: batch_size=%d is larger than the %d training images: each epoch is one step of %d",
            cfg.batch_size,
            loaders.info.num_train,
            loaders.info.num_train,
        )
    return loaders


def check_checkpoint_classes(saved: list[str] | None, found: list[str], checkpoint: object) -> None:
    """The class names a checkpoint was trained on against those of the data it is evaluated
    on: the same count in another order (or other folders) would score nonsense without a word."""
    if saved is None or list(saved) == list(found):
        return
    if sorted(saved) == sorted(found):
        raise UserError(
            f"{checkpoint}: the data's classes are the checkpoint's in another order "
            f"(first difference at label {next(i for i, (a, b) in enumerate(zip(saved, found)) if a != b)})"
        )
    only_ckpt, only_data = sorted(set(saved) - set(found))[:3], sorted(set(found) - set(saved))[:3]
    raise UserError(
        f"{checkpoint}: trained on other classes than the data's ({len(saved)} vs {len(found)}; "
        f"only in the checkpoint {only_ckpt}, only in the data {only_data})"
    )


def _memory_loaders(
    src: Arrays, cfg: Config, device: torch.device, rank: int, world_size: int
) -> Loaders:
    b = sampling.per_rank_batch(cfg.batch_size, world_size)
    if src.used is not None:  # the builder decoded only these (and the test subset)
        (train_idx, val_idx), test_x, test_y = src.used, src.test_x, src.test_y
    else:
        train_idx, val_idx = sampling.split_train(src.train_y, cfg)
        test_idx = sampling.subset_test(src.test_y, cfg)
        test_x, test_y = (
            (src.test_x, src.test_y)
            if test_idx is None
            else (src.test_x[test_idx], src.test_y[test_idx])
        )
    n, chans, native = len(src.train_y) + len(test_y), src.train_x.shape[1], src.train_x.shape[-1]
    out = cfg.img_size or native
    tx, vx = src.train_x, test_x
    if out != native and fits_in_memory(n, chans, out):
        # Resize once at load time; above the limit BatchTransform resizes each batch on the device.
        tx, vx = resize_uint8(tx, out), resize_uint8(vx, out)
    augment = src.augment if cfg.augment == "auto" else cfg.augment
    train_tf = BatchTransform(augment, out, src.mean, src.std, cfg.channels_last, device)
    eval_tf = BatchTransform("none", out, src.mean, src.std, cfg.channels_last, device)

    def on_device(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tx[idx].to(device), src.train_y[idx].to(device)

    train = MemoryTrainLoader(
        *on_device(train_idx), train_tf, cfg.batch_size, cfg.seed, rank, world_size
    )
    test = MemoryEvalLoader(vx.to(device), test_y.to(device), eval_tf, b, rank, world_size)
    val = (
        None
        if val_idx is None
        else MemoryEvalLoader(*on_device(val_idx), eval_tf, b, rank, world_size)
    )
    info = DataInfo(
        len(src.class_names),
        chans,
        out,
        tuple(src.mean),
        tuple(src.std),
        list(src.class_names),
        len(train_idx),
        len(test_y),
        src.bad_images,
        0 if val_idx is None else len(val_idx),
    )
    return Loaders(train, test, val, info)


def _stream_loaders(
    src: Folders, cfg: Config, device: torch.device, rank: int, world_size: int
) -> Loaders:
    b = sampling.per_rank_batch(cfg.batch_size, world_size)
    labels = torch.tensor([lab for _, lab in src.train], dtype=torch.int64)
    train_idx, val_idx = sampling.split_train(labels, cfg)
    train_set = [src.train[i] for i in train_idx.tolist()]
    test_idx = sampling.subset_test(
        torch.tensor([lab for _, lab in src.test], dtype=torch.int64), cfg
    )
    test_set = src.test if test_idx is None else [src.test[i] for i in test_idx.tolist()]
    augment = "imagenet" if cfg.augment == "auto" else cfg.augment

    def eval_loader(samples: list[tuple[str, int]]) -> StreamLoader:
        ds = FileDataset(
            samples, stream_transform("none", src.img_size, train=False), cfg.skip_bad_images
        )
        return StreamLoader(
            ds, EvalBatchSampler(len(samples), b, rank, world_size), cfg, src.mean, src.std, device
        )

    train_ds = FileDataset(
        train_set, stream_transform(augment, src.img_size, train=True), cfg.skip_bad_images
    )
    sampler = TrainBatchSampler(len(train_set), cfg.batch_size, cfg.seed, rank, world_size)
    train = StreamLoader(train_ds, sampler, cfg, src.mean, src.std, device)
    val = None if val_idx is None else eval_loader([src.train[i] for i in val_idx.tolist()])
    # Unreadable files are found only when read (and replaced then), so bad_images stays 0 here.
    info = DataInfo(
        len(src.class_names),
        3,
        src.img_size,
        tuple(src.mean),
        tuple(src.std),
        list(src.class_names),
        len(train_set),
        len(test_set),
        0,
        0 if val_idx is None else len(val_idx),
    )
    return Loaders(train, eval_loader(test_set), val, info)
