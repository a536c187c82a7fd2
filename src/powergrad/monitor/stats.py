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
    """Running sums of loss, accuracy and logit statistics over one epoch."""

    def __init__(self, device: torch.device, logit_stats: bool = True) -> None:
        self.device = device
        self.logit_stats = logit_stats
        self.sums = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)
        self.logit_max = torch.full((), float("-inf"), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        """``loss`` is the batch mean; ``target`` indices or soft rows."""
        n = logits.shape[0]
        hard = target.argmax(1) if target.is_floating_point() else target
        correct = (logits.argmax(1) == hard).sum()
        parts = [loss.detach().double() * n, correct.double(), torch.tensor(float(n), device=self.device)]
        if self.logit_stats:
            z = logits.detach().double()
            parts += [z.norm(dim=1).sum(), z.sum(), (z * z).sum(), torch.tensor(float(z.numel()), device=self.device)]
            self.logit_max = torch.maximum(self.logit_max, z.max())
        else:
            parts += [torch.zeros((), dtype=torch.float64, device=self.device)] * 4
        self.sums += torch.stack([p.to(torch.float64).reshape(()) for p in parts])

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.cpu(), "logit_max": self.logit_max.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sums = state["sums"].to(self.device)
        self.logit_max = state["logit_max"].to(self.device)

    def compute(self, dist: DistInfo) -> dict[str, float]:
        sums = self.sums.clone()
        if dist.enabled:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        lmax = self.logit_max.clone()
        if dist.enabled:
            torch.distributed.all_reduce(lmax, op=torch.distributed.ReduceOp.MAX)
        s = dict(zip(_FIELDS, sums.tolist()))
        count = max(s["count"], 1.0)
        out = {"train_loss": s["loss_sum"] / count, "train_acc": s["correct"] / count, "n": s["count"]}
        if self.logit_stats and s["logit_n"] > 0:
            mean = s["logit_sum"] / s["logit_n"]
            out.update(
                logit_norm=s["norm_sum"] / count,
                logit_mean=mean,
                logit_max=float(lmax),
                logit_var=max(s["logit_sq_sum"] / s["logit_n"] - mean * mean, 0.0),
            )
        return out
