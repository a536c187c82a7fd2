"""The paper's results table, from run directories only (each run's summary and its config).

Runs are grouped by setting (every key of the resolved config that changes the result, as
config.py's field metadata says, but the seed); each group gives the mean and the standard deviation
over its seeds of the final train, validation (when recorded) and test accuracy, and its
difference from the alpha = 1 group of the same setting. Where both groups hold the same seeds
(same data order, split and initial weights), the test difference is also paired seed by seed,
with a 95% t-interval over the pairs: seeds vary far more than alphas do, so pairing is what
makes a small difference visible. Only runs with status ``finished`` count; the others are
listed apart.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import machinery_keys
from ..errors import UserError
from ..monitor.checks import identical_runs
from ..rundir import SUMMARY, read_summary
from .stats import paired, t_interval

__all__ = [
    "find_runs",
    "finished_runs",
    "one_run_per_seed",
    "load_runs",
    "results_table",
    "format_table",
    "paired_difference",
    "t_interval",
    "Run",
    "signed",
]

log = logging.getLogger("powergrad")

# Left out of the setting: the keys that do not change what is learned (config.py says which),
# and the seed, over which a setting's runs are the replicates.
MACHINERY = {*machinery_keys(), "seed"}
SHOWN = ("model", "dataset", "sched", "alpha", "label_smoothing", "epochs")


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.summary.get("config", {})

    @property
    def setting(self) -> tuple:
        return tuple(
            sorted(
                (k, json.dumps(v, sort_keys=True))
                for k, v in self.config.items()
                if k not in MACHINERY
            )
        )

    @property
    def final(self) -> dict[str, Any]:
        return self.summary.get("final", {})


@dataclass
class Row:
    setting: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories at or under ``paths`` (a folder holding a summary, rundir.SUMMARY, is a run)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"no such run or sweep folder: {p}")
        if (p / SUMMARY).is_file():
            found.append(p)
        else:
            found += sorted(s.parent for s in p.rglob(SUMMARY))
    if not found:
        raise UserError(f"no runs (folders with {SUMMARY}) under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def load_runs(paths: list[str | Path]) -> tuple[list[Run], list[Run]]:
    """(finished runs, the others: pre-empted, pruned, diverged)."""
    runs = [Run(p, read_summary(p)) for p in find_runs(paths)]
    done = [r for r in runs if r.summary.get("status") == "finished" and r.final]
    return done, [r for r in runs if r not in done]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def paired_difference(
    runs: list[Run], base: list[Run], key: str = "test_acc"
) -> tuple[float, float, float, int] | None:
    """Mean and 95% t-interval (percentage points) of ``key`` in ``runs`` minus ``base`` over the
    seeds both hold, and the number of pairs; None with fewer than two pairs."""
    d = paired(
        {r.config["seed"]: 100 * r.final[key] for r in runs},
        {r.config["seed"]: 100 * r.final[key] for r in base},
    )
    if d is None or len(d.seeds) < 2:
        return None
    return d.mean, d.lo, d.hi, len(d.seeds)


def results_table(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per setting, accuracies in percent; sorted by setting, alpha falling."""
    groups: dict[tuple, Row] = {}
    for r in runs:
        group = groups.setdefault(
            r.setting, Row(setting={k: r.config.get(k) for k, _ in r.setting})
        )
        group.runs.append(r)
    varying = _varying_keys([g.setting for g in groups.values()])
    out: list[dict[str, Any]] = []
    for g in groups.values():
        train = [100 * r.final["train_acc"] for r in g.runs]
        test = [100 * r.final["test_acc"] for r in g.runs]
        (tr, tr_sd), (te, te_sd) = _mean_std(train), _mean_std(test)
        vals = [100 * r.final["val_acc"] for r in g.runs if r.final.get("val_acc") is not None]
        va, va_sd = _mean_std(vals) if len(vals) == len(g.runs) else (None, None)
        row = {k: g.setting.get(k) for k in SHOWN}
        row.update(
            {
                "other": " ".join(f"{k}={g.setting.get(k)}" for k in varying),
                "seeds": len(g.runs),
                "train_acc": tr,
                "train_acc_std": tr_sd,
                "val_acc": va,
                "val_acc_std": va_sd,
                "test_acc": te,
                "test_acc_std": te_sd,
                "gap": tr - te,
                "train_loss": statistics.fmean(r.final["train_loss"] for r in g.runs),
                "runs": [str(r.path) for r in g.runs],
                "_baseline": tuple(
                    sorted({**dict(g.runs[0].setting), "alpha": json.dumps(1.0)}.items())
                ),
                "_setting": g.runs[0].setting,
                "_runs": g.runs,
            }
        )
        out.append(row)
    by_setting = {row["_setting"]: row for row in out}
    for row in out:
        base = by_setting.get(row["_baseline"])
        row["d_train"] = row["train_acc"] - base["train_acc"] if base else None
        row["d_test"] = row["test_acc"] - base["test_acc"] if base else None
        pair = paired_difference(row["_runs"], base["_runs"]) if base and base is not row else None
        row["d_test_paired"], row["d_test_lo"], row["d_test_hi"], row["pairs"] = pair or (
            None,
            None,
            None,
            0,
        )
    for row in out:
        del row["_baseline"], row["_setting"], row["_runs"]
    out.sort(
        key=lambda r: (
            r["model"],
            r["dataset"],
            r["sched"],
            r["other"],
            r["label_smoothing"] or 0,
            -r["alpha"],
        )
    )
    return out


def _varying_keys(settings: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for s in settings for k in s} - set(SHOWN))
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]


COLUMNS = [
    ("model", "model"),
    ("dataset", "data set"),
    ("sched", "sched"),
    ("alpha", "alpha"),
    ("label_smoothing", "LS"),
    ("epochs", "epochs"),
    ("seeds", "seeds"),
    ("train_acc", "train %"),
    ("val_acc", "val %"),
    ("test_acc", "test %"),
    ("d_train", "Δ train"),
    ("d_test", "Δ test"),
    ("d_test_paired", "Δ test paired [95% CI]"),
    ("gap", "gap"),
    ("other", "other settings"),
]


def _pm(mean: float, sd: float | None) -> str:
    return f"{mean:.2f} ± {sd:.2f}" if sd is not None else f"{mean:.2f}"


def signed(v: float | None) -> str:
    """A difference in points as every table writes it: +0.87, never -0.00; "-" for none."""
    if v is None:
        return "-"
    return "+0.00" if round(v, 2) == 0 else f"{v:+.2f}"


def format_table(rows: list[dict[str, Any]], fmt: str = "md") -> str:
    """``md``: a Markdown table (mean ± std); ``csv``: one column per number; ``json``."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        keys = [k for k in rows[0] if k != "runs"] if rows else []
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in keys})
        return buf.getvalue()
    if fmt != "md":
        raise UserError(f"--format must be md, csv or json, got {fmt!r}")
    # Columns with nothing in any row (no other settings, no validation split, no pairs) are left out.
    cols = [
        c
        for c in COLUMNS
        if c[0] not in ("other", "val_acc", "d_test_paired") or any(r[c[0]] for r in rows)
    ]
    lines = [
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "|".join(" --- " for _ in cols) + "|",
    ]
    for r in rows:
        cells = []
        for k, _ in cols:
            if k in ("train_acc", "val_acc", "test_acc"):
                cells.append(_pm(r[k], r[f"{k}_std"]) if r[k] is not None else "-")
            elif k == "d_test_paired":
                cells.append(
                    f"{signed(r[k])} [{signed(r['d_test_lo'])}, {signed(r['d_test_hi'])}]"
                    if r[k] is not None
                    else "-"
                )
            elif k in ("d_train", "d_test"):
                cells.append(signed(r[k]))
            elif k == "gap":
                cells.append(f"{r[k]:.2f}")
            else:
                cells.append(
                    "" if r[k] is None else f"{r[k]:g}" if isinstance(r[k], float) else str(r[k])
                )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def identical_run_warnings(runs: list[Run]) -> list[str]:
    """Runs whose per-epoch metrics are identical (seed 002's copied table), from the monitor's
    ``identical_runs`` check (powergrad.monitor.checks)."""
    if len(runs) < 2:
        return []
    return [
        "identical per-epoch metrics: " + ", ".join(map(str, pair))
        for pair in identical_runs([r.path for r in runs])
    ]


def finished_runs(paths: list[str | Path]) -> tuple[list[Run], list[Run], list[str]]:
    """``load_runs``, refused in one line when no run finished: (the finished runs, one per
    setting and seed; the others, which every table leaves out; the repeated seeds left out, as
    warnings). Both kinds of run left out are also logged as warnings."""
    done, others = load_runs(paths)
    if not done:
        raise UserError(
            f"no finished runs under {', '.join(map(str, paths))} ({len(others)} unfinished)"
        )
    if others:
        log.warning(
            "report: %d unfinished run(s) left out (%s)",
            len(others),
            ", ".join(f"{r.path.name}: {r.summary.get('status')}" for r in others[:5]),
        )
    done, repeated = one_run_per_seed(done)
    for note in repeated:
        log.warning("report: %s", note)
    return done, others, repeated


def one_run_per_seed(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """A seed is one replicate: of several runs of one setting and seed (a run copied, or made
    twice in two folders), the first by path counts and the others are left out, each named in
    a warning. Counted twice, they would shrink the standard deviation and the intervals as if
    seeds had been added."""
    first: dict[tuple, Run] = {}
    notes = []
    for r in sorted(runs, key=lambda r: str(r.path)):
        kept = first.setdefault((r.setting, r.config.get("seed")), r)
        if kept is not r:
            notes.append(
                f"{r.path} left out: it repeats the setting and seed {r.config.get('seed')} "
                f"of {kept.path}, which counts"
            )
    kept_ids = {id(r) for r in first.values()}
    return [r for r in runs if id(r) in kept_ids], notes


def report(paths: list[str | Path], fmt: str = "md") -> str:
    """The table for the runs at or under ``paths``, plus warnings (left-out runs, copies)."""
    done, _, _ = finished_runs(paths)
    for w in identical_run_warnings(done):
        log.warning("report: %s", w)
    return format_table(results_table(done), fmt)
