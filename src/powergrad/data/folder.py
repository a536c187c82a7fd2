"""Image folders: scan (torchvision ImageFolder semantics), decode into memory with a cache, or stream.

Small folders (under memory.MEMORY_LIMIT_BYTES of uint8 at the chosen size) are decoded once, in a
Pool of cfg.workers, into a uint8 array cached as .npz under POWERGRAD_CACHE (default
~/.cache/powergrad; see powergrad.cache), keyed by a hash of the file list, sizes, mtimes and
image size. Only the images a run uses are decoded: its train_subset, val split and test_subset. Larger ones
(ImageNet) stream through a DataLoader whose batch sampler shards global batches like the
in-memory loader does.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from ..cache import cache_dir
from ..config import Config
from ..errors import UserError
from ..preflight import data_dir_required, imagefolder_dirs
from ..progress import track
from . import sampling
from .memory import Arrays, cifar_pad, fits_in_memory

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
try:  # deprecated since torchvision 0.29 in favour of TorchCodec; PIL does the job without it
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a torchvision that has dropped it
    decode_jpeg = None

_CACHE_VERSION = 2  # 2: JPEGs decoded by torchvision (same pixels; a fresh cache to be sure)
Sample = tuple[str, int]


@dataclass
class Folders:
    """A data set too large for memory: (path, label) lists to stream from disk."""

    train: list[Sample]
    test: list[Sample]
    class_names: list[str]
    img_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


# ---------------------------------------------------------------- scanning


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names, as torchvision's ImageFolder finds them."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise UserError(
            f"no class folders in {split_dir}: expected {split_dir}/<class>/<image>.jpg"
        )
    return classes


def list_images(folder: Path) -> list[str]:
    """Image files under a folder, recursively, in sorted order (ImageFolder's extensions)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(IMG_EXTENSIONS)
        ]
    return out


def scan_split(split_dir: Path, classes: list[str]) -> list[Sample]:
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        files = list_images(split_dir / name)
        if not files:
            raise UserError(
                f"class folder {split_dir / name} has no images ({', '.join(IMG_EXTENSIONS)})"
            )
        samples += [(f, label) for f in files]
    return samples


def check_same_classes(train: list[str], test: list[str], test_dir: Path) -> None:
    if train != test:
        only_train = sorted(set(train) - set(test))[:5]
        only_test = sorted(set(test) - set(train))[:5]
        raise UserError(
            f"class folders of {test_dir} differ from train: only in train {only_train}, "
            f"only in {test_dir.name} {only_test}"
        )


# ---------------------------------------------------------------- decoding and the cache


def _open_rgb(source: str | io.BytesIO) -> Image.Image:
    with Image.open(source) as im:
        return im.convert("RGB")  # convert() forces the full decode, so truncated files fail here


def _decode_jpeg_fast(data: bytes) -> np.ndarray | None:
    """(3, H, W) uint8 through torchvision's libjpeg-turbo decoder, or None when the bytes are
    not a JPEG or that decoder refuses them (truncated, odd), for PIL to decide.

    For small images the Python around PIL costs more than the decode: on CIFAR-10's 32x32 JPEGs
    this is about 3x PIL's rate, with the same pixels (the same library underneath).
    """
    if decode_jpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        img = decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
        )
    except RuntimeError:
        return None
    return img.numpy()


def decode_image(path: str, side: int) -> np.ndarray | None:
    """(3, side, side) uint8: shorter side resized to `side`, centre crop. None if unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()  # read once: torchvision's decoder first, PIL from the same bytes
    except OSError:
        return None
    fast = _decode_jpeg_fast(data)
    if fast is not None and fast.shape[1:] == (side, side):
        return fast
    try:
        im = (
            Image.fromarray(fast.transpose(1, 2, 0))
            if fast is not None
            else _open_rgb(io.BytesIO(data))
        )
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    w, h = im.size
    if (w, h) != (side, side):
        s = side / min(w, h)
        nw, nh = max(side, round(w * s)), max(side, round(h * s))
        im = im.resize(
            (nw, nh), Image.Resampling.BILINEAR
        )  # PIL's bilinear antialiases when shrinking
        left, top = (nw - side) // 2, (nh - side) // 2
        im = im.crop((left, top, left + side, top + side))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def first_image_side(samples: list[Sample]) -> int:
    """The shorter side of the first readable image: the default in-memory size of a folder."""
    for path, _ in samples[:100]:
        try:
            with Image.open(path) as im:
                return min(im.size)
        except (OSError, ValueError, SyntaxError):
            continue
    raise UserError(f"none of the first images under {Path(samples[0][0]).parent} could be read")


def _cache_key(samples: list[Sample], side: int) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION} side={side}".encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(json.dumps([os.path.abspath(path), label, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:20]


def load_images(
    samples: list[Sample], side: int, workers: int, skip_bad: bool, tag: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode (or read from the cache) a split into uint8 (N, 3, side, side) and int64 labels.

    Returns (images, labels, number of unreadable images skipped). An unreadable image is a
    UserError naming it unless skip_bad; the cache records bad files so either setting reuses it.
    """
    path = cache_dir() / f"{tag}-{_cache_key(samples, side)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            x, keep, bad = z["x"], z["keep"], [str(b) for b in z["bad"]]
    else:
        x, keep, bad = _decode_all(samples, side, workers)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x=x, keep=keep, bad=np.array(bad, dtype=str))
        os.replace(tmp, path)  # atomic, so ranks decoding at once do not read half a file
    if bad and not skip_bad:
        raise UserError(
            f"cannot read image {bad[0]} ({len(bad)} unreadable in all); fix or delete it, "
            f"or set skip_bad_images=true"
        )
    labels = torch.tensor([samples[i][1] for i in keep], dtype=torch.int64)
    return torch.from_numpy(x), labels, len(bad)


DECODE_CHUNK = 256  # images per task: one pickled array back per chunk, not one per image


def _decode_all(
    samples: list[Sample], side: int, workers: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    paths = [p for p, _ in samples]
    chunks = [paths[i : i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    x = np.empty((len(paths), 3, side, side), dtype=np.uint8)
    keep: list[int] = []
    bad: list[str] = []
    desc = f"decoding {len(paths)} images ({DECODE_CHUNK} a chunk)"
    if workers > 0:
        with multiprocessing.get_context().Pool(workers) as pool:
            results = pool.imap(partial(_decode_chunk, side=side), chunks)
            _collect(track(results, desc, len(chunks), "chunk"), chunks, x, keep, bad)
    else:
        _collect(
            track((_decode_chunk(c, side) for c in chunks), desc, len(chunks), "chunk"),
            chunks,
            x,
            keep,
            bad,
        )
    return x[: len(keep)], np.array(keep, dtype=np.int64), bad


def _decode_chunk(paths: list[str], side: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images of ``paths`` stacked, and which of them could be read."""
    out = np.zeros((len(paths), 3, side, side), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        arr = decode_image(path, side)
        if arr is not None:
            out[i], ok[i] = arr, True
    return out, ok


def _collect(
    results: Iterator[tuple[np.ndarray, np.ndarray]],
    chunks: list[list[str]],
    x: np.ndarray,
    keep: list[int],
    bad: list[str],
) -> None:
    start = 0
    for chunk, (imgs, ok) in zip(chunks, results):
        n = len(keep)
        x[n : n + int(ok.sum())] = imgs[ok]
        keep += [start + i for i in np.flatnonzero(ok).tolist()]
        bad += [chunk[i] for i in np.flatnonzero(~ok).tolist()]
        start += len(chunk)


def decode_used(
    train: list[Sample],
    test: list[Sample],
    side: int,
    cfg: Config,
    tag: str,
    *,
    class_names: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: str,
) -> Arrays:
    """Decode (or read from the cache) only the images this run uses: its train_subset and
    val_fraction of ``train``, its test_subset of ``test``; the other arguments are the
    :class:`Arrays` fields of the data set."""
    labels = torch.tensor([lab for _, lab in train], dtype=torch.int64)
    train_idx, val_idx = sampling.split_train(labels, cfg)
    test_idx = sampling.subset_test(torch.tensor([lab for _, lab in test], dtype=torch.int64), cfg)
    # A split that is the whole list keeps the cache name of earlier versions (imagefolder-train).
    parts = [("train", train_idx, train), ("val", val_idx, train), ("test", test_idx, test)]
    decoded: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for split, idx, samples in parts:
        if split == "val" and idx is None:
            continue
        chosen = (
            samples
            if idx is None or len(idx) == len(samples)
            else [samples[i] for i in idx.tolist()]
        )
        decoded[split] = load_images(
            chosen, side, cfg.workers, cfg.skip_bad_images, f"{tag}-{split}"
        )
    (tx, ty, bad_tr), (ex, ey, bad_te) = decoded["train"], decoded["test"]
    vx, vy, bad_va = decoded.get("val", (tx[:0], ty[:0], 0))
    n_tr, n_va = len(ty), len(vy)
    used = (torch.arange(n_tr), torch.arange(n_tr, n_tr + n_va) if "val" in decoded else None)
    return Arrays(
        torch.cat([tx, vx]),
        torch.cat([ty, vy]),
        ex,
        ey,
        class_names,
        mean,
        std,
        augment,
        bad_images=bad_tr + bad_va + bad_te,
        used=used,
    )


# ---------------------------------------------------------------- the imagefolder data set


def build_imagefolder(cfg: Config) -> Arrays | Folders:
    """data_dir/train/<class>/* plus data_dir/val/ (or data_dir/test/): in memory when small."""
    train_dir, test_dir = imagefolder_dirs(data_dir_required(cfg))
    classes = find_classes(train_dir)
    check_same_classes(classes, find_classes(test_dir), test_dir)
    train, test = scan_split(train_dir, classes), scan_split(test_dir, classes)
    side = cfg.img_size or first_image_side(train)
    if not fits_in_memory(len(train) + len(test), 3, side):
        return Folders(train, test, classes, cfg.img_size or 224)
    # Photos above 64 px get ImageNet-style crops; CIFAR-sized ones the pad-and-crop recipe.
    return decode_used(
        train,
        test,
        side,
        cfg,
        "imagefolder",
        class_names=classes,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment="cifar" if side <= 64 else "imagenet",
    )


# ---------------------------------------------------------------- streaming


def stream_transform(augment: str, size: int, train: bool) -> v2.Compose:
    """PIL image -> uint8 (3, size, size) tensor; normalisation happens later, on the device."""
    if not train or augment == "none":
        return v2.Compose(
            [v2.Resize(int(size / 0.875), antialias=True), v2.CenterCrop(size), v2.PILToTensor()]
        )
    if augment == "imagenet":
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.PILToTensor(),
            ]
        )
    steps = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    if augment == "cifar":
        steps.append(v2.RandomCrop(size, padding=cifar_pad(size), padding_mode="reflect"))
    return v2.Compose([*steps, v2.RandomHorizontalFlip(), v2.PILToTensor()])


class FileDataset(torch.utils.data.Dataset):
    """(path, label) samples read with PIL. An index may come as (index, seed) to fix its augmentation."""

    def __init__(self, samples: list[Sample], transform: v2.Compose, skip_bad: bool) -> None:
        self.samples, self.transform, self.skip_bad = samples, transform, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        # A bad image (with skip_bad_images) is replaced by the next readable one in the list.
        for k in range(len(self.samples) if self.skip_bad else 1):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                img = _open_rgb(path)
            except (OSError, ValueError, SyntaxError) as e:
                if not self.skip_bad:
                    raise UserError(
                        f"cannot read image {path} ({e}); set skip_bad_images=true to skip it"
                    ) from None
                continue
            if seed is None:
                return self.transform(img), label
            # v2 transforms draw from the global RNG: seeding it per (seed, epoch, step, slot of
            # the global batch) makes the augmentation independent of workers and world size;
            # fork_rng keeps the caller's RNG untouched when workers=0 runs this in-process.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(img), label
        raise UserError("no readable image in the data set")


class TrainBatchSampler:
    """Yields this rank's (index, augmentation seed) slice of each global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world_size = (
            n,
            batch_size,
            seed,
            rank,
            world_size,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sampling.steps_per_epoch(self.n, self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = sampling.global_batches(
            self.n, self.batch_size, self.seed, self.epoch, self.world_size
        )
        for step, gidx in enumerate(batches):
            sl = sampling.rank_slice(len(gidx), self.rank, self.world_size)
            base = sampling.step_seed(self.seed, self.epoch, step) * len(gidx)
            yield [
                (int(i), (base + sl.start + j) & ((1 << 63) - 1)) for j, i in enumerate(gidx[sl])
            ]


class EvalBatchSampler:
    def __init__(self, n: int, batch_size: int, rank: int, world_size: int) -> None:
        self.idx = sampling.eval_indices(n, rank, world_size).tolist()
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.idx) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.idx), self.batch_size):
            yield self.idx[i : i + self.batch_size]


class StreamLoader:
    """A DataLoader of uint8 batches, moved to the device and normalised there."""

    def __init__(
        self,
        dataset: FileDataset,
        batch_sampler: TrainBatchSampler | EvalBatchSampler,
        cfg: Config,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
    ) -> None:
        self.batch_sampler = batch_sampler
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=cfg.workers > 0,
            # Its own generator: the DataLoader draws worker seeds from it, not the global RNG.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.device, self.channels_last = device, cfg.channels_last
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for x, y in self.loader:
                x = x.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(self.device, non_blocking=True)
        except UserError as e:
            # A worker's error comes back wrapped with its traceback: keep the one-line message.
            line = str(e).strip().splitlines()[-1]
            raise UserError(line.split("UserError: ", 1)[-1]) from None
