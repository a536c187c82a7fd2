"""powergrad: Softmax Gradient Tampering (the PowerGrad Transform) for image classifiers."""

from .config import Config, load_config
from .errors import DivergenceError, UserError
from .tamper import PowerGradLoss, power_grad_cross_entropy

__version__ = "0.1.0"
__all__ = [
    "Config", "DivergenceError", "PowerGradLoss", "UserError", "evaluate", "fit", "load_config",
    "power_grad_cross_entropy", "train", "__version__",
]


def __getattr__(name: str):
    # The trainer pulls in timm and torchvision; import it only when asked, so that
    # `from powergrad import PowerGradLoss` stays light.
    if name in ("train", "fit", "evaluate"):
        from . import workflows

        return getattr(workflows, name)
    if name == "RunResult":
        from .engine import RunResult

        return RunResult
    raise AttributeError(f"module 'powergrad' has no attribute {name!r}")
