"""The decode cache: image folders decoded once into uint8 arrays, reused by later runs.

Where: ``$POWERGRAD_CACHE``, else ``~/.cache/powergrad``. One ``.npz`` per split a run used,
named ``<dataset>-<split>-<key>.npz``, where the key hashes the file list (paths, sizes,
modification times) and the image size, so an edited folder or another ``train_subset`` is a new
entry and a stale one is never read. Size: the images as uint8, 3 x side x side bytes each
(CIFAR-10 at 32 px: 150 MB for the 50,000 training images, 3 MB for a 1,000-image subset).
``powergrad cache list`` shows the entries, ``powergrad cache clear`` deletes them.

No torch here: ``powergrad cache`` answers without importing it.
"""

from __future__ import annotations

import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["cache_dir", "CacheEntry", "list_cache", "clear_cache", "CACHE_ENV"]

CACHE_ENV = "POWERGRAD_CACHE"
# What data/folder.py writes: the entry itself, and the temporary file of a decode in progress.
_ENTRY = re.compile(r"^[\w.-]+-[0-9a-f]{20}(\.\d+\.tmp)?\.npz$")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "powergrad").expanduser()


@dataclass
class CacheEntry:
    path: Path
    bytes: int
    modified: float
    images: int | None  # from the array's header; None if unreadable (a partial write)
    side: int | None

    def line(self) -> str:
        what = (
            f"{self.images} images at {self.side} px" if self.images is not None else "unreadable"
        )
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.modified))
        return f"{self.path.name}  {what}  {_size(self.bytes)}  {when}"


def _header(path: Path) -> tuple[int | None, int | None]:
    """(images, side) from the .npz's x array header, without reading the pixels."""
    from numpy.lib import format as npformat  # [plot]'s numpy: `powergrad cache` runs without

    try:
        with zipfile.ZipFile(path) as z, z.open("x.npy") as f:
            version = npformat.read_magic(f)
            read = (
                npformat.read_array_header_1_0
                if version == (1, 0)
                else npformat.read_array_header_2_0
            )
            shape, _, _ = read(f)
        return int(shape[0]), int(shape[-1])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None, None


def list_cache(folder: Path | None = None) -> list[CacheEntry]:
    folder = folder or cache_dir()
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and _ENTRY.match(p.name):
            st = p.stat()
            out.append(CacheEntry(p, st.st_size, st.st_mtime, *_header(p)))
    return out


def clear_cache(folder: Path | None = None) -> tuple[int, int]:
    """Delete the cache's entries (nothing else in the folder); (files removed, bytes freed)."""
    n = freed = 0
    for e in list_cache(folder):
        try:
            e.path.unlink()
        except FileNotFoundError:
            continue
        n, freed = n + 1, freed + e.bytes
    return n, freed


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")
