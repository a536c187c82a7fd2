"""A run folder holds exactly one run (issue 22, rows 1-6): after any sequence of commands it is
one run's record, complete or resumable, or the command was refused.

1. best.pt holds the epoch summary.json names as best, whatever save_every says;
2. --overwrite removes everything the old run wrote: nothing of it is resumed or reported;
3. two runs started at once into one folder: one runs, the other is refused (the folder lock);
4. two resumes of one folder at once, after a kill left its lock: the same;
5. a checkpoint from another run never writes into an existing run's folder; into a new folder
   it is a new run that records its parent;
6. a plain-pickle file as a checkpoint or weights is refused in one line, no torch warning.
Plus: the start reads a checkpoint once (tensors mapped while choosing); a stale lock is taken
over with one line; a held folder is refused naming its holder.

The races fork each process from a forkserver that has already imported torch and powergrad, so
that two processes start within a few milliseconds of each other, 20 times each.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from powergrad.cli import main
from powergrad.engine.checkpoint import load_checkpoint
from powergrad.rundir import TIMING_COLUMNS, read_metrics, read_summary

LOCK = ".lock"  # (a literal: these tests also run against code older than the lock)

TRIES = 20
FAST = ["digits", "epochs=1", "batch_size=256"]  # one short epoch: the races are at the start


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in read_metrics(run)]


# ----------------------------------------------------------------------------- 1: best.pt


def test_best_pt_holds_the_best_epoch_with_save_every(tmp_path, capsys):
    run = tmp_path / "A"
    args = ["train", "digits", "epochs=5", "save_every=3", "val_fraction=0.1", "--out", run]
    assert run_cli(args, capsys)[0] == 0
    summary = read_summary(run)
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == summary["best"]["epoch"], (best["epoch"], summary["best"]["epoch"])
    assert best["best"] == summary["best"]
    code, out, err = run_cli(["eval", "--checkpoint", run / "best.pt"], capsys)
    assert code == 0, err
    row = next(r for r in read_metrics(run) if r["epoch"] == summary["best"]["epoch"])
    assert json.loads(out.splitlines()[-1])["loss"] == pytest.approx(row["test_loss"], rel=1e-5)
    assert load_checkpoint(run / "last.pt")["epoch"] == 5


# ----------------------------------------------------------------------------- 2: --overwrite


def test_overwrite_leaves_nothing_of_the_old_run(tmp_path, capsys):
    run = tmp_path / "B"
    assert (
        run_cli(["train", "digits", "epochs=3", "keep_checkpoints=true", "--out", run], capsys)[0]
        == 0
    )
    old_events = {p.name for p in (run / "events").rglob("*") if p.is_file()}
    args = ["train", "digits", "epochs=2", "alpha=0.5", "--out", run, "--overwrite"]
    assert run_cli(args, capsys)[0] == 0
    assert sorted(p.name for p in run.glob("epoch*.pt")) == []
    assert not old_events & {p.name for p in (run / "events").rglob("*") if p.is_file()}
    assert [r["epoch"] for r in rows(run)] == [1, 2]
    assert "alpha: 0.5" in (run / "config.yaml").read_text()
    code, out, err = run_cli(["train", "resume=auto", "--out", run], capsys)
    assert code == 0, err
    assert "is already complete (2 of 2 epochs, last.pt)" in out
    summary = read_summary(run)
    assert summary["config"]["alpha"] == 0.5 and summary["epochs_done"] == 2
    assert load_checkpoint(run / "last.pt")["config"]["alpha"] == 0.5


# ----------------------------------------------------------------------------- 3, 4: races


def _child(argv: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    torch.set_num_threads(1)
    sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "powergrad.cli", "powergrad.workflows", "powergrad.data", "powergrad.models"]
        + ["powergrad.plots", "torch.utils.tensorboard", "sklearn.datasets"]
    )
    warm = ctx.Process(target=int)  # starts the server: the imports happen here
    warm.start()
    warm.join()
    return ctx


def race(ctx, commands: list[list], logs: list[Path]) -> list[tuple[int, str]]:
    """Start the commands at once; (exit code, output) of each."""
    procs = [
        ctx.Process(target=_child, args=([str(a) for a in c], str(log)))
        for c, log in zip(commands, logs)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    return [(p.exitcode, log.read_text()) for p, log in zip(procs, logs)]


def refused_as_held(code: int, text: str) -> bool:
    return code == 2 and " is in use by process " in text


def test_two_trains_into_one_folder_at_once_make_one_run(tmp_path, forkserver):
    for i in range(TRIES):
        run = tmp_path / f"C{i}"
        commands = [["train", *FAST, "--out", run], ["train", *FAST, "alpha=0.5", "--out", run]]
        logs = [tmp_path / f"c{i}-{k}.log" for k in range(2)]
        results = race(forkserver, commands, logs)
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], (i, results)
        (won, _), (lost, text) = sorted(results, key=lambda r: r[0])
        assert refused_as_held(lost, text) or "already holds a run" in text, text
        alpha = 0.5 if results[1][0] == 0 else 1.0
        assert read_summary(run)["config"]["alpha"] == alpha
        assert f"alpha: {alpha}" in (run / "config.yaml").read_text()
        assert [r["epoch"] for r in rows(run)] == [1]
        assert (run / "train.log").read_text().count("epoch   1/1") == 1
        assert not (run / LOCK).exists()


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """1 of 2 epochs saved, and the lock file of the killed process still there."""
    run = tmp_path_factory.mktemp("killed") / "run"
    assert main(["train", *FAST, "--out", str(run)]) == 0
    (run / "summary.json").unlink()
    (run / LOCK).write_text("process 999999999 on elsewhere (since 00:00:00)")
    return run


def test_two_resumes_of_one_folder_at_once_make_one_run(killed, tmp_path, forkserver):
    for i in range(TRIES):
        run = tmp_path / f"D{i}"
        shutil.copytree(killed, run)
        command = ["train", "resume=auto", "epochs=2", "--out", run]
        logs = [tmp_path / f"d{i}-{k}.log" for k in range(2)]
        results = race(forkserver, [command, command], logs)
        trained = [text for code, text in results if code == 0 and "epoch   2/2" in text]
        assert len(trained) == 1, (i, results)
        for code, text in results:  # the other: refused as held, or found the run complete
            assert code == 0 or refused_as_held(code, text), text
        assert "taking over the lock of process 999999999" in trained[0]
        assert [r["epoch"] for r in rows(run)] == [1, 2]
        summary = read_summary(run)
        assert summary["status"] == "finished" and summary["epochs_done"] == 2
        assert not (run / LOCK).exists()


def test_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys):
    import fcntl

    run = tmp_path / "held"
    run.mkdir()
    with open(run / LOCK, "w") as f:
        f.write("process 4242 on somehost (since 01:02:03)")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in (["train", *FAST], ["train", "resume=auto"]):
            code, _, err = run_cli([*args, "--out", run], capsys)
            assert code == 2 and err.splitlines() == [
                f"powergrad: error: {run.absolute()} is in use by process 4242 on somehost "
                "(since 01:02:03): wait for it to end, or choose another --out"
            ]
    assert os.listdir(run) == [LOCK]


# ----------------------------------------------------------------------------- 5: another run's file


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("other") / "OTHER"
    assert main(["train", "digits", "epochs=3", "keep_checkpoints=true", "--out", str(run)]) == 0
    return run


def test_another_runs_checkpoint_into_a_finished_run_is_refused(other, tmp_path, capsys):
    run = tmp_path / "E"
    assert run_cli(["train", "digits", "epochs=2", "seed=1", "--out", run], capsys)[0] == 0
    before = snapshot(run)
    code, _, err = run_cli(["train", f"resume={other / 'epoch2.pt'}", "--out", run], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(run) in err and str(other) in err and "another run" in err
    assert snapshot(run) == before


def test_another_runs_checkpoint_into_a_new_folder_is_a_new_run_with_its_parent(
    other, tmp_path, capsys
):
    run = tmp_path / "F"
    code, out, err = run_cli(["train", f"resume={other / 'epoch2.pt'}", "--out", run], capsys)
    assert code == 0, err
    summary = read_summary(run)
    assert summary["parent"]["checkpoint"] == str(other / "epoch2.pt")
    assert summary["parent"]["epochs_done"] == 2
    assert summary["parent"]["config_hash"] == read_summary(other)["config_hash"]
    assert rows(run) == rows(other)  # continued exactly: the same three epochs


def test_a_parent_given_by_a_relative_path_is_recorded_absolute(
    other, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(other.parent)
    run = tmp_path / "G"
    code, _, err = run_cli(["train", f"resume={other.name}/epoch2.pt", "--out", run], capsys)
    assert code == 0, err
    assert read_summary(run)["parent"]["checkpoint"] == str(other / "epoch2.pt")


# ----------------------------------------------------------------------------- 6: plain pickle


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["resume", "eval", "weights"])
def test_a_plain_pickle_is_refused_as_such_in_one_line(where, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Payload(marker), "epoch": 0}))
    args = {
        "resume": ["train", f"resume={evil}", "--out", tmp_path / "r"],
        "eval": ["eval", "--checkpoint", evil],
        "weights": ["train", *FAST, f"weights={evil}", "--out", tmp_path / "r"],
    }[where]
    with warnings.catch_warnings(record=True) as caught:  # what would reach stderr in a shell
        warnings.simplefilter("always")
        code, _, err = run_cli(args, capsys)
    assert [str(w.message) for w in caught] == []
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "refused: a plain pickle" in err and "nothing was run" in err and str(evil) in err
    assert not marker.exists() and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- the start


def test_the_start_reads_the_checkpoint_once_and_maps_the_others(
    other, tmp_path, capsys, monkeypatch
):
    """resume=auto on a folder of four checkpoints: each opened once, tensors mapped (not read)."""
    run = tmp_path / "run"
    shutil.copytree(other, run)
    (run / "summary.json").unlink()
    loads: list[tuple[str, bool]] = []
    real = torch.load

    def counting(path, *a, **k):
        loads.append((Path(path).name, bool(k.get("mmap"))))
        return real(path, *a, **k)

    monkeypatch.setattr(torch, "load", counting)
    code, out, err = run_cli(["train", "resume=auto", "--out", run], capsys)
    assert code == 0, err
    assert sorted(loads) == [(n, True) for n in ("epoch1.pt", "epoch2.pt", "epoch3.pt", "last.pt")]


def test_a_killed_holders_lock_is_taken_over_with_one_line(tmp_path, capsys):
    run = tmp_path / "stale"
    run.mkdir()
    (run / LOCK).write_text("process 999999999 on elsewhere (since 00:00:00)")
    code, out, err = run_cli(["train", *FAST, "--out", run], capsys)
    assert code == 0 and err == "", err
    assert [line for line in out.splitlines() if "taking over" in line] == [
        f"{run.absolute()}: taking over the lock of process 999999999 on elsewhere "
        "(since 00:00:00), which has ended"
    ]
    assert not (run / LOCK).exists()
