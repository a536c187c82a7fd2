"""Two sweep workers on two "machines" (separate processes, each with its own --out) share one
sweep through a real PostgreSQL server: one is killed mid-trial, and re-running its command
resumes that trial from its checkpoint; every point x seed completes exactly once.

The server is a throwaway one: initdb into a temporary folder, a free port on 127.0.0.1,
stopped at the end whatever happens. Skipped only where PostgreSQL's server binaries are absent.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import sweep_killed_in_trial
from optuna.distributions import FloatDistribution, IntDistribution

# Digits, 3 epochs on 300 images: a trial takes a second or two.
TINY = ["epochs=3", "train_subset=300", "batch_size=64"]
EPOCHS = 3


def _server_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> dict:
    """initdb refuses to run as root: there, the server runs as the `postgres` account that
    PostgreSQL's packages create (else `nobody`)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    pytest.skip(
        "running as root with neither a `postgres` nor a `nobody` account to run PostgreSQL as"
    )


@pytest.fixture
def postgres_url() -> Iterator[str]:
    bin_dir = _server_binaries()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; install PostgreSQL to run this test"
        )
    who = _as_server_user()
    folder = Path(tempfile.mkdtemp(prefix="powergrad-pg-"))  # not under tmp_path: root-only there
    if who:
        os.chown(folder, who["user"], who["group"])
    data, log = folder / "data", folder / "server.log"

    def run(*cmd: str) -> None:
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=120, **who)
        assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout}\n{proc.stderr}"

    try:
        run(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "powergrad",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        port = _free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off"
        )
        run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        yield f"postgresql://powergrad@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                cwd=folder,
                capture_output=True,
                timeout=60,
                **who,
            )
        shutil.rmtree(folder, ignore_errors=True)


def _sweep(args: list[str], source: str | None = None) -> subprocess.Popen:
    code = ["-c", source] if source else ["-m", "powergrad"]
    return subprocess.Popen(
        [sys.executable, *code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finished(folder: Path) -> dict[str, Path]:
    return {
        p.parent.name: p.parent
        for p in folder.glob("*/summary.json")
        if '"finished"' in p.read_text()
    }


def test_two_workers_share_a_sweep_on_postgresql_and_a_killed_trial_resumes(postgres_url, tmp_path):
    a_out, b_out = tmp_path / "machine-a", tmp_path / "machine-b"
    grid = ["sweep", "digits", "alpha=1,0.5", *TINY, "--seeds", "2", "--storage", postgres_url]
    # Worker A kills itself (SIGKILL, no clean-up) after the first epoch of its first trial, once
    # worker B has claimed a point too: both are mid-sweep at that moment. B starts once A has
    # claimed its point, so that B cannot take all four first.
    a = _sweep([*grid, "--out", str(a_out)], sweep_killed_in_trial(1, wait_for=str(b_out / "*=*")))
    deadline = time.time() + 300
    while not list(a_out.glob("*=*")) and a.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    b = _sweep([*grid, "--out", str(b_out)])
    a_err = a.communicate(timeout=600)[1]
    b_stdout, b_err = b.communicate(timeout=600)
    assert a.returncode == -9, a_err[-2000:]
    assert b.returncode == 0, b_err[-2000:]

    killed = [p.parent for p in a_out.glob("*/last.pt")]
    assert len(killed) == 1 and not (killed[0] / "summary.json").exists()
    point = killed[0].name
    epoch1 = (killed[0] / "metrics.csv").read_text().splitlines()[1]  # with its timing columns
    # B's summary: its own points, and A's as the storage has it (running, by a worker now gone).
    row = next(ln for ln in b_stdout.splitlines() if ln.startswith(point))
    assert "RUNNING" in row and f":{a.pid}" in row and "its worker has ended" in row, b_stdout
    assert "still running on other workers: 1 trial(s), 1 epochs so far" in b_stdout, b_stdout
    b_points = _finished(b_out)
    assert len(b_points) == 3 and all(f"{p:<40} COMPLETE" in b_stdout for p in b_points)

    # Machine A's command again: the killed trial is failed, its point queued again, and resumed.
    again = _sweep([*grid, "--out", str(a_out)])
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-2000:]
    assert re.search(rf"resumed from {re.escape(str(killed[0]))}/\w+\.pt at epoch 2,", stdout), (
        stdout
    )
    full = EPOCHS * 4
    assert (
        f"epochs trained {full} of the full grid's {full}: {EPOCHS} in trials this command ran, "
        f"{full - EPOCHS} by other or earlier workers; 0 saved by pruning; 0 not done"
    ) in stdout, stdout

    # Every point x seed completed exactly once, in one of the two machines' folders.
    runs = {**_finished(a_out), **_finished(b_out)}
    assert len(runs) == 4 and set(_finished(a_out)) == {point} and set(b_points).isdisjoint({point})
    rows = (killed[0] / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == EPOCHS and rows[0] == epoch1  # epoch 1 (and its timing) not trained again
    study = optuna.load_study(
        study_name="powergrad-sweep",
        storage=postgres_url.replace("postgresql:", "postgresql+psycopg:"),
    )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted((t.params["alpha"], t.params["seed"]) for t in complete) == [
        (0.5, 0),
        (0.5, 1),
        (1.0, 0),
        (1.0, 1),
    ]
    # Typed, on PostgreSQL too: numbers as numbers (Optuna's plots, optuna-dashboard).
    assert {t.distributions["alpha"] for t in complete} == {FloatDistribution(0.5, 1.0)}
    assert {t.distributions["seed"] for t in complete} == {IntDistribution(0, 1)}
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert (
        len(study.trials) == 5
        and len(failed) == 1
        and failed[0].user_attrs["error"].startswith("interrupted")
    )

    # The two folders report as one sweep.
    report = subprocess.run(
        [sys.executable, "-m", "powergrad", "report", str(a_out), str(b_out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [ln for ln in report.stdout.splitlines() if ln.startswith("| mlp")]
    assert report.returncode == 0 and len(rows) == 2 and all("| 2 |" in r for r in rows), (
        report.stdout
    )
