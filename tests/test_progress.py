"""What a run says while it works: start-up lines, progress (plain lines when not on a terminal,
a live bar on one), and train.log."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

TINY = ["digits", "model=convnet", "train_subset=400", "epochs=2", "batch_size=32"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "POWERGRAD_PROGRESS"}
    return {**env, **extra}


def test_not_a_terminal_prints_plain_progress_lines_and_keeps_train_log(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "powergrad", "train", *TINY, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(
            POWERGRAD_PROGRESS_EVERY_S="0"
        ),  # a line every step: a fast machine ends the epoch in < 0.05 s
        cwd=tmp_path,
    )
    first = proc.stdout.readline()
    first_s = time.perf_counter() - t0
    rest = proc.stdout.read()  # not communicate(): it would skip what readline() buffered
    proc.wait(timeout=300)
    assert proc.returncode == 0, rest[-3000:]
    lines = [first.rstrip("\n"), *rest.splitlines()]

    # Start-up: the run folder first (before torch is imported), then settings, data, model.
    assert lines[0] == f"run folder: {out}"
    assert first_s < 30  # the line comes before the heavy imports (seconds even under load)
    assert lines[1].startswith("settings (besides the defaults): ") and "model=convnet" in lines[1]
    assert "data: digits, 10 classes, 1x8x8: 400 train, 360 test images" in lines
    assert any(
        re.fullmatch(r"built convnet: 10 classes, 1 input channels, [\d,]+ parameters", ln)
        for ln in lines
    )

    # Progress: step/total, loss, lr, img/s and ETA, with no bar frames (no carriage returns).
    progress = [ln for ln in lines if ln.startswith("epoch 1/2  step ")]
    assert progress, lines
    assert re.fullmatch(
        r"epoch 1/2  step \d+/12  loss \d+\.\d{4}  lr [\d.e-]+  \d+ img/s  "
        r"eta \d+:\d\d:\d\d \(run \d+:\d\d:\d\d\)",
        progress[0],
    ), progress[0]
    assert "\r" not in rest

    # Everything printed is in the run's train.log too, in the same order.
    log = (out / "train.log").read_text().splitlines()
    assert log == lines[: len(log)] and lines[len(log) :] == []


def test_a_terminal_gets_a_live_bar_and_the_log_no_frames(tmp_path):
    out = tmp_path / "run"
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the pseudo-terminal
        os.chdir(tmp_path)
        os.execve(
            sys.executable,
            [sys.executable, "-m", "powergrad", "train", *TINY, "--out", str(out)],
            _env(),
        )
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    screen = b""
    deadline = time.time() + 300
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    _, status = os.waitpid(pid, 0)
    text = screen.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    # tqdm's frames: the description, a step count with the rate and an ETA, drawn over with \r.
    assert re.search(
        r"epoch 1/2: +\d+%\|.*\| *\d+/12 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?(step/s|s/step)", text
    ), text[-3000:]
    assert "\r" in text
    assert "epoch 1/2  step" not in text  # no plain lines on a terminal
    log = Path(out / "train.log").read_text()
    assert "epoch   2/2  lr" in log and "\r" not in log and "step/s" not in log


def test_ctrl_c_says_which_checkpoint_is_kept(tmp_path):
    out = tmp_path / "run"
    # Ctrl-C as on a terminal: a suite started in the background (`pytest &`) ignores SIGINT, and
    # the child would inherit that (Python leaves an ignored SIGINT ignored) and train on.
    proc = subprocess.Popen(
        [sys.executable, "-m", "powergrad", "train", "digits", "epochs=200", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while not (out / "last.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.splitlines()[-1] == (
        f"powergrad: interrupted; the last checkpoint is kept: {out / 'last.pt'} "
        f"(continue with `powergrad train resume=auto --out {out}`)"
    )
    assert "Traceback" not in err
    assert "powergrad: interrupted" in (out / "train.log").read_text()


def test_tensorboard_groups_tags_records_steps_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from powergrad.cli import main

    assert (
        main(["train", "digits", "epochs=3", "val_fraction=0.1", "--out", str(tmp_path / "run")])
        == 0
    )
    events = EventAccumulator(str(tmp_path / "run" / "events"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/acc",
        "train/lr",
        "val/acc",
        "val/loss",
        "test/acc",
        "test/loss",
        "logits/norm",
        "time/epoch_s",
        "step/loss",
        "step/lr",
        "step/img_per_s",
    } <= tags
    assert not any("_" in t.split("/")[0] for t in tags)  # every tag sits in a group
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("step/loss")] == [50]  # 3 epochs x 20 steps, every 50
    assert {"final/test/acc", "best/val/acc"} <= tags
    assert events.PluginTagToContent("hparams")  # the config, for the HPARAMS tab


def test_a_sweep_says_which_point_starts_how_many_are_done_and_the_eta(tmp_path, capsys):
    from powergrad.cli import main

    args = [
        "sweep",
        "digits",
        "alpha=1,0.5",
        "epochs=1",
        "train_subset=100",
        "--out",
        str(tmp_path / "s"),
    ]
    assert main(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sweep: alpha=")]
    assert (
        lines[0] == "sweep: alpha=0.5,seed=0 (0 of 2 points done)"
        or lines[0] == "sweep: alpha=1,seed=0 (0 of 2 points done)"
    )
    assert re.fullmatch(
        r"sweep: alpha=[\d.]+,seed=0 \(1 of 2 points done, eta \d+:\d\d:\d\d\)", lines[1]
    ), lines


def test_track_prints_count_rate_and_eta_lines_off_a_terminal(capsys, monkeypatch):
    from powergrad.progress import track

    monkeypatch.setenv("POWERGRAD_PROGRESS", "lines")
    monkeypatch.setenv("POWERGRAD_PROGRESS_EVERY_S", "0")
    assert list(track(range(3), "decoding 700 images (256 a chunk)", unit="chunk")) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # not after the last item: the caller's own line follows
    assert re.fullmatch(
        r"decoding 700 images \(256 a chunk\): chunk 1/3  [\d.]+ chunk/s  eta \d+:\d\d:\d\d",
        lines[0],
    )
    monkeypatch.setenv("POWERGRAD_PROGRESS", "off")
    assert list(track(range(3), "x")) == [0, 1, 2] and capsys.readouterr().out == ""
