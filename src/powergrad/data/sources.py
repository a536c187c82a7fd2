"""Data sets held in memory: scikit-learn digits, torchvision's sets, Tiny ImageNet, synthetic.

Each builder takes the Config and returns uint8 (N, C, H, W) images and int64 labels per split.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from ..config import Config
from ..errors import UserError, extra
from ..preflight import data_dir_required, data_root
from .folder import IMAGENET_MEAN, IMAGENET_STD, decode_used, list_images
from .memory import Arrays

# Mean and std of the digits train split below, scaled to 0..1 (computed once with
# round(x * 255 / 16) / 255 over the 1,437 train images; tests/test_data.py re-checks them).
DIGITS_MEAN, DIGITS_STD = (0.3054,), (0.3760,)


def _download(name: str, root: Path, fetch: Callable[[], object]) -> None:
    try:
        fetch()
    except Exception as e:  # noqa: BLE001 - torchvision raises URLError, RuntimeError, OSError...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{name}: download to {root} failed ({msg}); check the network, or put the files there by hand"
        ) from None


def build_digits(cfg: Config) -> Arrays:
    """scikit-learn's bundled 8x8 digits; a fixed stratified 80/20 split (random_state=0)."""
    with extra("train"):  # scikit-learn, a heavy import, for this data set only
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

    d = load_digits()
    # Values 0..16 become 0..255 so every data set is uint8 with the same /255 scale.
    x = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return Arrays(
        x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)], DIGITS_MEAN, DIGITS_STD, "none"
    )


# ---------------------------------------------------------------- CIFAR


def _safe_globals() -> dict[tuple[str, str], object]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    rebuild = core.multiarray._reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): rebuild,
        ("numpy._core.multiarray", "_reconstruct"): rebuild,
        ("numpy.core.numeric", "_frombuffer"): core.numeric._frombuffer,  # protocol 5
        ("numpy._core.numeric", "_frombuffer"): core.numeric._frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles spell bytes
    }


class _DataUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles: unpickle dicts, lists, strings and numpy arrays, nothing else.

    A plain pickle.load would call any function the file names (os.system included); this
    allow-list holds the globals a pickled numpy array needs and refuses the rest.
    """

    allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> object:
        fn = self.allowed.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(
                f"refused: it names {module}.{name}, which a data batch never needs"
            )
        return fn


def load_data_pickle(path: Path) -> Any:  # what the allow-list lets through: dicts, lists, arrays
    """A data pickle read through the allow-list of _DataUnpickler; UserError naming the file if refused."""
    try:
        return _DataUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: {e}") from None


def _read_cifar_batches(folder: Path, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        entry = load_data_pickle(folder / f)
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys += entry["labels"] if "labels" in entry else entry["fine_labels"]
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.int64)


def _cifar(cfg: Config, cls: type[Any], mean: tuple[float, ...], std: tuple[float, ...]) -> Arrays:
    """CIFAR-10/100 from torchvision's on-disk layout (the python pickle batches).

    The batches are read here rather than through cls(...), because torchvision md5-checks all
    178 MB on every construction; torchvision's class still names the files and downloads them.
    """
    name = cls.__name__
    root = data_root(cfg)
    folder = root if (root / cls.meta["filename"]).is_file() else root / cls.base_folder
    files = [f for f, _ in cls.train_list] + [f for f, _ in cls.test_list] + [cls.meta["filename"]]
    if not all((folder / f).is_file() for f in files) and cfg.download:
        _download(name, root, lambda: cls(str(root), train=True, download=True))
        folder = root / cls.base_folder
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"{name}: no data in {folder} (missing {', '.join(missing[:3])}); set download=true to "
            f"fetch it, or unpack the python version of the archive into {root}"
        )
    try:
        tx, ty = _read_cifar_batches(folder, [f for f, _ in cls.train_list])
        vx, vy = _read_cifar_batches(folder, [f for f, _ in cls.test_list])
        classes = list(load_data_pickle(folder / cls.meta["filename"])[cls.meta["key"]])
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(
            f"{name}: cannot read the batches in {folder} ({type(e).__name__}: {e})"
        ) from None
    return Arrays(tx, ty, vx, vy, classes, mean, std, "cifar")


def build_cifar10(cfg: Config) -> Arrays:
    return _cifar(
        cfg, torchvision.datasets.CIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    )


def build_cifar100(cfg: Config) -> Arrays:
    return _cifar(
        cfg, torchvision.datasets.CIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    )


# ---------------------------------------------------------------- MNIST and Fashion-MNIST


def _mnist(cfg: Config, cls: type[Any], mean: float, std: float) -> Arrays:
    """MNIST-style IDX files under root/<ClassName>/raw/, read by torchvision's class."""
    name, root = cls.__name__, data_root(cfg)
    raw = root / name / "raw"
    wanted = [Path(f).stem for f, _ in cls.resources]  # torchvision reads them un-gzipped
    for f in wanted:
        # Accept the .gz files as they come from the mirrors: unpack them once, as download does.
        if not (raw / f).is_file() and (raw / f"{f}.gz").is_file():
            with gzip.open(raw / f"{f}.gz", "rb") as src, open(raw / f, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if cfg.download and not all((raw / f).is_file() for f in wanted):
        _download(name, root, lambda: cls(str(root), train=True, download=True))
    missing = [f for f in wanted if not (raw / f).is_file()]
    if missing:
        raise UserError(
            f"{name}: no data in {raw} (missing {', '.join(missing)}, or their .gz); set download=true to fetch it"
        )
    try:
        tr, te = cls(str(root), train=True), cls(str(root), train=False)
    except (OSError, RuntimeError, ValueError, AssertionError) as e:
        raise UserError(
            f"{name}: cannot read the IDX files in {raw} ({type(e).__name__}: {e})"
        ) from None
    return Arrays(
        tr.data.unsqueeze(1).to(torch.uint8),
        tr.targets.long(),
        te.data.unsqueeze(1).to(torch.uint8),
        te.targets.long(),
        list(cls.classes),
        (mean,),
        (std,),
        "none",
    )


def build_mnist(cfg: Config) -> Arrays:
    return _mnist(cfg, torchvision.datasets.MNIST, 0.1307, 0.3081)


def build_fashion_mnist(cfg: Config) -> Arrays:
    return _mnist(cfg, torchvision.datasets.FashionMNIST, 0.2860, 0.3530)


# ---------------------------------------------------------------- Tiny ImageNet


def build_tiny_imagenet(cfg: Config) -> Arrays:
    """The raw tiny-imagenet-200 layout: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    root = data_dir_required(cfg)
    ann = root / "val" / "val_annotations.txt"
    if not (root / "train").is_dir() or not ann.is_file():
        raise UserError(
            f"tiny_imagenet: expected {root}/train/<wnid>/images/*.JPEG and {ann} (unzip "
            f"tiny-imagenet-200.zip from http://cs231n.stanford.edu/ and point data_dir at it)"
        )
    wnids_file = root / "wnids.txt"
    if wnids_file.is_file():
        wnids = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
    else:
        wnids = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
    label = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        files = list_images(root / "train" / w)
        if not files:
            raise UserError(f"tiny_imagenet: class folder {root / 'train' / w} has no images")
        train += [(f, label[w]) for f in files]
    test = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in label:
            raise UserError(
                f"{ann}:{n}: expected 'file<TAB>wnid...' with a wnid of the train classes, got {line!r}"
            )
        test.append((str(root / "val" / "images" / parts[0]), label[parts[1]]))
    missing = [p for p, _ in test if not os.path.exists(p)]
    if missing and not cfg.skip_bad_images:
        raise UserError(
            f"tiny_imagenet: {missing[0]} is listed in {ann} but missing ({len(missing)} in all)"
        )
    gone = set(missing)
    test = [s for s in test if s[0] not in gone]
    arrays = decode_used(
        train,
        test,
        64,
        cfg,
        "tiny_imagenet",
        class_names=wnids,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment="cifar",
    )
    arrays.bad_images += len(missing)
    return arrays


# ---------------------------------------------------------------- synthetic


def build_synthetic(cfg: Config) -> Arrays:
    """Random uint8 images and labels from cfg.seed: for benchmarks, not for learning."""
    k, s, n = cfg.num_classes or 10, cfg.img_size or 32, cfg.synthetic_size
    m = max(1, n // 4)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, 256, (n + m, 3, s, s), generator=g, dtype=torch.uint8)
    y = torch.randint(0, k, (n + m,), generator=g)
    return Arrays(
        x[:n], y[:n], x[n:], y[n:], [str(i) for i in range(k)], (0.5,) * 3, (0.25,) * 3, "none"
    )
