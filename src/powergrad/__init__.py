"""powergrad: Softmax Gradient Tampering (the PowerGrad Transform) for image classifiers."""

from .config import Config, load_config
from .errors import DivergenceError, UserError

__version__ = "0.1.0"
__all__ = [
    "Config", "DivergenceError", "PowerGradLoss", "UserError", "evaluate", "fit", "load_config",
    "power_grad_cross_entropy", "train", "__version__",
]

# Imported when first asked for: the loss needs torch, the trainer timm and torchvision too, and
# `powergrad --help`, `--version`, `recipes` and `config` answer without either (4 s saved).
_LAZY = {
    "PowerGradLoss": "tamper", "power_grad_cross_entropy": "tamper",
    "train": "engine", "fit": "engine", "evaluate": "engine", "RunResult": "engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'powergrad' has no attribute {name!r}")
