"""The run directory, the unit of record, and its one owner: every file a run writes is named
here (nowhere else in powergrad), as is what ``--overwrite`` removes, what resume may read, and
the lock that lets one process at a time write a folder.

RUN/config.yaml        the resolved config (feed it back as a recipe)
RUN/metrics.csv        one row per finished epoch
RUN/summary.json       final and best metrics, wall time, environment, diagnostics
RUN/last.pt best.pt    checkpoints (epoch{N}.pt too with keep_checkpoints)
RUN/train.log          everything the run printed (stdout and stderr), appended on resume
RUN/events/            TensorBoard events
RUN/plots/curves.png   the run's curves
RUN/filter_norms.npz   per-filter norms (monitor.filter_norms)
RUN/.lock              held while a process writes the folder (removed when it ends)

Only the standard library at module level: ``report`` reads runs with the [plot] extra alone.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import logging
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError, extra

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "RunDir",
    "hold_folder",
    "hold_folder_or_none",
    "run_folder_of",
    "METRIC_COLUMNS",
    "read_metrics",
    "read_summary",
    "environment",
    "holds_run",
    "refuse_run_dir",
]

METRIC_COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "test_top5",
    "gap",
    "val_loss",
    "val_acc",
    "logit_norm",
    "logit_mean",
    "logit_max",
    "logit_var",
    "dead_filter_share",
    "dead_feature_share",
    "epoch_s",
    "train_img_s",
]
TIMING_COLUMNS = ("epoch_s", "train_img_s")
TB_STEP_EVERY = 50  # optimiser steps between per-step TensorBoard records (timm's log_interval)
HPARAM_METRICS = (
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "test_loss",
    "test_acc",
    "test_top5",
)
# metrics.csv column -> TensorBoard tag: one section per group.
_TAG_PREFIXES = (
    ("train_", "train/"),
    ("val_", "val/"),
    ("test_", "test/"),
    ("logit_", "logits/"),
    ("dead_", "monitor/dead_"),
)
_TAGS = {
    "lr": "train/lr",
    "gap": "test/gap_train_minus_test",
    "epoch_s": "time/epoch_s",
    "train_img_s": "time/train_img_per_s",
}


def tensorboard_tag(column: str) -> str:
    if column in _TAGS:
        return _TAGS[column]
    for prefix, group in _TAG_PREFIXES:
        if column.startswith(prefix):
            return group + column[len(prefix) :]
    return f"other/{column}"


def new_run_name(cfg_model: str, cfg_dataset: str, alpha: float) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{cfg_dataset}-{cfg_model.replace('/', '_')}-a{alpha:g}"


log = logging.getLogger("powergrad")

# ----------------------------------------------------------------------------- the files

CONFIG = "config.yaml"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
LAST = "last.pt"  # the newest state: what resume=auto continues
BEST = "best.pt"  # the epoch summary.json names as best; resume takes it only when named
TRAIN_LOG = "train.log"
EVENTS = "events"  # TensorBoard's folder
PLOTS = "plots"
CURVES = "curves.png"  # in PLOTS
FILTER_NORMS = "filter_norms.npz"
LOCK = ".lock"
_EPOCH_GLOB = "epoch*.pt"


def epoch_file(epoch: int | str) -> str:
    """The checkpoint kept for ``epoch`` (keep_checkpoints=true)."""
    return f"epoch{epoch}.pt"


# Files whose presence makes a folder a run's record (a run killed before its first save has
# config.yaml; a finished one all of them).
RUN_FILES = (CONFIG, METRICS, SUMMARY, LAST, BEST)


def holds_run(path: str | Path) -> bool:
    """True if ``path`` is a folder holding a powergrad run's record."""
    path = Path(path)
    return path.is_dir() and (
        any((path / n).exists() for n in RUN_FILES) or any(path.glob(_EPOCH_GLOB))
    )


def refuse_to_replace(path: str | Path, overwrite: bool) -> None:
    """A new run goes into a folder holding another only with --overwrite."""
    if holds_run(path) and not overwrite:
        raise UserError(
            f"run directory {path} already holds a run; pass resume=auto to continue it, "
            "--overwrite to replace it, or choose another --out"
        )


def resume_candidates(folder: str | Path) -> list[Path]:
    """The checkpoints resume=auto chooses among, in the order that wins a tie: last.pt, then
    epoch{N}.pt by epoch. best.pt is not one (taken only when named)."""
    folder = Path(folder)
    epochs = sorted(folder.glob(_EPOCH_GLOB), key=lambda p: (len(p.name), p.name))
    return [p for p in [folder / LAST, *epochs] if p.is_file()]


def checkpoint_in(path: str | Path) -> Path:
    """A checkpoint named as its file, or as the run folder holding it: best.pt, else last.pt
    (what `powergrad eval --checkpoint RUN` reads). A path that is neither is returned as given,
    for the reader's own message."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path} is a folder without {BEST} or {LAST}: name a checkpoint file")
    return path


def written_by_run(folder: str | Path) -> list[Path]:
    """Everything a run writes in its folder, as far as present: what --overwrite removes."""
    folder = Path(folder)
    names = [*RUN_FILES, TRAIN_LOG, EVENTS, PLOTS, FILTER_NORMS]
    found = [folder / n for n in names if (folder / n).exists()]
    return found + sorted(folder.glob(_EPOCH_GLOB)) + sorted(folder.glob(".*.tmp*"))


def remove_run_files(folder: str | Path) -> None:
    """--overwrite: the old run goes whole (checkpoints, events, log), so that nothing of it can
    be resumed or read as the new run's."""
    for p in written_by_run(folder):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def curves_path(run: str | Path) -> Path:
    return Path(run) / PLOTS / CURVES


# ----------------------------------------------------------------------------- the lock

_held: dict[Path, int] = {}  # folders this process holds -> how many nested holds


@contextmanager
def hold_folder(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder`` (created if needed) for this process until the block ends: a second
    process asking for it gets a UserError naming the holder.

    An flock on RUN/.lock: the kernel drops it when its process ends however it ends, so a
    killed run's lock never blocks the next (its file, still naming the dead process, is taken
    over with one line). Nested holds in one process (the CLI, then the Python API) are free.
    The lock file goes when the block ends; a folder the hold created and nothing else wrote
    into goes with it, so that a refused start leaves --out as it was.
    """
    folder = Path(folder).absolute()
    if os.environ.get("RANK", "0") != "0":  # a distributed run's main process holds for all
        yield folder
        return
    if folder in _held:
        _held[folder] += 1
        try:
            yield folder
        finally:
            _held[folder] -= 1
        return
    created = not folder.exists()
    fd = _lock(folder)
    _held[folder] = 1
    try:
        yield folder
    finally:
        del _held[folder]
        (folder / LOCK).unlink(missing_ok=True)  # before the unlock: nobody locks a dead file
        os.close(fd)
        if created:
            with _quiet_oserror():
                folder.rmdir()  # only if nothing was written there


def hold_folder_or_none(folder: str | Path | None) -> AbstractContextManager[Path | None]:
    """hold_folder, or nothing when the folder is not known yet (a new one, named later)."""
    return hold_folder(folder) if folder is not None else nullcontext()


def run_folder_of(resume: str | None, out: str | Path | None) -> Path | None:
    """The folder a train command writes, as far as its --out and resume= say (None: a new
    folder, named once the config is known)."""
    if out:
        return Path(out)
    if resume and resume != "auto":
        return Path(resume) if Path(resume).is_dir() else Path(resume).parent
    return None


def _lock(folder: Path) -> int:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output path exists and is not a folder: {folder}")
    path = folder / LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise UserError(
                    f"{folder} is in use by {_holder(path) or 'another process'}: wait for it to "
                    "end, or choose another --out"
                ) from None
            try:  # the holder before us may have removed the file between our open and flock
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        before = os.read(fd, 200).decode(errors="replace").strip()
        if before:  # a killed holder's file (a clean one removes it)
            log.info("%s: taking over the lock of %s, which has ended", folder, before)
        me = f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%H:%M:%S')})"
        os.pwrite(fd, me.encode(), 0)  # over the old text, then cut: the file is never empty
        os.ftruncate(fd, len(me.encode()))
        return fd
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder}: {e.strerror or e}") from None


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says. A holder that has just created the file writes
    its name a moment after it locks: look again briefly before saying nothing."""
    for _ in range(20):
        with _quiet_oserror():
            if text := path.read_text(errors="replace").strip():
                return text
        time.sleep(0.01)
    return ""


@contextmanager
def _quiet_oserror() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


def refuse_run_dir(path: str | Path, what: str) -> None:
    """No command writes into a run's folder unless it is resuming that run."""
    if holds_run(path):
        raise UserError(
            f"{path} holds a training run; {what} writes elsewhere: choose another --out"
        )


class _LogSink:
    """Where teed output goes: RUN/train.log once a run folder is open; until then, held in memory
    (the command's first lines, printed before the folder exists), up to a bound."""

    HOLD_MAX = 1000  # writes held before a folder opens; more are dropped (another rank's output)

    def __init__(self) -> None:
        self.file: Any = None  # an open text file while a run folder is open
        self.held: list[str] = []

    def write(self, s: str) -> None:
        if self.file is not None:
            self.file.write(s)
            self.file.flush()  # a killed run keeps what it printed
        elif len(self.held) < self.HOLD_MAX:
            self.held.append(s)

    def attach(self, path: Path) -> None:
        """Write to ``path`` from now on (a second run in the same process, the demo's or a
        sweep's, moves the output to its own folder's log)."""
        if self.file is not None and self.file.name == str(path):
            return
        self.detach()
        self.file = open(path, "a", encoding="utf-8")
        self.file.write("".join(self.held))
        self.held.clear()
        self.file.flush()

    def detach(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Tee:
    """A stdout or stderr that also writes to the run's train.log. ``terminal`` is the real
    stream (progress bars draw there only: their frames do not belong in a log)."""

    def __init__(self, terminal: Any, sink: _LogSink) -> None:
        self.terminal, self.sink = terminal, sink

    def write(self, s: str) -> int:
        n = self.terminal.write(s)
        self.sink.write(s)
        return n

    def flush(self) -> None:
        self.terminal.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the terminal's
        return getattr(self.terminal, name)


@contextmanager
def teed_output() -> Iterator[_LogSink]:
    """stdout and stderr also go to the train.log of the run folder opened inside the block."""
    if isinstance(sys.stdout, Tee):  # already teed (the CLI, then the Python API inside it)
        yield sys.stdout.sink
        return
    sink = _LogSink()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(old[0], sink), Tee(old[1], sink)
    try:
        yield sink
    finally:
        sys.stdout, sys.stderr = old
        sink.detach()


class RunDir:
    """Writes one run's record. Only the main process of a distributed run makes one."""

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output path exists and is not a folder: {self.path}")
        if not resume:
            refuse_to_replace(self.path, overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(
                f"cannot write to output folder {self.path}: {e.strerror or e}"
            ) from None
        if overwrite and not resume:
            remove_run_files(self.path)
        # A process killed while saving leaves its temporary file; the save itself never landed.
        for tmp in self.path.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
        self._tb: SummaryWriter | None = None
        self._step_mark: tuple[int, float] | None = None  # (step, time) of the last step record
        self._log: AbstractContextManager[_LogSink] | None = (
            None  # the teed output of a run started from Python (the CLI tees its own)
        )
        if isinstance(sys.stdout, Tee):
            sys.stdout.sink.attach(self.path / TRAIN_LOG)
        else:
            self._log = teed_output()
            self._log.__enter__().attach(self.path / TRAIN_LOG)

    # --- files
    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS

    def write_config(self, text: str) -> None:
        _replace(self.path / CONFIG, text)

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.csv by ``rows`` (on resume: the history the checkpoint holds)."""
        tmp = _tmp(self.metrics_csv)
        with _writing(self.metrics_csv):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
                w.writeheader()
                for r in rows:
                    w.writerow({k: _fmt(r.get(k)) for k in METRIC_COLUMNS})
            os.replace(tmp, self.metrics_csv)

    def append_metrics(self, row: dict[str, Any]) -> None:
        new = not self.metrics_csv.exists()
        with _writing(self.metrics_csv), open(self.metrics_csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
        self.tensorboard(row)

    def _writer(self):
        if self._tb is None:
            with extra("train"):  # tensorboard: report reads run folders without it
                from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path / EVENTS))
        return self._tb

    def tensorboard(self, row: dict[str, Any]) -> None:
        """An epoch's row as scalars at step = epoch, under grouped tags (train/, val/, test/,
        logits/, monitor/, time/): TensorBoard draws one section per group."""
        tb = self._writer()
        step = int(row["epoch"])
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                tb.add_scalar(tensorboard_tag(k), v, step)
        tb.flush()

    def after_step(self, step: int, loss: Any, lr: float, batch_size: int) -> None:
        """Every TB_STEP_EVERY optimiser steps: the batch's loss, the lr and the throughput since
        the last record, under step/ (x = optimiser step). Reading the loss is one host sync per
        record, not per step."""
        now = time.perf_counter()
        if self._step_mark is None:
            self._step_mark = (step - 1, now)
        if step % TB_STEP_EVERY:
            return
        last_step, last_t = self._step_mark
        self._step_mark = (step, now)
        tb = self._writer()
        tb.add_scalar("step/loss", float(loss), step)
        tb.add_scalar("step/lr", lr, step)
        tb.add_scalar(
            "step/img_per_s", (step - last_step) * batch_size / max(now - last_t, 1e-9), step
        )

    def hparams(self, config: dict[str, Any], final: dict[str, Any], best: dict[str, Any]) -> None:
        """The config as TensorBoard hparams, with the run's final (and best) metrics, so that
        the HPARAMS tab compares the runs of a sweep."""
        flat = {}
        for k, v in config.items():
            for name, value in v.items() if isinstance(v, dict) and k == "monitor" else [(k, v)]:
                key = f"monitor.{name}" if k == "monitor" else name
                flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        metrics = {
            f"final/{tensorboard_tag(k)}": v
            for k, v in final.items()
            if k in HPARAM_METRICS and isinstance(v, (int, float)) and math.isfinite(v)
        }
        metrics.update(
            {
                f"best/{tensorboard_tag(k)}": v
                for k, v in best.items()
                if k in HPARAM_METRICS and isinstance(v, (int, float)) and math.isfinite(v)
            }
        )
        self._writer().add_hparams(flat, metrics, run_name=".")

    def write_summary(self, summary: dict[str, Any]) -> None:
        _replace(self.path / SUMMARY, json.dumps(summary, indent=2, default=str))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._log is not None:
            self._log.__exit__(None, None, None)
            self._log = None


def _tmp(path: Path) -> Path:
    """Where a file is written before it replaces ``path`` (removed when a folder is opened)."""
    return path.with_name(f".{path.name}.tmp")


def _replace(path: Path, text: str) -> None:
    tmp = _tmp(path)
    with _writing(path):
        tmp.write_text(text)
        os.replace(tmp, path)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A failed write (disk full, permissions) is the user's to fix: one line naming the file."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """metrics.csv as a list of dicts with floats (empty cells as None)."""
    path = Path(run) / METRICS
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        out.append({k: (float(v) if v not in ("", None) else None) for k, v in r.items()})
        out[-1]["epoch"] = int(float(r["epoch"]))
    return out


def read_summary(run: str | Path) -> dict[str, Any]:
    path = Path(run) / SUMMARY
    if not path.is_file():
        raise UserError(f"no {SUMMARY} in {run}: not a finished powergrad run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON") from None


def environment(device: str) -> dict[str, Any]:
    import torch  # kept out of the CLI's start (`powergrad --version`, `recipes`)

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import timm  # the [train] extra, which a run has; absent, the record says so
        import torchvision  # the same

        env["torchvision"] = torchvision.__version__
        env["timm"] = timm.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
