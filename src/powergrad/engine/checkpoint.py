"""Checkpoints: always whole on disk, loaded without running code from the file.

Writes go to a temporary file in the same folder, are flushed and fsync'ed, then renamed over
the old file (an atomic replace on POSIX), so a kill or a full disk at any moment leaves either
the previous checkpoint or the new one, never half of one. Loads use ``weights_only=True``: a
checkpoint holds tensors, numbers, strings, lists and dicts only, so a pickle that would run code
is refused.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

__all__ = ["save_checkpoint", "load_checkpoint", "find_resume_checkpoint"]

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` to ``path`` (tmp file + fsync + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**state, "format_version": FORMAT_VERSION}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a powergrad checkpoint safely, or raise UserError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).splitlines()[0] if str(e) else "unpickling failed"
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "refused: it holds objects other than tensors and plain values (possible code)"
        raise UserError(f"{path}: not a loadable checkpoint ({msg})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "zip" in first.lower() or "central directory" in first or isinstance(e, EOFError):
            first = "truncated or not a checkpoint file"
        raise UserError(f"{path}: cannot read checkpoint ({first})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: not a powergrad checkpoint (no 'model' entry)")
    return state


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint in ``run_dir`` that loads (for ``resume=auto``), or None."""
    run_dir = Path(run_dir)
    candidates = [p for p in (run_dir / "last.pt", run_dir / "preempt.pt") if p.is_file()]
    candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:
        try:
            load_checkpoint(p)
        except UserError:
            continue
        return p
    return None
