"""Training-pathology checks: the silent failures of the student reports, noticed for the user.

Each check is cheap (no extra pass over the data) and fires at most once per run. Thresholds
live in ``Config.monitor`` (powergrad.config.MonitorConfig).

- ``stalled``: train loss moved less than ``stall_loss_change`` (relative) over the first
  ``stall_epochs`` epochs and train accuracy stayed within ``stall_acc_margin`` of chance.
  Seed 002's intermediate-layer probe (loss frozen at 2.361, accuracy 0.100) is this.
- ``probabilities_as_logits``: the model's outputs are non-negative rows summing to 1, i.e.
  softmax was applied before the loss (seed 003's 5% plateau).
- ``dead_filters``: more than ``dead_filter_share`` of conv filters have a weight norm below
  ``dead_filter_norm`` (the paper's "zeroing out", expected without batch norm).
- ``overfitting``: test loss rose ``overfit_patience`` epochs in a row while train loss fell.
- ``non_finite`` is raised by the loop itself, which stops the run (exit code 3).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MonitorConfig

log = logging.getLogger("powergrad")


@dataclass
class Diagnostic:
    code: str
    epoch: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def looks_like_probabilities(logits: Tensor) -> bool:
    """Rows that are non-negative and sum to 1: softmax already applied."""
    z = logits.detach().float()
    if z.dim() != 2 or z.shape[1] < 2:
        return False
    return bool((z >= 0).all()) and bool(torch.allclose(z.sum(1), torch.ones_like(z[:, 0]), atol=1e-3))


@torch.no_grad()
def dead_filter_share(model: nn.Module, threshold: float) -> tuple[float, int]:
    """Share of conv filters (output channels) whose weight L2 norm is below ``threshold``."""
    dead = total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            norms = m.weight.detach().flatten(1).norm(dim=1)
            dead += int((norms < threshold).sum())
            total += norms.numel()
    return (dead / total if total else 0.0), total


class Monitor:
    """Holds the checks' state for one run; ``diagnostics`` is what goes into summary.json."""

    def __init__(self, cfg: MonitorConfig, num_classes: int) -> None:
        self.cfg = cfg
        self.chance = 1.0 / max(num_classes, 1)
        self.diagnostics: list[Diagnostic] = []
        self._seen: set[str] = set()

    def _add(self, code: str, epoch: int, message: str) -> Diagnostic | None:
        if code in self._seen:
            return None
        self._seen.add(code)
        d = Diagnostic(code, epoch, message)
        self.diagnostics.append(d)
        log.warning("diagnostic %s (epoch %d): %s", code, epoch, message)
        return d

    def check_outputs(self, logits: Tensor, epoch: int) -> None:
        """Call on the first training batch of a run."""
        if looks_like_probabilities(logits):
            self._add(
                "probabilities_as_logits", epoch,
                "the model's outputs are non-negative and sum to 1 per row: softmax is applied "
                "before the loss. Return raw logits (drop the final softmax); cross-entropy "
                "applies log-softmax itself.",
            )

    def after_epoch(self, history: list[dict[str, Any]], model: nn.Module) -> None:
        """Run the per-epoch checks on the metrics so far and the model's weights."""
        epoch = int(history[-1]["epoch"])
        self._check_stalled(history, epoch)
        self._check_overfitting(history, epoch)
        share, total = dead_filter_share(model, self.cfg.dead_filter_norm)
        history[-1]["dead_filter_share"] = share
        if total and share > self.cfg.dead_filter_share:
            self._add(
                "dead_filters", epoch,
                f"{share:.1%} of {total} conv filters have weight norm < {self.cfg.dead_filter_norm:g} "
                "and will not recover (zeroing out). Try batch norm, a lower learning rate or weight "
                "decay, adaptive gradient clipping (clip=agc), or alpha < 1.",
            )

    def _check_stalled(self, history: list[dict[str, Any]], epoch: int) -> None:
        k = self.cfg.stall_epochs
        if len(history) < k:
            return
        first = history[:k]
        losses = [r["train_loss"] for r in first]
        ref = max(abs(losses[0]), 1e-12)
        moved = (max(losses) - min(losses)) / ref
        at_chance = all(abs(r["train_acc"] - self.chance) <= self.cfg.stall_acc_margin for r in first)
        if moved < self.cfg.stall_loss_change and at_chance:
            self._add(
                "stalled", epoch,
                f"train loss moved {moved:.2%} over the first {k} epochs and accuracy stays at "
                f"chance ({self.chance:.3f}). Usual causes: a learning rate far too high for the "
                "input scale (saturated softmax), unnormalised features, softmax applied twice. "
                "Try a 10x lower lr, standardised inputs, or a model that returns logits.",
            )

    def _check_overfitting(self, history: list[dict[str, Any]], epoch: int) -> None:
        p = self.cfg.overfit_patience
        if len(history) < p + 1:
            return
        window = history[-(p + 1):]
        test = [r.get("test_loss") for r in window]
        train = [r["train_loss"] for r in window]
        if None in test:
            return
        rising = all(b > a for a, b in zip(test, test[1:]))
        falling = all(b < a for a, b in zip(train, train[1:]))
        if rising and falling:
            start = int(window[0]["epoch"])
            self._add(
                "overfitting", epoch,
                f"test loss has risen since epoch {start} while train loss keeps falling. Consider "
                "stronger augmentation, weight decay, label smoothing, or stopping at best.pt.",
            )
