"""Where a run's files are, checked without torch: the data folder, the checkpoint to resume or
start from. The data builders use these functions, and ``powergrad config`` (a dry run) calls
:func:`check_paths` to fail on a wrong path in a second, before anything heavy is imported.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import Config
from .errors import UserError

__all__ = ["data_root", "data_dir_required", "imagefolder_dirs", "check_paths", "FOLDER_DATASETS"]

log = logging.getLogger("powergrad")

FOLDER_DATASETS = ("imagefolder", "tiny_imagenet")  # need data_dir; the others default to ./data


def data_root(cfg: Config) -> Path:
    """Where torchvision's sets live: data_dir, else $POWERGRAD_DATA, else ./data."""
    root = Path(cfg.data_dir or os.environ.get("POWERGRAD_DATA") or "data").expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"data_dir {root} is a file, not a folder (dataset {cfg.dataset!r})")
    return root


def data_dir_required(cfg: Config) -> Path:
    if not cfg.data_dir:
        raise UserError(
            f"dataset {cfg.dataset!r} needs data_dir=PATH (the folder holding train/ and val/)"
        )
    root = data_root(cfg)
    if not root.is_dir():
        raise UserError(f"data_dir {root} does not exist (dataset {cfg.dataset!r})")
    return root


def imagefolder_dirs(root: Path) -> tuple[Path, Path]:
    """(train folder, evaluation folder) of an image folder: train/ and val/, else test/.

    With both val/ and test/ present, val/ is evaluated and test/ is not read: said in a warning,
    since a user who made both usually meant test/ for the final number.
    """
    train_dir = root / "train"
    present = [root / s for s in ("val", "test") if (root / s).is_dir()]
    if not train_dir.is_dir() or not present:
        raise UserError(
            f"imagefolder: expected {root}/train/<class>/*.jpg and {root}/val/<class>/ "
            f"(or {root}/test/<class>/); found no {'train' if not train_dir.is_dir() else 'val or test'} folder"
        )
    if len(present) == 2:
        log.warning(
            "warning: %s holds both val/ and test/: evaluating on val/, test/ is not used "
            "(remove or rename val/ to evaluate on test/)",
            root,
        )
    return train_dir, present[0]


def check_paths(cfg: Config) -> list[str]:
    """Check the paths a run will read (data, resume, weights); return one line saying what was
    found for each. UserError, naming the path, if one is wrong."""
    found = []
    if cfg.dataset in FOLDER_DATASETS:
        root = data_dir_required(cfg)
        if cfg.dataset == "imagefolder":
            train_dir, eval_dir = imagefolder_dirs(root)
            classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
            found.append(
                f"data: {train_dir} ({len(classes)} class folders), evaluated on {eval_dir}"
            )
        else:
            found.append(f"data: {root}")
    elif cfg.dataset not in ("digits", "synthetic"):
        root = data_root(cfg)
        state = (
            "exists"
            if root.is_dir()
            else ("missing; download=true fetches it" if cfg.download else "missing")
        )
        if not root.is_dir() and not cfg.download:
            raise UserError(
                f"data_dir {root} does not exist (dataset {cfg.dataset!r}); set download=true to fetch it"
            )
        found.append(f"data: {root} ({state})")
    for key in ("weights", "resume"):
        value = getattr(cfg, key)
        if value and value != "auto" and not Path(value).exists():
            raise UserError(f"{key}={value}: no such file or folder")
        if value:
            found.append(f"{key}: {value}")
    return found
