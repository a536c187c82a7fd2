"""Per-filter weight norms and per-channel pooled-feature norms, recorded every K steps.

The paper's "zeroing out" figure: the L2 norm of every conv filter over training (one line per
filter, one panel per layer), and the norm of each feature channel after global average pooling.
Switched by ``monitor.filter_norms``; ``monitor.filter_norms_every`` is K (0 = at epoch ends).
Records go to the run's filter-norm file (rundir.FILTER_NORMS):

    steps                 (T,)             the optimiser step of each record
    conv/<layer name>     (T, filters)     per-filter L2 norm of that conv's weight
    pooled                (T, channels)    RMS over the batch of each pooled feature channel
                                           (the classifier's input in the last training batch)

Cost: one norm per conv and one device-to-host copy per record; at K = 100 on ResNet-50 that is
53 small reductions every 100 steps, well under 1% of step time. Off by default all the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..rundir import FILTER_NORMS

FILE = FILTER_NORMS  # (rundir names every file of a run folder)


@torch.no_grad()
def filter_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-filter (output channel) L2 norm of every Conv2d weight, keyed by the conv's name.

    Float32 tensors on the weights' device; a filter whose norm collapses to ~0 is "dead"
    (the paper's zeroed-out filters in BN-free nets).
    """
    return {
        name: m.weight.detach().float().flatten(1).norm(dim=1)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


class FilterNormRecorder:
    """Call ``after_step(global_step)`` after each update and ``save(run_dir)`` at epoch ends."""

    def __init__(self, model: nn.Module, head: nn.Module | None, every: int) -> None:
        self.model = model
        self.every = every
        self.steps: list[int] = []
        self.conv: dict[str, list[np.ndarray]] = {}
        self.pooled: list[np.ndarray] = []
        self._features: torch.Tensor | None = None
        self._hook = head.register_forward_pre_hook(self._keep_input) if head is not None else None

    def _keep_input(self, module: nn.Module, args: tuple) -> None:
        if module.training and args:
            x = args[0].detach()
            self._features = x.flatten(2).mean(2) if x.dim() > 2 else x  # conv heads: pool here

    def after_step(self, global_step: int) -> None:
        if self.every and global_step % self.every == 0:
            self.record(global_step)

    def end_epoch(self, global_step: int, run_dir: Path | None) -> None:
        if not self.every or not self.steps or self.steps[-1] != global_step:
            self.record(global_step)
        if run_dir is not None:
            self.save(run_dir)

    @torch.no_grad()
    def record(self, global_step: int) -> None:
        if self.steps and self.steps[-1] == global_step:
            return
        self.steps.append(global_step)
        for name, norms in filter_norms(self.model).items():
            self.conv.setdefault(name, []).append(norms.cpu().numpy())
        if self._features is not None:
            f = self._features.float()
            self.pooled.append((f.pow(2).mean(0).sqrt()).cpu().numpy())

    def load(self, run_dir: Path, up_to_step: int) -> None:
        """On resume: keep the records of the run so far (those up to ``up_to_step``)."""
        data = read_filter_norms(run_dir)
        if data is None:
            return
        keep = data["steps"] <= up_to_step
        self.steps = data["steps"][keep].tolist()
        self.conv = {k: list(v[keep]) for k, v in data["conv"].items()}
        if len(data["pooled"]) == len(keep):
            self.pooled = list(data["pooled"][keep])

    def save(self, run_dir: Path) -> None:
        arrays: dict[str, Any] = {"steps": np.asarray(self.steps, dtype=np.int64)}
        arrays.update({f"conv/{k}": np.stack(v) for k, v in self.conv.items()})
        if self.pooled:
            arrays["pooled"] = np.stack(self.pooled)
        tmp = Path(run_dir) / f".{FILE}.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        tmp.replace(Path(run_dir) / FILE)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()


def read_filter_norms(run_dir: str | Path) -> dict | None:
    """``{steps, conv: {layer: (T, filters)}, pooled: (T, channels) or empty}``, or None."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    with np.load(path) as z:
        conv = {k[5:]: z[k] for k in z.files if k.startswith("conv/")}
        pooled = z["pooled"] if "pooled" in z.files else np.zeros((0, 0))
        return {"steps": z["steps"], "conv": conv, "pooled": pooled}
