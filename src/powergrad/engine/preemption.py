"""Pre-emption: SIGTERM / SIGUSR1 (how SLURM and friends warn a job) ask every process to stop
cleanly at the next check-in, after saving where it stands."""

from __future__ import annotations

import signal
from typing import Any

import torch

from .distributed import DistInfo, all_reduce_sum

__all__ = ["PreemptionFlag"]


class PreemptionFlag:
    SIGNALS = tuple(
        s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s
    )

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: no handlers, no pre-emption
            self._old = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, dist: DistInfo) -> bool:
        """True on every rank if any rank was signalled."""
        if not dist.enabled:
            return self.requested
        flag = torch.tensor(float(self.requested), device=dist.device)
        return bool(all_reduce_sum(flag, dist) > 0)

    def restore(self) -> None:
        if self.requested:
            # Stopping: keep catching. SLURM signals every process of a job and torchrun passes the
            # signal on as well, so a second one can arrive while rank 0 writes its records.
            return
        for s, h in self._old.items():
            signal.signal(s, h)
