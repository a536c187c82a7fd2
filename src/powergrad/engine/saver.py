"""The save policy, in one place (as timm's CheckpointSaver): what is best, which file, when.

- the best epoch: the highest accuracy on the selection split (validation when the run holds one
  out, else test: the summary's ``best_split``); :meth:`CheckpointSaver.after_epoch` decides it
  and sets ``state.best``, which the run's summary reports;
- the best checkpoint (``BEST``): written after every epoch that is the best so far, whatever
  ``save_every`` says, so that it always holds the epoch the summary names;
- the last checkpoint (``LAST``): every ``save_every`` epochs and after the last epoch; inside an
  epoch every ``checkpoint_every_steps`` optimiser steps (:meth:`mid_epoch_due`), and when the
  run stops early (pre-emption, or a sweep's pruner) at a point not saved yet;
- the per-epoch checkpoints (``epoch_file(N)``): with each epoch's last checkpoint when
  ``keep_checkpoints`` is set.

The file names are rundir's.

Every write is atomic (engine/checkpoint.py). Only the main process writes; on the others the
saver still decides the best, so that every process holds the same state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..rundir import BEST, LAST, epoch_file
from .checkpoint import progress, save_checkpoint
from .state import TrainingState

__all__ = ["CheckpointSaver", "selection_split"]


def selection_split(has_val: bool) -> str:
    """The split whose accuracy chooses the best epoch."""
    return "val" if has_val else "test"


class CheckpointSaver:
    def __init__(self, folder: Path | None, cfg: Config) -> None:
        self.folder = folder  # None on the processes that do not write
        self.save_every = cfg.save_every
        self.every_steps = cfg.checkpoint_every_steps
        self.keep_all = cfg.keep_checkpoints
        self.epochs = cfg.epochs
        self.saved_at: tuple[int, int] | None = None  # the progress LAST holds, once written

    def mid_epoch_due(self, global_step: int, step: int, steps_per_epoch: int) -> bool:
        """A mid-epoch save is due after this step (never on an epoch's last: the epoch save follows)."""
        return (
            bool(self.every_steps)
            and global_step % self.every_steps == 0
            and step + 1 < steps_per_epoch
        )

    def save_mid_epoch(self, state: TrainingState) -> None:
        """LAST at a step inside an epoch (state.epoch_stats holds the epoch's sums so far)."""
        self._write(state.to_checkpoint(), LAST)

    def after_epoch(self, state: TrainingState, row: dict[str, Any]) -> None:
        """Decide whether the finished epoch (state.epoch already counts it) is the best, then
        write the files due."""
        key = f"{state.best_split}_acc"
        is_best = not state.best or row[key] > state.best.get(key, -1)
        if is_best:
            state.best = dict(row)
        due = state.epoch % self.save_every == 0 or state.epoch == self.epochs
        if not (due or is_best) or self.folder is None:
            return
        ckpt = state.to_checkpoint()
        if due:
            self._write(ckpt, LAST)
            if self.keep_all:
                self._write(ckpt, epoch_file(state.epoch))
        if is_best:
            self._write(ckpt, BEST)

    def save_on_stop(self, state: TrainingState) -> None:
        """A run stopping before its end (pre-empted, pruned) keeps where it stands in LAST."""
        if self.saved_at != progress({"epoch": state.epoch, "step_in_epoch": state.step_in_epoch}):
            self._write(state.to_checkpoint(), LAST)

    def _write(self, ckpt: dict[str, Any], name: str) -> None:
        if self.folder is None:
            return
        save_checkpoint(ckpt, self.folder / name)
        if name == LAST:
            self.saved_at = progress(ckpt)
