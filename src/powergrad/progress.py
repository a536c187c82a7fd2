"""Progress while a run works: a live bar on a terminal, a plain line now and then elsewhere.

On a terminal (stdout is a tty) each epoch, evaluation and decode gets a tqdm bar with its rate
and ETA, drawn on the terminal only (the run's log gets the epoch lines, not bar frames)
and cleared when done. Elsewhere (CI, SLURM logs, ``| tee``) a plain line is printed at most every
``PROGRESS_EVERY_S`` seconds, as timm's ``log_interval`` does every N steps:

    epoch 3/30  step 120/391  loss 1.2345  lr 0.0876  512 img/s  eta 0:00:34 (run 0:12:05)

Why tqdm: it is already installed with timm and optuna (no new dependency), it computes rate
and ETA with smoothing, handles terminal width and non-UTF-8 terminals, and leaves logging and
print alone (rich would take over the console to do the same).

Reading the loss for a line is one host-device sync: it happens per printed line (or every
``BAR_REFRESH_S`` on a bar), not per step.

``POWERGRAD_PROGRESS=lines`` forces the plain lines on a terminal, ``=bar`` the bar elsewhere,
``=off`` neither.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TypeVar

__all__ = ["StepProgress", "track", "mode", "clock", "PROGRESS_EVERY_S"]

PROGRESS_EVERY_S = 30.0  # seconds between plain lines (not a terminal)
BAR_REFRESH_S = 0.5  # seconds between loss/lr updates on a bar (each reads the loss: a sync)
T = TypeVar("T")


def _terminal():
    """The real stdout: the run's tee (rundir.Tee) keeps it as ``terminal``."""
    return getattr(sys.stdout, "terminal", sys.stdout)


def mode() -> str:
    """bar, lines or off: POWERGRAD_PROGRESS if set, else bar on a terminal and lines elsewhere."""
    forced = os.environ.get("POWERGRAD_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    isatty = getattr(_terminal(), "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def every_s() -> float:
    """Seconds between plain lines: PROGRESS_EVERY_S, or POWERGRAD_PROGRESS_EVERY_S (tests)."""
    try:
        return float(os.environ.get("POWERGRAD_PROGRESS_EVERY_S", PROGRESS_EVERY_S))
    except ValueError:
        return PROGRESS_EVERY_S


def clock(seconds: float) -> str:
    """h:mm:ss"""
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def _close(bar: Any) -> None:
    # Draw the last state before the bar is cleared: an epoch shorter than BAR_REFRESH_S would
    # otherwise only ever show its 0% frame.
    bar.refresh()
    bar.close()


def _bar(total: int | None, desc: str, unit: str, initial: int = 0) -> Any:
    from tqdm import tqdm  # [train]'s tqdm, imported only where a terminal shows a bar

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        leave=False,
        file=_terminal(),
        dynamic_ncols=True,
        mininterval=BAR_REFRESH_S,
    )


class StepProgress:
    """The optimiser steps of one epoch. Call :meth:`step` after each step, :meth:`close` at the end.

    ``first`` is the step the epoch starts from (a mid-epoch resume), ``steps_left_after`` the
    steps of the run after this epoch (for the run's ETA).
    """

    def __init__(
        self,
        epoch: int,
        epochs: int,
        steps: int,
        batch_size: int,
        *,
        first: int = 0,
        steps_left_after: int = 0,
        enabled: bool = True,
    ) -> None:
        self.epoch, self.epochs, self.steps, self.batch_size = epoch, epochs, steps, batch_size
        self.first, self.done, self.after = first, first, steps_left_after
        self.mode = mode() if enabled else "off"
        self.every = every_s()
        self.t0 = self.last = time.perf_counter()
        self.bar = (
            _bar(steps, f"epoch {epoch}/{epochs}", "step", first) if self.mode == "bar" else None
        )

    def step(self, loss: Any, lr: float) -> None:
        self.done += 1
        if self.mode == "off":
            return
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
            if now - self.last >= BAR_REFRESH_S:
                self.bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.4g}", refresh=False)
                self.last = now
        elif now - self.last >= self.every and self.done < self.steps:
            self.last = now
            print(self.line(float(loss), lr, now), flush=True)

    def line(self, loss: float, lr: float, now: float) -> str:
        rate = (self.done - self.first) / max(now - self.t0, 1e-9)  # steps/s this epoch
        left = self.steps - self.done
        return (
            f"epoch {self.epoch}/{self.epochs}  step {self.done}/{self.steps}  loss {loss:.4f}  "
            f"lr {lr:.4g}  {rate * self.batch_size:.0f} img/s  eta {clock(left / rate)} "
            f"(run {clock((left + self.after) / rate)})"
        )

    def close(self) -> None:
        if self.bar is not None:
            _close(self.bar)
            self.bar = None


def track(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    unit: str = "batch",
    enabled: bool = True,
) -> Iterator[T]:
    """``items`` as they come, with a bar (terminal) or a line every PROGRESS_EVERY_S seconds
    (elsewhere) saying how far, at what rate, and how long is left."""
    how = mode() if enabled else "off"
    if total is None and isinstance(items, Sized):
        total = len(items)
    if how == "off":
        yield from items
        return
    if how == "bar":
        bar = _bar(total, desc, unit)
        try:
            for item in items:
                yield item
                bar.update(1)
        finally:
            _close(bar)
        return
    every, t0 = every_s(), time.perf_counter()
    last = t0
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every and (total is None or done < total):
            last = now
            rate = done / max(now - t0, 1e-9)
            eta = f"  eta {clock((total - done) / rate)}" if total else ""
            print(f"{desc}: {unit} {done}/{total or '?'}  {rate:.1f} {unit}/s{eta}", flush=True)
