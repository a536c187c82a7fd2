"""Figures from run directories: learning curves of one run, and runs compared."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402

from ..rundir import read_metrics  # noqa: E402

__all__ = ["plot_curves", "plot_compare"]


def plot_curves(run: str | Path, out: str | Path | None = None) -> Path:
    """Train/test loss and accuracy per epoch of one run -> RUN/plots/curves.png."""
    run = Path(run)
    rows = read_metrics(run)
    out = Path(out) if out else run / "plots" / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [r["train_loss"] for r in rows], label="train")
    a.plot(ep, [r["test_loss"] for r in rows], label="test")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.plot(ep, [r["train_acc"] for r in rows], label="train")
    b.plot(ep, [r["test_acc"] for r in rows], label="test")
    b.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_compare(runs: dict[str, str | Path], out: str | Path, log_axes: bool = False) -> Path:
    """Train (dashed) and test (solid) accuracy per epoch of several runs, one colour each.

    ``log_axes=True`` draws both axes logarithmic, as the paper's accuracy-per-epoch figure.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (label, run) in enumerate(runs.items()):
        rows = read_metrics(run)
        ep = [r["epoch"] for r in rows]
        color = f"C{i}"
        b.plot(ep, [r["train_acc"] for r in rows], "--", color=color, label=f"{label} train")
        b.plot(ep, [r["test_acc"] for r in rows], "-", color=color, label=f"{label} test")
        a.plot(ep, [r["train_loss"] for r in rows], "--", color=color, label=f"{label} train")
        a.plot(ep, [r["test_loss"] for r in rows], "-", color=color, label=f"{label} test")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for ax in (a, b):
        if log_axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
