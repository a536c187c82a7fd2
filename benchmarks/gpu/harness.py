"""The harness of the GPU runs: steps in child processes under time limits, and their records.

A plan is an ordered list of step functions, each marked with ``@step(budget_s)``: the seconds
it may take on one H100, its own time limit. The parent process (no torch import) runs each
step in a child process (``python3 -m benchmarks.gpu --child MODULE:FUNCTION``), so a crashed
CUDA context or a hang stays in that child. The child writes its record to a file after every
row or check; the parent, once the child ends (or is killed at its limit), appends the record
as one JSON line to ``OUT/<plan>.jsonl`` (flushed and fsynced) and rewrites ``OUT/<plan>.md``.
The children's output goes to ``OUT/<plan>.log`` as it is written. So a run cut off from
outside still leaves every finished step's result in OUT.

Children stay in the parent's process group (a kill of the command's group reaches them) and
die with the parent (PR_SET_PDEATHSIG); at a step's limit and on SIGTERM/SIGINT/SIGHUP the
parent kills the child and every descendant (torchrun's workers included) with SIGKILL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .report import markdown

ROOT = Path(__file__).resolve().parents[2]  # the repository: benchmarks/ and src/ are under it
# The whole command's limit (the lending tool's is ~540 s: this leaves room to spare).
TIME_LIMIT_S = 480.0
# Python's start, unpacking the data set, the report: what the steps' budgets must leave.
STARTUP_S = 45.0
MIN_STEP_S = 5.0  # a step with less time left than this is recorded as skipped, not started
# The dry run's limits are this many times the GPU's: tiny steps on a small, shared CPU spend
# most of their time importing torch, which a GPU machine does in a second or two.
DRY_RUN_SLOWDOWN = 4.0


def step(budget_s: float) -> Callable[[Callable], Callable]:
    """Marks a step function with its cost: its time limit in seconds on one H100."""

    def mark(fn: Callable) -> Callable:
        fn.budget_s = budget_s  # type: ignore[attr-defined]
        return fn

    return mark


def step_id(fn: Callable) -> str:
    return f"{fn.__module__}:{fn.__name__}"


def plan_seconds(plan: list[Callable]) -> float:
    """What a plan may take at most: its steps' limits plus the start-up allowance."""
    return STARTUP_S + sum(fn.budget_s for fn in plan)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- records


def plain(v: Any) -> Any:
    """A JSON-safe value: floats to 6 significant digits (inf/nan as text), tensors and numpy scalars unwrapped."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float):  # 6 significant digits: a 5e-8 error must not read as 0
        return float(f"{v:.6g}") if math.isfinite(v) else str(v)
    return v


@dataclasses.dataclass
class Record:
    """One step's result: rows of numbers, checks, notes; written to `sink` after every change."""

    name: str
    what: str = ""
    status: str = "running"  # ok | failed | error | timeout | killed | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    sink: Path | None = None

    def row(self, **values: Any) -> dict[str, Any]:
        self.rows.append({k: plain(v) for k, v in values.items()})
        self.flush()
        return self.rows[-1]

    def check(
        self, name: str, ok: bool | None, detail: str = "", kind: str = "correctness"
    ) -> bool:
        """kind: correctness (a failure fails the run) or target (a speed goal: reported only).
        ok None: not judged (the reason in detail)."""
        self.checks.append(
            {"name": name, "ok": None if ok is None else bool(ok), "kind": kind, "detail": detail}
        )
        self.flush()
        return bool(ok)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.flush()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("sink")
        return d

    def flush(self) -> None:
        if self.sink is not None:
            tmp = self.sink.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.to_dict()))
            tmp.replace(self.sink)

    def finish(self) -> None:
        if self.status == "running":
            failed = any(c["ok"] is False and c["kind"] == "correctness" for c in self.checks)
            self.status = "failed" if failed else "ok"
        self.flush()


@dataclasses.dataclass
class Ctx:
    """What a step gets: its device, size, scratch folder, data, earlier records, deadline."""

    device: Any  # torch.device (this module does not import torch)
    tiny: bool
    work: Path
    data: Path | None  # CIFAR-10 (JPEG) as an image folder, or None (generated data)
    prior: dict[str, dict[str, Any]]  # earlier steps' records, by name
    deadline: float  # time.monotonic() at the step's limit
    rec: Record

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def enough(self, seconds: float, what: str) -> bool:
        """True if `seconds` remain for `what`; else a note says it was skipped and why."""
        if self.left() >= seconds:
            return True
        self.rec.note(
            f"skipped {what}: {self.left():.0f} s left of the step's limit, needs ~{seconds:.0f} s"
        )
        return False


# ----------------------------------------------------------------------------- the child side


def child_main(target: str, work: Path, data: Path | None, budget: float, tiny: bool) -> int:
    """Runs one step function in this process; an exception is recorded as the step's error."""
    import torch  # the child is where torch lives

    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    rec = Record(name, what=first_line(fn), budget_s=budget, sink=work / f"record-{name}.json")
    rec.flush()
    prior_file = work / "prior.json"
    prior = json.loads(prior_file.read_text()) if prior_file.is_file() else {}
    if tiny:
        torch.set_num_threads(1)  # tiny ops: one thread is faster on a small, shared machine
    device = torch.device("cpu" if tiny else "cuda")
    ctx = Ctx(device, tiny, work, data, prior, time.monotonic() + budget, rec)
    tic = time.monotonic()
    try:
        fn(ctx)
    except Exception as e:  # noqa: BLE001 - recorded: the run goes on with the next step
        rec.status = "error"
        rec.error = f"{type(e).__name__}: {e}"[:2000] + "\n" + traceback.format_exc()[-3000:]
    rec.seconds = time.monotonic() - tic
    rec.finish()
    return 0


def first_line(fn: Callable) -> str:
    """A step's docstring's first paragraph, on one line: what the step measures."""
    return " ".join((fn.__doc__ or fn.__name__).strip().split("\n\n")[0].split())


# ----------------------------------------------------------------------------- the parent side


class Stopped(Exception):
    """SIGTERM, SIGINT or SIGHUP reached the parent: the current step is killed, the run ends."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame
        self.record: dict[str, Any] | None = None  # the step it cut short


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


def descendants(pid: int) -> list[int]:
    """pid's child processes, recursively, from /proc (those that left its session included)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL pid and all its descendants (the descendants listed first: none is reparented)."""
    for p in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def child_env(tiny: bool, work: Path) -> dict[str, str]:
    """The children's environment: this powergrad and benchmarks/ importable, output unbuffered,
    one decode cache and one compile cache for the whole run; in the dry run the C++ loss op off
    (as it is on CUDA) and one thread (a resumed run's float sums then match the first's)."""
    path = [str(ROOT / "src"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "PYTHONUNBUFFERED": "1",
        "POWERGRAD_CACHE": str(work / "decode-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"),
    }
    if tiny:
        env.update(POWERGRAD_CPU_KERNEL="0", OMP_NUM_THREADS="1")
    return env


@dataclasses.dataclass
class Run:
    """The parent's state: where results go, what ran, when the whole run must end."""

    plan: str
    out: Path
    work: Path
    data: Path | None
    tiny: bool
    end: float  # time.monotonic() by which the whole command must be done
    command: str
    start: dict[str, Any] = dataclasses.field(default_factory=dict)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    end_line: dict[str, Any] | None = None

    @property
    def jsonl(self) -> Path:
        return self.out / f"{self.plan}.jsonl"

    @property
    def md(self) -> Path:
        return self.out / f"{self.plan}.md"

    @property
    def log(self) -> Path:
        return self.out / f"{self.plan}.log"

    def emit(self, line: dict[str, Any]) -> None:
        """One JSON line, on disk now (a cut-off command keeps it), and the table rewritten."""
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        kind = line["kind"]
        if kind == "start":
            self.start = line
        elif kind == "step":
            self.records.append(line)
        else:
            self.end_line = line
        tmp = self.md.with_suffix(".tmp")
        tmp.write_text(markdown(self.start, self.records, self.end_line))
        tmp.replace(self.md)


def run_step(run: Run, fn: Callable) -> dict[str, Any]:
    """One step in a child process, killed at its limit (or the run's, if sooner)."""
    name = fn.__name__
    budget = fn.budget_s * (DRY_RUN_SLOWDOWN if run.tiny else 1.0)  # type: ignore[attr-defined]
    limit = min(budget, run.end - time.monotonic() - 5)  # 5 s: the report after the last step
    if limit < MIN_STEP_S:
        return {
            **Record(name, first_line(fn), "skipped", budget_s=budget).to_dict(),
            "notes": [f"skipped: {max(limit, 0):.0f} s left of the run's time limit"],
        }
    (run.work / "prior.json").write_text(json.dumps({r["name"]: r for r in run.records}))
    sink = run.work / f"record-{name}.json"
    sink.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--child", step_id(fn), "--work", str(run.work)]
    cmd += [f"--budget={limit}", *(["--data", str(run.data)] if run.data else [])]
    cmd += ["--dry-run"] if run.tiny else []
    tic = time.monotonic()
    how, stop = "", None
    with open(run.log, "a") as log:
        log.write(f"\n===== {name} (limit {limit:.0f} s)\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=child_env(run.tiny, run.work),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            how = "timeout"
        except Stopped as e:
            how, stop = f"killed by {e.signame}", e
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
        log.write(f"===== {name}: exit {proc.returncode}{', ' + how if how else ''}\n")
    rec = json.loads(sink.read_text()) if sink.is_file() else Record(name, first_line(fn)).to_dict()
    rec.update(budget_s=budget, seconds=time.monotonic() - tic)
    output = tail(run.log)
    if how:
        rec["status"] = "timeout" if how == "timeout" else "killed"
        rec["error"] = f"{how} after {rec['seconds']:.0f} s\n{output}"
    elif rec["status"] == "running":
        rec["status"], rec["error"] = "error", f"exited {proc.returncode} mid-step\n{output}"
    if stop is not None:
        stop.record = rec
        raise stop
    return rec


def tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def run_plan(
    plan_name: str,
    plan: list[Callable],
    out: Path,
    work: Path,
    data: Path | None,
    tiny: bool,
    time_limit: float,
    started: float,
    command: str,
) -> int:
    """Every step of the plan in order; returns 0 if all correctness checks passed, else 1.
    A step that fails, crashes or runs out of time is recorded and the next one starts."""
    out.mkdir(parents=True, exist_ok=True)
    if tiny:
        time_limit *= DRY_RUN_SLOWDOWN
    run = Run(plan_name, out, work, data, tiny, started + time_limit, command)
    for path in (run.jsonl, run.md, run.log):
        path.unlink(missing_ok=True)
    run.emit(
        {
            "kind": "start",
            "plan": plan_name,
            "command": command,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "time_limit_s": time_limit,
            "dry_run": tiny,
            "data": str(data) if data else None,
            "steps": [fn.__name__ for fn in plan],
        }
    )
    handlers = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    stopped = None
    try:
        for fn in plan:
            print(f"[{plan_name}] {fn.__name__}", flush=True)
            rec = run_step(run, fn)
            run.emit({"kind": "step", **rec})
            print(
                f"[{plan_name}] {fn.__name__}: {rec['status']} in {rec['seconds']:.0f} s",
                flush=True,
            )
    except Stopped as e:  # the rest of the plan is not started; what ran is on disk
        stopped = e.signame
        if e.record is not None:
            run.emit({"kind": "step", **e.record})
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    bad = [
        r["name"] for r in run.records if r["status"] in ("failed", "error", "timeout", "killed")
    ]
    code = 1 if bad or stopped else 0
    run.emit(
        {
            "kind": "end",
            "exit_code": code,
            "seconds": time.monotonic() - started,
            "not_passed": bad,
            "stopped_by": stopped,
        }
    )
    print(f"[{plan_name}] wrote {run.jsonl}, {run.md}, {run.log}; exit {code}", flush=True)
    return code
