"""Data-parallel training through torchrun on the CPU (gloo): two processes against one.

Every test starts real processes (torch.distributed.run), so they are few and share runs: one
process-group start costs 3-5 s on 2 cores. OMP_NUM_THREADS=1 keeps two workers off each
other's cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from powergrad.rundir import read_summary

# digits with a batch of 4: ~360 steps an epoch, long enough to be signalled mid-epoch; the MLP
# has no batch norm, so one process and two see the same numbers.
ARGS = ["digits", "epochs=3", "batch_size=4", "lr=0.01", "device=cpu", "seed=1"]
STEPS = 1437 // 4  # digits: 1437 training images
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
POWERGRAD = [sys.executable, "-m", "powergrad"]


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_position(path: Path) -> tuple[int, int]:
    """(epoch, step_in_epoch) of a checkpoint; saves are atomic renames, so a read never sees half a file."""
    try:
        state = checkpoint(path)
    except FileNotFoundError:
        return (0, 0)
    return state["epoch"], state["step_in_epoch"]


def assert_same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = checkpoint(a)["model"], checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k] - wb[k]).abs().max().item()
        assert diff <= tol, (k, diff)


# Timings differ; everything else, dead_feature_share included (the processes' feature masks are
# united before it is computed), must match one process.
NOT_COMPARED = ("epoch_s", "train_img_s")


def assert_same_history(a: Path, b: Path, rel: float = 1e-5) -> None:
    ha, hb = checkpoint(a)["history"], checkpoint(b)["history"]
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb):
        for k, v in ra.items():
            if k in NOT_COMPARED or v is None:
                continue
            assert rb[k] == pytest.approx(v, rel=rel, abs=rel), (ra["epoch"], k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same recipe in one plain process."""
    out = tmp_path_factory.mktemp("dist") / "one"
    r = run([*POWERGRAD, "train", *ARGS, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    return out


def test_two_processes_match_one(one_process, tmp_path):
    # accum_steps=2 also splits each process's 2 images into two micro-batches (no_sync on the
    # first): the update must still be the one over the global batch of 4.
    out = tmp_path / "two"
    r = run([*TORCHRUN, "-m", "powergrad", "train", *ARGS, "accum_steps=2", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert_same_weights(one_process / "last.pt", out / "last.pt")
    assert_same_history(one_process / "last.pt", out / "last.pt")
    assert read_summary(out)["env"]["world_size"] == 2
    # rank 0 alone prints progress: one line per epoch, not two
    assert sum(line.startswith("epoch   1/3") for line in r.stdout.splitlines()) == 1, r.stdout


def descendants(pid: int) -> list[int]:
    """Child processes of pid, recursively (torchrun's workers live in their own sessions)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 90) -> list[str]:
    """Read proc's stdout until a line starts with prefix; the lines read."""
    lines: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                return lines
    finally:
        timer.cancel()
    raise AssertionError(f"no line {prefix!r} in {''.join(lines)}")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_sigterm_mid_epoch_saves_and_one_process_finishes(one_process, tmp_path):
    out = tmp_path / "preempted"
    # A mid-epoch save every 20 steps tells the test, without a race, that epoch 2 has begun and
    # has most of its steps still to run (a sleep raced a fast machine).
    proc = subprocess.Popen(
        [*POWERGRAD, "train", *ARGS, "nproc=2", "checkpoint_every_steps=20", "--out", str(out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_line(proc, "epoch   1/3")
    deadline = time.time() + 60
    while (
        checkpoint_position(out / "last.pt") < (1, 1)
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.005)
    # As SLURM does at a time limit or pre-emption: every process of the job gets the signal.
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "pre-empted: checkpoint saved" in stderr
    assert "Traceback" not in stderr
    state = checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < STEPS, state["step_in_epoch"]
    assert state["world_size"] == 2
    assert read_summary(out)["status"] == "preempted"

    # One process continues the run: the step index within the epoch is the same for any
    # number of processes, because batch_size is the global batch.
    r = run([*POWERGRAD, "train", "resume=auto", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert read_summary(out)["status"] == "finished"
    assert_same_weights(one_process / "last.pt", out / "last.pt")
    assert_same_history(one_process / "last.pt", out / "last.pt")


def test_failing_rank_ends_the_run_in_one_line(tmp_path):
    """Rank 1 alone cannot see the data folder (a node without the mount): it fails in one line,
    rank 0 (waiting for it in a collective) stops too, and nothing hangs."""
    data = tmp_path / "img"
    from PIL import Image

    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (60 * i, 100, 200)).save(data / split / c / f"{i}.png")
    script = (
        'd="$1"; [ "$RANK" = 1 ] && d=/nowhere; shift; '
        'exec "$0" -m powergrad train dataset=imagefolder data_dir="$d" "$@"'
    )
    cmd = [
        *TORCHRUN,
        "--no-python",
        "sh",
        "-c",
        script,
        sys.executable,
        str(data),
        "epochs=1",
        "batch_size=4",
        "device=cpu",
        "--out",
        str(tmp_path / "run"),
    ]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen_error, lines = None, []
    for line in proc.stderr:
        lines.append(line)
        if "data_dir /nowhere does not exist" in line and seen_error is None:
            seen_error = time.monotonic()
    proc.wait(timeout=60)
    ended = time.monotonic()
    err = "".join(lines)
    assert proc.returncode != 0
    assert seen_error is not None, err
    assert ended - seen_error < 20, err  # a stuck rank 0 would wait 30 s for torchrun's SIGKILL
    assert sum("powergrad: error: data_dir /nowhere does not exist" in ln for ln in lines) == 1, err
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err


def test_failing_rank_with_nproc_is_one_line_and_its_exit_code(tmp_path):
    """A user error under nproc=K is one line and exit code 2, as in one process: whether one
    rank hits it (only rank 0 writes the run directory, so only it sees that --out is taken; rank
    1 loses it mid-collective and stays quiet) or every rank does (no such data folder)."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "config.yaml").write_text(
        "epochs: 1\n"
    )  # a run's record (a stray file would not take it)
    one_rank = run(
        [*POWERGRAD, "train", "digits", "epochs=1", "device=cpu", "nproc=2", "--out", str(out)]
    )
    every_rank = run(
        [
            *POWERGRAD,
            "train",
            "digits",
            "dataset=imagefolder",
            f"data_dir={tmp_path / 'nowhere'}",
            "device=cpu",
            "nproc=2",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    for r, words in ((one_rank, "--overwrite"), (every_rank, "does not exist")):
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert (
            len(lines) == 1 and lines[0].startswith("powergrad: error: ") and words in lines[0]
        ), r.stderr


def test_ranks_that_disagree_on_where_to_resume_stop_in_one_line(one_process, tmp_path):
    """resume=auto with the run directory on one node only: rank 0 finds the checkpoint, rank 1
    does not; training them together would put them out of step, so both stop at once."""
    script = (
        'o="$1"; [ "$RANK" = 1 ] && o="$2"; shift 2; '
        'exec "$0" -m powergrad train resume=auto epochs=4 "$@" --out "$o"'
    )
    cmd = [
        *TORCHRUN,
        "--no-python",
        "sh",
        "-c",
        script,
        sys.executable,
        str(one_process),
        str(tmp_path / "node2-local"),
        "device=cpu",
    ]
    r = run(cmd)
    assert r.returncode != 0, r.stderr
    assert "powergrad: error: the 2 processes disagree (epoch from 0 to 3" in r.stderr, r.stderr
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr, r.stderr
    assert len(checkpoint(one_process / "last.pt")["history"]) == 3  # the run is left as it was
