"""powergrad: Softmax Gradient Tampering (the PowerGrad Transform) for image classifiers."""

from .tamper import PowerGradLoss, power_grad_cross_entropy

__version__ = "0.1.0"
__all__ = ["PowerGradLoss", "power_grad_cross_entropy", "__version__"]
