"""What is measured while training: per-epoch statistics on the device, and pathology checks."""

from .checks import Diagnostic, Monitor
from .stats import EpochStats

__all__ = ["Diagnostic", "EpochStats", "Monitor"]
