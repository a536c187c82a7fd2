"""The CUDA path in one command: correctness and speed checks for one GPU machine, in <= 20 minutes.

    python benchmarks/gpu_suite.py --out DIR [--data CIFAR10_DIR_OR_TAR] [--sections a,b,...]
    python benchmarks/gpu_suite.py --out DIR --dry-run     # the CPU mode: every section, tiny

Writes DIR/gpu_suite.json (everything) and DIR/gpu_suite.md (the tables), and DIR/gpu_suite.log
(the sections' own output, when each runs in its own process). Sections (ids):

1. ``loss``: the tampered loss on the device: exact against the float64 formula in fp32, bf16 and
   fp16; its cost against ``F.cross_entropy``, eager and under ``torch.compile``, at 4096 x 1000
   and 65536 x 1000 (CUDA events, warm-up, medians of interleaved rounds).
2. ``sync``: no host-device synchronisation inside a training step. ``powergrad.train`` runs under
   ``torch.cuda.set_sync_debug_mode("warn")``; every sync is attributed to its code line and to
   the step it fell in (the trainer's train loader, from ``powergrad.data.create_loaders``, is
   wrapped to mark where each step begins). Allowed: the documented flag read, in at most one
   step in ``SYNC_EVERY`` (25) plus an epoch's last step, at most two syncs there.
3. ``train``: ``powergrad.train`` end to end on CIFAR-10 (JPEG) with the GPU-resident loader:
   eager fp32, bf16, bf16 + channels-last, bf16 + channels-last + compile: images/s, data-time
   share, peak memory, final accuracy of a short run.
4. ``resume``: SIGKILL mid-epoch, ``resume=auto``: the run completes, its metrics continue;
   what is bitwise and what is within tolerance is measured against two uninterrupted runs.
5. ``nccl``: ``torchrun`` with one process per GPU (NCCL); with >= 2 GPUs the 2-vs-1 process
   equivalence of tests/test_distributed.py.
6. ``resnet50``: ResNet-50, 224 px synthetic, bf16, batch 256: eager, channels-last, compile +
   channels-last (benchmarks/gpu_resnet50.py's steps) and the same through ``powergrad.train``.
   Targets: the trainer >= 0.97x the best bare mode, the best mode >= 1.3x eager.
7. ``cifar94``: seconds to 94% CIFAR-10 test accuracy: recipe ``speed/cifar10-94`` against
   airbench94 (``pip install airbench``; skipped with the reason when absent), same run.
8. ``stream``: the streaming image-folder loader at 224 px on generated JPEGs against the
   ResNet-50 step's images/s, and GPU JPEG decoding (``torchvision.io.decode_jpeg``).

Each section runs in its own process (``--no-isolate`` runs them in this one) under a time
budget; a section that fails, crashes or runs out of time records that and the suite goes on.
Exit code: 0 when every correctness check passed (speed targets may be missed: the table says
so), 1 when a check failed or a section crashed or timed out, 2 for a usage error.

The CPU mode (``--dry-run``, alias ``--tiny``) runs every section at tiny size on the CPU with
generated data, ``torch.compile`` on dynamo's eager backend, speed targets not judged: it keeps
the suite's code paths working (tests/test_benchmarks_smoke.py). CIFAR-10 data: ``--data`` or
$POWERGRAD_DATA: a folder with train/ and test/, or a .tar of one (untarred into the scratch
folder), or a folder holding cifar10-jpeg.tar.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import json
import linecache
import math
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import powergrad
from powergrad import power_grad_cross_entropy
from powergrad.config import load_config
from powergrad.rundir import read_metrics, read_summary

HERE = Path(__file__).resolve().parent
SRC = Path(powergrad.__file__).resolve().parents[1]  # subprocesses import this same powergrad
SECTIONS = ("loss", "sync", "train", "resume", "nccl", "resnet50", "cifar94", "stream")
# Seconds per section on one H100 (1,110 s in all, of the 20-minute bound); a section checks its
# budget before each long step, and one 30 s past it is stopped and recorded as timed out.
BUDGET_S = {
    "loss": 90,
    "sync": 60,
    "train": 210,
    "resume": 120,
    "nccl": 90,
    "resnet50": 240,
    "cifar94": 210,
    "stream": 90,
}
TOTAL_S = 1140  # leaves time for start-up, untarring, a section overrunning its budget (30 s at most) and the report


def _load_sibling(name: str):
    """A script of benchmarks/ as a module (its functions are reused, not copied)."""
    spec = importlib.util.spec_from_file_location(f"_pg_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class Section:
    """One section's record: rows of numbers, checks, notes; written out as it grows."""

    id: str
    status: str = "running"  # ok | failed | error | timeout | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    sink: Path | None = None  # a child process writes its record here after every change

    def row(self, **values: Any) -> dict[str, Any]:
        self.rows.append({k: _plain(v) for k, v in values.items()})
        self.flush()
        return self.rows[-1]

    def check(
        self, name: str, ok: bool | None, detail: str = "", kind: str = "correctness"
    ) -> bool:
        """kind: correctness (fails the suite) or target (a speed goal: reported, not failed).
        ok None: not judged (the reason in detail)."""
        self.checks.append({"name": name, "ok": ok, "kind": kind, "detail": detail})
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


def _plain(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else str(v)
    if isinstance(v, (torch.Tensor, np.generic)):
        return _plain(v.item())
    return v


@dataclasses.dataclass
class Ctx:
    """What a section gets: where it runs, how big, its scratch folder, data, earlier results."""

    device: torch.device
    tiny: bool
    work: Path
    data: Path | None  # CIFAR-10 as an image folder (train/, test/), or None
    prior: dict[str, dict[str, Any]]  # earlier sections' records, by id
    deadline: float  # time.monotonic() by which the section should be done
    rec: Section

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def enough(self, seconds: float, what: str) -> bool:
        """True if seconds remain for `what`; else a note says it was skipped."""
        if self.left() >= seconds:
            return True
        self.rec.note(
            f"skipped {what}: {self.left():.0f} s of the section's budget left, it needs ~{seconds:.0f} s"
        )
        return False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def env(self) -> dict[str, str]:
        return subprocess_env(self.cuda)


def subprocess_env(cuda: bool) -> dict[str, str]:
    """A subprocess imports this same powergrad; on the CPU it uses as many threads as this
    process, so that its float sums are ordered the same (a resumed run can then be bitwise)."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    if not cuda:
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(
    fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds of each fn, interleaved (one of each per round) so drift hits all alike;
    CUDA events on a GPU, a synchronised host clock on the CPU."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                tic = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - tic)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def compile_for(ctx: Ctx) -> Iterator[None]:
    """On the CPU mode, torch.compile traces with dynamo but runs eagerly (backend "eager"):
    the compile path is exercised without minutes of C++ code generation on a small machine."""
    if ctx.cuda:
        yield
        return
    real = torch.compile
    torch.compile = functools.partial(real, backend="eager")
    try:
        yield
    finally:
        torch.compile = real


def train_run(
    ctx: Ctx, name: str, recipe: str | None, overrides: dict[str, Any]
) -> tuple[Any, float | None]:
    """powergrad.train into ctx.work/name: its RunResult and peak device memory in GiB."""
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    cfg = load_config(recipe, {"device": ctx.device.type, **overrides})
    with compile_for(ctx):
        result = powergrad.train(cfg, ctx.work / name, overwrite=True)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None
    return result, peak


def run_cmd(ctx: Ctx, cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        done = subprocess.run(
            cmd, env=ctx.env(), stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1)
        )
    return done


def tail(path: Path, n: int = 600) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


# ----------------------------------------------------------------------------- generated data


def _write_jpegs(job: tuple[str, int, int, int, int]) -> None:
    """Smooth random images (low-frequency noise, upsampled) at a size drawn per image: closer to
    photos for a JPEG decoder than white noise, which decodes slower than any photo."""
    from PIL import Image

    folder, label, count, side, seed = job
    rng = np.random.default_rng(seed)
    tint = np.array([(label * 67) % 256, (label * 131) % 256, (label * 29) % 256], dtype=np.float32)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = (int(side * rng.uniform(0.8, 1.25)) for _ in range(2))
        small = rng.normal(0, 50, (max(2, h // 16), max(2, w // 16), 3)) + tint
        img = Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (h, w, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(
            f"{folder}/{i:05d}.jpg", quality=90
        )


def make_jpeg_folder(
    root: Path, classes: int, train_per_class: int, test_per_class: int, side: int, workers: int = 1
) -> Path:
    """root/train/cNN/*.jpg and root/test/cNN/*.jpg; the class sets a mean colour, so it is learnable."""
    jobs = [
        (str(root / split / f"c{k:02d}"), k, n, side, 1000 * k + (split == "test"))
        for split, n in (("train", train_per_class), ("test", test_per_class))
        for k in range(classes)
    ]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_jpegs, jobs)
    else:
        for job in jobs:
            _write_jpegs(job)
    return root


def resolve_data(arg: str | None, work: Path) -> Path | None:
    """CIFAR-10 as an image folder: a folder with train/, a .tar of one, or a folder holding
    cifar10-jpeg.tar (the shared data folder's layout). Untarred into work/ when needed."""
    if not arg:
        return None
    path = Path(arg).expanduser()
    if path.is_dir() and (path / "train").is_dir():
        return path
    tar = path / "cifar10-jpeg.tar" if path.is_dir() else path
    if not tar.is_file():
        raise SystemExit(f"--data {arg}: no train/ folder, .tar file or cifar10-jpeg.tar there")
    dest = work / "cifar10"
    if not (dest / "train").is_dir():
        with tarfile.open(tar) as t:
            t.extractall(dest, filter="data")
    found = dest if (dest / "train").is_dir() else next(iter(dest.glob("*/train")), None)
    if found is None:
        raise SystemExit(f"--data {arg}: the archive holds no train/ folder")
    return found if found.name != "train" else found.parent


# ----------------------------------------------------------------------------- 1. the loss


def formula64(
    z: torch.Tensor, t: torch.Tensor, alpha: float, ls: float
) -> tuple[float, torch.Tensor]:
    """The definition in float64: mean smoothed cross-entropy, and (softmax(alpha z) - q) / N."""
    z = z.double()
    n, c = z.shape
    q = F.one_hot(t, c).double() * (1 - ls) + ls / c
    loss = -(q * torch.log_softmax(z, 1)).sum(1).mean()
    return loss.item(), (torch.softmax(alpha * z, 1) - q) / n


# Relative errors allowed against float64 on the same (rounded) inputs: the loss is computed in
# float32 for every input dtype; the gradient comes back in the input's dtype, so its rounding
# (2^-8 bf16, 2^-11 fp16, relative) bounds it.
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LOSS_TOL = 1e-5


def loss_steps(
    ctx: Ctx, z0: torch.Tensor, t: torch.Tensor, alpha: float, compiled: bool
) -> dict[str, Callable[[], None]]:
    """Forward + backward of cross-entropy and of the tampered loss on fresh leaves of z0."""
    losses = {
        "cross_entropy": lambda z: F.cross_entropy(z, t),
        "power_grad": lambda z: power_grad_cross_entropy(z, t, alpha),
    }
    if compiled:
        with compile_for(ctx):
            losses = {k: torch.compile(f, dynamic=False) for k, f in losses.items()}
    return {
        k: functools.partial(lambda f: f(z0.detach().requires_grad_()).backward(), f)
        for k, f in losses.items()
    }


def sec_loss(ctx: Ctx) -> None:
    dev, alpha = ctx.device, 0.3
    n, c = (64, 10) if ctx.tiny else (4096, 1000)
    g = torch.Generator().manual_seed(0)
    for dtype in GRAD_TOL:
        for ls in (0.0, 0.1):
            z0 = (torch.randn(n, c, generator=g) * 3).to(dtype)
            t = torch.randint(0, c, (n,), generator=g)
            z = z0.to(dev).requires_grad_()
            loss = power_grad_cross_entropy(z, t.to(dev), alpha, ls)
            loss.backward()
            want_loss, want_grad = formula64(z0, t, alpha, ls)
            loss_err = abs(loss.item() - want_loss) / abs(want_loss)
            grad = z.grad.double().cpu()
            grad_err = ((grad - want_grad).norm() / want_grad.norm()).item()
            name = str(dtype).removeprefix("torch.")
            ok = (
                math.isfinite(loss_err)
                and loss_err <= LOSS_TOL
                and grad_err <= GRAD_TOL[dtype]
                and z.grad.dtype == dtype
                and bool(torch.isfinite(grad).all())
            )
            ctx.rec.row(
                part="exactness",
                dtype=name,
                label_smoothing=ls,
                n=n,
                c=c,
                loss_rel_err=loss_err,
                grad_rel_err=grad_err,
                grad_dtype=str(z.grad.dtype).removeprefix("torch."),
            )
            ctx.rec.check(
                f"exact vs float64, {name}, ls {ls}",
                ok,
                f"loss {loss_err:.1e} (<= {LOSS_TOL:g}), grad {grad_err:.1e} (<= {GRAD_TOL[dtype]:g})",
            )

    shapes = [(64, 10), (256, 10)] if ctx.tiny else [(4096, 1000), (65536, 1000)]
    rounds = 3 if ctx.tiny else 30
    for n, c in shapes:
        z0 = torch.randn(n, c, generator=g).mul_(3).to(dev)
        t = torch.randint(0, c, (n,), generator=g).to(dev)
        for mode in ("eager", "compile"):
            if mode == "compile" and not ctx.enough(20, f"compiled timing at {n} x {c}"):
                continue
            try:
                med = median_times(loss_steps(ctx, z0, t, alpha, mode == "compile"), dev, rounds)
            except Exception as e:  # noqa: BLE001 - a compile failure is a finding: recorded, the rest goes on
                ctx.rec.check(
                    f"fwd+bwd runs, {mode}, {n} x {c}", False, f"{type(e).__name__}: {str(e)[:300]}"
                )
                continue
            ratio = med["power_grad"] / med["cross_entropy"]
            ctx.rec.row(
                part="cost",
                mode=mode,
                n=n,
                c=c,
                dtype="float32",
                alpha=alpha,
                cross_entropy_ms=med["cross_entropy"] * 1e3,
                power_grad_ms=med["power_grad"] * 1e3,
                ratio=ratio,
                rounds=rounds,
            )
            ctx.rec.check(
                f"power_grad <= 1.0x cross_entropy, {mode}, {n} x {c}",
                None if ctx.tiny else ratio <= 1.0,
                f"{ratio:.3f}x" + (" (tiny: not judged)" if ctx.tiny else ""),
                kind="target",
            )


# ----------------------------------------------------------------------------- 2. no sync in a step


class StepTap:
    """Marks which training step the trainer is in by wrapping its train loader: step k runs from
    the moment batch k is handed over to the moment batch k + 1 (or the epoch's end) is asked
    for. Any loop that pulls its batches from the loader is measured the same way."""

    def __init__(self) -> None:
        self.epoch = -1
        self.phase: tuple[str, int, int] = ("setup", -1, -1)
        self.steps: Counter[int] = Counter()  # steps seen per epoch

    def wrap(self, loader: Any) -> Any:
        return _TappedLoader(loader, self)


class _TappedLoader:
    def __init__(self, inner: Any, tap: StepTap) -> None:
        self._inner, self._tap = inner, tap

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:  # set_epoch and whatever else the loop asks for
        return getattr(self._inner, name)

    def __iter__(self) -> Iterator[Any]:
        tap = self._tap
        tap.epoch += 1
        tap.phase = ("epoch_start", tap.epoch, -1)
        for k, batch in enumerate(self._inner):
            tap.phase = ("step", tap.epoch, k)
            tap.steps[tap.epoch] += 1
            yield batch
        tap.phase = ("epoch_end", tap.epoch, -1)


@contextlib.contextmanager
def tapped_train_loaders(tap: StepTap) -> Iterator[None]:
    """powergrad.data.create_loaders, and every powergrad module's reference to it, return the
    train loader wrapped by tap."""
    import powergrad.data as pdata

    real = pdata.create_loaders

    def create_loaders(*args: Any, **kwargs: Any) -> Any:
        loaders = real(*args, **kwargs)
        return dataclasses.replace(loaders, train=tap.wrap(loaders.train))

    holders = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("powergrad") and getattr(m, "create_loaders", None) is real
    ]
    for m in holders:
        m.create_loaders = create_loaders
    try:
        yield
    finally:
        for m in holders:
            m.create_loaders = real


def call_site() -> str:
    """The innermost powergrad line of the caller's stack (else the innermost outside torch and
    this file), as "path:line function: source"."""
    frame, fallback = sys._getframe(1), None
    while frame is not None:
        name = frame.f_code.co_filename
        if name != __file__ and not name.endswith("warnings.py"):
            if f"{os.sep}powergrad{os.sep}" in name:
                break
            if fallback is None and f"{os.sep}torch{os.sep}" not in name:
                fallback = frame
        frame = frame.f_back
    frame = frame or fallback
    if frame is None:
        return "?"
    name, line = frame.f_code.co_filename, frame.f_lineno
    where = (
        name.split(f"{os.sep}powergrad{os.sep}", 1)[-1]
        if f"{os.sep}powergrad{os.sep}" in name
        else Path(name).name
    )
    return f"{where}:{line} {frame.f_code.co_name}: {linecache.getline(name, line).strip()[:80]}"


@contextlib.contextmanager
def record_syncs(
    tap: StepTap, events: list[tuple[tuple[str, int, int], str]], cuda: bool
) -> Iterator[None]:
    """Record (phase, call site) of every host-device sync. On CUDA: torch's sync debug mode
    ("warn"), each warning caught where it is raised. On the CPU (no syncs exist) the stand-in is
    every read of a tensor's value into Python (item, bool, int, float, tolist), which is what
    syncs on a GPU: it exercises the same attribution."""
    if cuda:
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchronizing CUDA operation" in str(message):
                events.append((tap.phase, call_site()))
            else:
                shown(message, category, filename, lineno, file, line)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return
    names = ("item", "tolist", "__bool__", "__int__", "__float__")
    saved = {n: torch.Tensor.__dict__.get(n) for n in names}
    inside = [False]  # one read counts once (int(t) may read through item())

    def reader(name: str) -> Callable:
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            if inside[0]:
                return real(self, *a, **k)
            inside[0] = True
            try:
                events.append((tap.phase, call_site()))
                return real(self, *a, **k)
            finally:
                inside[0] = False

        return read

    for n in names:
        setattr(torch.Tensor, n, reader(n))
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, v)


def judge_syncs(
    events: list[tuple[tuple[str, int, int], str]], steps: Counter[int], every: int, per_read: int
) -> tuple[bool, str, dict[str, int]]:
    """Steady state (epochs after the first): at most ceil(S / every) + 1 steps of an epoch's S
    may sync (the flag read, and the epoch's last step), each at most per_read times."""
    in_steps = [(ph, site) for ph, site in events if ph[0] == "step" and ph[1] >= 1]
    by_step = Counter((ph[1], ph[2]) for ph, _ in in_steps)
    worst = []
    for epoch, s in steps.items():
        if epoch < 1:
            continue
        counts = [n for (e, _), n in by_step.items() if e == epoch]
        allowed = math.ceil(s / every) + 1
        if len(counts) > allowed or (counts and max(counts) > per_read):
            worst.append(
                f"epoch {epoch + 1}: {len(counts)} of {s} steps synced (allowed {allowed}), "
                f"up to {max(counts)} syncs in one (allowed {per_read})"
            )
    sites = Counter(site for _, site in in_steps)
    return not worst, "; ".join(worst) or "within the allowance", dict(sites.most_common())


def sec_sync(ctx: Ctx) -> None:
    try:
        from powergrad.engine.loop import SYNC_EVERY
    except ImportError:  # the loop was rebuilt without the name: the documented value
        SYNC_EVERY = 25
    every = (
        SYNC_EVERY if ctx.cuda else 1
    )  # the loop reads its flags every step on the CPU (free there)
    steps, batch, epochs = (4, 4, 2) if ctx.tiny else (60, 128, 3)
    variants = [("fp32", "none", True), ("bf16", "bf16", True)]
    if ctx.cuda:  # GradScaler.step reads found_inf with .item() every step: reported, not judged
        variants.append(("fp16", "fp16", False))
    for name, amp, judged in variants:
        if not ctx.enough(10, f"the {name} run"):
            continue
        tap, events = StepTap(), []
        with tapped_train_loaders(tap), record_syncs(tap, events, ctx.cuda):
            train_run(
                ctx,
                f"sync-{name}",
                None,
                {
                    "model": "resnet20",
                    "model_kwargs": {"depth": 8 if ctx.tiny else 20},
                    "dataset": "synthetic",
                    "img_size": 8 if ctx.tiny else 32,
                    "num_classes": 10,
                    "synthetic_size": steps * batch,
                    "batch_size": batch,
                    "epochs": epochs,
                    "amp": amp,
                    "lr": 0.05,
                    "alpha": 0.3,
                    "workers": 0,
                },
            )
        if not tap.steps:
            raise RuntimeError(
                "the trainer's train loader was never iterated through the tap: "
                "powergrad.train no longer takes its loaders from powergrad.data.create_loaders"
            )
        ok, detail, sites = judge_syncs(events, tap.steps, every, per_read=2)
        first = sum(1 for ph, _ in events if ph[0] == "step" and ph[1] == 0)
        outside = sum(1 for ph, _ in events if ph[0] != "step")
        ctx.rec.row(
            amp=name,
            epochs=epochs,
            steps_per_epoch=steps,
            syncs_in_steps_after_epoch1=sum(sites.values()),
            syncs_in_epoch1_steps=first,
            syncs_outside_steps=outside,
            flag_read_every=every,
            sites=" | ".join(f"{n}x {s}" for s, n in sites.items()) or "none",
        )
        label = (
            "host-device syncs"
            if ctx.cuda
            else "host reads of tensor values (the CPU stand-in for syncs)"
        )
        if judged:
            ctx.rec.check(
                f"{name}: {label} within the flag read's allowance (steps after epoch 1)",
                ok,
                detail,
            )
        else:
            ctx.rec.note(
                f"{name}: {detail} (not judged: torch's GradScaler reads its inf flag with .item() each step)"
            )
        if (
            not ctx.cuda
        ):  # the machinery itself: every step seen, and the flag read (every step here) in them
            judged_steps = steps * (epochs - 1)
            ctx.rec.check(
                f"{name}: the tap saw every step and the loop's per-step flag read",
                all(n == steps for n in tap.steps.values()) and sum(sites.values()) >= judged_steps,
                f"steps per epoch {dict(tap.steps)}; reads in the {judged_steps} steps after epoch 1: "
                f"{sum(sites.values())}",
            )


# ----------------------------------------------------------------------------- 3. train end to end


TRAIN_MODES = {
    "eager_fp32": {"amp": "none"},
    "bf16": {"amp": "bf16"},
    "bf16_channels_last": {"amp": "bf16", "channels_last": True},
    "bf16_channels_last_compile": {"amp": "bf16", "channels_last": True, "compile": True},
}


def cifar_like(ctx: Ctx) -> tuple[dict[str, Any], bool]:
    """Overrides that point a recipe at CIFAR-10 (JPEG), or at generated images; True if real."""
    if ctx.data is not None:
        return {"dataset": "imagefolder", "data_dir": str(ctx.data), "img_size": 32}, True
    if ctx.tiny:
        folder = ctx.work / "tiny-cifar"
        if not (folder / "train").is_dir():
            make_jpeg_folder(folder, classes=3, train_per_class=16, test_per_class=4, side=32)
        return {"dataset": "imagefolder", "data_dir": str(folder), "img_size": 32}, False
    return {
        "dataset": "synthetic",
        "img_size": 32,
        "num_classes": 10,
        "synthetic_size": 50000,
    }, False


def loader_epoch_s(ctx: Ctx, cfg_overrides: dict[str, Any], recipe: str) -> float:
    """Seconds for the trainer's train loader alone to deliver one epoch (synchronised). The
    in-memory loader augments on the same stream as training, so this is the data part of an epoch."""
    from powergrad.data import create_loaders

    cfg = load_config(recipe, {"device": ctx.device.type, **cfg_overrides})
    loader = create_loaders(cfg, ctx.device).train
    loader.set_epoch(1)
    for _ in loader:  # warm-up epoch (first-touch allocations)
        pass
    sync(ctx.device)
    tic = time.perf_counter()
    for _ in loader:
        pass
    sync(ctx.device)
    return time.perf_counter() - tic


def sec_train(ctx: Ctx) -> None:
    data, real = cifar_like(ctx)
    if not real:
        ctx.rec.note(
            "no CIFAR-10 data (--data or POWERGRAD_DATA): generated images; accuracy not judged"
        )
    epochs = 2 if ctx.tiny else 4
    base = {
        **data,
        "epochs": epochs,
        "batch_size": 8 if ctx.tiny else 512,
        "lr": 0.4,
        "warmup_epochs": 1,
        "warmup_lr": 0.04,
        "workers": 0 if ctx.tiny else min(16, os.cpu_count() or 1),
    }
    if ctx.tiny:
        base["model_kwargs"] = {"depth": 8}
    accs = {}
    for mode, keys in TRAIN_MODES.items():
        if not ctx.enough(5 if ctx.tiny else 40, f"mode {mode}"):
            continue
        cfg = {**base, **keys}
        tic = time.perf_counter()
        result, peak = train_run(ctx, f"train-{mode}", "cifar10/resnet20-jpeg", cfg)
        wall = time.perf_counter() - tic
        last = result.history[-1]
        data_s = loader_epoch_s(ctx, cfg, "cifar10/resnet20-jpeg")
        accs[mode] = last["test_acc"]
        ctx.rec.row(
            mode=mode,
            epochs=epochs,
            img_per_s=last["train_img_s"],
            first_epoch_s=result.history[0]["epoch_s"],
            epoch_s=last["epoch_s"],
            data_share=data_s / last["epoch_s"],
            peak_mem_gib=peak,
            train_loss=last["train_loss"],
            test_acc=last["test_acc"],
            wall_s=wall,
        )
        ctx.rec.check(
            f"{mode}: finite loss, {epochs} epochs",
            math.isfinite(last["train_loss"]) and len(result.history) == epochs,
        )
        floor = 0.5
        ctx.rec.check(
            f"{mode}: learns (test acc >= {floor} after {epochs} epochs)",
            last["test_acc"] >= floor if real else None,
            f"{last['test_acc']:.4f}" + ("" if real else " (generated data: not judged)"),
        )
    if real and "eager_fp32" in accs:
        worst = max(abs(a - accs["eager_fp32"]) for a in accs.values())
        ctx.rec.check(
            "the modes agree (test acc within 0.1 of eager fp32)",
            worst <= 0.1,
            f"largest gap {worst:.4f}",
        )


# ----------------------------------------------------------------------------- 4. SIGKILL + resume


def _position(path: Path) -> tuple[int, int]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - absent, or being replaced: not there yet
        return (-1, -1)
    return int(state["epoch"]), int(state["step_in_epoch"])


def _weights_diff(a: Path, b: Path) -> float:
    wa = torch.load(a / "last.pt", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", map_location="cpu", weights_only=True)["model"]
    return max(
        ((wa[k].double() - wb[k].double()).abs().max().item() if wa[k].numel() else 0.0) for k in wa
    )


TIMINGS = ("epoch_s", "train_img_s")


def _history_diff(a: list[dict], b: list[dict]) -> float:
    """Largest relative difference over the metric rows (timings left out); inf if shapes differ."""
    if [r["epoch"] for r in a] != [r["epoch"] for r in b]:
        return math.inf
    worst = 0.0
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if k in TIMINGS or v is None or rb.get(k) is None:
                continue
            worst = max(worst, abs(v - rb[k]) / max(abs(v), 1e-12))
    return worst


def sec_resume(ctx: Ctx) -> None:
    if ctx.tiny:
        args = {
            "model": "mlp",
            "img_size": 8,
            "synthetic_size": 96,
            "batch_size": 4,
            "epochs": 3,
            "checkpoint_every_steps": 3,
        }
    else:
        args = {
            "model": "resnet20",
            "img_size": 32,
            "synthetic_size": 12800,
            "batch_size": 128,
            "epochs": 6,
            "amp": "bf16",
            "checkpoint_every_steps": 10,
        }
    args = {"dataset": "synthetic", "num_classes": 10, "lr": 0.01, "workers": 0, **args}
    a, b, killed = ctx.work / "resume-a", ctx.work / "resume-b", ctx.work / "resume-killed"
    train_run(ctx, a.name, None, args)
    train_run(ctx, b.name, None, args)

    cmd = [
        sys.executable,
        "-m",
        "powergrad",
        "train",
        *(f"{k}={v}" for k, v in args.items()),
        f"device={ctx.device.type}",
        "--out",
        str(killed),
        "--overwrite",
    ]
    log = ctx.work / "resume-killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=ctx.env(), stdout=f, stderr=subprocess.STDOUT)
    at = (-1, -1)
    try:
        while proc.poll() is None and time.monotonic() < ctx.deadline - 20:
            at = _position(killed / "last.pt")
            if at[0] >= 1 and at[1] > 0:  # mid-epoch, after a whole epoch: metrics to continue
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    at = _position(killed / "last.pt")
    before = read_metrics(killed)
    if proc.returncode != -signal.SIGKILL or at[1] <= 0:
        raise RuntimeError(
            f"could not kill the run mid-epoch (exit {proc.returncode}, last checkpoint at "
            f"epoch {at[0]} step {at[1]}): {tail(log)}"
        )
    ctx.rec.check(
        "killed mid-epoch", True, f"SIGKILL with last.pt at epoch {at[0] + 1}, step {at[1]}"
    )

    resumed, _ = train_run(ctx, killed.name, None, {**args, "resume": "auto"})
    after = read_metrics(killed)
    want = read_metrics(a)
    epochs = [r["epoch"] for r in after]
    ctx.rec.check(
        "resume=auto completes",
        resumed.status == "finished"
        and read_summary(killed)["status"] == "finished"
        and epochs == list(range(1, args["epochs"] + 1)),
        f"status {resumed.status}, epochs {epochs}",
    )
    kept = _history_diff(before, after[: len(before)]) == 0.0
    ctx.rec.check(
        "metrics continue: the rows before the kill are kept as they were",
        kept and len(before) >= 1,
        f"{len(before)} rows before the kill",
    )

    noise_w, resumed_w = _weights_diff(a, b), _weights_diff(a, killed)
    noise_h, resumed_h = _history_diff(read_metrics(a), read_metrics(b)), _history_diff(want, after)
    ctx.rec.row(
        compare="uninterrupted B vs A",
        weights_max_abs_diff=noise_w,
        metrics_max_rel_diff=noise_h,
        bitwise=noise_w == 0 and noise_h == 0,
    )
    ctx.rec.row(
        compare="killed + resumed vs A",
        weights_max_abs_diff=resumed_w,
        metrics_max_rel_diff=resumed_h,
        bitwise=resumed_w == 0 and resumed_h == 0,
    )
    if noise_w == 0 and noise_h == 0:
        ctx.rec.check(
            "uninterrupted runs are bitwise equal, so the resumed one must be",
            resumed_w == 0 and resumed_h == 0,
            f"weights {resumed_w:.3g}, metrics {resumed_h:.3g}",
        )
    else:
        # Non-deterministic kernels (atomics in cuDNN's backward, autotuned algorithms) make two
        # uninterrupted runs differ; a correct resume differs from them by about as much.
        tol = max(0.05, 3 * noise_h)
        acc_gap = abs(after[-1]["test_acc"] - want[-1]["test_acc"])
        loss_gap = abs(after[-1]["train_loss"] - want[-1]["train_loss"]) / max(
            abs(want[-1]["train_loss"]), 1e-12
        )
        ctx.rec.check(
            "resumed within tolerance of uninterrupted",
            acc_gap <= 0.05 and loss_gap <= tol,
            f"test acc gap {acc_gap:.4f} (<= 0.05), train loss rel gap {loss_gap:.3g} (<= {tol:.3g}); "
            f"two uninterrupted runs: weights {noise_w:.3g}, metrics {noise_h:.3g}",
        )
    ctx.rec.note(
        "bitwise on any device: the records of the epochs before the kill, the data order and "
        "augmentation (seeded by seed, epoch, step), and the restored model/optimiser/RNG state; "
        "after the resume the result is bitwise only where the kernels are deterministic "
        "(the rows above say which case this device is)"
    )


# ----------------------------------------------------------------------------- 5. torchrun / NCCL


def nccl_smoke(ctx: Ctx) -> float:
    """A one-rank process group of this device's backend: init, all-reduce, destroy (NCCL works
    here even where one GPU gives torchrun nothing to connect). Returns the reduced value."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if ctx.cuda else "gloo"
    device = (
        torch.device("cuda", torch.cuda.current_device()) if ctx.cuda else None
    )  # bound: an indexed device
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=device
    )
    try:
        t = torch.full((4,), 2.0, device=ctx.device)
        dist.all_reduce(t)
        return t.sum().item()
    finally:
        dist.destroy_process_group()


def sec_nccl(ctx: Ctx) -> None:
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    backend = "nccl" if ctx.cuda else "gloo"
    ctx.rec.check(f"a {backend} process group initialises and all-reduces", nccl_smoke(ctx) == 8.0)
    # tests/test_distributed.py's recipe: digits, batch 4, an MLP (no batch norm, so one process
    # and several compute the same update); accum_steps=2 adds no_sync micro-batches.
    args = {
        "epochs": 1 if ctx.tiny else 3,
        "batch_size": 16 if ctx.tiny else 4,
        "lr": 0.01,
        "seed": 1,
        "accum_steps": 2,
    }
    tic = time.perf_counter()
    train_run(ctx, "nccl-plain", "digits", args)
    ctx.rec.row(
        run="plain process",
        processes=1,
        world_size=1,
        backend="none",
        wall_s=time.perf_counter() - tic,
    )
    sizes = [1] if gpus < 2 else sorted({2, gpus})  # 2: the equivalence; all GPUs: one process each
    if gpus < 2:
        ctx.rec.note(
            f"{gpus} GPU(s): torchrun ran one process (no process group forms for one; the "
            f"{backend} smoke test above covers the backend); the 2-vs-1 check needs 2 GPUs"
        )
    for nproc in sizes:
        if not ctx.enough(15, f"torchrun with {nproc} processes"):
            continue
        run_args = {**args, "batch_size": args["batch_size"] if nproc <= 2 else 2 * nproc}
        out, log = ctx.work / f"nccl-torchrun{nproc}", ctx.work / f"nccl-torchrun{nproc}.log"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "powergrad",
            "train",
            "digits",
            *(f"{k}={v}" for k, v in run_args.items()),
            f"device={ctx.device.type}",
            "--out",
            str(out),
            "--overwrite",
        ]
        tic = time.perf_counter()
        done = run_cmd(ctx, cmd, log, ctx.left() - 5)
        ok = done.returncode == 0
        world = read_summary(out)["env"].get("world_size") if ok else None
        ctx.rec.row(
            run=f"torchrun --nproc_per_node={nproc}",
            processes=nproc,
            world_size=world,
            backend=backend if nproc > 1 else "none (one process)",
            batch_size=run_args["batch_size"],
            wall_s=time.perf_counter() - tic,
        )
        ctx.rec.check(
            f"torchrun with {nproc} process(es) finishes, world size {nproc}",
            ok and world == nproc,
            "" if ok else f"exit {done.returncode}: {tail(log, 400)}",
        )
        if not ok or nproc > 2:
            continue
        one = ctx.work / "nccl-plain"
        w, h = _weights_diff(one, out), _history_diff(read_metrics(one), read_metrics(out))
        # One process's batch-4 matmuls against two processes' batch-2 ones plus an all-reduce:
        # the sums are ordered differently, so agreement is to float32 rounding, not bitwise.
        tol = 1e-4
        name = (
            "2 processes match 1"
            if nproc == 2
            else "torchrun with 1 process matches a plain process"
        )
        ctx.rec.check(
            name,
            w <= tol and h <= tol,
            f"weights max abs diff {w:.2e}, metrics max rel diff {h:.2e} (<= {tol:g})",
        )
    if gpus < 2:
        ctx.rec.check(
            f"2 processes match 1 ({backend})", None, f"skipped: needs >= 2 GPUs, found {gpus}"
        )


# ----------------------------------------------------------------------------- 6. ResNet-50 modes


def sec_resnet50(ctx: Ctx) -> None:
    bench = _load_sibling("gpu_resnet50")
    if ctx.tiny:
        args = argparse.Namespace(
            model="resnet20", img_size=16, batch_size=4, steps=1, rounds=1, amp="none"
        )
    else:
        args = argparse.Namespace(
            model="resnet50", img_size=224, batch_size=256, steps=15, rounds=3, amp="bf16"
        )
        torch.backends.cudnn.benchmark = (
            True  # fixed shapes: cuDNN picks its fastest kernels (bare and trainer alike)
        )
    modes = {"eager": (False, False), "channels_last": (True, False), "compile": (True, True)}
    steps = {}
    for mode, (cl, comp) in modes.items():
        if not ctx.enough(5 if ctx.tiny else 100 if comp else 15, f"mode {mode}"):
            continue
        with compile_for(ctx):
            steps[mode] = bench.Step(args, ctx.device, channels_last=cl, compile=comp)
    rates: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.rounds):
        for m, step in steps.items():
            rates[m].append(args.batch_size * args.steps / step(args.steps))
    med = {m: statistics.median(v) for m, v in rates.items()}
    del steps
    best = max(med, key=med.get) if med else None
    if best and ctx.enough(5 if ctx.tiny else 120, "the trainer run"):
        cl, comp = modes[best]
        # 40 steps an epoch (not 15): the epoch's fixed costs (its first batch, the flag read at
        # its end) would otherwise weigh on the trainer's images/s more than on a long epoch.
        longer = argparse.Namespace(
            **{**vars(args), "steps": max(args.steps, 1 if ctx.tiny else 40)}
        )
        with compile_for(ctx):
            med["trainer"] = bench.trainer_img_per_s(
                longer, ctx.device, channels_last=cl, compile=comp
            )
    for m, v in med.items():
        ctx.rec.row(
            mode=m if m != "trainer" else f"trainer ({best})",
            img_per_s=v,
            vs_eager=v / med["eager"] if "eager" in med else None,
            model=args.model,
            batch_size=args.batch_size,
            img_size=args.img_size,
            amp=args.amp,
        )
    why = " (tiny: not judged)" if ctx.tiny else ""
    if "trainer" in med:
        r = med["trainer"] / med[best]
        ctx.rec.check(
            "trainer >= 0.97x the best bare mode",
            None if ctx.tiny else r >= 0.97,
            f"{r:.3f}x {best}{why}",
            kind="target",
        )
    if "eager" in med and best:
        r = med[best] / med["eager"]
        ctx.rec.check(
            "best mode >= 1.3x eager",
            None if ctx.tiny else r >= 1.3,
            f"{best} {r:.3f}x{why}",
            kind="target",
        )


# ----------------------------------------------------------------------------- 7. CIFAR-10 to 94%


def seconds_to(history: list[dict[str, Any]], target: float) -> tuple[float | None, int | None]:
    """Training seconds (epoch_s summed) up to the first epoch at test accuracy >= target."""
    total = 0.0
    for row in history:
        total += row["epoch_s"]
        if row["test_acc"] >= target:
            return total, row["epoch"]
    return None, None


def sec_cifar94(ctx: Ctx) -> None:
    target = 0.94
    data, real = cifar_like(ctx)
    if not real and not ctx.tiny:
        ctx.rec.status = "skipped"
        ctx.rec.note("skipped: needs CIFAR-10 (--data DIR or .tar, or POWERGRAD_DATA)")
        return
    airbench_s = None
    try:
        import airbench  # noqa: F401
    except ImportError:
        ctx.rec.row(impl="airbench94", skipped="airbench is not installed (pip install airbench)")
    else:
        if not ctx.cuda:
            ctx.rec.row(impl="airbench94", skipped="airbench needs a CUDA GPU")
        elif ctx.enough(60, "airbench94"):
            ab = _load_sibling("airbench_cifar10")
            ab.write_airbench_data(ctx.data, ctx.work / "airbench" / "cifar10")
            res = ab.run_airbench(ctx.work / "airbench")
            airbench_s = res["seconds"]
            ctx.rec.row(
                impl="airbench94",
                seconds=res["seconds"],
                test_acc=res["test_acc"],
                reached=(res["test_acc"] or 0) >= target,
            )

    recipe = "speed/cifar10-94"
    over = {**data}
    if ctx.tiny:
        over.update(
            epochs=2,
            warmup_epochs=1,
            batch_size=8,
            amp="none",
            workers=0,
            model_kwargs={"widths": [8, 8, 16, 16], "tta_flip": True},
        )
    if ctx.cuda and ctx.enough(90, "the warm-up run"):
        # As airbench's warmup94: compilation and cuDNN's choices cached before the timed run.
        train_run(ctx, "cifar94-warmup", recipe, {**over, "epochs": 1, "warmup_epochs": 0})
    tic = time.perf_counter()
    result, peak = train_run(ctx, "cifar94", recipe, over)
    wall = time.perf_counter() - tic
    seconds, epoch = seconds_to(result.history, target)
    ctx.rec.row(
        impl=recipe,
        seconds=seconds,
        epoch_reached=epoch,
        epochs=len(result.history),
        best_test_acc=max(r["test_acc"] for r in result.history),
        first_epoch_s=result.history[0]["epoch_s"],
        later_epoch_s=result.history[-1]["epoch_s"],
        wall_s=wall,
        peak_mem_gib=peak,
        reached=seconds is not None,
    )
    if ctx.tiny or not real:
        ctx.rec.check(f"{recipe} reaches {target:.0%}", None, "tiny: not judged", kind="target")
        return
    ctx.rec.check(
        f"{recipe} reaches {target:.0%}",
        seconds is not None,
        f"best {max(r['test_acc'] for r in result.history):.4f}",
        kind="target",
    )
    if airbench_s and seconds:
        ratio = seconds / airbench_s
        ctx.rec.row(impl="ratio powergrad / airbench94", ratio=ratio)
        ctx.rec.check("within 2x of airbench94", ratio <= 2.0, f"{ratio:.2f}x", kind="target")


# ----------------------------------------------------------------------------- 8. streaming at 224 px


def _r50_step_rate(ctx: Ctx) -> tuple[float, str]:
    """Images/s the ResNet-50 step consumes: section resnet50's best bare mode, else measured here
    (eager channels-last, a few steps)."""
    rows = [
        r
        for r in ctx.prior.get("resnet50", {}).get("rows", [])
        if not str(r.get("mode", "")).startswith("trainer")
    ]
    if rows and not ctx.tiny:
        best = max(rows, key=lambda r: r["img_per_s"])
        return best["img_per_s"], f"section resnet50, {best['mode']}"
    bench = _load_sibling("gpu_resnet50")
    args = (
        argparse.Namespace(model="resnet20", img_size=16, batch_size=4, amp="none")
        if ctx.tiny
        else argparse.Namespace(model="resnet50", img_size=224, batch_size=256, amp="bf16")
    )
    step = bench.Step(args, ctx.device, channels_last=True, compile=False)
    n = 2 if ctx.tiny else 10
    return args.batch_size * n / step(n), "measured here, channels_last eager"


def sec_stream(ctx: Ctx) -> None:
    from torchvision.transforms import v2

    from powergrad.data import FileDataset, StreamLoader, TrainBatchSampler, stream_transform
    from powergrad.data.folder import IMAGENET_MEAN, IMAGENET_STD, find_classes, scan_split

    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    side, classes, per_class, batch = (64, 2, 8, 4) if ctx.tiny else (224, 10, 256, 256)
    workers = 0 if ctx.tiny else max(1, min(16, cores) - 1)
    folder = ctx.work / "imagenet-like"
    if not (folder / "train").is_dir():
        make_jpeg_folder(
            folder,
            classes,
            per_class,
            1,
            int(side * 1.6),
            workers=1 if ctx.tiny else min(16, cores),
        )
    samples = scan_split(folder / "train", find_classes(folder / "train"))
    cfg = load_config(None, {"workers": workers, "channels_last": True, "seed": 0})
    ds = FileDataset(samples, stream_transform("imagenet", side, train=True), False)
    sampler = TrainBatchSampler(len(samples), batch, 0, 0, 1)
    loader = StreamLoader(ds, sampler, cfg, IMAGENET_MEAN, IMAGENET_STD, ctx.device)
    for _ in loader:  # epoch 1 starts the workers
        pass
    sampler.set_epoch(1)
    sync(ctx.device)
    tic, n = time.perf_counter(), 0
    for x, _ in loader:
        n += x.shape[0]
    sync(ctx.device)
    loader_rate = n / (time.perf_counter() - tic)
    del loader
    step_rate, source = _r50_step_rate(ctx)
    bottleneck = "loader" if loader_rate < step_rate else "model"
    ctx.rec.row(
        path="stream loader (PIL decode, RandomResizedCrop, workers)",
        img_per_s=loader_rate,
        workers=workers,
        cpu_cores=cores,
        img_size=side,
        batch_size=batch,
    )
    ctx.rec.row(path=f"ResNet-50 step ({source})", img_per_s=step_rate)

    # Decoding on the device: file bytes read on the host, decode_jpeg in one batched call, then
    # RandomResizedCrop per image on the device. On the CPU mode the same code decodes on the CPU.
    from torchvision.io import decode_jpeg, read_file

    paths = [p for p, _ in samples[:batch]]
    crop = v2.RandomResizedCrop(side, antialias=True)

    def decode() -> list[torch.Tensor]:
        return decode_jpeg([read_file(p) for p in paths], device=ctx.device)

    def decode_crop() -> torch.Tensor:
        return torch.stack([crop(img) for img in decode()])

    rates = {}
    for what, fn in {"decode_jpeg": decode, "decode_jpeg + RandomResizedCrop": decode_crop}.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", DeprecationWarning
                )  # torchvision >= 0.29 points to TorchCodec
                rates[what] = (
                    len(paths)
                    / median_times({what: fn}, ctx.device, 1 if ctx.tiny else 5, warmup=1)[what]
                )
        except Exception as e:  # noqa: BLE001 - recorded; the loader's figures above stand
            ctx.rec.check(
                f"{what} on {ctx.device.type} runs", False, f"{type(e).__name__}: {str(e)[:300]}"
            )
            continue
        ctx.rec.row(
            path=f"{what} (device={ctx.device.type}, file reads on the host)",
            img_per_s=rates[what],
            batch_size=len(paths),
        )
    best_device = max(rates.values(), default=None)
    ctx.rec.row(
        path="verdict",
        bottleneck=bottleneck,
        loader_vs_step=loader_rate / step_rate,
        device_decode_vs_step=best_device / step_rate if best_device else None,
    )
    ctx.rec.check(
        "the stream loader delivers full batches",
        n == (len(samples) // batch) * batch,
        f"{n} images in epoch 2",
    )


RUNNERS: dict[str, Callable[[Ctx], None]] = {
    "loss": sec_loss,
    "sync": sec_sync,
    "train": sec_train,
    "resume": sec_resume,
    "nccl": sec_nccl,
    "resnet50": sec_resnet50,
    "cifar94": sec_cifar94,
    "stream": sec_stream,
}


# ----------------------------------------------------------------------------- running sections


def run_here(sid: str, ctx: Ctx) -> Section:
    """Run a section in this process; an exception is recorded as the section's error."""
    rec = ctx.rec
    tic = time.monotonic()
    try:
        RUNNERS[sid](ctx)
    except Exception as e:  # noqa: BLE001 - one section's failure must not stop the suite
        rec.status = "error"
        rec.error = f"{type(e).__name__}: {e}"[:2000] + "\n" + traceback.format_exc()[-3000:]
    finally:
        if ctx.cuda:
            torch.cuda.empty_cache()
    rec.seconds = time.monotonic() - tic
    rec.finish()
    return rec


def _descendants(pid: int) -> list[int]:
    """Child processes of pid, recursively (torchrun's workers start their own sessions)."""
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


def run_child(
    sid: str, args: argparse.Namespace, work: Path, data: Path | None, prior: dict, budget: float
) -> Section:
    """Run a section in a fresh process (a crashed CUDA context or a hang stays there), killed at
    its budget; what it recorded so far is kept."""
    sink, prior_file = work / f"section-{sid}.json", work / f"prior-{sid}.json"
    prior_file.write_text(json.dumps(prior))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        sid,
        "--work",
        str(work),
        "--prior",
        str(prior_file),
        "--budget",
        str(budget),
        "--out",
        str(args.out),
    ]
    if data is not None:
        cmd += ["--data", str(data)]
    if args.dry_run:
        cmd.append("--dry-run")
    log = work / f"section-{sid}.log"
    tic = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=subprocess_env(cuda=not args.dry_run),
        )
        try:
            proc.wait(timeout=budget + 30)  # the section's own checks stop it first, normally
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    with open(
        Path(args.out) / "gpu_suite.log", "a"
    ) as f:  # the sections' output, for the post-mortem
        f.write(
            f"\n===== {sid} (exit {proc.returncode}{', timed out' if timed_out else ''})\n{log.read_text(errors='replace')}"
        )
    rec = Section(sid, budget_s=budget)
    if sink.is_file():
        rec = Section(**{**json.loads(sink.read_text()), "sink": None})
    rec.seconds = time.monotonic() - tic
    if timed_out:
        rec.status, rec.error = (
            "timeout",
            f"stopped after {rec.seconds:.0f} s (budget {budget:.0f} s)\n{tail(log, 1500)}",
        )
    elif rec.status == "running":  # it never finished its record: crashed, or killed from outside
        rec.status, rec.error = (
            "error",
            f"the section's process exited {proc.returncode} without finishing\n{tail(log, 1500)}",
        )
    elif proc.returncode != 0 and rec.status == "ok":
        rec.status, rec.error = (
            "error",
            f"the section's process exited {proc.returncode}\n{tail(log, 1500)}",
        )
    rec.finish()
    return rec


def child_main(args: argparse.Namespace) -> None:
    sid = args.child
    work = Path(args.work)
    rec = Section(sid, budget_s=args.budget, sink=work / f"section-{sid}.json")
    rec.flush()
    ctx = make_ctx(
        args,
        work,
        Path(args.data) if args.data else None,
        json.loads(Path(args.prior).read_text()),
        args.budget,
        rec,
    )
    run_here(sid, ctx)


def make_ctx(
    args: argparse.Namespace,
    work: Path,
    data: Path | None,
    prior: dict,
    budget: float,
    rec: Section,
) -> Ctx:
    device = torch.device("cpu" if args.dry_run else "cuda")
    return Ctx(device, args.dry_run, work, data, prior, time.monotonic() + budget, rec)


# ----------------------------------------------------------------------------- report


def device_info(dry_run: bool) -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if not dry_run and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            device=p.name,
            memory_gib=round(p.total_memory / 2**30, 1),
            capability=f"{p.major}.{p.minor}",
        )
    else:
        info["device"] = "cpu (dry run)"
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    d = report["device"]
    lines = [
        f"# powergrad GPU suite: {d['device']}",
        "",
        f"{report['started']} UTC, torch {d['torch']} (CUDA {d['cuda']}), {d['gpus']} GPU(s), "
        f"{d['cpu_cores']} CPU cores; `{report['command']}`; exit code {report['exit_code']}"
        + (
            "; **dry run: tiny sizes on the CPU, no figure here is a GPU result**"
            if report["dry_run"]
            else ""
        ),
        "",
        "| section | status | seconds (budget) | checks passed | failed | targets missed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in report["sections"]:
        passed = sum(c["ok"] is True for c in s["checks"])
        failed = [c["name"] for c in s["checks"] if c["ok"] is False and c["kind"] == "correctness"]
        missed = [c["name"] for c in s["checks"] if c["ok"] is False and c["kind"] == "target"]
        lines.append(
            f"| {s['id']} | {s['status']} | {s['seconds']:.0f} ({s['budget_s']:.0f}) | {passed} | "
            f"{_cell('; '.join(failed))} | {_cell('; '.join(missed))} |"
        )
    for s in report["sections"]:
        lines += ["", f"## {s['id']}: {s['status']}", ""]
        parts = dict.fromkeys(r.get("part") for r in s["rows"])  # one table per part of a section
        for part in parts:
            rows = [r for r in s["rows"] if r.get("part") == part]
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
            lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
            lines.append("")
        for c in s["checks"]:
            mark = {
                True: "PASS",
                False: "FAIL" if c["kind"] == "correctness" else "MISSED",
                None: "not judged",
            }[c["ok"]]
            lines.append(
                f"- {mark} ({c['kind']}): {c['name']}{': ' + c['detail'] if c['detail'] else ''}"
            )
        lines += [f"- note: {n}" for n in s["notes"]]
        if s["error"]:
            lines += ["", "```", s["error"].strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_suite.md").write_text(markdown(report))


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_suite.json and gpu_suite.md")
    ap.add_argument(
        "--data",
        default=os.environ.get("POWERGRAD_DATA"),
        help="CIFAR-10 (JPEG): a folder with train/ and test/, a .tar of one, or a folder holding cifar10-jpeg.tar",
    )
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    ap.add_argument(
        "--dry-run",
        "--tiny",
        action="store_true",
        help="tiny sizes on the CPU: the suite's own test",
    )
    ap.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each section in its own process (default: on, except with --dry-run)",
    )
    ap.add_argument("--time-limit", type=float, default=TOTAL_S, help="seconds for the whole suite")
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--prior", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    wanted = args.sections.split(",")
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {', '.join(bad)}; valid: {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in wanted]
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device here; --dry-run runs the suite's CPU mode")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    threads = torch.get_num_threads()
    if args.dry_run:  # tiny ops: one thread is faster, and much faster on a shared, loaded machine
        torch.set_num_threads(1)
    try:
        if args.child:
            child_main(args)
            return 0
        return run_suite(args, argv)
    finally:
        torch.set_num_threads(threads)


def run_suite(args: argparse.Namespace, argv: list[str] | None) -> int:
    isolate = (not args.dry_run) if args.isolate is None else args.isolate
    started = datetime.datetime.now(datetime.timezone.utc)
    end = time.monotonic() + args.time_limit
    scratch = (
        contextlib.nullcontext(args.work)
        if args.work
        else tempfile.TemporaryDirectory(prefix="pg-gpu-suite-")
    )
    report: dict[str, Any] = {
        "suite": "powergrad gpu_suite",
        "version": 1,
        "started": started.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(
            ["python", "benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "dry_run": args.dry_run,
        "isolated": isolate,
        "device": device_info(args.dry_run),
        "powergrad": powergrad.__version__,
        "sections": [],
        "exit_code": None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.log").unlink(missing_ok=True)  # the isolated sections' output, appended
    with scratch as work_dir:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        data = resolve_data(args.data, work)
        report["data"] = str(data) if data else None
        prior: dict[str, dict] = {}
        for i, sid in enumerate(args.sections):
            # Each section gets its budget, or its share of what is left if that is less.
            later = sum(BUDGET_S[s] for s in args.sections[i + 1 :])
            # The CPU mode's budgets are 3x: a loaded 2-core machine is slower at tiny sizes than a GPU at full.
            budget = (
                3 * BUDGET_S[sid]
                if args.dry_run
                else max(0.0, min(BUDGET_S[sid], end - time.monotonic() - 0.5 * later))
            )
            print(f"[gpu_suite] {sid}: budget {budget:.0f} s", flush=True)
            if budget < 10 and not args.dry_run:
                rec = Section(
                    sid,
                    status="skipped",
                    budget_s=budget,
                    notes=["skipped: the suite's time limit is spent"],
                )
            elif isolate:
                rec = run_child(sid, args, work, data, prior, budget)
            else:
                rec = run_here(
                    sid, make_ctx(args, work, data, prior, budget, Section(sid, budget_s=budget))
                )
            prior[sid] = rec.to_dict()
            report["sections"].append(prior[sid])
            print(f"[gpu_suite] {sid}: {rec.status} in {rec.seconds:.0f} s", flush=True)
            write_report(out, report)  # after every section: a crash of the suite keeps what ran
    bad = [s["id"] for s in report["sections"] if s["status"] in ("failed", "error", "timeout")]
    report["exit_code"] = 1 if bad else 0
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    write_report(out, report)
    print(markdown(report).split("\n## ")[0], flush=True)
    print(
        f"[gpu_suite] wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}; "
        + (f"failed: {', '.join(bad)}" if bad else "every correctness check passed"),
        flush=True,
    )
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
