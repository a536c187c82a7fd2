"""Sweeps (grid x seeds on digits: interrupted and continued, two workers, failures, pruning),
and the table and figures read back from their run directories."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import sweep_killed_in_trial

from powergrad.cli import main
from powergrad.report.tables import load_runs, results_table
from powergrad.sweep import parse_grid, run_sweep

# A small conv net on digits (so the filter-norm figures have convs), 2 epochs on 300 images.
TINY = [
    "model=convnet",
    "model_kwargs={widths: [4, 8], hidden: 16}",
    "epochs=2",
    "train_subset=300",
    "monitor.filter_norms=true",
    "monitor.filter_norms_every=5",
]
FIGURES = [
    "transformed_distribution.png",
    "accuracy_loglog.png",
    "loss_curves.png",
    "accuracy_vs_alpha.png",
    "logit_stats.png",
    "logit_stats_vs_alpha.png",
    "loss_vs_logit_norm.png",
]


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(
        study_name="powergrad-sweep", storage=f"sqlite:///{out.resolve() / 'study.db'}"
    )


def _finished(out: Path) -> list[Path]:
    return [p for p in out.glob("*/summary.json") if '"finished"' in p.read_text()]


def _mid_trial(out: Path) -> bool:
    return any(
        (d / "metrics.csv").is_file() and not (d / "summary.json").is_file()
        for d in out.glob("*=*")
    )


def test_parse_grid_splits_axes_from_fixed_keys():
    recipe, axes, fixed = parse_grid(
        ["digits", "alpha=1,0.5", "decay_milestones=3,6", "model_kwargs={a: [1, 2]}", "lr=0.1"]
    )
    assert recipe == "digits" and axes == {"alpha": ["1", "0.5"]}
    assert fixed == {"decay_milestones": "3,6", "model_kwargs": "{a: [1, 2]}", "lr": "0.1"}


# The sweep CLI in a child that SIGKILLs itself at the end of the first epoch of its third trial.
KILL_IN_THIRD_TRIAL = sweep_killed_in_trial(3)


def test_digits_sweep_interrupted_continued_then_report_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "digits", "alpha=1,0.5,0.25", *TINY, "--seeds", "2", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_THIRD_TRIAL, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    done_before = {p: p.stat().st_mtime_ns for p in _finished(out)}
    assert len(done_before) == 2 and _mid_trial(out)

    assert main(args) == 0  # the same command continues the sweep
    printed = capsys.readouterr().out
    assert "epochs trained 12 of the full grid's 12" in printed
    study = _study(out)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    points = {(t.params["alpha"], t.params["seed"]) for t in complete}
    assert len(complete) == len(points) == 6  # every point once
    assert all(p.stat().st_mtime_ns == m for p, m in done_before.items())  # not re-run
    interrupted = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert all("interrupted" in t.user_attrs["error"] for t in interrupted)

    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    rows = [ln for ln in table.splitlines() if ln.startswith("| convnet")]
    assert len(rows) == 3 and all(" ± " in r and "| 2 |" in r for r in rows)
    assert "+0.00 | +0.00" in rows[0]  # alpha = 1 is its own baseline
    assert main(["report", str(out), "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # header + 3 settings

    figs = tmp_path / "figs"
    assert main(["plot", str(out), "--out", str(figs)]) == 0
    names = {p.name for p in figs.iterdir()}
    assert set(FIGURES) <= names
    assert sum(n.startswith("filter_norms-") for n in names) == 6
    assert sum(n.startswith("pooled_features-") for n in names) == 6


def test_two_workers_share_a_sweep_and_failed_trials_are_recorded(tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(
        "digits",
        {"alpha": ["1", "0.5"], "model": ["mlp", "no_such_model"]},
        out,
        fixed={"epochs": 1, "train_subset": 200},
        workers=2,
    )
    study = _study(out)
    assert len(study.trials) == 4  # no point ran twice
    states = {(t.params["alpha"], t.params["model"]): t.state.name for t in study.trials}
    assert states[(1.0, "mlp")] == states[(0.5, "mlp")] == "COMPLETE"
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 2 and all(
        "UserError: unknown model" in t.user_attrs["error"] for t in failed
    )
    assert sorted(r["state"] for r in result.trials) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert len({t.user_attrs["run_dir"] for t in study.trials}) == 4


def test_prune_stops_a_clearly_worse_trial(tmp_path):
    result = run_sweep(
        "digits",
        {"lr": ["0.05", "0.04", "0.03", "1e-5"]},
        tmp_path / "sweep",
        fixed={"epochs": 4, "train_subset": 200},
        prune=True,
    )
    by_point = {r["point"]: r for r in result.trials}
    worst = by_point["lr=1e-5,seed=0"]
    assert worst["state"] == "PRUNED" and worst["epochs_done"] < 4
    assert result.epochs_run < result.epochs_full == 16


def test_sweep_refuses_bad_values_and_another_grid_before_running(tmp_path, capsys, caplog):
    out = tmp_path / "sweep"
    assert main(["sweep", "digits", "alpha=1,-1", "--out", str(out)]) == 2
    assert "alpha" in capsys.readouterr().err and not out.exists()
    with caplog.at_level("INFO", logger="powergrad"):
        run_sweep("digits", {"alpha": ["1"]}, out, fixed={"epochs": 1, "train_subset": 100})
    assert "storage sqlite:///" in caplog.text and "study powergrad-sweep" in caplog.text
    with pytest.raises(Exception, match="another sweep"):
        run_sweep("digits", {"alpha": ["0.5"]}, out, fixed={"epochs": 1, "train_subset": 100})
    assert os.path.isdir(out / "alpha=1,seed=0")


def _write_run(
    folder: Path, alpha: float, seed: int, test_acc: float, val_acc: float | None = None
) -> None:
    folder.mkdir(parents=True)
    final = {
        "epoch": 4,
        "train_acc": 0.5,
        "train_loss": 1.0,
        "test_acc": test_acc,
        "val_acc": val_acc,
    }
    summary = {
        "status": "finished",
        "final": final,
        "config": {
            "model": "resnet20",
            "dataset": "cifar10",
            "sched": "cosine",
            "epochs": 4,
            "label_smoothing": 0.0,
            "alpha": alpha,
            "seed": seed,
        },
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_report_pairs_seeds_with_a_t_interval(tmp_path, capsys):
    # alpha 0.5 beats alpha 1 by 1, 2 and 3 points on seeds 0, 1, 2: mean +2, and the 95%
    # t-interval is 2 ± t(0.975, 2) * 1 / sqrt(3) = 2 ± 2.484 (t = 4.303).
    base = [0.40, 0.30, 0.50]
    for seed, acc in enumerate(base):
        _write_run(tmp_path / f"a1-s{seed}", 1.0, seed, acc, val_acc=acc)
        _write_run(tmp_path / f"a0.5-s{seed}", 0.5, seed, acc + (seed + 1) / 100, val_acc=acc)
    _write_run(
        tmp_path / "a0.5-s7", 0.5, 7, 0.9
    )  # no alpha = 1 partner: in the mean, not in the pairs
    rows = {r["alpha"]: r for r in results_table(load_runs([tmp_path])[0])}
    assert rows[1.0]["d_test_paired"] is None and rows[1.0]["pairs"] == 0
    row = rows[0.5]
    assert row["pairs"] == 3 and row["seeds"] == 4 and row["val_acc"] is None  # seed 7 has no val
    assert row["d_test_paired"] == pytest.approx(2.0)
    assert (row["d_test_lo"], row["d_test_hi"]) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-3)

    assert main(["report", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "Δ test paired [95% CI]" in table and "+2.00 [-0.48, +4.48]" in table


def test_a_seed_run_twice_counts_once_and_is_named(tmp_path, capsys):
    for seed, acc in enumerate([0.40, 0.30, 0.50]):
        _write_run(tmp_path / f"a1-s{seed}", 1.0, seed, acc)
    _write_run(tmp_path / "copy" / "a1-s0", 1.0, 0, 0.40)  # seed 0 again, in another folder
    assert main(["report", str(tmp_path), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    (row,) = csv.DictReader(io.StringIO(out))
    assert row["seeds"] == "3" and float(row["test_acc_std"]) == pytest.approx(10.0)  # not 4 seeds
    assert (
        f"report: {tmp_path / 'copy' / 'a1-s0'} left out: it repeats the setting and seed 0 of "
        f"{tmp_path / 'a1-s0'}, which counts" in err
    )
    assert (
        main(["report", str(tmp_path), "--format", "html", "--out", str(tmp_path / "r.html")]) == 0
    )
    assert f"{tmp_path / 'copy' / 'a1-s0'} left out" in (tmp_path / "r.html").read_text()
