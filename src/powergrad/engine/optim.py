"""Optimisers and learning-rate schedules: thin over torch.optim and timm's schedulers."""

from __future__ import annotations

import torch
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from ..config import Config

__all__ = ["create_optimizer", "create_scheduler"]


def create_optimizer(params: list[dict] | list[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov as in the paper) or AdamW over parameter groups."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def create_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, updates_per_epoch: int
) -> Scheduler:
    """timm's scheduler, stepped once per optimiser update (smooth warm-up and cosine).

    ``epochs`` counts every epoch trained: the decay spans ``epochs - cooldown_epochs`` (warm-up
    included, as in timm), then the rate holds at ``min_lr`` for ``cooldown_epochs``.
    ``step`` decays by ``decay_rate`` every ``decay_epochs``, or at ``decay_milestones``;
    ``exp`` decays by ``decay_rate`` every epoch (seed 003's "x 0.9 per epoch").
    """
    name = {"cosine": "cosine", "const": "constant"}.get(cfg.sched, "step")
    decay_epochs = cfg.decay_epochs
    if cfg.sched == "step" and cfg.decay_milestones:
        name = "multistep"
    if cfg.sched == "exp":
        decay_epochs = 1
    sched, _ = create_scheduler_v2(
        optimizer,
        sched=name,
        num_epochs=cfg.epochs - cfg.cooldown_epochs,
        decay_epochs=decay_epochs,
        decay_milestones=list(cfg.decay_milestones or []),
        cooldown_epochs=cfg.cooldown_epochs,
        decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=max(1, updates_per_epoch),
    )
    return sched
