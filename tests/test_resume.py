"""Resume you can trust (issue 12): each user-visible fault of the old resume, as a test.

1. candidates by the progress inside each checkpoint, never file times; best.pt only by name;
2. settings that change the result must equal the checkpoint's (exit 2 naming each);
3. another run's checkpoint into a new folder neither takes its recipe silently nor does nothing
   silently; init_from= starts a new run from its weights;
4. timm checkpoints: model from arch, args applied, one "epochs done" line, no trace on failure
   (tests/test_recipes.py, beside its fixture);
5. the first epoch line after a resume shows the lr used; wall time adds up;
6. no command writes into a run's folder unless it resumes it;
7. best.pt's split is named; the epoch line shows validation accuracy.
Plus: the checkpoint's keys and TrainingState.from_checkpoint's cannot drift apart.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from powergrad.cli import main
from powergrad.config import load_config
from powergrad.engine.checkpoint import load_checkpoint
from powergrad.engine.optim import create_optimizer, create_scheduler
from powergrad.rundir import TIMING_COLUMNS

RECIPE = ["digits", "batch_size=128", "keep_checkpoints=true"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


def copy_run(src: Path, dst: Path) -> Path:
    """As `cp -r` copies: file times are not kept (the copies are all newer than the run)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 3-epoch run with epoch{N}.pt kept."""
    out = tmp_path_factory.mktemp("resume") / "finished"
    assert main(["train", *RECIPE, "epochs=3", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """The same recipe stopped after 2 of 3 epochs (as a kill after epoch 2's save leaves it)."""
    out = tmp_path_factory.mktemp("resume") / "two"
    assert main(["train", *RECIPE, "epochs=2", "--out", str(out)]) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2
    return out


# ----------------------------------------------------------------------------- 1: which checkpoint


def test_a_copied_finished_run_with_a_newer_best_pt_is_complete_and_untouched(
    finished, tmp_path, capsys
):
    run = copy_run(finished, tmp_path / "copy")
    (run / "best.pt").touch()  # the newest file by far: the old resume took it and retrained
    before = snapshot(run)
    code, out, err = run_cli(["train", "resume=auto", "--out", run], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1].startswith(f"{run} is already complete (3 of 3 epochs, last.pt)")
    # One line besides the command line's own start (issue 13: the folder, then the settings,
    # before any import), and none from reading data.
    assert (
        len(lines) == 3 and lines[0] == f"run folder: {run}" and lines[1].startswith("settings (")
    )
    assert err == ""
    assert snapshot(run) == before


def test_a_finished_record_without_checkpoints_is_refused_not_trained_over(
    finished, tmp_path, capsys
):
    """A study strips its records to config.yaml, metrics.csv and summary.json; resume=auto on
    one used to find no checkpoint and train a new run over the record."""
    run = copy_run(finished, tmp_path / "stripped")
    for p in run.glob("*.pt"):
        p.unlink()
    before = snapshot(run)
    code, out, err = run_cli(["train", *RECIPE, "epochs=3", "resume=auto", "--out", run], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "holds a finished run's record" in err
    assert snapshot(run) == before


def test_resume_takes_the_most_progress_not_the_newest_file(two_epochs, tmp_path, capsys):
    run = copy_run(two_epochs, tmp_path / "run")
    (run / "summary.json").unlink()
    (run / "epoch1.pt").touch()
    (run / "best.pt").touch()
    code, out, err = run_cli(["train", "resume=auto", "epochs=3", "--out", run], capsys)
    assert code == 0, err
    assert f"resumed from {run / 'last.pt'} at epoch 3, step 0" in out
    choice = next(line for line in out.splitlines() if line.startswith("resume: "))
    assert "epoch 2 done" in choice and "epoch1.pt (epoch 1 done: less progress)" in choice
    assert "best.pt (taken only when named" in choice
    assert [r["epoch"] for r in metrics(run)] == ["1", "2", "3"]


def test_best_pt_is_taken_when_named(two_epochs, tmp_path, capsys):
    run = copy_run(two_epochs, tmp_path / "run")
    best = load_checkpoint(run / "best.pt")
    code, out, err = run_cli(
        ["train", f"resume={run / 'best.pt'}", "epochs=3", "--out", run], capsys
    )
    assert code == 0, err
    assert f"resumed from {run / 'best.pt'} at epoch {best['epoch'] + 1}" in out


# ----------------------------------------------------------------------------- 2: same recipe


def test_resume_with_other_result_settings_exits_2_naming_each(two_epochs, tmp_path, capsys):
    run = copy_run(two_epochs, tmp_path / "run")
    before = snapshot(run)
    code, out, err = run_cli(["train", "resume=auto", "alpha=0.25", "lr=0.1", "--out", run], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert (
        "alpha: checkpoint 1.0, this command 0.25" in err
        and "lr: checkpoint 0.05, this command 0.1" in err
    )
    assert snapshot(run) == before
    assert "alpha: 1.0" in (run / "config.yaml").read_text()


def test_resume_may_change_machinery_and_raise_epochs(two_epochs, tmp_path, capsys):
    run = copy_run(two_epochs, tmp_path / "run")
    code, _, err = run_cli(
        [
            "train",
            *RECIPE,
            "resume=auto",
            "epochs=3",
            "workers=0",
            "save_every=2",
            "device=cpu",
            "--out",
            run,
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 3


# ----------------------------------------------------------------------------- 3: another run's file


def test_another_runs_finished_checkpoint_into_a_new_folder_says_so(finished, tmp_path, capsys):
    new = tmp_path / "new"
    code, out, err = run_cli(["train", f"resume={finished / 'last.pt'}", "--out", new], capsys)
    assert code == 0, err
    assert "is a finished run (3 of 3 epochs): nothing to train into" in out and "init_from=" in out
    assert not new.exists()


def test_another_runs_checkpoint_past_epochs_is_refused(finished, tmp_path, capsys):
    new = tmp_path / "new"
    code, _, err = run_cli(
        ["train", *RECIPE, "epochs=1", f"resume={finished / 'last.pt'}", "--out", new], capsys
    )
    assert code == 2 and "has 3 epochs done, more than epochs=1" in err and "init_from=" in err
    assert not new.exists()


def test_init_from_starts_a_new_run_from_the_weights(finished, tmp_path, capsys):
    new = tmp_path / "child"
    code, out, err = run_cli(
        [
            "train",
            *RECIPE,
            "epochs=1",
            "alpha=0.5",
            f"init_from={finished / 'last.pt'}",
            "--out",
            new,
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads((new / "summary.json").read_text())
    assert summary["epochs_done"] == 1 and summary["config"]["alpha"] == 0.5
    parent = json.loads((finished / "summary.json").read_text())
    assert summary["parent"] == {
        "checkpoint": str(finished / "last.pt"),
        "epochs_done": 3,
        "config_hash": parent["config_hash"],
    }
    # It starts from the parent's weights: far above a fresh 1-epoch run's first epoch.
    assert float(metrics(new)[0]["train_acc"]) > float(metrics(finished)[0]["train_acc"])
    assert load_checkpoint(new / "last.pt")["epoch"] == 1
    # ... and it is a new run: its folder is refused to a second init_from.
    assert (
        run_cli(["train", *RECIPE, f"init_from={finished / 'last.pt'}", "--out", new], capsys)[0]
        == 2
    )


# ----------------------------------------------------------------------------- 5: lr and wall time


def test_first_epoch_after_extending_shows_the_lr_used_and_wall_time_adds_up(
    two_epochs, tmp_path, capsys
):
    run = copy_run(two_epochs, tmp_path / "run")
    wall_before = json.loads((run / "summary.json").read_text())["wall_s"]
    code, out, err = run_cli(["train", "resume=auto", "epochs=4", "--out", run], capsys)
    assert code == 0, err
    rows = metrics(run)
    # The lr of a 4-epoch cosine schedule at the start of epoch 3 (the 2-epoch one had reached 0).
    cfg = load_config("digits", {"batch_size": 128, "epochs": 4})
    steps = load_checkpoint(run / "epoch2.pt")["global_step"]
    sched = create_scheduler(
        create_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg), cfg, steps // 2
    )
    sched.step_update(steps)
    want = sched.optimizer.param_groups[0]["lr"]
    assert want > 0.01
    assert float(rows[2]["lr"]) == pytest.approx(want, rel=1e-5)
    assert f"epoch   3/4  lr {want:.4g}" in out
    assert json.loads((run / "summary.json").read_text())["wall_s"] > wall_before


# ----------------------------------------------------------------------------- 6: others' folders


def test_sweep_and_plot_refuse_a_run_folder(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    code, _, err = run_cli(["sweep", "digits", "alpha=1,0.5", "epochs=1", "--out", run], capsys)
    assert code == 2 and "holds a training run" in err
    code, _, err = run_cli(["plot", finished, "--out", run], capsys)
    assert code == 2 and "holds a training run" in err
    assert snapshot(run) == before


def test_a_failed_resume_leaves_no_trace_in_out(finished, tmp_path, capsys):
    new = tmp_path / "new"
    code, _, err = run_cli(
        ["train", f"resume={finished / 'last.pt'}", "epochs=5", "model=convnet", "--out", new],
        capsys,
    )
    assert code == 2 and "model: checkpoint 'mlp', this command 'convnet'" in err
    assert not new.exists()


# ----------------------------------------------------------------------------- 7: model selection


def test_best_split_is_named_and_the_epoch_line_shows_validation(tmp_path, capsys):
    code, out, err = run_cli(
        [
            "train",
            "digits",
            "epochs=1",
            "batch_size=128",
            "val_fraction=0.2",
            "--out",
            tmp_path / "val",
        ],
        capsys,
    )
    assert code == 0, err
    assert "val loss" in out.split("epoch   1/1", 1)[1].splitlines()[0]
    assert json.loads((tmp_path / "val" / "summary.json").read_text())["best_split"] == "val"
    assert (
        run_cli(
            ["train", "digits", "epochs=1", "batch_size=128", "--out", tmp_path / "test"], capsys
        )[0]
        == 0
    )
    assert json.loads((tmp_path / "test" / "summary.json").read_text())["best_split"] == "test"


# ----------------------------------------------------------------------------- the format


class _Recording(dict):
    """A checkpoint that notes every key read from it."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.read: set[str] = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)


def _state(cfg):
    from powergrad.engine.state import TrainingState
    from powergrad.monitor import Monitor

    model = torch.nn.Linear(4, 3)
    opt = create_optimizer(list(model.parameters()), cfg)
    return TrainingState(
        model=model,
        optimizer=opt,
        scheduler=create_scheduler(opt, cfg, 10),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        monitor=Monitor(cfg.monitor, 3),
        cfg=cfg,
        device=torch.device("cpu"),
        skipped_updates=torch.zeros((), dtype=torch.long),
    )


def test_checkpoint_keys_and_from_checkpoint_do_not_drift_apart():
    from powergrad.engine.state import CHECKPOINT_KEYS

    cfg = load_config("digits")
    written = _state(cfg)
    written.epoch, written.step_in_epoch, written.global_step = 1, 3, 13
    written.epoch_stats = {"sums": torch.zeros(7)}  # a mid-epoch checkpoint: every entry set
    written.class_names, written.wall_s_before = ["a", "b", "c"], 12.5
    ckpt = written.to_checkpoint()
    assert tuple(ckpt) == CHECKPOINT_KEYS
    recording = _Recording(ckpt)
    read = _state(cfg)
    read.from_checkpoint(recording, "test.pt")
    assert recording.read == set(CHECKPOINT_KEYS), set(CHECKPOINT_KEYS) ^ recording.read
    assert (read.epoch, read.step_in_epoch, read.global_step) == (1, 3, 13)
    assert read.class_names == ["a", "b", "c"] and read.wall_s >= 12.5
    assert read.scheduler.state_dict() == written.scheduler.state_dict()
