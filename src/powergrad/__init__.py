"""powergrad: Softmax Gradient Tampering (the PowerGrad Transform) for image classifiers.

``pip install powergrad`` brings the loss alone (torch is its one dependency); the rest comes
with extras, loaded here only when asked for (see the README's "Install"):

- ``power_grad_cross_entropy``, ``PowerGradLoss``: the loss; ``powergrad.reference``: the
  official hook, for comparison.
- ``Config``, ``load_config``, ``train``, ``fit``, ``evaluate``, ``RunResult``: the trainer,
  ``pip install 'powergrad[train]'``.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .errors import DivergenceError, MissingExtraError, UserError

if TYPE_CHECKING:
    # Re-exported through __getattr__ below; named here for type checkers and editors.
    from .config import Config as Config
    from .config import load_config as load_config
    from .engine import RunResult as RunResult
    from .tamper import PowerGradLoss as PowerGradLoss
    from .tamper import power_grad_cross_entropy as power_grad_cross_entropy
    from .workflows import evaluate as evaluate
    from .workflows import fit as fit
    from .workflows import train as train

__version__ = "0.1.0"
# Only what imports with torch alone, so that `from powergrad import *` works on any install.
__all__ = [
    "DivergenceError",
    "MissingExtraError",
    "PowerGradLoss",
    "UserError",
    "power_grad_cross_entropy",
    "__version__",
]

# Imported when first asked for, so that `powergrad --help`, `--version`, `recipes` and `config`
# answer without torch (about 4 s on a loaded machine) and `from powergrad import PowerGradLoss`
# needs torch alone (not timm, torchvision or PyYAML). `from powergrad import *` goes through
# __getattr__ as well.
_LAZY = {
    "PowerGradLoss": "tamper",
    "power_grad_cross_entropy": "tamper",
    "Config": "config",
    "load_config": "config",
    "train": "workflows",
    "fit": "workflows",
    "evaluate": "workflows",
    "RunResult": "engine",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'powergrad' has no attribute {name!r}")
