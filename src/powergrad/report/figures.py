"""The paper's figures, from run directories only (their metrics, summaries and filter norms).

``make_figures(paths, out)`` writes, for the runs at or under ``paths`` (accuracy in percent,
as ``powergrad report`` prints it; train dashed, validation dotted, test solid; curves are means
over the seeds of an alpha, and each title says over how many):

    accuracy_loglog.png          train, validation and test accuracy per epoch, both axes
                                 logarithmic, one colour per alpha (black: alpha = 1)
    loss_curves.png              train, validation and test loss per epoch, one colour per alpha
    accuracy_vs_alpha.png        final train, validation and test accuracy against alpha, error
                                 bars = std over seeds
    transformed_distribution.png an illustration on made-up logits (no run's data): p' = p^alpha
                                 / sum p^alpha at the swept alphas, unordered and rank-ordered
    logit_stats.png              logit norm, mean, max and variance per epoch, one line per alpha
    logit_stats_vs_alpha.png     the same four at the last epoch against alpha
    loss_vs_logit_norm.png       final train loss against final logit norm, one point per run;
                                 a fitted line within an alpha with 3+ runs, none across alphas
    filter_norms-RUN.png         per-filter weight norm over steps, one panel per conv layer,
                                 with the count of zeroed filters (runs with monitor.filter_norms)
    pooled_features-RUN.png      per-channel norm of the classifier's input (the pooled features)
                                 over steps, and at the last record sorted

A "vs alpha" figure of a single alpha says on the panel that a curve needs a sweep.
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
import numpy as np

from ..errors import UserError
from ..monitor.filters import read_filter_norms
from ..plots import (
    PERCENT,
    integer_epochs,
    new_figure,
    one_point_note,
    plain_log_ticks,
    save_figure,
)
from ..rundir import read_metrics, refuse_run_dir
from .tables import MACHINERY, Run, load_runs

__all__ = ["make_figures", "plot_transformed_distribution"]

LOGIT_STATS = ("logit_norm", "logit_mean", "logit_max", "logit_var")
# What each logit statistic is (monitor/stats.py), as the panel's y label.
LOGIT_LABELS = {
    "logit_norm": "mean L2 norm of an example's logits",
    "logit_mean": "mean logit",
    "logit_max": "largest logit of the epoch",
    "logit_var": "variance of the logits",
}
SPLITS = (("train", "--"), ("val", ":"), ("test", "-"))  # line style per split in every figure


def _families(runs: list[Run]) -> list[tuple[str, dict[float, list[Run]]]]:
    """Runs grouped by setting without alpha; within a family, by alpha (falling)."""
    fams: dict[str, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        key = json.dumps(
            {k: v for k, v in r.config.items() if k not in MACHINERY and k != "alpha"},
            sort_keys=True,
        )
        fams[key][float(r.config.get("alpha", 1.0))].append(r)
    settings = [json.loads(k) for k in fams]
    varying = sorted(
        k
        for k in {k for s in settings for k in s}
        if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1
    )
    out = []
    for key, by_alpha in fams.items():
        s = json.loads(key)
        label = (
            " ".join(f"{k}={s.get(k)}" for k in varying)
            or f"{s.get('model')} on {s.get('dataset')}"
        )
        out.append((label, dict(sorted(by_alpha.items(), reverse=True))))
    return out


def _seed_span(groups: list[list[Run]]) -> str:
    """'3 seeds' or '2-3 seeds': how many runs stand behind each mean."""
    counts = sorted({len(g) for g in groups})
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{span} seed{'s' if counts[-1] > 1 else ''}"


def _seeds_note(groups: list[list[Run]]) -> str:
    """What a line stands for: 'lines are means over 3 seeds', or one run each."""
    if {len(g) for g in groups} == {1}:
        return "one run each (no seeds to average)"
    return f"lines are means over {_seed_span(groups)}"


def _points_note(groups: list[list[Run]]) -> str:
    """What a point of a 'vs alpha' figure stands for."""
    if {len(g) for g in groups} == {1}:
        return "points: one run each (no error bars)"
    return f"points: mean over {_seed_span(groups)}; bars: std over seeds"


def _mean_curve(runs: list[Run], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for row in read_metrics(r.path):
            if row.get(key) is not None:
                per_epoch[row["epoch"]].append(row[key])
    epochs = sorted(per_epoch)
    return epochs, [scale * float(np.mean(per_epoch[e])) for e in epochs]


def _colour(i: int, alpha: float) -> str:
    return "black" if alpha == 1.0 else f"C{i}"


def plot_accuracy_loglog(label: str, by_alpha: dict[float, list[Run]], path: Path) -> Path:
    fig, ax = new_figure(figsize=(6.4, 4.4))
    for i, (alpha, runs) in enumerate(by_alpha.items()):
        for split, style in SPLITS:
            ep, acc = _mean_curve(runs, f"{split}_acc", PERCENT)
            if ep:
                ax.plot(ep, acc, style, color=_colour(i, alpha), label=f"alpha={alpha:g} {split}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.set(
        xlabel="epoch (log scale)",
        ylabel="top-1 accuracy, % (log scale)",
        title=f"accuracy per epoch: {label}\n{_seeds_note(list(by_alpha.values()))}",
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_loss_curves(label: str, by_alpha: dict[float, list[Run]], path: Path) -> Path:
    fig, ax = new_figure(figsize=(6.4, 4.4))
    for i, (alpha, runs) in enumerate(by_alpha.items()):
        for split, style in SPLITS:
            ep, loss = _mean_curve(runs, f"{split}_loss")
            if ep:
                ax.plot(ep, loss, style, color=_colour(i, alpha), label=f"alpha={alpha:g} {split}")
    ax.set(
        xlabel="epoch",
        ylabel="cross-entropy (untampered, as evaluated)",
        title=f"loss per epoch: {label}\n{_seeds_note(list(by_alpha.values()))}",
    )
    ax.title.set_fontsize(9)
    integer_epochs(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _final(runs: list[Run], key: str, scale: float = 1.0) -> tuple[float, float]:
    vals = [scale * float(r.final[key]) for r in runs if r.final.get(key) is not None]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def plot_accuracy_vs_alpha(families, path: Path) -> Path:
    fig, ax = new_figure(figsize=(6.4, 4.4))
    markers = {"train": "s", "val": "^", "test": "o"}
    for i, (label, by_alpha) in enumerate(families):
        alphas = list(by_alpha)
        for split, style in SPLITS:
            m, s = zip(*(_final(by_alpha[a], f"{split}_acc", PERCENT) for a in alphas))
            if all(math.isnan(v) for v in m):
                continue  # no run recorded this split (val: only with val_fraction > 0)
            ax.errorbar(
                alphas,
                m,
                yerr=s,
                fmt=markers[split] + style,
                color=f"C{i}",
                capsize=3,
                label=f"{label} {split}" if len(families) > 1 else split,
            )
    groups = [g for _, by_alpha in families for g in by_alpha.values()]
    ax.set(
        xlabel="alpha",
        ylabel="final top-1 accuracy (%)",
        title=f"final accuracy against alpha\n{_points_note(groups)}",
    )
    ax.title.set_fontsize(9)
    one_point_note(ax, [a for _, by_alpha in families for a in by_alpha])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_transformed_distribution(
    path: Path, alphas: list[float] | None = None, num_classes: int = 10, seed: int = 0
) -> Path:
    """An illustration of p' = softmax(alpha z) at the given alphas (those swept) and alpha = 1,
    on made-up logits: an unordered p, and the same p rank-ordered. No run's data is drawn."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, num_classes)  # logits of one example, std 2: a peaked softmax
    alphas = sorted({1.0, *(alphas or (1.0, 0.5, 0.25, 0.0))}, reverse=True)
    cmap = matplotlib.colormaps["viridis"]
    fig, axes = new_figure(1, 2, figsize=(10, 4.0), sharey=True)
    panels = (("unordered", "class", z), ("rank-ordered", "class, by rank of p", np.sort(z)[::-1]))
    for ax, (title, xlabel, logits) in zip(axes, panels):
        for i, a in enumerate(alphas):
            p = np.exp(a * logits - (a * logits).max())
            p /= p.sum()
            ax.plot(
                range(num_classes),
                p,
                "o-",
                color=cmap(0.85 * i / max(len(alphas) - 1, 1)),
                label=f"alpha={a:g}",
            )  # no pale yellow
        ax.set(xlabel=xlabel, title=f"{title} (C = {num_classes})", xticks=range(num_classes))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("p' = p^alpha / sum p^alpha")
    axes[1].legend(fontsize=7)
    fig.suptitle(
        "illustration, not measured: the PowerGrad transform of one made-up example "
        "(random logits, std 2) at the swept alphas",
        fontsize=9,
    )
    return save_figure(fig, path)


def plot_logit_stats(label: str, by_alpha: dict[float, list[Run]], path: Path) -> Path:
    fig, axes = new_figure(1, 4, figsize=(16, 3.8))
    for i, (alpha, runs) in enumerate(by_alpha.items()):
        for ax, key in zip(axes, LOGIT_STATS):
            ep, v = _mean_curve(runs, key)
            ax.plot(ep, v, color=_colour(i, alpha), label=f"alpha={alpha:g}")
    for ax, key in zip(axes, LOGIT_STATS):
        ax.set(xlabel="epoch", ylabel=LOGIT_LABELS[key], title=key.replace("_", " "))
        integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"training-set logits per epoch: {label}; {_seeds_note(list(by_alpha.values()))}",
        fontsize=9,
    )
    return save_figure(fig, path)


def plot_logit_stats_vs_alpha(families, path: Path) -> Path:
    fig, axes = new_figure(1, 4, figsize=(16, 3.8))
    groups = [g for _, by_alpha in families for g in by_alpha.values()]
    for i, (label, by_alpha) in enumerate(families):
        alphas = list(by_alpha)
        for ax, key in zip(axes, LOGIT_STATS):
            m, s = zip(*(_final(by_alpha[a], key) for a in alphas))
            several = any(len(g) > 1 for g in groups)
            name = (
                label if len(families) > 1 else ("mean ± std over seeds" if several else "one run")
            )
            ax.errorbar(alphas, m, yerr=s, fmt="o-", color=f"C{i}", capsize=3, label=name)
    for ax, key in zip(axes, LOGIT_STATS):
        ax.set(xlabel="alpha", ylabel=LOGIT_LABELS[key], title=f"final {key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        one_point_note(ax, [a for _, by_alpha in families for a in by_alpha])
    fig.suptitle(
        f"training-set logits at the last epoch against alpha ({_points_note(groups)})", fontsize=9
    )
    return save_figure(fig, path)


MIN_FIT_RUNS = 3  # a line through fewer points of one alpha says nothing


def plot_loss_vs_logit_norm(runs: list[Run], path: Path) -> Path:
    """One point per run, one colour per alpha. A least-squares line is fitted within an alpha
    that has at least MIN_FIT_RUNS runs, never across alphas: alpha moves both the loss and the
    norm, so one line through the clusters would show that, not how loss follows the norm."""
    by_alpha: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        if r.final.get("logit_norm") is not None and r.final.get("train_loss") is not None:
            by_alpha[float(r.config.get("alpha", 1.0))].append(
                (r.final["logit_norm"], r.final["train_loss"])
            )
    fig, ax = new_figure(figsize=(6.4, 4.4))
    fitted = False
    for i, (alpha, pts) in enumerate(sorted(by_alpha.items(), reverse=True)):
        x, y = map(np.array, zip(*pts))
        colour = _colour(i, alpha)
        ax.scatter(x, y, color=colour, label=f"alpha={alpha:g} ({len(pts)} runs)")
        if len(pts) >= MIN_FIT_RUNS and np.ptp(x) > 0:
            slope, icpt = np.polyfit(x, y, 1)
            corr = f"r = {np.corrcoef(x, y)[0, 1]:.2f}" if np.ptp(y) > 0 else "loss constant"
            xs = np.linspace(x.min(), x.max(), 20)
            ax.plot(
                xs,
                slope * xs + icpt,
                "--",
                color=colour,
                lw=1,
                label=f"fit within alpha={alpha:g}: {corr}",
            )
            fitted = True
    note = (
        "dashed: least-squares fit within one alpha"
        if fitted
        else f"no line: a fit needs {MIN_FIT_RUNS}+ runs of one alpha"
    )
    ax.set(
        xlabel="final mean L2 norm of the logits (train)",
        ylabel="final train cross-entropy",
        title=f"loss against logit norm, one point per run\n{note}; none across alphas "
        "(alpha moves both)",
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    if by_alpha:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_filter_norms(run: Run, data: dict[str, Any], path: Path) -> Path:
    layers = list(data["conv"])
    threshold = float(run.config.get("monitor", {}).get("dead_filter_norm", 1e-3))
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = new_figure(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    steps = data["steps"]
    zeroed_total = 0
    for ax, name in zip(axes.flat, layers):
        norms = data["conv"][name]  # (T, filters)
        zeroed = int((norms[-1] < threshold).sum())
        zeroed_total += zeroed
        ax.plot(steps, norms, lw=0.6, alpha=0.7)
        ax.set_title(f"{name}: {zeroed}/{norms.shape[1]} zeroed", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("filter weight L2 norm", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.suptitle(
        f"per-filter L2 norm, {run.path.name} (alpha={run.config.get('alpha')}): "
        f"{zeroed_total} filters below {threshold:g}",
        fontsize=9,
    )
    return save_figure(fig, path)


def plot_pooled_features(run: Run, data: dict[str, Any], path: Path) -> Path:
    pooled = data["pooled"]  # (T, channels)
    fig, (a, b) = new_figure(1, 2, figsize=(10, 3.8))
    a.plot(data["steps"][: len(pooled)], pooled, lw=0.5, alpha=0.6)
    a.set(
        xlabel="step", ylabel="RMS over the batch", title="per-channel norm of the pooled features"
    )
    b.bar(range(pooled.shape[1]), np.sort(pooled[-1])[::-1], width=1.0)
    b.set(
        xlabel="channel (sorted)",
        ylabel="RMS over the batch",
        title=f"at the last record ({int((pooled[-1] < 1e-6).sum())} channels at 0)",
    )
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.path.name} (alpha={run.config.get('alpha')})", fontsize=9)
    return save_figure(fig, path)


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
    swept = sorted({float(r.config.get("alpha", 1.0)) for r in runs}, reverse=True)
    written = [plot_transformed_distribution(out / "transformed_distribution.png", swept)]
    for i, (label, by_alpha) in enumerate(families):
        sfx = f"-f{i + 1}" if len(families) > 1 else ""
        written.append(plot_accuracy_loglog(label, by_alpha, out / f"accuracy_loglog{sfx}.png"))
        written.append(plot_loss_curves(label, by_alpha, out / f"loss_curves{sfx}.png"))
        written.append(plot_logit_stats(label, by_alpha, out / f"logit_stats{sfx}.png"))
    written.append(plot_accuracy_vs_alpha(families, out / "accuracy_vs_alpha.png"))
    written.append(plot_logit_stats_vs_alpha(families, out / "logit_stats_vs_alpha.png"))
    written.append(plot_loss_vs_logit_norm(runs, out / "loss_vs_logit_norm.png"))
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
