"""Figures from run directories: learning curves of one run, and runs compared; and the drawing
helpers every figure of powergrad uses (report/figures.py too). It sits below report/ and
engine/, which both draw with it: the trainer plots a run's curves at its end.

Figures are drawn on a ``matplotlib.figure.Figure`` with its own Agg canvas, never through
pyplot: importing powergrad must not switch the backend of a notebook or a GUI session that
also plots, and PNG files need no display.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import extra

with extra("plot"):  # below report/ and engine/: both draw with these helpers
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

from .rundir import curves_path, read_metrics

__all__ = [
    "plot_curves",
    "plot_compare",
    "new_figure",
    "save_figure",
    "plain_log_ticks",
    "one_point_note",
    "integer_epochs",
    "PERCENT",
]

PERCENT = 100.0  # accuracies are drawn in percent, as `powergrad report` prints them
_SPLIT_STYLE = {"train": "--", "val": ":", "test": "-"}


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6, 4.2), **kw: Any):
    """(figure, axes) on a private Agg canvas; pyplot's global backend is left alone."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def plain_log_ticks(ax, axis: str = "both", integer_x: bool = True) -> None:
    """Label a log axis with plain numbers (1, 2, 5, 10, ... or, over a narrow range, a few
    evenly spaced ones) instead of matplotlib's 9x10^-1 minor labels. ``integer_x``: the x axis
    counts epochs, so its ticks are whole numbers."""
    for name in ("x", "y") if axis == "both" else (axis,):
        lo, hi = getattr(ax, f"get_{name}lim")()
        if lo <= 0:
            continue
        ticks = [m * 10.0**d for d in range(-4, 6) for m in (1, 2, 5) if lo <= m * 10.0**d <= hi]
        if len(ticks) < 3:  # a narrow range (test accuracy 90-98%): a few round numbers in it
            locator = MaxNLocator(5, integer=integer_x and name == "x")
            ticks = [t for t in locator.tick_values(lo, hi) if lo <= t <= hi and t > 0]
        a = getattr(ax, f"{name}axis")
        a.set_major_locator(FixedLocator(ticks))
        a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a.set_minor_formatter(NullFormatter())
        getattr(ax, f"set_{name}lim")(lo, hi)


def integer_epochs(ax) -> None:
    """Epoch axes tick whole epochs (not 1.5, 2.5 on a short run)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _column(
    rows: list[dict[str, Any]], key: str, scale: float = 1.0
) -> tuple[list[int], list[float]]:
    pts = [(r["epoch"], r[key] * scale) for r in rows if r.get(key) is not None]
    return [e for e, _ in pts], [v for _, v in pts]


def _draw_splits(a, b, rows: list[dict[str, Any]], color: str | None, prefix: str = "") -> None:
    """Loss on ``a`` and accuracy (percent) on ``b`` for each split the run recorded."""
    for split, style in _SPLIT_STYLE.items():
        for ax, key, scale in ((a, f"{split}_loss", 1.0), (b, f"{split}_acc", PERCENT)):
            ep, v = _column(rows, key, scale)
            if ep:
                ax.plot(ep, v, style, color=color, label=f"{prefix}{split}")


def plot_curves(run: str | Path, out: str | Path | None = None) -> Path:
    """Train/val/test loss and accuracy per epoch of one run -> its curves (rundir.curves_path)."""
    run = Path(run)
    rows = read_metrics(run)
    out = Path(out) if out else curves_path(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = new_figure(1, 2, figsize=(10, 3.8))
    _draw_splits(a, b, rows, None)
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (a, b):
        integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run.name, fontsize=9)
    return save_figure(fig, out)


def plot_compare(runs: dict[str, str | Path], out: str | Path, log_axes: bool = False) -> Path:
    """Loss and accuracy per epoch of several runs, one colour each: train dashed, validation
    dotted (when recorded), test solid.

    ``log_axes=True`` draws both axes logarithmic, as the paper's accuracy-per-epoch figure.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = new_figure(1, 2, figsize=(10, 3.8))
    for i, (label, run) in enumerate(runs.items()):
        _draw_splits(a, b, read_metrics(run), f"C{i}", prefix=f"{label} ")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (a, b):
        if log_axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
            plain_log_ticks(ax)
        else:
            integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out)


def one_point_note(ax, alphas: Iterable[float]) -> None:
    """A 'vs alpha' panel with a single alpha shows one point: say so on the panel."""
    if len(set(alphas)) < 2:
        ax.text(
            0.5,
            0.1,
            "one alpha only: a curve needs a sweep,\ne.g. powergrad sweep RECIPE alpha=1,0.5,0.25",
            transform=ax.transAxes,
            ha="center",
            va="bottom",
            fontsize=7,
            color="0.35",
            bbox={"facecolor": "white", "edgecolor": "0.7", "alpha": 0.8},
        )
