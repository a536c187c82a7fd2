"""Paired statistics for the issue-9 study, from run directories only (summary.json, metrics.csv).

    .venv/bin/python studies/analyze.py results/cifar10-resnet20 [--ls results/cifar10-resnet20-ls0.1]
    .venv/bin/python studies/analyze.py results/cifar10-resnet20-10k --baseline results/cifar10-resnet20-10k-warmup

For one setting (a folder of runs a<alpha>-s<seed>):
- per alpha: mean and std over seeds of final val / test / train accuracy, the gap, the final
  train loss and logit norm (and the dead-filter share when recorded);
- the paired difference of each alpha from alpha = 1 over the same seeds (same data subset, val
  split and initial weights), with a 95% t-interval over the seed pairs;
- the alpha picked on the validation split (highest mean final val accuracy), never on test;
- epochs (and seconds of training) each alpha needs to reach the alpha = 1 run's final test
  accuracy, per seed;
- Pearson correlations: final train loss against logit norm, and logit norm against alpha;
- with ``--ls``: the change of the train-test gap that label smoothing brings, paired per alpha
  and seed;
- with ``--baseline``: a control setting's alpha = 1 runs as the baseline (for example with a
  warm-up), and the control's own difference from this setting's alpha = 1;
- with ``--seeds``: only those seeds (what a subset of the seeds said on its own);
- with ``--compare``: a family of paired comparisons between any two cells (setting and alpha),
  each with its 95% t-interval, paired t-test p-value and Holm-adjusted p-value over the family;
- per setting also: the first epoch per seed (train loss and accuracy), the logit norm relative to
  alpha = 1's, and correlations within each alpha as well as over all runs.
Numbers in percent unless named otherwise. `powergrad report` now gives the per-alpha means, the
validation accuracy and the paired test interval too (the same numbers), and `powergrad report
--pick KEY` the comparison of each alpha at its val-picked setting; the rest is only here. The
statistics (t-intervals, p-values, Holm) are powergrad.report.stats's, as `report` computes them.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

from powergrad.report.stats import holm, p_value, t_interval
from powergrad.report.tables import Run, load_runs
from powergrad.rundir import read_metrics


def by_alpha_seed(path: str, seeds: list[int] | None = None) -> dict[float, dict[int, Run]]:
    done, others = load_runs([path])
    if others:
        print(f"(left out, not finished: {', '.join(r.path.name for r in others)})\n")
    out: dict[float, dict[int, Run]] = defaultdict(dict)
    for r in done:
        if seeds is None or int(r.config["seed"]) in seeds:
            out[float(r.config["alpha"])][int(r.config["seed"])] = r
    return dict(sorted(out.items(), reverse=True))


def mean_sd(xs: list[float], digits: int = 2) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.{digits}f}" if xs else "-"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def fmt_ci(m: float, lo: float, hi: float, digits: int = 2) -> str:
    if math.isnan(lo):
        return f"{m:+.{digits}f}"
    zero = " (includes 0)" if lo <= 0 <= hi else ""
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{zero}"


PERCENT = (
    "test_acc",
    "train_acc",
    "val_acc",
    "gap",
    "dead_filter_share",
)  # fractions shown in percent


def final(r: Run, key: str, scale: float = 100.0) -> float:
    v = r.final.get(key)
    return math.nan if v is None else scale * float(v)


def accuracy_table(runs: dict[float, dict[int, Run]]) -> tuple[str, float]:
    """The per-alpha table and the alpha picked on val."""
    base = runs.get(1.0, {})
    dead = any(
        r.final.get("dead_filter_share") is not None for a in runs.values() for r in a.values()
    )
    head = [
        "alpha",
        "seeds",
        "val %",
        "test %",
        "Δ test vs α=1, 95% CI",
        "train %",
        "Δ train vs α=1",
        "gap (train-test)",
        "train loss",
        "test loss",
        "logit norm",
    ] + (["dead filters %"] if dead else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    val_means = {}
    for alpha, seeds in runs.items():
        rs = list(seeds.values())
        common = sorted(set(seeds) & set(base))
        d_test = [final(seeds[s], "test_acc") - final(base[s], "test_acc") for s in common]
        d_train = [final(seeds[s], "train_acc") - final(base[s], "train_acc") for s in common]
        val = [final(r, "val_acc") for r in rs]
        val_means[alpha] = statistics.fmean(val)
        cells = [
            f"{alpha:g}",
            str(len(rs)),
            mean_sd(val),
            mean_sd([final(r, "test_acc") for r in rs]),
            "baseline" if alpha == 1.0 else (fmt_ci(*t_interval(d_test)) if d_test else "-"),
            mean_sd([final(r, "train_acc") for r in rs]),
            "baseline" if alpha == 1.0 else (fmt_ci(*t_interval(d_train)) if d_train else "-"),
            mean_sd([final(r, "gap") for r in rs]),
            mean_sd([final(r, "train_loss", 1.0) for r in rs], 4),
            mean_sd([final(r, "test_loss", 1.0) for r in rs], 3),
            mean_sd([final(r, "logit_norm", 1.0) for r in rs]),
        ]
        if dead:
            cells.append(mean_sd([final(r, "dead_filter_share") for r in rs]))
        lines.append("| " + " | ".join(cells) + " |")
    picked = max(val_means, key=val_means.get)
    return "\n".join(lines), picked


def epochs_to_target(runs: dict[float, dict[int, Run]]) -> str:
    """Per seed: first epoch at which each alpha's test accuracy reaches the alpha = 1 run's final."""
    base = runs.get(1.0, {})
    head = [
        "alpha",
        "epochs to α=1's final test acc, per seed",
        "mean epochs",
        "mean train seconds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for alpha, seeds in runs.items():
        per_seed, secs = [], []
        for s in sorted(set(seeds) & set(base)):
            target = base[s].final["test_acc"]
            rows = read_metrics(seeds[s].path)
            hit = next((i for i, row in enumerate(rows) if float(row["test_acc"]) >= target), None)
            if hit is None:
                per_seed.append("never")
                continue
            per_seed.append(str(int(rows[hit]["epoch"])))
            secs.append(sum(float(row["epoch_s"]) for row in rows[: hit + 1]))
        reached = [int(e) for e in per_seed if e != "never"]
        mean_e = (
            f"{statistics.fmean(reached):.2f} ({len(reached)}/{len(per_seed)} reached)"
            if reached
            else "never"
        )
        mean_s = f"{statistics.fmean(secs):.0f}" if secs else "-"
        lines.append(f"| {alpha:g} | {', '.join(per_seed)} | {mean_e} | {mean_s} |")
    return "\n".join(lines)


def correlations(runs: dict[float, dict[int, Run]]) -> str:
    rs = [r for seeds in runs.values() for r in seeds.values()]
    loss = [final(r, "train_loss", 1.0) for r in rs]
    norm = [final(r, "logit_norm", 1.0) for r in rs]
    alpha = [float(r.config["alpha"]) for r in rs]
    test_loss = [final(r, "test_loss", 1.0) for r in rs]
    out = []
    for name, x, y in (
        ("final train loss vs logit norm", norm, loss),
        ("final test loss vs logit norm", norm, test_loss),
        ("logit norm vs alpha", alpha, norm),
        ("final train loss vs alpha", alpha, loss),
    ):
        r, p = stats.pearsonr(x, y)
        out.append(f"- {name}: Pearson r = {r:+.3f} (p = {p:.2g}, n = {len(rs)} runs)")
    return "\n".join(out)


def within_alpha(runs: dict[float, dict[int, Run]]) -> str:
    """Train loss vs logit norm inside each alpha: does the over-all r come from between alphas?"""
    out = []
    for alpha, seeds in runs.items():
        rs = list(seeds.values())
        if len(rs) < 3:
            continue
        r, _ = stats.pearsonr(
            [final(x, "logit_norm", 1.0) for x in rs], [final(x, "train_loss", 1.0) for x in rs]
        )
        out.append(f"alpha {alpha:g}: r = {r:+.2f} (n = {len(rs)})")
    text = "- final train loss vs logit norm within one alpha: " + "; ".join(out)
    means = [
        (
            statistics.fmean(final(x, "logit_norm", 1.0) for x in seeds.values()),
            statistics.fmean(final(x, "train_loss", 1.0) for x in seeds.values()),
        )
        for seeds in runs.values()
    ]
    if len(means) > 3:  # Fisher's z needs n > 3
        r, _ = stats.pearsonr(*zip(*means))
        half = stats.norm.ppf(0.975) / math.sqrt(len(means) - 3)
        lo, hi = math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)
        text += (
            f"\n- between alphas (one point per alpha: mean final train loss vs mean logit norm): "
            f"r = {r:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}] (Fisher z, n = {len(means)} alphas)"
        )
    return text


def norm_ratios(runs: dict[float, dict[int, Run]]) -> str:
    """Mean logit norm of each alpha over alpha = 1's, next to 1/alpha."""
    base = runs.get(1.0)
    if not base:
        return "- logit norm relative to alpha = 1: no alpha = 1 runs"
    ref = statistics.fmean(final(r, "logit_norm", 1.0) for r in base.values())
    parts = [
        f"alpha {a:g}: {statistics.fmean(final(r, 'logit_norm', 1.0) for r in seeds.values()) / ref:.1f}x "
        f"(1/alpha = {1 / a:g})"
        for a, seeds in runs.items()
        if a != 1.0
    ]
    return "- mean logit norm relative to alpha = 1's: " + "; ".join(parts)


def first_epoch(runs: dict[float, dict[int, Run]]) -> str:
    """Epoch 1 per seed: the logged train loss is CE on the raw logits z, which tampering makes about
    1/alpha larger, so for alpha < 1 it is no yardstick of a lost start; train accuracy is."""
    head = [
        "alpha",
        "seeds",
        "epoch-1 train loss, per seed",
        "epoch-1 train acc %, per seed",
        "epoch-1 test acc %, per seed",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for alpha, seeds in runs.items():
        rows = [read_metrics(seeds[s].path)[0] for s in sorted(seeds)]
        lines.append(
            f"| {alpha:g} | {', '.join(map(str, sorted(seeds)))} | "
            + ", ".join(f"{float(r['train_loss']):.2f}" for r in rows)
            + " | "
            + ", ".join(f"{100 * float(r['train_acc']):.1f}" for r in rows)
            + " | "
            + ", ".join(f"{100 * float(r['test_acc']):.1f}" for r in rows)
            + " |"
        )
    return "\n".join(lines)


def per_seed(runs: dict[float, dict[int, Run]], key: str = "test_acc") -> str:
    """Final value of `key` (percent) for every seed, one row per alpha."""
    seeds = sorted({s for a in runs.values() for s in a})
    lines = [
        "| alpha | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for alpha, runs_of in runs.items():
        cells = [f"{final(runs_of[s], key):.2f}" if s in runs_of else "-" for s in seeds]
        lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(spec: str) -> tuple[str, float]:
    """'results/SETTING@ALPHA' -> (folder, alpha)."""
    path, _, alpha = spec.rpartition("@")
    if not path:
        raise SystemExit(f"analyze.py: expected FOLDER@ALPHA, got {spec!r}")
    return path, float(alpha)


def compare(specs: list[str], metric: str, seeds: list[int] | None) -> str:
    """Each spec 'A@alpha,B@alpha': the paired difference A − B over their common seeds, one family."""
    rows = []
    for spec in specs:
        (pa, aa), (pb, ab) = (cell(x) for x in spec.split(","))
        a, b = (
            by_alpha_seed(p, seeds).get(x, {}) if Path(p).is_dir() else {}
            for p, x in ((pa, aa), (pb, ab))
        )
        common = sorted(set(a) & set(b))
        scale = 100.0 if metric in PERCENT else 1.0
        d = [final(a[s], metric, scale) - final(b[s], metric, scale) for s in common]
        p = p_value(d)
        rows.append((f"{Path(pa).name} α={aa:g}", f"{Path(pb).name} α={ab:g}", common, d, p))
    adjusted = holm([r[4] for r in rows])
    unit = "points" if metric in PERCENT else "raw"
    head = [
        "#",
        "cell",
        "reference",
        "seed pairs",
        f"Δ {metric} ({unit}), 95% CI",
        "p (paired t)",
        f"Holm p (family of {len(rows)})",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, ((name, ref, common, d, p), h) in enumerate(zip(rows, adjusted), 1):
        ci = (
            fmt_ci(*t_interval(d), digits=4 if "loss" in metric else 2) if d else "not run yet"
        )  # digits' losses ~0.01
        seeds_text = f"{len(common)} ({', '.join(map(str, common))})" if common else "0"
        p_text, h_text = ("-", "-") if math.isnan(p) else (f"{p:.2g}", f"{h:.2g}")
        lines.append(f"| {k} | {name} | {ref} | {seeds_text} | {ci} | {p_text} | {h_text} |")
    return "\n".join(lines)


def ls_gap(runs: dict[float, dict[int, Run]], ls_runs: dict[float, dict[int, Run]]) -> str:
    head = [
        "alpha",
        "seed pairs",
        "gap without LS",
        "gap with LS 0.1",
        "Δ gap (LS − none), 95% CI",
        "Δ test (LS − none), 95% CI",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for alpha, seeds in runs.items():
        other = ls_runs.get(alpha, {})
        common = sorted(set(seeds) & set(other))
        if not common:
            continue
        dg = [final(other[s], "gap") - final(seeds[s], "gap") for s in common]
        dt = [final(other[s], "test_acc") - final(seeds[s], "test_acc") for s in common]
        lines.append(
            f"| {alpha:g} | {len(common)} | {mean_sd([final(seeds[s], 'gap') for s in common])} | "
            f"{mean_sd([final(other[s], 'gap') for s in common])} | {fmt_ci(*t_interval(dg))} | {fmt_ci(*t_interval(dt))} |"
        )
    return "\n".join(lines)


def compute(paths: list[str]) -> str:
    """Wall-clock time of every run (summary.json wall_s), one row per setting and thread count
    (a setting's runs can come from sessions with different thread counts)."""
    lines = [
        "| setting | threads | runs | wall-clock hours | run minutes (min / median / max) | CPU-hours (wall x threads) |",
        "|---|---|---|---|---|---|",
    ]
    total = 0.0
    for path in paths:
        done, others = load_runs([path])
        by_threads: dict[int, list[float]] = defaultdict(list)
        for r in done + others:
            by_threads[r.summary.get("env", {}).get("cpu_threads") or 1].append(
                float(r.summary.get("wall_s", 0.0))
            )
        for threads, walls in sorted(by_threads.items(), reverse=True):
            mins = sorted(w / 60 for w in walls)
            cpu = sum(walls) * threads / 3600
            total += cpu
            lines.append(
                f"| {path} | {threads} | {len(walls)} | {sum(walls) / 3600:.2f} | "
                f"{mins[0]:.1f} / {statistics.median(mins):.1f} / {mins[-1]:.1f} | {cpu:.2f} |"
            )
    lines.append(f"| total | | | | | {total:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "setting", nargs="*", help="a folder of runs (one setting, several alphas and seeds)"
    )
    ap.add_argument("--ls", help="the same setting with label smoothing, for the gap comparison")
    ap.add_argument(
        "--compute", action="store_true", help="only the compute spent by the settings given"
    )
    ap.add_argument("--seeds", type=int, nargs="+", help="only these seeds")
    ap.add_argument(
        "--compare",
        nargs="+",
        metavar="A@ALPHA,B@ALPHA",
        help="paired differences A − B (one family, Holm-adjusted); the settings are then ignored",
    )
    ap.add_argument(
        "--metric",
        default="test_acc",
        help="summary.json final key for --compare (test_acc, train_acc, gap)",
    )
    ap.add_argument(
        "--baseline",
        help="a control setting whose alpha = 1 runs replace this setting's as the "
        "baseline of every paired column (same seeds)",
    )
    args = ap.parse_args()
    if args.compare:
        print(compare(args.compare, args.metric, args.seeds))
        return
    if args.compute:
        print(compute(args.setting))
        return
    if len(args.setting) != 1:
        ap.error("one setting at a time (several only with --compute)")
    args.setting = args.setting[0]
    runs = by_alpha_seed(args.setting, args.seeds)
    against = "alpha = 1"
    if args.baseline:
        own, control = runs.get(1.0, {}), by_alpha_seed(args.baseline, args.seeds).get(1.0, {})
        common = sorted(set(own) & set(control))
        d = [final(control[s], "test_acc") - final(own[s], "test_acc") for s in common]
        print(
            f"Control {args.baseline} (alpha = 1) against this setting's alpha = 1, test accuracy, "
            f"{len(common)} seed pairs: {fmt_ci(*t_interval(d)) if d else '-'}; per seed "
            f"{', '.join(f'{s}: {x:+.2f}' for s, x in zip(common, d))}\n"
        )
        runs = {**runs, 1.0: control}
        against = f"the control's alpha = 1 ({args.baseline})"
    table, picked = accuracy_table(runs)
    print(
        f"### {args.setting}\n\nFinal epoch; mean ± std over seeds; Δ = paired difference from "
        f"{against} over the same seeds, 95% t-interval.\n\n{table}\n"
    )
    print(f"alpha picked on val (highest mean final val accuracy): {picked:g}\n")
    print(
        f"Epochs to reach the alpha = 1 run's final test accuracy (same seed):\n\n{epochs_to_target(runs)}\n"
    )
    print(f"Final test accuracy per seed:\n\n{per_seed(runs)}\n")
    print(
        f"First epoch (the logged train loss is CE on z, about 1/alpha larger for alpha < 1):\n\n{first_epoch(runs)}\n"
    )
    print(
        f"Logit norm and correlations (p-values treat runs as independent; runs of one seed share "
        f"data and initial weights):\n\n{norm_ratios(runs)}\n{within_alpha(runs)}\n{correlations(runs)}\n"
    )
    if args.ls:
        print(
            f"Label smoothing 0.1 and the gap ({args.ls} against {args.setting}, same seeds):\n\n"
            f"{ls_gap(runs, by_alpha_seed(args.ls, args.seeds))}\n"
        )


if __name__ == "__main__":
    main()
