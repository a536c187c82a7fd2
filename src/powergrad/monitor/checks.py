"""Training-pathology checks: the silent failures of the student reports, noticed for the user.

Each check is cheap (no extra pass over the data: it reads the per-epoch metrics, the weights,
and one device-side mask updated by a hook on the classifier's input) and fires at most once per
run, as a warning line and an entry in the run summary's ``diagnostics`` (code, epoch, message).
Thresholds live in ``Config.monitor`` (powergrad.config.MonitorConfig); defaults in brackets.

- ``stalled``: over any ``stall_epochs`` [3] consecutive epochs the train loss moved less than
  ``stall_loss_change`` [1%] (max - min, relative to the first) and train accuracy stayed within
  ``stall_acc_margin`` [2 points] of chance. Seed 002's intermediate-layer probe (loss frozen at
  2.361, accuracy 0.100) is this; a loss at log(e + C - 1) - accuracy is named as the signature
  of softmax applied before the loss and saturated.
- ``probabilities_as_logits``: the first batch's outputs are non-negative rows summing to 1, i.e.
  softmax was applied before the loss (seed 003's 5% plateau).
- ``dead_filters``: more than ``dead_filter_share`` [5%] of conv filters have a weight L2 norm
  below ``dead_filter_norm`` [1e-3] (the paper's "zeroing out", expected without batch norm), or
  more than ``dead_filter_share`` of the classifier's input features (pooled channels) were
  exactly zero for every training image of the epoch.
- ``overfitting``: the held-out loss (validation if recorded, else test) stayed more than
  ``overfit_rise`` [20%] above its lowest value for the last ``overfit_patience`` [3] epochs while
  the train loss fell; the message names the epoch of the lowest value.
- ``non_finite`` is raised by the loop itself, which stops the run (exit code 3).

:func:`identical_runs` compares finished runs: pairs whose per-epoch metrics are identical (seed
002's tables 3.1 and 3.3 are one table pasted twice).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..config import MonitorConfig
from ..rundir import BEST, TIMING_COLUMNS, read_metrics

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
    return bool((z >= 0).all()) and bool(
        torch.allclose(z.sum(1), torch.ones_like(z[:, 0]), atol=1e-3)
    )


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
    """Holds the checks' state for one run; ``diagnostics`` is what goes into the run's summary."""

    def __init__(self, cfg: MonitorConfig, num_classes: int) -> None:
        self.cfg = cfg
        self.chance = 1.0 / max(num_classes, 1)
        self.num_classes = num_classes
        self.diagnostics: list[Diagnostic] = []
        self._seen: set[str] = set()
        self.feature_alive: Tensor | None = (
            None  # per input feature of the head: nonzero for some image
        )
        self._hook: RemovableHandle | None = None

    def watch_features(self, model: nn.Module) -> None:
        """Hook the classifier's input to find features that are zero for every training image.

        One comparison and one reduction per step, kept on the device; read once per epoch.
        """
        try:
            from ..models import get_head  # [train] (timm): report reads this module with [plot]

            _, head = get_head(model)
        except Exception:  # noqa: BLE001 - a model without a findable head is not checked
            return
        self._hook = head.register_forward_pre_hook(self._record_features)

    def _record_features(self, module: nn.Module, args: tuple) -> None:
        if not (
            module.training and torch.is_grad_enabled() and args and isinstance(args[0], Tensor)
        ):
            return
        x = args[0].detach()
        nonzero = (x != 0).flatten(2).any(2) if x.dim() > 2 else (x != 0)  # conv heads: per channel
        nonzero = nonzero.reshape(x.shape[0], -1).any(0)
        if self.feature_alive is None or self.feature_alive.shape != nonzero.shape:
            self.feature_alive = nonzero
        else:
            self.feature_alive |= nonzero

    def load_diagnostics(self, saved: list[dict[str, Any]]) -> None:
        """Diagnostics from a checkpoint: kept in the summary, and not raised a second time."""
        for d in saved:
            self.diagnostics.append(Diagnostic(str(d["code"]), int(d["epoch"]), str(d["message"])))
            self._seen.add(str(d["code"]))

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

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
                "probabilities_as_logits",
                epoch,
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
                "dead_filters",
                epoch,
                f"{share:.1%} of {total} conv filters have weight norm < {self.cfg.dead_filter_norm:g} "
                "and will not recover (zeroing out). Try batch norm, a lower learning rate or weight "
                "decay, adaptive gradient clipping (clip=agc), or alpha < 1.",
            )
        if self.feature_alive is not None:
            alive, self.feature_alive = self.feature_alive, None  # a fresh mask for the next epoch
            dead = 1.0 - float(alive.float().mean())
            history[-1]["dead_feature_share"] = dead
            if dead > self.cfg.dead_filter_share:
                self._add(
                    "dead_filters",
                    epoch,
                    f"{dead:.1%} of the {alive.numel()} features entering the classifier were zero "
                    "for every training image this epoch (dead channels: zeroing out). Try batch "
                    "norm, a lower learning rate, clip=agc, or alpha < 1.",
                )

    def _check_stalled(self, history: list[dict[str, Any]], epoch: int) -> None:
        k = self.cfg.stall_epochs
        if len(history) < k:
            return
        window = history[-k:]  # any k consecutive epochs: the first may still hold the fall
        losses = [r["train_loss"] for r in window]
        if not all(math.isfinite(v) for v in losses):
            return
        moved = (max(losses) - min(losses)) / max(abs(losses[0]), 1e-12)
        at_chance = all(
            abs(r["train_acc"] - self.chance) <= self.cfg.stall_acc_margin for r in window
        )
        if moved >= self.cfg.stall_loss_change or not at_chance:
            return
        acc, loss = window[-1]["train_acc"], losses[-1]
        saturated = math.log(math.e + self.num_classes - 1) - acc
        if abs(loss - saturated) < 0.02:
            cause = (
                f"The loss sits at log(e + {self.num_classes - 1}) - accuracy = {saturated:.3f}: the "
                "cross-entropy of one-hot probabilities taken as logits. The model applies softmax "
                "before the loss and that softmax has saturated, so no gradient flows. Return "
                "logits; standardise the inputs (probe_standardize=true) or lower the lr."
            )
        else:
            cause = (
                "Usual causes: a learning rate far too high for the input scale (saturated "
                "softmax), unnormalised features, softmax applied twice. Try a 10x lower lr, "
                "standardised inputs, or a model that returns logits."
            )
        self._add(
            "stalled",
            epoch,
            f"train loss moved {moved:.2%} over epochs {window[0]['epoch']}-{window[-1]['epoch']} and "
            f"accuracy stays at chance ({self.chance:.3f}). {cause}",
        )

    def _check_overfitting(self, history: list[dict[str, Any]], epoch: int) -> None:
        """Fires when the held-out loss (validation if recorded, else test) stayed more than
        ``overfit_rise`` above its lowest value for the last ``overfit_patience`` epochs, while
        the train loss fell below where it was at that lowest point.

        Relative and sustained, so that the epoch-to-epoch wobble of a healthy run (digits:
        0.0904 -> 0.0922, 2%) is not an alarm; the test loss of a genuinely overfitting run
        (digits at alpha 0.05: 1.4 -> 2.3) is.
        """
        p = self.cfg.overfit_patience
        if len(history) < p + 1:
            return
        key = "val_loss" if history[-1].get("val_loss") is not None else "test_loss"
        held_out = [
            float(v) for v in (r.get(key) for r in history) if v is not None and math.isfinite(v)
        ]
        if len(held_out) < len(history):  # an epoch without a finite held-out loss
            return
        before = held_out[:-p]
        best_i = min(range(len(before)), key=lambda i: before[i])
        best = before[best_i]
        limit = best * (1 + self.cfg.overfit_rise)
        if not all(v > limit for v in held_out[-p:]):
            return
        if not history[-1]["train_loss"] < history[best_i]["train_loss"]:
            return
        split = "validation" if key == "val_loss" else "test"
        start = int(history[best_i]["epoch"])
        self._add(
            "overfitting",
            epoch,
            f"{split} loss has risen since epoch {start} ({best:.4g} -> {held_out[-1]:.4g}, more than "
            f"{self.cfg.overfit_rise:.0%} above its lowest for {p} epochs) while train loss keeps "
            "falling. Consider stronger augmentation, weight decay, label smoothing, or stopping at "
            f"{BEST}.",
        )


# Metric columns that measure time or follow the schedule, not the model: two runs with
# the same numbers but different lr (seed 002's 3.1 at 0.05, 3.3 at 0.1) are still one table.
_NOT_COMPARED = {"epoch", "lr"}


def identical_runs(run_dirs: list[str | Path]) -> list[tuple[Path, Path]]:
    """Pairs of runs whose per-epoch metrics are identical, timing and lr columns aside.

    Compares the columns both runs recorded, every epoch, to the 6 significant digits of
    the metrics file (rundir.METRICS). A deterministic rerun of the same recipe and seed also matches: the report says
    whether the configs differ. Runs without metrics are skipped.
    """
    tables = []
    for run in run_dirs:
        rows = read_metrics(run)
        if rows:
            tables.append((Path(run), rows))
    pairs = []
    for (a, ra), (b, rb) in itertools.combinations(tables, 2):
        if len(ra) != len(rb):
            continue
        cols = (set(ra[0]) & set(rb[0])) - _NOT_COMPARED - set(TIMING_COLUMNS)
        cols = {c for c in cols if not c.endswith("_s")}  # any later timing column
        if cols and all(x.get(c) == y.get(c) for x, y in zip(ra, rb) for c in cols):
            pairs.append((a, b))
    return pairs
