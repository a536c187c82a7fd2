"""Training: the loop, optimisers and schedules, checkpoints, distributed set-up."""

from ..errors import extra

with extra("train"):
    from .loop import RunResult, evaluate, evaluate_loader, fit, train

__all__ = ["RunResult", "evaluate", "evaluate_loader", "fit", "train"]
