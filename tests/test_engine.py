"""The training engine end to end: CLI, run directory, eval, exact resume, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from torch.utils.data import DataLoader, TensorDataset

import powergrad
from powergrad.config import load_config

FAST = ["epochs=2", "batch_size=128"]


def metrics_rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "digits", *FAST, "alpha=0.25", "--out", str(run)], capsys)
    assert code == 0, err
    for name in (
        "config.yaml",
        "metrics.csv",
        "summary.json",
        "last.pt",
        "best.pt",
        "plots/curves.png",
    ):
        assert (run / name).is_file(), name
    assert any((run / "events").iterdir())
    rows = metrics_rows(run)
    assert len(rows) == 2
    required = "epoch,lr,train_loss,train_acc,test_loss,test_acc,test_top5,gap,epoch_s,train_img_s"
    assert set(required.split(",")) <= set(rows[0])
    assert 0 <= float(rows[-1]["test_acc"]) <= 1
    summary = json.loads((run / "summary.json").read_text())
    assert {"final", "best", "wall_s", "env", "config_hash", "diagnostics"} <= set(summary)
    assert summary["diagnostics"] == []
    assert summary["final"]["epoch"] == 2
    # the resolved config can be fed back as a recipe
    again = load_config(str(run / "config.yaml"))
    assert again.alpha == 0.25 and again.epochs == 2

    code, out, err = run_cli(["eval", "--checkpoint", str(run / "last.pt")], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"top1", "top5", "loss", "n"}
    assert result["n"] == 360
    assert abs(result["top1"] - float(rows[-1]["test_acc"])) < 1e-4


def test_resume_after_any_epoch_gives_identical_metrics(tmp_path, capsys):
    full = tmp_path / "full"
    args = ["train", "digits", "epochs=4", "batch_size=64", "alpha=0.25", "keep_checkpoints=true"]
    assert run_cli([*args, "--out", str(full)], capsys)[0] == 0
    want = metrics_rows(full)
    for stop in (1, 3):
        part = tmp_path / f"resumed{stop}"
        code, _, err = run_cli(
            ["train", f"resume={full / f'epoch{stop}.pt'}", "--out", str(part)], capsys
        )
        assert code == 0, err
        got = metrics_rows(part)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            for k in a:
                if k not in ("epoch_s", "train_img_s"):
                    assert a[k] == b[k], (stop, k, a[k], b[k])


def test_python_api_train_and_fit(tmp_path):
    result = powergrad.train("digits", out=tmp_path / "a", epochs=1, alpha=0.5)
    assert result.status == "finished" and result.final["epoch"] == 1

    torch.manual_seed(0)
    x = torch.randn(256, 20)
    w = torch.randn(20, 4)
    y = (x @ w).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    res = powergrad.fit(model, loader, loader, out=tmp_path / "fit", epochs=5, lr=0.1, alpha=0.3)
    assert res.final["train_acc"] > 0.7
    assert (tmp_path / "fit" / "metrics.csv").is_file()


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", "epochs=1", "--out", str(run)], capsys)[0] == 0
    before = (run / "metrics.csv").read_text()
    code, out, err = run_cli(["train", "epochs=1", "--out", str(run)], capsys)
    assert code == 2 and "already holds a run" in err
    assert out == ""  # no "run folder:" line for a start that was refused
    assert (run / "metrics.csv").read_text() == before
    assert (
        run_cli(["train", "epochs=1", "lr=0.01", "--out", str(run), "--overwrite"], capsys)[0] == 0
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "alhpa=0.3"], "did you mean 'alpha'"),
        (["train", "epochs=two"], "epochs: expected int"),
        (["train", "alpha=-1"], "alpha"),
        (["train", "lr=-0.1"], "lr: must be > 0"),
        (["train", "sched=linear"], "sched: must be one of"),
        (["train", "no-such-recipe"], "no recipe named"),
        (["train", "monitor.stall_epoch=2"], "did you mean 'monitor.stall_epochs'"),
        (["train", "model=resnet_9000", "epochs=1"], "resnet"),
        (["train", "dataset=cifar10", "data_dir=/nonexistent", "epochs=1"], "/nonexistent"),
        (["eval", "--checkpoint", "/nonexistent.pt"], "checkpoint not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(args, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("powergrad: error")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_bad_yaml_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    code, _, err = run_cli(["train", str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err


def test_divergence_exits_3_naming_the_step(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "powergrad",
            "train",
            "epochs=3",
            "lr=1e12",
            "momentum=0.99",
            "--out",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "non-finite loss at step" in proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diagnostics"][0]["code"] == "non_finite"


def test_recipes_lists_the_default(capsys):
    code, out, _ = run_cli(["recipes"], capsys)
    assert code == 0 and "digits" in out


def test_config_overrides_coerce_types():
    cfg = load_config(
        None,
        [
            "epochs=3",
            "nesterov=false",
            "decay_milestones=30,60,90",
            "model_kwargs.hidden=32",
            "monitor.stall_epochs=5",
            "weights=none",
        ],
    )
    assert cfg.epochs == 3 and cfg.nesterov is False and cfg.decay_milestones == [30, 60, 90]
    assert cfg.model_kwargs == {"hidden": "32"} and cfg.monitor.stall_epochs == 5
    assert cfg.weights is None


def test_a_run_without_validation_says_its_best_is_chosen_on_test(tmp_path, capsys):
    code, out, _ = run_cli(["train", "epochs=1", "--out", tmp_path / "a"], capsys)
    assert code == 0 and "best.pt will be the epoch with the best test accuracy" in out
    code, out, _ = run_cli(
        ["train", "epochs=1", "val_fraction=0.1", "--out", tmp_path / "b"], capsys
    )
    assert code == 0 and "no validation split" not in out


def test_resume_auto_on_a_folder_without_a_checkpoint_says_it_starts_anew(tmp_path, capsys):
    code, out, _ = run_cli(["train", "epochs=1", "resume=auto", "--out", tmp_path / "typo"], capsys)
    assert code == 0 and f"resume=auto: no checkpoint in {tmp_path / 'typo'}, so a new run" in out
