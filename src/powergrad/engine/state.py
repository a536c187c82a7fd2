"""Training state: everything a run needs to continue exactly, as one object.

:class:`TrainingState` holds the live objects (model, optimiser, scheduler, scaler, monitor) and
the counters and records around them (epoch, step, RNG states, the epoch's partial sums, history,
best row, wall time so far, the data set's class names). :meth:`TrainingState.to_checkpoint`
writes all of it and :meth:`TrainingState.from_checkpoint` reads all of it back: the one pair
that defines the checkpoint format (``CHECKPOINT_KEYS``, ``FORMAT_VERSION``). A test reads a
checkpoint through a dict that records what was read, so the two cannot drift apart.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Config, check_resume
from ..errors import UserError
from ..monitor import Monitor

log = logging.getLogger("powergrad")

__all__ = [
    "TrainingState",
    "CHECKPOINT_KEYS",
    "FORMAT_VERSION",
    "load_model_state",
    "seed_everything",
]

# 2: scheduler restored, wall_s, class_names, best_split, parent. Version 1 files load as well
# (their missing entries take the defaults below; their scheduler is rebuilt from the step).
FORMAT_VERSION = 2

# Every entry of a checkpoint written by to_checkpoint (format_version is added on save).
CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "step_in_epoch",
    "global_step",
    "epoch_stats",
    "epoch_lr",
    "history",
    "best",
    "best_split",
    "rng",
    "config",
    "world_size",
    "fp16_skipped_updates",
    "feature_alive",
    "diagnostics",
    "wall_s",
    "class_names",
    "parent",
)


@dataclass
class TrainingState:
    """One run's state between two optimiser steps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm Scheduler (state_dict / load_state_dict / step_update)
    scaler: torch.amp.GradScaler
    monitor: Monitor
    cfg: Config
    device: torch.device
    world_size: int = 1
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimiser steps done in epoch ``epoch`` (a mid-epoch save)
    global_step: int = 0
    epoch_lr: float | None = None  # the lr at the start of the epoch in progress
    epoch_stats: dict[str, Any] | None = None  # that epoch's sums so far (over all processes)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    best_split: str = "test"  # whose accuracy chose the best checkpoint: val if there is one
    skipped_updates: int = 0  # fp16 steps the scaler skipped (the optimiser did not step)
    wall_s_before: float = 0.0  # wall time of the processes that ran this run before this one
    class_names: list[str] | None = None
    parent: dict[str, Any] | None = None  # init_from: the run these weights came from
    started: float = field(default_factory=time.time)

    @property
    def wall_s(self) -> float:
        """Wall time of the whole run: earlier processes plus this one."""
        return self.wall_s_before + time.time() - self.started

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def to_checkpoint(self) -> dict[str, Any]:
        """The state as a checkpoint dict (tensors and plain values only: loads weights_only)."""
        mid_epoch = self.epoch_stats is not None
        alive = self.monitor.feature_alive
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_stats": self.epoch_stats,
            "epoch_lr": self.epoch_lr if mid_epoch else None,
            "history": self.history,
            "best": self.best,
            "best_split": self.best_split,
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "world_size": self.world_size,
            "fp16_skipped_updates": int(self.skipped_updates),
            "feature_alive": alive.cpu() if mid_epoch and alive is not None else None,
            "diagnostics": [d.to_dict() for d in self.monitor.diagnostics],
            "wall_s": self.wall_s,
            "class_names": self.class_names,
            "parent": self.parent,
        }
        assert tuple(state) == CHECKPOINT_KEYS, "to_checkpoint and CHECKPOINT_KEYS disagree"
        return state

    def from_checkpoint(self, ckpt: dict[str, Any], path: Any = "checkpoint") -> None:
        """Restore everything :meth:`to_checkpoint` wrote (weights into the raw, unwrapped model),
        after checking that the checkpoint was trained with the same recipe (see
        :func:`powergrad.config.check_resume`)."""
        check_resume(ckpt["config"], self.cfg, path)
        if int(ckpt["world_size"]) != self.world_size:
            log.info(
                "the checkpoint was written by %d process(es), this run has %d",
                ckpt["world_size"],
                self.world_size,
            )
        load_model_state(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch") or 0)
        self.global_step = int(ckpt["global_step"])
        self.epoch_stats = ckpt.get("epoch_stats") if self.step_in_epoch else None
        self.epoch_lr = ckpt.get("epoch_lr")
        self.history, self.best = list(ckpt.get("history") or []), dict(ckpt.get("best") or {})
        self.best_split = str(ckpt.get("best_split") or self.best_split)
        set_rng_state(ckpt.get("rng"))
        self.skipped_updates += int(ckpt.get("fp16_skipped_updates") or 0)
        alive = ckpt.get("feature_alive")
        if alive is not None and self.step_in_epoch:  # the epoch's feature mask so far
            self.monitor.feature_alive = alive.to(self.device)
        self.monitor.load_diagnostics(list(ckpt.get("diagnostics") or []))
        self.wall_s_before = float(ckpt.get("wall_s") or 0.0)
        self.class_names = ckpt.get("class_names") or self.class_names
        self.parent = ckpt.get("parent")
        self.started = time.time()

    def from_official(self, ckpt: dict[str, Any], steps_per_epoch: int, path: Any) -> None:
        """A timm-style checkpoint (engine/official.py): weights, momentum where it fits, epochs
        done; no steps, no history, no RNG states."""
        from .official import load_optimizer_where_it_fits  # a rare path: its own module

        load_model_state(self.model, ckpt["model"], path)
        load_optimizer_where_it_fits(self.optimizer, ckpt["optimizer"])
        self.epoch, self.step_in_epoch = int(ckpt["epoch"]), 0
        self.global_step = self.epoch * steps_per_epoch


def load_model_state(model: nn.Module, state: dict[str, Any], path: Any) -> None:
    """Load weights saved from a plain, DDP-wrapped or compiled model; one line if they do not fit."""
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    wrong = {
        "shape mismatch": [
            f"{k} (file {list(v.shape)} vs model {list(own[k].shape)})"
            for k, v in state.items()
            if k in own and hasattr(v, "shape") and v.shape != own[k].shape
        ],
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
    }
    problems = [
        f"{len(keys)} {what}: {', '.join(keys[:2])}{' ...' if len(keys) > 2 else ''}"
        for what, keys in wrong.items()
        if keys
    ]
    if problems:  # one line that says which model the file was for, not torch's page of keys
        raise UserError(f"{path}: checkpoint does not fit the model ({'; '.join(problems)})")
    model.load_state_dict(state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    mt19937 = np.random.get_state(legacy=False)["state"]  # the dict form: what the stubs type
    state = {
        "torch": torch.get_rng_state(),
        "numpy": list(mt19937["key"].tolist()),
        "numpy_pos": int(mt19937["pos"]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
