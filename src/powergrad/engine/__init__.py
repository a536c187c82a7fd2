"""Training: the loop, its state and checkpoints, optimisers and schedules, distributed set-up.

The public ``train`` / ``fit`` / ``evaluate`` live above the engine, in powergrad.workflows
(they build data, models and probes, then call :func:`run_training`).
"""

from ..errors import extra

with extra("train"):
    from .loop import RunResult, evaluate_loader, run_training

__all__ = ["RunResult", "evaluate_loader", "run_training"]
