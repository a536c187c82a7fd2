"""Helpers shared by the tests (pytest puts this folder on sys.path: `from conftest import ...`)."""

from __future__ import annotations

import os

import pytest

from powergrad import kernels
from powergrad.cli import main


def run_cli(args, capsys) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def sweep_killed_in_trial(trial: int, wait_for: str | None = None) -> str:
    """Python source for ``python -c SRC sweep ...``: the sweep CLI, which SIGKILLs itself at the
    end of the first epoch of its ``trial``-th trial (after that epoch's checkpoint and its report
    to the study), once a path
    matching the glob ``wait_for`` exists if given. No clean-up runs: the trial stays RUNNING in
    the study. A deterministic point mid-sweep (polling from outside raced a fast machine)."""
    return f"""
import glob, os, signal, sys, time
import powergrad.sweep as sweep
from powergrad.cli import main

real_train, trials = sweep.train, []

def train(cfg, *args, on_epoch=None, **kwargs):
    trials.append(cfg)
    def hook(row):
        stop = on_epoch(row)
        if len(trials) == {trial}:
            deadline = time.time() + 300
            while {wait_for!r} and not glob.glob({wait_for!r}) and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return stop
    return real_train(cfg, *args, on_epoch=hook, **kwargs)

sweep.train = train
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="session", autouse=True)
def cpu_loss_op_built():
    """The loss's C++ op (powergrad/kernels.py) built once, before any test: the subprocesses
    that tests start then load it in milliseconds instead of racing to compile it (~30 s) under
    their own timeouts."""
    if os.environ.get(kernels.ENV_SWITCH) != "0":  # off: `make gpu-test`, as on CUDA
        kernels.load_cpu_kernel()
