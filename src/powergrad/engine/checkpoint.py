"""Checkpoints: always whole on disk, loaded without running code from the file.

Writes go to a temporary file in the same folder, are flushed and fsync'ed, then renamed over
the old file (an atomic replace on POSIX), so a kill or a full disk at any moment leaves either
the previous checkpoint or the new one, never half of one. Loads use ``weights_only=True``: a
checkpoint holds tensors, numbers, strings, lists and dicts only, so a pickle that would run code
is refused. docs/reliability.md states these promises and the tests that hold them.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any, cast

import torch

from ..errors import UserError
from .state import FORMAT_VERSION

__all__ = ["save_checkpoint", "load_checkpoint", "remove_stale_temporaries", "RESUME_NAMES"]

log = logging.getLogger("powergrad")

# The checkpoint names of a run folder, besides epoch{N}.pt (keep_checkpoints=true); resume=auto
# takes best.pt only when named (engine/resume.py).
RESUME_NAMES = ("last.pt", "preempt.pt", "best.pt")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` to ``path`` (tmp file + fsync + rename)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            torch.save(
                {**state, "format_version": FORMAT_VERSION}, cast(IO[bytes], writer)
            )  # write() is all it uses
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # torch.save turns a failed write() into RuntimeError("[enforce fail ...] unexpected pos"):
        # the writer kept the OSError (disk full, file too large) that says what went wrong.
        cause = e if isinstance(e, OSError) else (writer.error if writer else None)
        if cause is not None:
            raise UserError(
                f"cannot write checkpoint {path}: {cause.strerror or cause}; the previous "
                f"{path.name}, if any, is intact"
            ) from None
        raise
    _fsync_dir(path.parent)


class _Writer:
    """A file for torch.save that remembers the OSError of a failed write."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f: IO[bytes] = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


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


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.pt.*.tmp`` files a killed save left behind; return what was removed."""
    removed = []
    for p in Path(folder).glob(".*.pt.*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a powergrad checkpoint safely, or raise UserError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            msg = "refused: it asks to build objects other than tensors and plain values (possible code); nothing was run"
        else:  # "Unsupported operand": bytes that are not a pickle at all
            msg = "truncated or not a checkpoint file"
        raise UserError(f"{path}: not a loadable checkpoint ({msg})") from None
    except Exception as e:  # noqa: BLE001 - on garbage the unpickler raises IndexError, KeyError, ...
        if isinstance(e, (PermissionError, IsADirectoryError)):
            raise UserError(f"{path}: cannot read checkpoint ({e.strerror})") from None
        # A cut-off zip gives OSError(EINVAL), RuntimeError or BadZipFile, garbage IndexError...
        raise UserError(
            f"{path}: cannot read checkpoint (truncated or not a checkpoint file)"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: not a powergrad checkpoint (no 'model' entry)")
    version = state.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format {version!r} is newer than this powergrad reads "
            f"({FORMAT_VERSION}); upgrade powergrad"
        )
    return state
