"""powergrad's tampered loss on the CPU as one C++ autograd op (``csrc/tamper_cpu.cpp``).

Its forward is cross-entropy's own ops (the same value to the last bit); its backward reads
each row of the logits from memory once and finishes it in the L1 cache, where PyTorch's ops make
four trips over the (N, C) array, and it runs without Python, whose autograd.Function costs
more than cross-entropy's whole backward on small inputs (docs/performance.md has the measured
effect). :mod:`powergrad.tamper` uses it for unweighted (N, C) float32 and float64 logits on
the CPU, outside ``torch.compile``; everything else (GPUs, class weights, (N, C, d...) input)
takes its PyTorch-op autograd.Function, which is also what the op is tested against.

The op is compiled on first use, once per machine and PyTorch version (about 30 s on two
cores; it needs a C++ compiler and ninja, as ``torch.utils.cpp_extension`` does), into
``$POWERGRAD_KERNEL_DIR`` (default ``~/.cache/powergrad/kernels``); later processes load the
built library in milliseconds. ``POWERGRAD_CPU_KERNEL=0`` turns it off. If it cannot be built,
one warning says why and the PyTorch-op path runs: results are the same either way (to
rounding in the gradient: the two sum in different orders).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["cpu_loss", "load_cpu_kernel"]

ENV_SWITCH = "POWERGRAD_CPU_KERNEL"
ENV_DIR = "POWERGRAD_KERNEL_DIR"
_SOURCE = Path(__file__).with_name("csrc") / "tamper_cpu.cpp"
_DTYPES = (torch.float32, torch.float64)
_log = logging.getLogger(__name__)
_lock = threading.Lock()


def cpu_loss(logits: Tensor, weight: Tensor | None) -> Callable | None:
    """The C++ op if it applies to these (batched) logits, else None (the Python path runs)."""
    if (
        weight is not None
        or not logits.is_cpu
        or logits.dim() != 2
        or logits.dtype not in _DTYPES
        or os.environ.get(ENV_SWITCH) == "0"
        or torch.compiler.is_compiling()  # the op has no fake kernel for tracing
    ):
        return None
    return load_cpu_kernel()


def _compile_flags() -> list[str]:
    """-O3 and the vector instructions PyTorch itself dispatches to on this CPU.

    ATen's vector type (at::vec::Vectorized, with SLEEF's exp from libtorch) picks its width
    from the CPU_CAPABILITY macros, as PyTorch's own kernels are compiled once per capability.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    isa = {
        "AVX2": ["-mavx2", "-mfma"],
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    }
    # -fopenmp: at::parallel_for is inline OpenMP; without it the kernel runs on one thread.
    flags = ["-O3", "-fopenmp"]
    if capability in isa:  # other CPUs: the portable (scalar) Vectorized
        flags += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        flags += isa[capability]
    return flags


def _library_name(flags: list[str]) -> str:
    """A name per source, flags and PyTorch build: a stale library is never loaded."""
    key = "\n".join([_SOURCE.read_text(), *flags, torch.__version__, torch.__file__])
    return "powergrad_tamper_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:12]


@functools.cache
def load_cpu_kernel() -> Callable | None:
    """torch.ops.powergrad.tampered_cross_entropy, built if needed; None if it cannot be had."""
    with _lock:
        try:
            flags = _compile_flags()
            name = _library_name(flags)
            root = Path(os.environ.get(ENV_DIR) or Path.home() / ".cache/powergrad/kernels")
            built = root / name / f"{name}.so"
            if built.is_file():
                torch.ops.load_library(str(built))
            else:
                _build(name, flags, built.parent)
            # The overload itself: calling it skips the packet's overload lookup (~1 us a call).
            return torch.ops.powergrad.tampered_cross_entropy.default
        except Exception as exc:  # no compiler, no ninja, a read-only cache, ...
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            warnings.warn(
                f"powergrad: the fused CPU loss kernel is unavailable ({first_line}); "
                f"the PyTorch-op path runs instead (same results, slower on the CPU; "
                f"{ENV_SWITCH}=0 silences this)",
                RuntimeWarning,
                stacklevel=4,
            )
            return None


def _build(name: str, flags: list[str], directory: Path) -> None:
    from torch.utils import cpp_extension  # imported only to build (it probes for CUDA)

    _log.info("compiling the loss's C++ op for the CPU into %s (once, about 30 s)", directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PATH", "")
    try:
        # cpp_extension runs `ninja` from PATH; the PyPI wheel's binary is not on it when the
        # environment was not activated (`.venv/bin/python ...`).
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    except ImportError:
        pass
    try:
        cpp_extension.load(  # also loads the library into this process
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],  # the libgomp PyTorch already loaded (same soname)
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path
