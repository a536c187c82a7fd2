"""Correctness on a CUDA GPU: `pytest -m gpu tests/test_gpu.py` (make gpu-test). Skipped without one.

The same checks as the GPU runs' steps (benchmarks/gpu), as tests: the loss exact in fp32, bf16
and fp16 against a dtype-rounded float64 reference; compiled (Inductor) equal to eager; a real
recipe step (augment=cifar, bf16, channels-last) without host-device syncs; a compiled
trainer run that learns. The C++ loss op is CPU-only, so CUDA runs the Python path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a namespace package of the repository

from benchmarks.gpu.common import make_jpeg_folder, train_args  # noqa: E402
from benchmarks.gpu.loss import exactness  # noqa: E402
from benchmarks.gpu.training import (  # noqa: E402
    StepTap,
    flag_read_every,
    judge_syncs,
    record_syncs,
    tapped_train_loaders,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_exact_on_cuda(dtype, ls):
    r = exactness(CUDA, dtype, ls, 4096, 1000)
    assert r["ok"] and r["finite"] and r["grad_dtype_kept"], r


def test_compiled_loss_matches_eager_on_cuda():
    from powergrad import power_grad_cross_entropy

    g = torch.Generator().manual_seed(0)
    z0 = (torch.randn(512, 100, generator=g) * 3).to(CUDA)
    t = torch.randint(0, 100, (512,), generator=g).to(CUDA)

    def fwd_bwd(f):
        z = z0.clone().requires_grad_()
        loss = f(z, t, 0.3, 0.1)
        loss.backward()
        return loss.detach(), z.grad

    compiled = torch.compile(power_grad_cross_entropy, dynamic=False)
    (la, ga), (lb, gb) = fwd_bwd(power_grad_cross_entropy), fwd_bwd(compiled)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-8)


def run_cli(args: list[str]) -> None:
    from powergrad.cli import main

    assert main(args) == 0


@pytest.fixture
def jpegs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))
    return make_jpeg_folder(tmp_path / "jpegs", 3, 64, 8, side=32)


def test_recipe_step_has_no_sync_on_cuda(jpegs, tmp_path):
    """cifar10/resnet20-jpeg with augment=cifar, bf16, channels-last: after the first epoch, only
    the loop's flag read (every SYNC_EVERY steps, and an epoch's last step) syncs."""
    import powergrad.workflows  # noqa: F401 - loaded, so that the tap finds its references

    over = {
        "dataset": "imagefolder",
        "data_dir": str(jpegs),
        "img_size": 32,
        "augment": "cifar",
        "amp": "bf16",
        "channels_last": True,
        "epochs": 2,
        "batch_size": 8,
        "workers": 0,
        "device": "cuda",
    }
    tap, events = StepTap(), []
    with tapped_train_loaders(tap), record_syncs(tap, events, cuda=True):
        run_cli(train_args("cifar10/resnet20-jpeg", over, tmp_path / "run"))
    ok, detail, sites = judge_syncs(events, tap.steps, flag_read_every(True), per_read=2)
    assert tap.steps[1] == 24 and ok, (detail, sites)


def test_compiled_trainer_learns_on_cuda(jpegs, tmp_path):
    from powergrad.rundir import read_metrics

    over = {
        "dataset": "imagefolder",
        "data_dir": str(jpegs),
        "img_size": 32,
        "amp": "bf16",
        "channels_last": True,
        "compile": True,
        "epochs": 3,
        "batch_size": 16,
        "lr": 0.05,
        "workers": 0,
        "device": "cuda",
    }
    run_cli(train_args("cifar10/resnet20-jpeg", over, tmp_path / "run"))
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 3 and rows[-1]["train_loss"] < rows[0]["train_loss"]
