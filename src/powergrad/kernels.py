"""The tampered loss's backward as one fused CPU kernel (``csrc/tamper_cpu.cpp``).

On the CPU, PyTorch's ops make four trips through memory over the (N, C) logits for the tampered
backward (the alpha scaling, softmax's two passes, the row scale) where cross-entropy's backward
makes about two; the kernel reads each row from memory once and finishes it in the L1 cache
(docs/performance.md has the measured effect). :mod:`powergrad.tamper` uses it for unweighted
(N, C) float32 and float64 logits on the CPU, outside ``torch.compile``; everything else (GPUs,
class weights, (N, C, d...) input) takes the PyTorch-op backward, which is also what the kernel
is tested against.

The kernel is compiled on first use, once per machine and PyTorch version (about 15 s on two
cores; it needs a C++ compiler and ninja, as ``torch.utils.cpp_extension`` does), into
``$POWERGRAD_KERNEL_DIR`` (default ``~/.cache/powergrad/kernels``); later processes load the
built library in milliseconds. ``POWERGRAD_CPU_KERNEL=0`` turns it off. If it cannot be built,
one warning says why and the PyTorch-op backward runs: results are the same either way (to
rounding: the two sum in different orders).
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

__all__ = ["fused_backward", "load_cpu_kernel"]

ENV_SWITCH = "POWERGRAD_CPU_KERNEL"
ENV_DIR = "POWERGRAD_KERNEL_DIR"
_SOURCE = Path(__file__).with_name("csrc") / "tamper_cpu.cpp"
_log = logging.getLogger(__name__)
_lock = threading.Lock()


def fused_backward(log_p: Tensor, weight: Tensor | None) -> Callable | None:
    """The kernel's op if it applies to this backward, else None (the PyTorch-op path runs)."""
    if (
        weight is not None
        or log_p.device.type != "cpu"
        or log_p.dim() != 2
        or not log_p.is_contiguous()
        or log_p.dtype not in (torch.float32, torch.float64)
        or os.environ.get(ENV_SWITCH, "1") == "0"
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
    """torch.ops.powergrad.tampered_ce_backward_, built if needed; None if it cannot be had."""
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
            return torch.ops.powergrad.tampered_ce_backward_
        except Exception as exc:  # no compiler, no ninja, a read-only cache, ...
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            warnings.warn(
                f"powergrad: the fused CPU loss kernel is unavailable ({first_line}); "
                f"the PyTorch-op backward runs instead (same results, slower on the CPU; "
                f"{ENV_SWITCH}=0 silences this)",
                RuntimeWarning,
                stacklevel=4,
            )
            return None


def _build(name: str, flags: list[str], directory: Path) -> None:
    from torch.utils import cpp_extension  # imported only to build (it probes for CUDA)

    _log.info("compiling the fused CPU loss kernel into %s (once, about 15 s)", directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(  # also loads the library into this process
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],  # the libgomp PyTorch already loaded (same soname)
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
