"""Per-epoch sums kept on the device: read once per epoch, so no host sync per step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed
from torch import Tensor

if TYPE_CHECKING:  # the engine imports the monitor; no import back at run time
    from ..engine.distributed import DistInfo

# Order of the entries in the one sum vector (one all-reduce per epoch in distributed runs).
_FIELDS = ("loss_sum", "correct", "count", "norm_sum", "logit_sum", "logit_sq_sum", "logit_n")


class EpochStats:
    """Running sums of loss, accuracy and logit statistics over one epoch.

    Sums that depend on the data stay on the device; the counts (batch sizes) are known on the
    host and kept there, so a step creates no host-to-device copy.
    """

    def __init__(self, device: torch.device, logit_stats: bool = True) -> None:
        self.device = device
        self.logit_stats = logit_stats
        self.sums = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)
        self.logit_max = torch.full((), float("-inf"), dtype=torch.float64, device=device)
        self.count = 0.0  # images, host side
        self.logit_n = 0.0  # logit entries, host side
        names = ("loss_sum", "correct", "norm_sum", "logit_sum", "logit_sq_sum")
        self._device_slots = torch.tensor([_FIELDS.index(f) for f in names], device=device)

    @torch.no_grad()
    def update(self, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        """``loss`` is the batch mean; ``target`` indices or soft rows."""
        n = logits.shape[0]
        hard = target.argmax(1) if target.is_floating_point() else target
        parts = [loss.detach().double() * n, (logits.argmax(1) == hard).sum().double()]
        self.count += n
        if self.logit_stats:
            z = logits.detach().double()
            parts += [z.norm(dim=1).sum(), z.sum(), (z * z).sum()]
            self.logit_max = torch.maximum(self.logit_max, z.max())
            self.logit_n += z.numel()
            self.sums.index_add_(0, self._device_slots, torch.stack(parts))
        else:
            self.sums.index_add_(0, self._device_slots[:2], torch.stack(parts))

    def _merged(self) -> Tensor:
        sums = self.sums.clone()
        sums[_FIELDS.index("count")] = self.count
        sums[_FIELDS.index("logit_n")] = self.logit_n
        return sums

    def zero_(self) -> None:
        self.sums.zero_()
        self.count = self.logit_n = 0.0

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self._merged().cpu(), "logit_max": self.logit_max.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        sums = state["sums"].to(torch.float64)
        self.count = float(sums[_FIELDS.index("count")])
        self.logit_n = float(sums[_FIELDS.index("logit_n")])
        sums[_FIELDS.index("count")] = sums[_FIELDS.index("logit_n")] = 0
        self.sums = sums.to(self.device)
        self.logit_max = state["logit_max"].to(self.device)

    def compute(self, dist: DistInfo) -> dict[str, float]:
        sums = self._merged()
        if dist.enabled:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        lmax = self.logit_max.clone()
        if dist.enabled:
            torch.distributed.all_reduce(lmax, op=torch.distributed.ReduceOp.MAX)
        s = dict(zip(_FIELDS, sums.tolist()))
        count = max(s["count"], 1.0)
        out = {
            "train_loss": s["loss_sum"] / count,
            "train_acc": s["correct"] / count,
            "n": s["count"],
        }
        if self.logit_stats and s["logit_n"] > 0:
            mean = s["logit_sum"] / s["logit_n"]
            out.update(
                logit_norm=s["norm_sum"] / count,
                logit_mean=mean,
                logit_max=float(lmax),
                logit_var=max(s["logit_sq_sum"] / s["logit_n"] - mean * mean, 0.0),
            )
        return out
