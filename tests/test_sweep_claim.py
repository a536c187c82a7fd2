"""A sweep's workers on one SQLite file: each queued trial is claimed by exactly one worker, and a
worker whose trial is closed under it (failed by another worker) leaves it and goes on.

Met by the 2h study (docs/results.md): `powergrad sweep --workers 2` started both workers on
trial 0; the second found the run folder in use and failed the trial, and the first then crashed
on its next `trial.report`."""

from __future__ import annotations

import threading
from pathlib import Path

import optuna
from optuna.storages._rdb import models
from optuna.trial import TrialState

from powergrad import sweep
from powergrad.sweep import run_sweep


def _queue(db: Path) -> sweep.Queue:
    return sweep._open_queue(f"sqlite:///{db}", {"seed": list(range(12))}, None)


def test_two_workers_never_claim_one_trial_on_sqlite(tmp_path, monkeypatch):
    db = tmp_path / "study.db"
    q = _queue(db)
    for seed in range(12):
        q.study.enqueue_trial({"seed": seed})

    # Widen the gap between reading a trial WAITING and writing it RUNNING, the gap two workers
    # that start together fall into: SQLite has no row lock (SQLAlchemy drops FOR UPDATE there).
    find = models.TrialModel.find_or_raise_by_id

    def slow_find(*args, **kwargs):
        row = find(*args, **kwargs)
        threading.Event().wait(0.05)
        return row

    monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id", slow_find)
    start = threading.Barrier(3)
    claimed: list[int] = []

    def worker() -> None:
        own = _queue(db)  # a worker of its own: its own storage and connections
        start.wait()
        while (got := sweep._claim(own)) is not None:
            claimed.append(got[0].number)
            own.study.tell(got[0], 1.0, skip_if_finished=True)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(12))  # every trial once: none twice, none left
    assert not (tmp_path / "study.db.lock").exists()  # the claim's lock file is gone after it


def test_a_worker_leaves_a_trial_failed_under_it_and_the_point_resumes(
    tmp_path, monkeypatch, caplog, capsys
):
    out = tmp_path / "sweep"
    fixed = {"epochs": 3, "train_subset": 200, "model": "mlp"}
    real_train = sweep.train

    def train_while_another_worker_fails_the_trial(cfg, out, on_epoch):
        def on_epoch_then_failed(row):
            if row["epoch"] == 1:  # e.g. fail_stale_trials on another host, after a stall
                other = _queue(out.parent / "study.db")
                running = other.study.get_trials(states=(TrialState.RUNNING,))
                other.study.tell(running[0].number, state=TrialState.FAIL)
            return on_epoch(row)

        return real_train(cfg, out=out, on_epoch=on_epoch_then_failed)

    monkeypatch.setattr(sweep, "train", train_while_another_worker_fails_the_trial)
    with caplog.at_level("WARNING", logger="powergrad"):
        run_sweep("digits", {"alpha": ["0.5"]}, out, fixed=fixed)  # no crash
    assert "was closed while this worker ran it" in caplog.text
    run_dir = out / "alpha=0.5,seed=0"
    assert (run_dir / "last.pt").is_file() and not (run_dir / "summary.json").exists()
    study = optuna.load_study(study_name=sweep.STUDY_NAME, storage=f"sqlite:///{out}/study.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL]

    monkeypatch.setattr(sweep, "train", real_train)  # run again: the point resumes and finishes
    result = run_sweep("digits", {"alpha": ["0.5"]}, out, fixed=fixed)
    assert [r["state"] for r in result.trials] == ["COMPLETE"]
    epochs = [
        ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")
    ]
    assert epochs == ["1/3", "2/3", "3/3"]  # epoch 1 trained once: the second run resumed
