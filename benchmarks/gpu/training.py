"""Steps 3-6 of the first run: no sync in a real step; resnet20-jpeg eager and compiled; resume.

Every run goes through `powergrad train` (benchmarks.gpu.common.train), on CIFAR-10 (JPEG) when
the run has it, else on generated JPEGs of the same size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from powergrad.config import load_config
from powergrad.rundir import read_metrics, read_summary

from .common import CIFAR_RECIPE, cifar_data, sync, train, train_args
from .harness import Ctx, step

# ----------------------------------------------------------------------------- syncs


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
        m.create_loaders = create_loaders  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m in holders:
            m.create_loaders = real  # type: ignore[attr-defined]


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
        frame = frame.f_back  # type: ignore[assignment]
    frame = frame or fallback
    if frame is None:
        return "?"
    name, line = frame.f_code.co_filename, frame.f_lineno
    sep = f"{os.sep}powergrad{os.sep}"
    where = name.split(sep, 1)[-1] if sep in name else Path(name).name
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

        def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
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

        def read(self, *a, **k):  # type: ignore[no-untyped-def]
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


def flag_read_every(cuda: bool) -> int:
    """Steps between the loop's reads of its flags: SYNC_EVERY on a GPU, every step on the CPU."""
    try:
        from powergrad.engine.loop import SYNC_EVERY
    except ImportError:  # the loop was rebuilt without the name: the documented value
        SYNC_EVERY = 25
    return SYNC_EVERY if cuda else 1


@step(budget_s=40)
def sync_probe(ctx: Ctx) -> None:
    """No host-device sync inside a training step of the real recipe (cifar10/resnet20-jpeg,
    augment=cifar, bf16, channels-last): every sync attributed to its code line and step."""
    import powergrad.workflows  # noqa: F401 - loaded now, so that the tap finds its references

    data, _ = cifar_data(ctx)
    batch = 8 if ctx.tiny else 512
    steps = 4 if ctx.tiny else 10
    tap, events = StepTap(), []
    with tapped_train_loaders(tap), record_syncs(tap, events, ctx.cuda):
        train(
            ctx,
            "sync-probe",
            CIFAR_RECIPE,
            {
                **data,
                "augment": "cifar",
                "amp": "bf16",
                "channels_last": True,
                "epochs": 2,
                "batch_size": batch,
                "train_subset": batch * steps,
                **({} if ctx.tiny else {"test_subset": 2000}),
                "workers": 0 if ctx.tiny else 8,
                **({"model_kwargs": {"depth": 8}} if ctx.tiny else {}),
            },
        )
    if not tap.steps:
        raise RuntimeError(
            "the trainer's train loader was never iterated through the tap: "
            "powergrad train no longer takes its loaders from powergrad.data.create_loaders"
        )
    every = flag_read_every(ctx.cuda)
    ok, detail, sites = judge_syncs(events, tap.steps, every, per_read=2)
    ctx.rec.row(
        recipe=CIFAR_RECIPE,
        augment="cifar",
        steps_per_epoch=dict(tap.steps).get(1),
        syncs_in_steps_after_epoch1=sum(sites.values()),
        syncs_in_epoch1_steps=sum(1 for ph, _ in events if ph[0] == "step" and ph[1] == 0),
        syncs_outside_steps=sum(1 for ph, _ in events if ph[0] != "step"),
        flag_read_every=every,
        sites=" | ".join(f"{n}x {s}" for s, n in sites.items()) or "none",
    )
    what = "host-device syncs" if ctx.cuda else "host reads of tensor values (the CPU stand-in)"
    ctx.rec.check(f"{what} within the flag read's allowance (steps after epoch 1)", ok, detail)
    if not ctx.cuda:  # the machinery itself: every step seen, the per-step flag read found
        judged = sum(n for e, n in tap.steps.items() if e >= 1)
        ctx.rec.check(
            "the tap saw every step and the loop's per-step flag read",
            all(n == steps for n in tap.steps.values()) and sum(sites.values()) >= judged,
            f"steps per epoch {dict(tap.steps)}; reads in the {judged} judged steps: {sum(sites.values())}",
        )


# ----------------------------------------------------------------------------- train end to end


def loader_epoch_s(ctx: Ctx, overrides: dict[str, Any]) -> float:
    """Seconds for the trainer's train loader alone to deliver one epoch (synchronised). The
    in-memory loader augments on the same stream as training, so this is an epoch's data part."""
    from powergrad.data import create_loaders

    cfg = load_config(CIFAR_RECIPE, {"device": ctx.device.type, **overrides})
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


def resnet20_run(ctx: Ctx, name: str, keys: dict[str, Any]) -> dict[str, Any] | None:
    """cifar10/resnet20-jpeg for a few epochs with `keys`: one row, its checks; the run's record."""
    data, real = cifar_data(ctx)
    epochs = 2 if ctx.tiny else 5
    over = {
        **data,
        "epochs": epochs,
        "batch_size": 8 if ctx.tiny else 512,
        "lr": 0.4,
        "warmup_epochs": 1,
        "warmup_lr": 0.04,
        "workers": 0 if ctx.tiny else 8,
        **({"model_kwargs": {"depth": 8}} if ctx.tiny else {}),
        **keys,
    }
    run = train(ctx, name, CIFAR_RECIPE, over)
    h = run["history"]
    later = [r["epoch_s"] for r in h[1:]] or [h[0]["epoch_s"]]
    steady = statistics.median(later)
    data_s = loader_epoch_s(ctx, over) if ctx.enough(10, "the loader-alone epoch") else None
    ctx.rec.row(
        mode=name,
        epochs=len(h),
        img_per_s=h[-1]["train_img_s"],
        first_epoch_s=h[0]["epoch_s"],
        steady_epoch_s=steady,
        first_epoch_extra_s=h[0]["epoch_s"] - steady,
        data_share=data_s / steady if data_s is not None else None,
        peak_mem_gib=run["peak_mem_gib"],
        train_loss=h[-1]["train_loss"],
        test_acc=h[-1]["test_acc"],
        wall_s=run["wall_s"],
    )
    ctx.rec.check(
        f"{name}: finite loss, {epochs} epochs",
        math.isfinite(h[-1]["train_loss"]) and len(h) == epochs,
    )
    ctx.rec.check(
        f"{name}: learns (test acc >= 0.5 after {epochs} epochs)",
        h[-1]["test_acc"] >= 0.5 if real else None,
        f"{h[-1]['test_acc']:.4f}" + ("" if real else " (generated data: not judged)"),
    )
    return run


@step(budget_s=65)
def train_bf16(ctx: Ctx) -> None:
    """cifar10/resnet20-jpeg, bf16 + channels-last, 5 epochs: images/s, the data share of an
    epoch (the loader alone, timed apart), peak memory, test accuracy."""
    resnet20_run(ctx, "bf16_channels_last", {"amp": "bf16", "channels_last": True})


@step(budget_s=100)
def train_compiled(ctx: Ctx) -> None:
    """The same with compile=true: compile time (the first epoch's excess over a steady epoch)
    apart from the steady rate; accuracy against the eager run."""
    run = resnet20_run(
        ctx, "bf16_channels_last_compile", {"amp": "bf16", "channels_last": True, "compile": True}
    )
    eager = ctx.prior.get("train_bf16", {}).get("rows", [])
    if run is None or not eager or ctx.data is None:
        return
    mine = ctx.rec.rows[-1]
    gap = abs(mine["test_acc"] - eager[-1]["test_acc"])
    ctx.rec.check("compiled and eager agree (test acc within 0.1)", gap <= 0.1, f"gap {gap:.4f}")
    ctx.rec.row(
        part="compile vs eager",
        compile_s=mine["first_epoch_extra_s"],
        steady_speedup=eager[-1]["steady_epoch_s"] / mine["steady_epoch_s"],
    )


# ----------------------------------------------------------------------------- SIGKILL + resume


def _position(run: Path) -> tuple[int, int]:
    """(epoch, step in epoch) of the run's last.pt; (-1, -1) while there is none to read."""
    try:
        state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
        return int(state["epoch"]), int(state["step_in_epoch"])
    except Exception:  # noqa: BLE001 - absent, being replaced, or a format without these keys
        return (-1, -1)


def _weights_diff(a: Path, b: Path) -> float:
    wa = torch.load(a / "last.pt", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", map_location="cpu", weights_only=True)["model"]
    return max(
        ((wa[k].double() - wb[k].double()).abs().max().item() if wa[k].numel() else 0.0) for k in wa
    )


TIMINGS = ("epoch_s", "train_img_s")


def history_diff(a: list[dict], b: list[dict]) -> float:
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


@step(budget_s=50)
def resume(ctx: Ctx) -> None:
    """SIGKILL mid-epoch, then resume=auto: the run completes, its metrics continue; bitwise or
    within the noise of two uninterrupted runs."""
    args: dict[str, Any] = {
        "model": "resnet20",
        "dataset": "synthetic",
        "num_classes": 10,
        "lr": 0.01,
        "workers": 0,
    }
    if ctx.tiny:
        args.update(
            model="mlp",
            img_size=8,
            synthetic_size=96,
            batch_size=4,
            epochs=3,
            checkpoint_every_steps=3,
        )
    else:
        args.update(
            img_size=32,
            synthetic_size=6400,
            batch_size=128,
            epochs=5,
            amp="bf16",
            checkpoint_every_steps=10,
        )
    a, b, killed = ctx.work / "resume-a", ctx.work / "resume-b", ctx.work / "resume-killed"
    train(ctx, a.name, None, args)
    train(ctx, b.name, None, args)
    cmd = [
        sys.executable,
        "-m",
        "powergrad",
        *train_args(None, {**args, "device": ctx.device.type}, killed),
    ]
    log = ctx.work / "resume-killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None and ctx.left() > 20:
            at = _position(killed)
            if at[0] >= 1 and at[1] > 0:  # mid-epoch, after a whole epoch: metrics to continue
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    at, before = _position(killed), read_metrics(killed)
    if proc.returncode != -signal.SIGKILL or at[1] <= 0:
        raise RuntimeError(
            f"could not kill the run mid-epoch (exit {proc.returncode}, last.pt at epoch {at[0]} "
            f"step {at[1]}): {log.read_text(errors='replace')[-600:]}"
        )
    ctx.rec.check(
        "killed mid-epoch", True, f"SIGKILL with last.pt at epoch {at[0] + 1}, step {at[1]}"
    )
    train(ctx, killed.name, None, {**args, "resume": "auto"})
    after, want = read_metrics(killed), read_metrics(a)
    ctx.rec.check(
        "resume=auto completes",
        read_summary(killed)["status"] == "finished"
        and [r["epoch"] for r in after] == list(range(1, args["epochs"] + 1)),
        f"epochs {[r['epoch'] for r in after]}",
    )
    ctx.rec.check(
        "metrics continue: the rows before the kill are kept as they were",
        len(before) >= 1 and history_diff(before, after[: len(before)]) == 0.0,
        f"{len(before)} rows before the kill",
    )
    noise_w, noise_h = _weights_diff(a, b), history_diff(want, read_metrics(b))
    got_w, got_h = _weights_diff(a, killed), history_diff(want, after)
    for compare, w, h in (
        ("uninterrupted B vs A", noise_w, noise_h),
        ("killed + resumed vs A", got_w, got_h),
    ):
        ctx.rec.row(
            compare=compare,
            weights_max_abs_diff=w,
            metrics_max_rel_diff=h,
            bitwise=w == 0 and h == 0,
        )
    if noise_w == 0 and noise_h == 0:
        ctx.rec.check(
            "uninterrupted runs are bitwise equal, so the resumed one must be",
            got_w == 0 and got_h == 0,
            f"weights {got_w:.3g}, metrics {got_h:.3g}",
        )
    else:  # non-deterministic kernels: a correct resume differs from A about as much as B does
        acc_gap = abs(after[-1]["test_acc"] - want[-1]["test_acc"])
        tol = max(0.05, 3 * noise_h)
        loss_gap = abs(after[-1]["train_loss"] - want[-1]["train_loss"]) / max(
            abs(want[-1]["train_loss"]), 1e-12
        )
        ctx.rec.check(
            "resumed within the noise of uninterrupted runs",
            acc_gap <= 0.05 and loss_gap <= tol,
            f"test acc gap {acc_gap:.4f} (<= 0.05), train loss rel gap {loss_gap:.3g} (<= {tol:.3g})",
        )
