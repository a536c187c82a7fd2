"""Training: the loop, optimisers and schedules, checkpoints, distributed set-up."""

from .loop import RunResult, evaluate, evaluate_loader, fit, train

__all__ = ["RunResult", "evaluate", "evaluate_loader", "fit", "train"]
