"""The checkpoint policy, in one place (as timm's CheckpointSaver): which file, when.

- ``last.pt``: every ``save_every`` epochs and after the last epoch; also every
  ``checkpoint_every_steps`` optimiser steps inside an epoch, and when a run is pre-empted;
- ``best.pt``: with ``last.pt``, when the epoch's selection accuracy (validation when there is a
  validation split, else test: summary.json's ``best_split`` says which) is the best so far;
- ``epoch{N}.pt``: with ``last.pt`` when ``keep_checkpoints`` is set.

Every write is atomic (engine/checkpoint.py). Only the main process writes; the others return.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from .checkpoint import save_checkpoint
from .state import TrainingState

__all__ = ["CheckpointSaver"]


class CheckpointSaver:
    def __init__(self, folder: Path | None, cfg: Config) -> None:
        self.folder = folder  # None on the processes that do not write
        self.save_every = cfg.save_every
        self.every_steps = cfg.checkpoint_every_steps
        self.keep_all = cfg.keep_checkpoints
        self.epochs = cfg.epochs

    def wants_mid_epoch(self, global_step: int, step: int, steps_per_epoch: int) -> bool:
        """A mid-epoch save is due after this step (never on an epoch's last: the epoch save follows)."""
        return (
            bool(self.every_steps)
            and global_step % self.every_steps == 0
            and step + 1 < steps_per_epoch
        )

    def save_mid_epoch(self, state: TrainingState) -> None:
        """last.pt at a step inside an epoch (state.epoch_stats holds the epoch's sums so far)."""
        if self.folder is not None:
            save_checkpoint(state.to_checkpoint(), self.folder / "last.pt")

    def save_epoch(self, state: TrainingState, is_best: bool) -> None:
        """The files due after a finished epoch (state.epoch already counts it)."""
        if self.folder is None:
            return
        if state.epoch % self.save_every and state.epoch != self.epochs:
            return
        ckpt = state.to_checkpoint()
        save_checkpoint(ckpt, self.folder / "last.pt")
        if is_best:
            save_checkpoint(ckpt, self.folder / "best.pt")
        if self.keep_all:
            save_checkpoint(ckpt, self.folder / f"epoch{state.epoch}.pt")
