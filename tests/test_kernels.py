"""The loss's C++ op for the CPU (powergrad/kernels.py, csrc/tamper_cpu.cpp) against PyTorch's ops.

tests/test_tamper.py runs every one of its tests through both paths against the float64
formula and F.cross_entropy; here: that the op is built and used, that its gradient agrees with
the PyTorch-op path on every branch it takes, which inputs it takes, and the fallback when it
cannot be built.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from powergrad import kernels, power_grad_cross_entropy


def gradient(z, t, monkeypatch, kernel: bool, **kw) -> torch.Tensor:
    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if kernel else "0")
    z = z.clone().requires_grad_(True)
    loss = power_grad_cross_entropy(z, t, **kw)
    g = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype).view_as(loss) if loss.dim() else None
    loss.backward(g)
    return z.grad


def test_the_op_is_built_and_the_loss_uses_it(monkeypatch):
    op = kernels.load_cpu_kernel()
    assert op is not None  # make installs ninja; these machines have a C++ compiler
    calls = []
    monkeypatch.setattr(kernels, "load_cpu_kernel", lambda: lambda *a: calls.append(1) or op(*a))
    z, t = torch.randn(8, 5, requires_grad=True), torch.randint(0, 5, (8,))
    power_grad_cross_entropy(z, t, alpha=0.5).backward()
    assert calls == [1]


CASES = list(
    itertools.product(
        [torch.float32, torch.float64],
        [(7, 10), (5, 17), (64, 1000), (3, 1), (0, 10)],  # short rows, tail, long rows, C=1, N=0
        ["index", "index-ignored", "soft"],
        [0.0, 0.2],
        ["mean", "sum", "none"],
        [0.0, 0.3, 1.0, 1.7],
    )
)


@pytest.mark.parametrize("dtype,size,kind,ls,reduction,alpha", CASES)
def test_kernel_agrees_with_the_pytorch_op_backward(
    dtype, size, kind, ls, reduction, alpha, monkeypatch
):
    n, c = size
    g = torch.Generator().manual_seed(n * c)
    z = (torch.randn(n, c, generator=g) * 4).to(dtype)
    if kind == "soft":
        t = torch.softmax(torch.randn(n, c, generator=g) * 3, 1).to(dtype)
    else:
        t = torch.randint(0, c, (n,), generator=g)
        if kind == "index-ignored":
            t[::3] = -100
    kw = dict(alpha=alpha, label_smoothing=ls, reduction=reduction)
    fused = gradient(z, t, monkeypatch, True, **kw)
    ops = gradient(z, t, monkeypatch, False, **kw)
    # 32 eps of each entry, or of the gradient's scale for entries near 0 (C = 1: all of them,
    # where the row factor s ~ 1 / N sets the scale of the rounding)
    eps = torch.finfo(dtype).eps
    scale = max(ops.abs().max().item() if ops.numel() else 0.0, 1.0 / max(n, 1))
    torch.testing.assert_close(fused, ops, rtol=32 * eps, atol=32 * eps * scale)


@pytest.mark.parametrize("c", [10, 1000])
def test_large_alpha_does_not_underflow(c, monkeypatch):
    """alpha > 1 shifts each row by its max: softmax(50 z) stays one-hot-like, never 0 / 0."""
    z = torch.randn(16, c, generator=torch.Generator().manual_seed(0)) * 3
    t = torch.randint(0, c, (16,), generator=torch.Generator().manual_seed(1))
    fused = gradient(z, t, monkeypatch, True, alpha=50.0)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, gradient(z, t, monkeypatch, False, alpha=50.0))


def test_which_logits_take_the_op(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    z = torch.randn(4, 6)
    assert kernels.cpu_loss(z, None) is not None
    assert kernels.cpu_loss(z.double(), None) is not None
    assert kernels.cpu_loss(z.t(), None) is not None  # any strides: the op's log_softmax copies
    assert kernels.cpu_loss(z, torch.ones(6)) is None  # class weights
    assert kernels.cpu_loss(z.view(2, 6, 2), None) is None  # (N, C, d)
    assert kernels.cpu_loss(z.half(), None) is None
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.cpu_loss(z, None) is None


def test_an_op_that_cannot_be_built_warns_once_and_the_loss_still_works(monkeypatch, tmp_path):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setenv(kernels.ENV_DIR, str(tmp_path))  # nothing built there
    monkeypatch.setattr(kernels, "_build", no_compiler)
    kernels.load_cpu_kernel.cache_clear()
    try:
        z, t = torch.randn(6, 4), torch.randint(0, 4, (6,))
        with pytest.warns(RuntimeWarning, match="Ninja is required to load C"):
            fallback = gradient(z, t, monkeypatch, True, alpha=0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: the answer is kept for the process
            gradient(z, t, monkeypatch, True, alpha=0.3)
    finally:
        kernels.load_cpu_kernel.cache_clear()  # the next test loads the real one again
    torch.testing.assert_close(fallback, gradient(z, t, monkeypatch, False, alpha=0.3))


def test_a_library_left_by_a_killed_build_is_never_loaded(monkeypatch, tmp_path):
    """Only a build that completed leaves its marker; anything else goes back to the build
    (loading half a library is a bus error, not an exception)."""
    cflags, ldflags = kernels._compile_flags()
    name = kernels._library_name(cflags, ldflags)
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{name}.so").write_bytes(b"half a library")  # no marker
    loaded, built = [], []
    monkeypatch.setenv(kernels.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(kernels, "_build", lambda *a: built.append(a))
    kernels.load_cpu_kernel.cache_clear()
    try:
        assert kernels.load_cpu_kernel() is not None  # the op this process already has
    finally:
        kernels.load_cpu_kernel.cache_clear()
    assert loaded == [] and len(built) == 1
    assert (tmp_path / name / kernels._DONE).is_file()


def test_a_completed_library_that_no_longer_loads_is_rebuilt(monkeypatch, tmp_path):
    cflags, ldflags = kernels._compile_flags()
    name = kernels._library_name(cflags, ldflags)
    (tmp_path / name).mkdir()
    (tmp_path / name / kernels._DONE).touch()

    def damaged(path):
        raise OSError(f"{path}: file too short")

    built = []
    monkeypatch.setenv(kernels.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(torch.ops, "load_library", damaged)
    monkeypatch.setattr(kernels, "_build", lambda *a: built.append(a))
    kernels.load_cpu_kernel.cache_clear()
    try:
        assert kernels.load_cpu_kernel() is not None
    finally:
        kernels.load_cpu_kernel.cache_clear()
    assert len(built) == 1


def test_the_build_error_named_is_the_cause_not_the_command():
    ninja_output = (
        "Error building extension 'x': [1/2] /nope/c++ -MMD -c a.cpp -o a.o\n"
        "FAILED: a.o\n/nope/c++ -MMD -c a.cpp\n/bin/sh: 1: /nope/c++: not found\n"
        "ninja: build stopped: subcommand failed."
    )
    assert kernels.build_failure(RuntimeError(ninja_output)) == "/bin/sh: 1: /nope/c++: not found"
    assert kernels.build_failure(RuntimeError("Ninja is required")) == "Ninja is required"


# A first build as a library user meets it, in a fresh process: the compiler's work is the
# library the test process already built (copied in place of `cpp_extension.load`'s), everything
# around it is real: the import of cpp_extension, the log line, the CLI.
FIRST_BUILD = """
import logging, os, shutil, sys
import torch
from powergrad import cli, kernels

real = kernels._cpp_extension

def importing_cpp_extension():
    module = real()
    def load(name, build_directory, **kwargs):
        library = os.path.join(build_directory, name + ".so")
        shutil.copy(os.environ["BUILT"], library)
        torch.ops.load_library(library)  # as cpp_extension.load does
    module.load = load
    return module

kernels._cpp_extension = importing_cpp_extension
assert not logging.getLogger().handlers  # nothing configured logging: a library user's process
kernels.load_cpu_kernel()  # the first loss call
kernels.load_cpu_kernel.cache_clear()
kernels.load_cpu_kernel()  # later calls: nothing more is said
for argv in (["kernel", "build"], ["kernel", "where"]):
    assert cli.main(argv) == 0
print("control", file=sys.stderr, flush=True)
from torch.utils import cpp_extension
cpp_extension._find_cuda_home()  # what the import would have said
"""


def test_a_first_build_says_so_in_one_line_without_torchs_cuda_notice(tmp_path):
    assert kernels.load_cpu_kernel() is not None  # built here (the test process's own)
    env = dict(os.environ, BUILT=str(kernels.library_path()), CUDA_HOME=str(tmp_path))
    env[kernels.ENV_DIR] = str(tmp_path / "kernels")
    env.pop(kernels.ENV_SWITCH, None)
    done = subprocess.run(
        [sys.executable, "-c", FIRST_BUILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    said, control = done.stderr.split("control\n")
    library = tmp_path / "kernels" / kernels.library_path().parent.name
    assert said.splitlines() == [
        f"powergrad: compiling the loss's C++ op for the CPU into {library} (once per PyTorch "
        f"installation, about 25 s; `powergrad kernel build` does it ahead of time, "
        f"{kernels.ENV_SWITCH}=0 skips it)"
    ]
    assert done.stdout.splitlines() == [
        f"already built: {library / library.name}.so",
        f"{library / library.name}.so (built; move it with {kernels.ENV_DIR}=DIR)",
    ]
    if torch.version.cuda and not torch.cuda.is_available():  # torch would have said it
        assert "No CUDA runtime is found" in control


def test_kernel_build_ahead_of_time_and_its_failure(monkeypatch, tmp_path, capsys):
    from powergrad import cli

    monkeypatch.setenv(kernels.ENV_DIR, str(tmp_path))
    library = kernels.library_path()
    assert cli.main(["kernel"]) == 0
    assert (
        capsys.readouterr().out
        == f"{library} (not built yet; move it with {kernels.ENV_DIR}=DIR)\n"
    )
    built = []
    monkeypatch.setattr(kernels, "_build", lambda *a: built.append(a) or a[-1].mkdir())
    assert cli.main(["kernel", "build"]) == 0
    assert capsys.readouterr().out == f"built: {library}\n" and len(built) == 1
    assert kernels.is_built(library)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'x'\n/bin/sh: 1: c++: not found")

    monkeypatch.setenv(kernels.ENV_DIR, str(tmp_path / "other"))
    monkeypatch.setattr(kernels, "_build", no_compiler)
    assert cli.main(["kernel", "build"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == (
        "powergrad: error: kernel build: the C++ op cannot be built: /bin/sh: 1: c++: not found\n"
    )


def _loss_with_compiler(cxx: Path, tmp_path: Path) -> str:
    """stderr of a process whose first tampered backward must build the op with ``cxx``."""
    env = dict(os.environ, CXX=str(cxx))
    env[kernels.ENV_DIR] = str(tmp_path / "kernels")
    env.pop(kernels.ENV_SWITCH, None)
    code = (
        "import torch; from powergrad import PowerGradLoss; "
        "PowerGradLoss(0.5)(torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0]))"
        ".backward()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_without_a_compiler_one_warning_says_why(tmp_path):
    err = _loss_with_compiler(tmp_path / "no-c++", tmp_path)
    (why,) = [ln for ln in err.splitlines() if "RuntimeWarning" in ln]
    assert f"unavailable (no C++ compiler: {tmp_path / 'no-c++'} not found (install g++" in why
    assert "compiling" not in err  # no build announced that cannot start


def test_a_compiler_that_fails_gives_our_line_not_torchs_banner(tmp_path):
    broken = tmp_path / "broken-c++"  # not g++ by name: torch warns about compatibility
    broken.write_text("#!/bin/sh\necho 'broken-c++: fatal error: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    err = _loss_with_compiler(broken, tmp_path)
    assert "!! WARNING !!" not in err  # torch's compiler banner
    (why,) = [ln for ln in err.splitlines() if "RuntimeWarning" in ln]
    assert "the loss's C++ op for the CPU is unavailable (" in why
