"""Checkpoints: always whole on disk, loaded without running code from the file.

Writes go to a temporary file in the same folder, are flushed and fsync'ed, then renamed over
the old file (an atomic replace on POSIX), so a kill or a full disk at any moment leaves either
the previous checkpoint or the new one, never half of one. Loads use ``weights_only=True``: a
checkpoint holds tensors, numbers, strings, lists and dicts only, so a pickle that would run code
is refused; so is a plain pickle (not torch.save's format), read opcode by opcode without
running it. docs/reliability.md states these promises and the tests that hold them.

Which files a run folder holds, and their names, is powergrad.rundir's to say.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, cast

import torch

from ..errors import UserError
from ..models.weights import plain_pickle_problem
from .state import FORMAT_VERSION

__all__ = ["save_checkpoint", "load_checkpoint", "progress"]

log = logging.getLogger("powergrad")

_ZIP = b"PK\x03\x04"  # torch.save's format since torch 1.6
_LEGACY = (
    b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # the older one's magic number
)
# Opcodes by which a pickle asks to import or call something (the way a pickle runs code).
_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


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


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load a powergrad checkpoint safely, or raise UserError naming the file and the problem.

    ``mmap=True`` maps the tensors' bytes instead of reading them: the counters (epoch, step)
    cost a read of the small pickle only, and weights are read when they are used.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    problem = plain_pickle_problem(path)
    if problem:
        raise UserError(f"{path}: {problem}")
    try:
        with warnings.catch_warnings():  # torch's advice to load unsafely is not ours to print
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def progress(ckpt: dict[str, Any]) -> tuple[int, int]:
    """(epochs done, steps done in the next epoch): how far a checkpoint's run got."""
    return int(ckpt.get("epoch", 0)), int(ckpt.get("step_in_epoch") or 0)
