"""The paper's figures, from run directories only (metrics.csv, summary.json, filter_norms.npz).

``make_figures(paths, out)`` writes, for the runs at or under ``paths``:

    accuracy_loglog.png          train (dashed) and test (solid) accuracy per epoch, both axes
                                 logarithmic, one colour per alpha (mean over seeds)
    loss_curves.png              train and test loss per epoch, one colour per alpha
    accuracy_vs_alpha.png        final train and test accuracy against alpha, error bars = std
                                 over seeds
    transformed_distribution.png p' = p^alpha / sum p^alpha against alpha for an unordered and a
                                 rank-ordered distribution over C = 10 classes
    logit_stats.png              logit norm, mean, max and variance per epoch, one line per alpha
    logit_stats_vs_alpha.png     the same four at the last epoch against alpha
    loss_vs_logit_norm.png       final train loss against final logit norm, one point per run,
                                 with a least-squares line
    filter_norms-RUN.png         per-filter weight norm over steps, one panel per conv layer,
                                 with the count of zeroed filters (runs with monitor.filter_norms)
    pooled_features-RUN.png      per-channel norm of the classifier's input (the pooled features)
                                 over steps, and at the last record sorted

With several settings besides alpha (a "family" each), the per-family figures get a ``-fN``
suffix and the family's settings in their title.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..errors import UserError  # noqa: E402
from ..rundir import read_metrics, refuse_run_dir  # noqa: E402
from .tables import MACHINERY, Run, load_runs  # noqa: E402

__all__ = ["make_figures", "plot_transformed_distribution"]

LOGIT_STATS = ("logit_norm", "logit_mean", "logit_max", "logit_var")


def _families(runs: list[Run]) -> list[tuple[str, dict[float, list[Run]]]]:
    """Runs grouped by setting without alpha; within a family, by alpha (falling)."""
    fams: dict[str, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        key = json.dumps({k: v for k, v in r.config.items() if k not in MACHINERY and k != "alpha"}, sort_keys=True)
        fams[key][float(r.config.get("alpha", 1.0))].append(r)
    settings = [json.loads(k) for k in fams]
    varying = sorted(k for k in {k for s in settings for k in s}
                     if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1)
    out = []
    for key, by_alpha in fams.items():
        s = json.loads(key)
        label = " ".join(f"{k}={s.get(k)}" for k in varying) or f"{s.get('model')} on {s.get('dataset')}"
        out.append((label, dict(sorted(by_alpha.items(), reverse=True))))
    return out


def _mean_curve(runs: list[Run], key: str) -> tuple[list[int], list[float]]:
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for row in read_metrics(r.path):
            if row.get(key) is not None:
                per_epoch[row["epoch"]].append(row[key])
    epochs = sorted(per_epoch)
    return epochs, [float(np.mean(per_epoch[e])) for e in epochs]


def _colour(i: int, alpha: float) -> str:
    return "black" if alpha == 1.0 else f"C{i}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_loglog(label: str, by_alpha: dict[float, list[Run]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (alpha, runs) in enumerate(by_alpha.items()):
        c = _colour(i, alpha)
        for key, style in (("train_acc", "--"), ("test_acc", "-")):
            ep, acc = _mean_curve(runs, key)
            ax.plot(ep, acc, style, color=c, label=f"alpha={alpha:g} {key[:-4]}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="epoch (log)", ylabel="top-1 accuracy (log)", title=f"accuracy per epoch: {label}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_loss_curves(label: str, by_alpha: dict[float, list[Run]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (alpha, runs) in enumerate(by_alpha.items()):
        c = _colour(i, alpha)
        for key, style in (("train_loss", "--"), ("test_loss", "-")):
            ep, loss = _mean_curve(runs, key)
            ax.plot(ep, loss, style, color=c, label=f"alpha={alpha:g} {key[:-5]}")
    ax.set(xlabel="epoch", ylabel="cross-entropy (forward, untampered)", title=f"loss: {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _final(runs: list[Run], key: str) -> tuple[float, float]:
    vals = [float(r.final[key]) for r in runs if r.final.get(key) is not None]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def plot_accuracy_vs_alpha(families, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (label, by_alpha) in enumerate(families):
        alphas = list(by_alpha)
        for key, marker, style in (("test_acc", "o", "-"), ("train_acc", "s", "--")):
            m, s = zip(*(_final(by_alpha[a], key) for a in alphas))
            ax.errorbar(alphas, m, yerr=s, fmt=marker + style, color=f"C{i}", capsize=3,
                        label=f"{label} {key[:-4]}" if len(families) > 1 else key[:-4])
    ax.set(xlabel="alpha", ylabel="final top-1 accuracy", title="accuracy against alpha (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_transformed_distribution(path: Path, num_classes: int = 10, seed: int = 0) -> Path:
    """p' = softmax(alpha z) for alphas from 1 to 0: an unordered p, and the same p rank-ordered."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, num_classes)  # logits of one example, std 2: a peaked softmax
    alphas = (1.0, 0.75, 0.5, 0.25, 0.1, 0.0)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (title, logits) in zip(axes, (("unordered", z), ("rank-ordered", np.sort(z)[::-1]))):
        for i, a in enumerate(alphas):
            p = np.exp(a * logits - (a * logits).max())
            p /= p.sum()
            ax.plot(range(num_classes), p, "o-", color=plt.cm.viridis(i / (len(alphas) - 1)), label=f"alpha={a:g}")
        ax.set(xlabel="class", title=f"{title} (C = {num_classes})", xticks=range(num_classes))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("p' = p^alpha / sum p^alpha")
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def plot_logit_stats(label: str, by_alpha: dict[float, list[Run]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for i, (alpha, runs) in enumerate(by_alpha.items()):
        for ax, key in zip(axes, LOGIT_STATS):
            ep, v = _mean_curve(runs, key)
            ax.plot(ep, v, color=_colour(i, alpha), label=f"alpha={alpha:g}")
    for ax, key in zip(axes, LOGIT_STATS):
        ax.set(xlabel="epoch", title=key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"training logits per epoch: {label}", fontsize=9)
    return _save(fig, path)


def plot_logit_stats_vs_alpha(families, path: Path) -> Path:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for i, (label, by_alpha) in enumerate(families):
        alphas = list(by_alpha)
        for ax, key in zip(axes, LOGIT_STATS):
            m, s = zip(*(_final(by_alpha[a], key) for a in alphas))
            ax.errorbar(alphas, m, yerr=s, fmt="o-", color=f"C{i}", capsize=3, label=label)
    for ax, key in zip(axes, LOGIT_STATS):
        ax.set(xlabel="alpha", title=f"final {key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
    if len(families) > 1:
        axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_loss_vs_logit_norm(runs: list[Run], path: Path) -> Path:
    pts = [(r.final.get("logit_norm"), r.final.get("train_loss"), float(r.config.get("alpha", 1.0)))
           for r in runs if r.final.get("logit_norm") is not None]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if pts:
        x, y, a = map(np.array, zip(*pts))
        sc = ax.scatter(x, y, c=a, cmap="viridis", vmin=0, vmax=1)
        fig.colorbar(sc, ax=ax, label="alpha")
        if len(set(x.tolist())) > 1:
            slope, icpt = np.polyfit(x, y, 1)
            r = np.corrcoef(x, y)[0, 1]
            xs = np.linspace(x.min(), x.max(), 50)
            ax.plot(xs, slope * xs + icpt, "k--", label=f"fit: loss = {slope:.3g} x norm + {icpt:.3g} (r = {r:.2f})")
            ax.legend(fontsize=7)
    ax.set(xlabel="final logit norm (train)", ylabel="final train cross-entropy", title="loss against logit norm, one point per run")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_filter_norms(run: Run, data: dict[str, Any], path: Path) -> Path:
    layers = list(data["conv"])
    threshold = float(run.config.get("monitor", {}).get("dead_filter_norm", 1e-3))
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    steps = data["steps"]
    zeroed_total = 0
    for ax, name in zip(axes.flat, layers):
        norms = data["conv"][name]  # (T, filters)
        zeroed = int((norms[-1] < threshold).sum())
        zeroed_total += zeroed
        ax.plot(steps, norms, lw=0.6, alpha=0.7)
        ax.set_title(f"{name}: {zeroed}/{norms.shape[1]} zeroed", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"per-filter L2 norm, {run.path.name} (alpha={run.config.get('alpha')}): "
                 f"{zeroed_total} filters below {threshold:g}", fontsize=9)
    return _save(fig, path)


def plot_pooled_features(run: Run, data: dict[str, Any], path: Path) -> Path:
    pooled = data["pooled"]  # (T, channels)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(data["steps"][: len(pooled)], pooled, lw=0.5, alpha=0.6)
    a.set(xlabel="step", ylabel="RMS over the batch", title="per-channel norm of the pooled features")
    b.bar(range(pooled.shape[1]), np.sort(pooled[-1])[::-1], width=1.0)
    b.set(xlabel="channel (sorted)", title=f"at the last record ({int((pooled[-1] < 1e-6).sum())} channels at 0)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.path.name} (alpha={run.config.get('alpha')})", fontsize=9)
    return _save(fig, path)


def make_figures(paths: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write every figure the runs at or under ``paths`` support into ``out``; return the files."""
    runs, _ = load_runs(paths)
    if not runs:
        raise UserError(f"no finished runs under {', '.join(map(str, paths))}")
    if out:
        refuse_run_dir(out, "plot")
    out = Path(out) if out else Path(paths[0]) / "figures"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from None
    families = _families(runs)
    written = [plot_transformed_distribution(out / "transformed_distribution.png")]
    for i, (label, by_alpha) in enumerate(families):
        sfx = f"-f{i + 1}" if len(families) > 1 else ""
        written.append(plot_accuracy_loglog(label, by_alpha, out / f"accuracy_loglog{sfx}.png"))
        written.append(plot_loss_curves(label, by_alpha, out / f"loss_curves{sfx}.png"))
        written.append(plot_logit_stats(label, by_alpha, out / f"logit_stats{sfx}.png"))
    written.append(plot_accuracy_vs_alpha(families, out / "accuracy_vs_alpha.png"))
    written.append(plot_logit_stats_vs_alpha(families, out / "logit_stats_vs_alpha.png"))
    written.append(plot_loss_vs_logit_norm(runs, out / "loss_vs_logit_norm.png"))
    from .. import engine  # noqa: F401  (monitor and engine import each other: engine first)
    from ..monitor.filters import read_filter_norms

    unique = len({r.path.name for r in runs}) == len(runs)
    for r in runs:
        data = read_filter_norms(r.path)
        if data is None:
            continue
        name = r.path.name if unique else f"{r.path.parent.name}_{r.path.name}"
        if data["conv"]:
            written.append(plot_filter_norms(r, data, out / f"filter_norms-{name}.png"))
        if data["pooled"].size:
            written.append(plot_pooled_features(r, data, out / f"pooled_features-{name}.png"))
    return written
