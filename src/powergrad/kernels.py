"""powergrad's tampered loss on the CPU as one C++ autograd op (``csrc/tamper_cpu.cpp``).

Its forward is cross-entropy's own ops (the same value to the last bit); its backward reads
each row of the logits from memory once and finishes it in the L1 cache, where PyTorch's ops make
four trips over the (N, C) array, and it runs without Python (a Python autograd.Function's fixed
cost is most of cross-entropy's whole backward on small inputs). docs/performance.md has the
measured effect. :mod:`powergrad.tamper` uses it for unweighted (N, C) float32 and float64
logits on the CPU, outside ``torch.compile``; everything else (GPUs, class weights,
(N, C, d...) input) takes its PyTorch-op autograd.Function, which is also what the op is tested
against.

The op is compiled on first use (about 25 s on two cores, announced by one warning-level log
line; it needs a C++ compiler and ninja, as ``torch.utils.cpp_extension`` does), or ahead of time
by ``powergrad kernel build``, into ``$POWERGRAD_KERNEL_DIR`` (default
``~/.cache/powergrad/kernels``), once for each version of the source, compiler flags and PyTorch
installation (older builds stay there until deleted); later processes load the built library in
milliseconds. ``POWERGRAD_CPU_KERNEL=0`` turns it off. If it cannot be built, one warning says why
and the PyTorch-op path runs: results are the same either way (the loss to the last bit, the
gradient to rounding: the two sum in different orders).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

__all__ = [
    "build_cpu_kernel",
    "build_failure",
    "cpu_loss",
    "is_built",
    "library_path",
    "load_cpu_kernel",
]

ENV_SWITCH = "POWERGRAD_CPU_KERNEL"
ENV_DIR = "POWERGRAD_KERNEL_DIR"
_SOURCE = Path(__file__).with_name("csrc") / "tamper_cpu.cpp"
_DTYPES = (torch.float32, torch.float64)
_DONE = (
    "built"  # written next to the library once it is complete (a killed link leaves half a file)
)
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


def _compile_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags): -O3, the vector instructions PyTorch itself dispatches to
    on this CPU, and PyTorch's own OpenMP runtime.

    ATen's vector type (at::vec::Vectorized, with SLEEF's exp from libtorch) picks its width from
    the CPU_CAPABILITY macros, as PyTorch's own kernels are compiled once per capability.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    isa = {
        "AVX2": ["-mavx2", "-mfma"],
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    }
    cflags, ldflags = ["-O3"], []
    if capability in isa:  # other CPUs: the portable (scalar) Vectorized
        cflags += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        cflags += isa[capability]
    # at::parallel_for is inline OpenMP in an OpenMP build of PyTorch: without -fopenmp the op
    # runs on one thread (measured: 2.47 against 1.25 ms at 2 threads). Linked to the libgomp
    # PyTorch ships, if it ships one (pip wheels rename it), so that torch.set_num_threads holds
    # and only one OpenMP runtime is loaded. Elsewhere (macOS) the op runs on one thread.
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        cflags.append("-fopenmp")
        bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
        ldflags += [str(bundled[0])] if bundled else ["-fopenmp"]
    return cflags, ldflags


def _library_name(cflags: list[str], ldflags: list[str]) -> str:
    """A name per source, flags and PyTorch installation: a stale library is never loaded."""
    key = "\n".join([_SOURCE.read_text(), *cflags, *ldflags, torch.__version__, torch.__file__])
    return "powergrad_tamper_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:12]


@functools.cache
def load_cpu_kernel() -> Callable | None:
    """torch.ops.powergrad.tampered_cross_entropy, built if needed; None if it cannot be had."""
    try:
        build_cpu_kernel()
        # The overload itself: calling it skips the packet's overload lookup (~1 us a call).
        return torch.ops.powergrad.tampered_cross_entropy.default
    except Exception as exc:  # no compiler, no ninja, a read-only cache, ...
        warnings.warn(
            f"powergrad: the loss's C++ op for the CPU is unavailable ({build_failure(exc)}); "
            f"PyTorch's ops run instead (same results, slower on the CPU; "
            f"{ENV_SWITCH}=0 silences this)",
            RuntimeWarning,
            stacklevel=5,  # power_grad_cross_entropy's caller
        )
        return None


def library_path() -> Path:
    """Where the op's library for this source, compiler flags and PyTorch installation lives."""
    name = _library_name(*_compile_flags())
    root = Path(os.environ.get(ENV_DIR) or Path.home() / ".cache/powergrad/kernels")
    return root / name / f"{name}.so"


def is_built(library: Path) -> bool:
    """Whether a build of this library completed (its marker is written last)."""
    return library.with_name(_DONE).is_file()


def build_cpu_kernel() -> tuple[Path, bool]:
    """Load the op into this process, compiling it first if no earlier build completed.

    Returns the library's path and whether it was compiled now; raises what the build raised.
    ``powergrad kernel build`` calls it ahead of time (images, clusters); the loss on first use.
    """
    with _lock:
        cflags, ldflags = _compile_flags()
        library = library_path()
        if _load_built(library):
            return library, False
        _build(library.stem, cflags, ldflags, library.parent)
        library.with_name(_DONE).touch()
        return library, True


def _load_built(library: Path) -> bool:
    """Load a library an earlier build completed; False if there is none (or it will not load)."""
    if not is_built(library):
        return False
    try:
        torch.ops.load_library(str(library))
        return True
    except OSError as exc:  # damaged since: let the build make it again
        _log.warning("rebuilding %s: %s", library, exc)
        library.with_name(_DONE).unlink(missing_ok=True)
        return False


def build_failure(exc: BaseException) -> str:
    """The line of a build error that says what went wrong (ninja prints the command first)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    telling = [ln for ln in lines if re.search(r"error|not found|no such file|fatal", ln, re.I)]
    return (telling[1] if len(telling) > 1 and "Error building" in telling[0] else lines[0])[:300]


def _build(name: str, cflags: list[str], ldflags: list[str], directory: Path) -> None:
    compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension runs
    if shutil.which(compiler) is None:  # say so at once, not after announcing a 25 s build
        raise RuntimeError(f"no C++ compiler: {compiler} not found (install g++, or set CXX)")
    # One line, at warning level so that a library user sees it (Python prints warnings to
    # stderr when nothing configured logging): otherwise the first loss call pauses unexplained.
    _log.warning(
        "powergrad: compiling the loss's C++ op for the CPU into %s (once per PyTorch "
        "installation, about 25 s; `powergrad kernel build` does it ahead of time, %s=0 skips it)",
        directory,
        ENV_SWITCH,
    )
    cpp_extension = _cpp_extension()
    directory.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PATH", "")
    try:
        # cpp_extension runs `ninja` from PATH; the PyPI wheel's binary is not on it when the
        # environment was not activated (`.venv/bin/python ...`).
        import ninja  # optional: without it the loss uses PyTorch's ops

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    except ImportError:
        pass
    # Without a usable compiler torch logs a banner of "!! WARNING !!" about compiler
    # compatibility before failing; the one line load_cpu_kernel warns with says what failed.
    notice, quiet = logging.getLogger("torch.utils.cpp_extension"), _Quiet("!! WARNING !!")
    notice.addFilter(quiet)
    try:
        cpp_extension.load(  # also loads the library into this process
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path
        notice.removeFilter(quiet)


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported only to build, without its notice about CUDA.

    Importing it looks for a CUDA toolkit and, with one installed but no GPU, logs "No CUDA
    runtime is found, using CUDA_HOME=...": noise for this op, which is built for the CPU only.
    """
    notice = logging.getLogger("torch.utils.cpp_extension")
    quiet = _Quiet("No CUDA runtime is found")
    notice.addFilter(quiet)
    try:
        from torch.utils import cpp_extension  # only to build: it looks for a CUDA toolkit
    finally:
        notice.removeFilter(quiet)
    return cpp_extension


class _Quiet(logging.Filter):
    """Drops the records whose message contains ``needle``."""

    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in str(record.msg)
