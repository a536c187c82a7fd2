"""Training: the loop, its state and checkpoints, optimisers and schedules, distributed set-up.

The public ``train`` / ``fit`` / ``evaluate`` live above the engine, in powergrad.workflows
(they build data, models and probes, then call :func:`run_training`); the names are kept here
for code that imports them from powergrad.engine, resolved on first use.
"""

from ..errors import extra

with extra("train"):
    from .loop import RunResult, evaluate_loader, run_training

__all__ = ["RunResult", "evaluate", "evaluate_loader", "fit", "run_training", "train"]


def __getattr__(name: str):
    if name in ("train", "fit", "evaluate"):
        from .. import workflows  # above the engine: imported when asked, never at import time

        return getattr(workflows, name)
    raise AttributeError(f"module 'powergrad.engine' has no attribute {name!r}")
