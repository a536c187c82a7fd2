"""powergrad.data on tiny files written in the real on-disk formats (CPU, no network)."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from powergrad.cache import list_cache
from powergrad.config import load_config
from powergrad.data import DATASETS, create_loaders, folder, memory, sampling
from powergrad.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))


def cfg_of(**kw):
    # load_config reads the string "none" as a null (config.py's _coerce), so augment="none" is
    # set on the built Config.
    augment = kw.pop("augment", None)
    cfg = load_config(None, {"workers": 0, **kw})
    return dataclasses.replace(cfg, augment=augment) if augment else cfg


def batches(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def cat(bs):
    return torch.cat([x for x, _ in bs]), torch.cat([y for _, y in bs])


# ---------------------------------------------------------------- writers of the real formats


def write_cifar10(root: Path, per_batch=8, n_test=10, seed=0):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", n_test)]:
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "batch_label": name,
        }
        (d / name).write_bytes(pickle.dumps(entry))
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    (d / "batches.meta").write_bytes(
        pickle.dumps({"label_names": names, "num_cases_per_batch": per_batch})
    )
    return root


def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x0800 + arr.ndim  # 0x08 = unsigned byte
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist(root: Path, name="MNIST", n_train=24, n_test=12, gz=True):
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for f, a in files.items():
        if gz:
            (raw / f"{f}.gz").write_bytes(gzip.compress(idx_bytes(a)))
        else:
            (raw / f).write_bytes(idx_bytes(a))
    return files


def save_image(path: Path, size=(16, 16), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def write_folder(root: Path, classes=("cat", "dog", "eel"), n_train=6, n_test=3, test_name="val"):
    seed = 0
    for split, n in (("train", n_train), (test_name, n_test)):
        for c in classes:
            for i in range(n):
                ext = "png" if i % 2 else "jpg"
                size = (16, 16) if i % 3 else (20, 24)  # mixed sizes get resized at decode
                save_image(root / split / c / f"{i}.{ext}", size, seed)
                seed += 1
    return root


def write_tiny(root: Path, wnids=("n01", "n02", "n03"), n_train=4, n_val=2):
    seed, lines = 0, []
    for w in wnids:
        for i in range(n_train):
            save_image(root / "train" / w / "images" / f"{w}_{i}.JPEG", (64, 64), seed)
            seed += 1
        for i in range(n_val):
            name = f"val_{w}_{i}.JPEG"
            save_image(root / "val" / "images" / name, (64, 64), seed)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
            seed += 1
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return root


# ---------------------------------------------------------------- digits and the basics


def test_digits_shapes_split_and_normalisation():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ld = create_loaders(cfg_of(batch_size=64), CPU)
    info = ld.info
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 8)
    assert (info.num_train, info.num_test) == (1437, 360)
    assert len(ld.train) == 1437 // 64 and ld.val is None
    x, y = next(iter(ld.train))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The hard-coded constants are the train split's statistics.
    d = load_digits()
    tr, _ = train_test_split(np.arange(1797), test_size=0.2, stratify=d.target, random_state=0)
    px = np.round(d.images[tr] * 255 / 16) / 255
    assert info.mean[0] == pytest.approx(px.mean(), abs=1e-3)
    assert info.std[0] == pytest.approx(px.std(), abs=1e-3)
    xs, ys = cat(batches(ld.train, 0))
    assert abs(xs.mean()) < 0.1 and abs(xs.std() - 1) < 0.1
    assert ys.min() >= 0 and ys.max() <= 9
    tx, ty = cat(batches(ld.test))
    assert tx.shape[0] == 360 and torch.bincount(ty).min() >= 35  # stratified: ~36 per class


def test_unknown_dataset_and_augment_and_batch():
    with pytest.raises(UserError, match="valid: .*cifar10.*digits"):
        create_loaders(cfg_of(dataset="nope"), CPU)
    with pytest.raises(UserError, match="augment"):
        create_loaders(cfg_of(augment="mixup"), CPU)
    with pytest.raises(UserError, match="divisible"):
        create_loaders(cfg_of(batch_size=63), CPU, rank=0, world_size=2)
    assert {
        "digits",
        "cifar10",
        "cifar100",
        "mnist",
        "fashion_mnist",
        "imagefolder",
        "tiny_imagenet",
        "synthetic",
    } <= set(DATASETS)


@pytest.mark.parametrize("augment", ["cifar", "imagenet", "flip", "none"])
def test_epochs_deterministic_and_ranks_concatenate(augment):
    kw = dict(
        dataset="synthetic", synthetic_size=100, img_size=16, batch_size=32, augment=augment, seed=3
    )
    one = create_loaders(cfg_of(**kw), CPU)
    a, b = batches(one.train, 1), batches(one.train, 1)
    assert len(a) == 3 and all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b)
    )
    assert not torch.equal(batches(one.train, 2)[0][1], a[0][1])
    again = create_loaders(cfg_of(**kw), CPU)
    assert torch.equal(batches(again.train, 1)[0][0], a[0][0])
    ranks = [create_loaders(cfg_of(**kw), CPU, rank=r, world_size=2) for r in range(2)]
    shards = [batches(r.train, 1) for r in ranks]
    assert all(len(s) == 3 for s in shards)
    for step, (x, y) in enumerate(a):
        assert shards[0][step][0].shape[0] == 16
        assert torch.allclose(torch.cat([s[step][0] for s in shards]), x, atol=1e-5)
        assert torch.equal(torch.cat([s[step][1] for s in shards]), y)


def test_eval_shards_cover_test_once():
    kw = dict(dataset="synthetic", synthetic_size=88, batch_size=6)  # 22 test images
    full_x, full_y = cat(batches(create_loaders(cfg_of(**kw), CPU).test))
    assert full_x.shape[0] == 22
    parts = [
        cat(batches(create_loaders(cfg_of(**kw), CPU, rank=r, world_size=3).test)) for r in range(3)
    ]
    assert sum(p[0].shape[0] for p in parts) == 22
    merged = torch.empty_like(full_x)
    for r, (x, _) in enumerate(parts):
        merged[r::3] = x
    assert torch.equal(merged, full_x)
    # And the order does not change between calls.
    assert torch.equal(cat(batches(create_loaders(cfg_of(**kw), CPU).test))[1], full_y)


def test_val_fraction_and_train_subset():
    ld = create_loaders(cfg_of(val_fraction=0.2, train_subset=500, batch_size=50), CPU)
    assert ld.info.num_train == 500 and ld.info.num_test == 360
    vx, vy = cat(batches(ld.val))
    assert vx.shape[0] == round(1437 * 0.2)
    counts = torch.bincount(cat(batches(ld.train, 0))[1], minlength=10)
    assert counts.sum() == 500 and counts.min() >= 45  # class-balanced
    # val is disjoint from train: no val image appears among the train images.
    tr = {tuple(r.tolist()) for r in cat(batches(ld.train, 0))[0].flatten(1)}
    assert not any(tuple(r.tolist()) in tr for r in vx.flatten(1)[:50])
    # Fixed by the seed.
    ld2 = create_loaders(cfg_of(val_fraction=0.2, train_subset=500, batch_size=50), CPU)
    assert torch.equal(cat(batches(ld2.val))[1], vy)
    with pytest.raises(UserError, match="train_subset"):
        create_loaders(cfg_of(train_subset=5000), CPU)


def test_small_train_set_gives_one_batch():
    ld = create_loaders(cfg_of(dataset="synthetic", synthetic_size=20, batch_size=64), CPU)
    bs = batches(ld.train, 0)
    assert len(ld.train) == 1 and len(bs) == 1 and bs[0][0].shape[0] == 20


def test_channels_last_and_synthetic_info():
    ld = create_loaders(
        cfg_of(
            dataset="synthetic",
            synthetic_size=64,
            num_classes=7,
            img_size=12,
            channels_last=True,
            batch_size=16,
        ),
        CPU,
    )
    x, y = next(iter(ld.train))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (16, 3, 12, 12)
    assert ld.info.num_classes == 7 and ld.info.mean == (0.5,) * 3 and y.max() < 7


# ---------------------------------------------------------------- torchvision formats


def test_cifar10_pickle_batches(tmp_path):
    write_cifar10(tmp_path)
    ld = create_loaders(
        cfg_of(dataset="cifar10", data_dir=str(tmp_path), batch_size=8, augment="none"), CPU
    )
    info = ld.info
    assert (info.num_classes, info.in_chans, info.img_size, info.num_train, info.num_test) == (
        10,
        3,
        32,
        40,
        10,
    )
    assert info.class_names[0] == "airplane" and len(ld.train) == 5
    x, y = cat(batches(ld.test))
    assert x.shape == (10, 3, 32, 32) and y.min() >= 0 and y.max() <= 9
    # Normalisation undone gives back the stored bytes.
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"].reshape(-1, 3, 32, 32)
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    assert torch.allclose((x * std + mean) * 255, torch.from_numpy(raw).float(), atol=1e-3)
    # The default (auto) augment pad-crops and flips the train set: batches differ from plain ones.
    auto = create_loaders(cfg_of(dataset="cifar10", data_dir=str(tmp_path), batch_size=8), CPU)
    assert not torch.equal(batches(auto.train, 0)[0][0], batches(ld.train, 0)[0][0])


def test_cifar_resize_once_or_per_batch(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    kw = dict(dataset="cifar10", data_dir=str(tmp_path), batch_size=10, img_size=48)
    once = create_loaders(cfg_of(**kw), CPU)
    assert once.info.img_size == 48 and once.test.x.shape[-1] == 48  # stored resized
    monkeypatch.setattr(memory, "MEMORY_LIMIT_BYTES", 1000)
    per_batch = create_loaders(cfg_of(**kw), CPU)
    assert per_batch.test.x.shape[-1] == 32  # stored native, resized per batch
    a, b = cat(batches(once.test))[0], cat(batches(per_batch.test))[0]
    assert a.shape == b.shape == (10, 3, 48, 48)
    assert (a - b).abs().max() < 0.5 / 255 / 0.24 + 1e-4  # they differ only by uint8 rounding
    assert next(iter(per_batch.train))[0].shape == (10, 3, 48, 48)


def test_cifar_missing_and_download_failure(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="download=true") as e:
        create_loaders(cfg_of(dataset="cifar10", data_dir=str(tmp_path)), CPU)
    assert "cifar-10-batches-py" in str(e.value) and "\n" not in str(e.value)

    def offline(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    with pytest.raises(UserError, match="download to .* failed") as e:
        create_loaders(cfg_of(dataset="cifar100", data_dir=str(tmp_path), download=True), CPU)
    assert "\n" not in str(e.value)


def test_mnist_gz_and_fashion_raw(tmp_path):
    files = write_mnist(tmp_path, "MNIST", gz=True)
    write_mnist(tmp_path, "FashionMNIST", n_train=16, n_test=8, gz=False)
    ld = create_loaders(cfg_of(dataset="mnist", data_dir=str(tmp_path), batch_size=8), CPU)
    assert (ld.info.in_chans, ld.info.img_size, ld.info.num_train, ld.info.num_test) == (
        1,
        28,
        24,
        12,
    )
    x, y = cat(batches(ld.test))
    assert x.shape == (12, 1, 28, 28)
    assert torch.equal(y, torch.from_numpy(files["t10k-labels-idx1-ubyte"]).long())
    assert ld.info.mean == (0.1307,)
    fm = create_loaders(cfg_of(dataset="fashion_mnist", data_dir=str(tmp_path), batch_size=8), CPU)
    assert (fm.info.num_train, fm.info.num_test, fm.info.mean) == (16, 8, (0.2860,))
    assert fm.info.class_names[0] == "T-shirt/top"
    with pytest.raises(UserError, match="FashionMNIST.*download=true"):
        create_loaders(cfg_of(dataset="fashion_mnist", data_dir=str(tmp_path / "empty")), CPU)


# ---------------------------------------------------------------- image folders and Tiny ImageNet


def test_imagefolder_in_memory_and_cache(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "imgs")
    cfg = cfg_of(dataset="imagefolder", data_dir=str(root), batch_size=6)
    ld = create_loaders(cfg, CPU)
    info = ld.info
    assert info.class_names == ["cat", "dog", "eel"] and (info.num_train, info.num_test) == (18, 9)
    assert (info.in_chans, info.img_size) == (
        3,
        20,
    )  # the first (20x24) image sets it; 16x16 ones resized
    assert isinstance(ld.train, memory.MemoryTrainLoader)
    x, y = cat(batches(ld.test))
    assert x.shape == (9, 3, 20, 20) and y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2

    def no_decode(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(folder, "decode_image", no_decode)
    again = create_loaders(cfg, CPU)
    assert torch.equal(cat(batches(again.test))[0], x)
    # A changed file list is a new cache key, so it decodes (and here fails loudly).
    save_image(root / "train" / "cat" / "new.png", (16, 16), 99)
    with pytest.raises(AssertionError, match="decoded again"):
        create_loaders(cfg, CPU)


def test_imagefolder_decodes_only_the_images_a_run_uses(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "imgs")  # 18 train, 9 test images over 3 classes
    decoded = []
    real = folder.decode_image
    monkeypatch.setattr(
        folder, "decode_image", lambda path, side: decoded.append(path) or real(path, side)
    )
    cfg = cfg_of(
        dataset="imagefolder",
        data_dir=str(root),
        batch_size=3,
        train_subset=6,
        test_subset=3,
        val_fraction=0.2,
    )
    ld = create_loaders(cfg, CPU)
    assert (ld.info.num_train, ld.info.num_test) == (6, 3)
    n_val = len(cat(batches(ld.val))[1])
    assert len(decoded) == 6 + n_val + 3  # not the 27 images of the folder
    assert sorted(cat(batches(ld.test))[1].tolist()) == [0, 1, 2]  # class-balanced
    entries = list_cache(tmp_path / "cache")
    assert sorted(e.images for e in entries) == sorted([6, n_val, 3]) and {
        e.side for e in entries
    } == {20}
    # The same images as decoding the whole train folder and cutting afterwards gives.
    classes = folder.find_classes(root / "train")
    all_x, all_y, _ = folder.load_images(
        folder.scan_split(root / "train", classes), 20, 0, False, "all"
    )
    train_idx, _ = sampling.split_train(all_y, cfg)
    expect = {tuple(r.tolist()) for r in all_x[train_idx].flatten(1)}
    got = {tuple(r.tolist()) for r in folder.build_imagefolder(cfg).train_x[:6].flatten(1)}
    assert got == expect


def test_test_subset_is_class_balanced_and_seeded():
    ld = create_loaders(cfg_of(test_subset=100, batch_size=50), CPU)
    y = cat(batches(ld.test))[1]
    assert ld.info.num_test == 100 and torch.bincount(y, minlength=10).min() == 10
    again = cat(batches(create_loaders(cfg_of(test_subset=100, batch_size=50), CPU).test))
    other = cat(batches(create_loaders(cfg_of(test_subset=100, batch_size=50, seed=1), CPU).test))
    assert torch.equal(again[1], y) and not torch.equal(again[0], other[0])
    with pytest.raises(
        UserError, match="test_subset=361: must be between 1 and the 360 test examples"
    ):
        create_loaders(cfg_of(test_subset=361), CPU)


def test_imagefolder_test_dir_and_img_size(tmp_path):
    root = write_folder(tmp_path / "imgs", test_name="test", n_train=2, n_test=1)
    ld = create_loaders(
        cfg_of(dataset="imagefolder", data_dir=str(root), batch_size=3, img_size=24), CPU
    )
    assert ld.info.img_size == 24 and ld.info.num_test == 3
    assert next(iter(ld.train))[0].shape == (3, 3, 24, 24)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError, match="needs data_dir"):
        create_loaders(cfg_of(dataset="imagefolder"), CPU)
    with pytest.raises(UserError, match="does not exist"):
        create_loaders(cfg_of(dataset="imagefolder", data_dir=str(tmp_path / "nowhere")), CPU)
    (tmp_path / "notrain").mkdir()
    with pytest.raises(UserError, match="expected .*train/<class>"):
        create_loaders(cfg_of(dataset="imagefolder", data_dir=str(tmp_path / "notrain")), CPU)
    empty = write_folder(tmp_path / "empty", n_train=1, n_test=1)
    (empty / "train" / "zzz").mkdir()
    (empty / "val" / "zzz").mkdir()
    with pytest.raises(UserError, match="zzz has no images"):
        create_loaders(cfg_of(dataset="imagefolder", data_dir=str(empty)), CPU)
    mism = write_folder(tmp_path / "mism", n_train=1, n_test=1)
    (mism / "val" / "eel").rename(mism / "val" / "fox")
    with pytest.raises(UserError, match="differ from train.*eel.*fox"):
        create_loaders(cfg_of(dataset="imagefolder", data_dir=str(mism)), CPU)


def test_jpeg_fast_decoder_gives_pils_pixels(tmp_path, monkeypatch):
    """JPEGs go through torchvision's decoder when it is there; the pixels (and the resize of
    images of another size) are PIL's (both are libjpeg-turbo; builds may round a pixel apart, so
    1 grey level is allowed). Grey, truncated and PNG files take PIL's path."""
    rng = np.random.default_rng(0)
    files = {}
    for name, size, mode in (
        ("a.jpg", (32, 32), "RGB"),
        ("b.jpg", (40, 48), "RGB"),
        ("c.jpg", (32, 32), "L"),
        ("d.png", (32, 32), "RGB"),
    ):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(tmp_path / name, quality=90)
        files[name] = str(tmp_path / name)
    full = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    fast = {name: folder.decode_image(path, 32) for name, path in files.items()}
    assert (
        folder._decode_jpeg_fast((tmp_path / "a.jpg").read_bytes()) is not None
    )  # the fast path is taken here
    assert folder._decode_jpeg_fast((tmp_path / "d.png").read_bytes()) is None
    monkeypatch.setattr(folder, "_decode_jpeg_fast", lambda data: None)  # PIL alone
    for name, path in files.items():
        slow = folder.decode_image(path, 32)
        assert fast[name].shape == slow.shape == (3, 32, 32), name
        assert np.abs(fast[name].astype(int) - slow).max() <= 1, name
    assert folder.decode_image(str(tmp_path / "cut.jpg"), 32) is None


def test_corrupt_image_with_and_without_skip(tmp_path):
    root = write_folder(tmp_path / "imgs", n_train=2, n_test=1)
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    cfg = dict(dataset="imagefolder", data_dir=str(root), batch_size=2)
    with pytest.raises(UserError, match="broken.jpg.*skip_bad_images") as e:
        create_loaders(cfg_of(**cfg), CPU)
    assert "\n" not in str(e.value)
    ld = create_loaders(cfg_of(**cfg, skip_bad_images=True), CPU)  # reuses the cache it wrote
    assert ld.info.bad_images == 1 and ld.info.num_train == 6
    assert cat(batches(ld.train, 0))[1].shape[0] == 6


def test_imagefolder_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "MEMORY_LIMIT_BYTES", 0)  # force the streaming path
    root = write_folder(tmp_path / "imgs", n_train=4, n_test=3)
    kw = dict(dataset="imagefolder", data_dir=str(root), batch_size=4, img_size=16)
    one = create_loaders(cfg_of(**kw), CPU)
    assert isinstance(one.train, folder.StreamLoader) and one.info.img_size == 16
    a = batches(one.train, 1)
    assert (
        len(a) == len(one.train) == 3
        and a[0][0].shape == (4, 3, 16, 16)
        and a[0][0].dtype == torch.float32
    )
    torch.manual_seed(123)
    assert torch.equal(batches(one.train, 1)[0][0], a[0][0])  # deterministic
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # and the caller's global RNG is left alone
    assert not torch.equal(batches(one.train, 2)[0][1], a[0][1])
    shards = [batches(create_loaders(cfg_of(**kw), CPU, r, 2).train, 1) for r in range(2)]
    for step, (x, y) in enumerate(a):
        assert torch.allclose(torch.cat([s[step][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[step][1] for s in shards]), y)
    tests = [cat(batches(create_loaders(cfg_of(**kw), CPU, r, 2).test)) for r in range(2)]
    assert sum(t[0].shape[0] for t in tests) == 9
    assert sorted(torch.cat([t[1] for t in tests]).tolist()) == [0] * 3 + [1] * 3 + [2] * 3
    val = create_loaders(cfg_of(**kw, val_fraction=0.25), CPU)
    assert val.info.num_train == 9 and sum(x.shape[0] for x, _ in val.val) == 3


def test_streaming_corrupt_image_from_a_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "MEMORY_LIMIT_BYTES", 0)
    root = write_folder(tmp_path / "imgs", n_train=1, n_test=1)
    (root / "val" / "cat" / "0.jpg").write_bytes(b"garbage")
    ld = create_loaders(
        cfg_of(dataset="imagefolder", data_dir=str(root), batch_size=3, img_size=16, workers=1), CPU
    )
    with pytest.raises(UserError, match=r"cannot read image .*0\.jpg") as e:
        batches(ld.test)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    ok = create_loaders(
        cfg_of(
            dataset="imagefolder",
            data_dir=str(root),
            batch_size=3,
            img_size=16,
            skip_bad_images=True,
        ),
        CPU,
    )
    assert cat(batches(ok.test))[0].shape[0] == 3


def test_tiny_imagenet_layout(tmp_path):
    root = write_tiny(tmp_path / "tiny")
    ld = create_loaders(cfg_of(dataset="tiny_imagenet", data_dir=str(root), batch_size=4), CPU)
    info = ld.info
    assert info.class_names == ["n01", "n02", "n03"] and info.img_size == 64
    assert (info.num_train, info.num_test, info.num_classes) == (12, 6, 3)
    x, y = cat(batches(ld.test))
    assert x.shape == (6, 3, 64, 64) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    (root / "val" / "val_annotations.txt").write_text("val_n01_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match="wnid"):
        create_loaders(cfg_of(dataset="tiny_imagenet", data_dir=str(root)), CPU)
    with pytest.raises(UserError, match="val_annotations.txt"):
        create_loaders(cfg_of(dataset="tiny_imagenet", data_dir=str(tmp_path)), CPU)


def test_cache_command_lists_and_clears_only_its_own_files(tmp_path, capsys):
    from powergrad.cli import main

    root = write_folder(tmp_path / "imgs")
    create_loaders(cfg_of(dataset="imagefolder", data_dir=str(root), batch_size=3), CPU)
    (tmp_path / "cache" / "notes.txt").write_text("mine")  # not the cache's: left alone
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("imagefolder-train-") and "18 images at 20 px" in line for line in out
    )
    assert out[-1].startswith(f"{tmp_path / 'cache'}: 2 cached splits")
    assert main(["cache", "clear"]) == 0
    assert "removed 2 cached splits" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["notes.txt"]
