"""`powergrad report DIR --pick KEY`: the fair comparison, each alpha at its own best setting.

For each alpha, the value of KEY (or the combination of values of several keys) with the best
mean validation score over the seeds every value tried shares is picked; test is never looked
at. Then every alpha at its pick is compared with alpha = 1 at its own pick: the paired
difference of test accuracy over the seeds both picks hold, its 95% t-interval and p, Holm's
adjustment over the alphas, and docs/results.md's verdict words (report/stats.py). A pick at the
edge of the values tried is flagged: the best may lie beyond.

Runs are grouped as `report` groups them (every key that changes the result but the seed), less
alpha and the picked keys: each group gets its own picks and comparisons.

`pick_results` returns the data (`PickResult`); `format_pick` renders it as Markdown, CSV or
JSON, so another renderer can start from the same data.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .stats import Paired, holm, paired, verdict
from .tables import Run, finished_runs, signed

__all__ = [
    "Arm",
    "Candidate",
    "Comparison",
    "PickResult",
    "format_pick",
    "load_picks",
    "md_comparisons",
    "md_picks",
    "parse_alphas",
    "parse_seeds",
    "pick_report",
    "pick_results",
    "rows",
]

log = logging.getLogger("powergrad")

# What a pick may be made on, and whether higher is better. Never a test split's number.
PICK_ON = {"val_acc": True, "val_loss": False}
PERCENT = {"val_acc", "test_acc"}


@dataclass
class Candidate:
    """One value (or combination of values) of the picked keys, tried at one alpha."""

    values: tuple[Any, ...]
    val: dict[int, float]  # seed -> the pick's metric (val_acc in percent)
    test: dict[int, float]  # seed -> test accuracy in percent
    runs: list[str]
    score: float = math.nan  # mean of ``val`` over the arm's pick seeds
    # the pick's lead over this value, paired over the pick seeds (None for the pick itself):
    # the pick minus this on val_acc, this minus the pick on val_loss, so positive favours the pick
    val_vs_pick: Paired | None = None
    test_vs_pick: Paired | None = None  # the pick minus this on test: shown, never used to pick


@dataclass
class Arm:
    """One alpha: every value tried, the seeds the pick compared them on, and the pick."""

    alpha: float
    candidates: list[Candidate]
    pick_seeds: tuple[int, ...]
    pick: Candidate
    tied: list[Candidate] = field(default_factory=list)  # as good as the pick on val, not it
    warnings: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    """An alpha at its pick minus alpha = 1 at its pick, test accuracy in points."""

    alpha: float
    diff: Paired | None
    holm_p: float
    verdict: str


@dataclass
class PickResult:
    keys: tuple[str, ...]
    pick_on: str
    setting: str  # what sets this group apart from the others ("" when there is one group)
    arms: list[Arm]  # alpha falling
    comparisons: list[Comparison]  # one per alpha other than 1, alpha falling
    warnings: list[str]

    def arm(self, alpha: float) -> Arm | None:
        return next((a for a in self.arms if a.alpha == alpha), None)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``0-9``, ``0,1,2``, ``10-19,25``: the seeds named, sorted."""
    seeds: set[int] = set()
    for part in filter(None, text.replace(" ", ",").split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UserError(f"seeds: expected numbers and ranges such as 0-9,12; got {text!r}")
        lo, hi = int(m[1]), int(m[2] or m[1])
        seeds.update(range(lo, hi + 1))
    if not seeds:
        raise UserError(f"seeds: none named in {text!r}")
    return tuple(sorted(seeds))


def parse_alphas(text: str) -> tuple[float, ...]:
    """``1,0.5``: the alphas to compare; 1, the reference, must be among them."""
    try:
        alphas = tuple(float(a) for a in text.replace(" ", ",").split(",") if a)
    except ValueError:
        raise UserError(f"--alphas: expected numbers such as 1,0.5; got {text!r}") from None
    if 1.0 not in alphas:
        raise UserError(
            f"--alphas {text}: alpha 1 is the reference every alpha is compared with; name it"
        )
    return alphas


def _only_alphas(runs: list[Run], alphas: tuple[float, ...]) -> list[Run]:
    kept = [r for r in runs if float(r.config["alpha"]) in alphas]
    missing = sorted(set(alphas) - {float(r.config["alpha"]) for r in kept}, reverse=True)
    if missing:
        raise UserError(
            f"--alphas: no finished runs of alpha {', '.join(f'{a:g}' for a in missing)}"
        )
    return kept


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _shown(recorded: str) -> str:
    """A setting's value as the tables write it (0, not 0.0), from its JSON in ``Run.setting``."""
    value = json.loads(recorded)
    return "null" if value is None else _value(value)


def _named(keys: tuple[str, ...], values: tuple[Any, ...]) -> str:
    return " ".join(f"{k} {_value(v)}" for k, v in zip(keys, values))


def _seed_list(seeds: tuple[int, ...]) -> str:
    return f"{len(seeds)} ({', '.join(map(str, seeds))})"


def _check(runs: list[Run], keys: tuple[str, ...], pick_on: str) -> None:
    """Refuse a pick that could see test, or that has nothing to pick."""
    if pick_on not in PICK_ON:
        what = "the test split" if pick_on.startswith("test") else "not a validation metric"
        raise UserError(
            f"report --pick-on {pick_on}: that is {what}; a pick is made on validation only "
            f"({' or '.join(PICK_ON)})"
        )
    recorded = {k for r in runs for k, _ in r.setting}
    for k in keys:
        if k in ("alpha", "seed"):
            role = "what is compared" if k == "alpha" else "what the comparison pairs by"
            raise UserError(f"report --pick {k}: {k} is {role}, not a setting to pick")
        if k not in recorded:
            near = difflib.get_close_matches(k.lower(), sorted(recorded), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise UserError(
                f"report --pick {k}: no run records {k} as a setting (a key that changes the "
                f"result){hint}"
            )
    settings = [dict(r.setting) for r in runs]
    varied = [
        k for k in sorted(recorded - {"alpha", "seed"}) if len({s.get(k) for s in settings}) > 1
    ]
    for k in keys:
        # A key at one value is taken as is (a replication at one setting still compares each
        # alpha with alpha = 1); but when another key varies, the user meant that one.
        if k not in varied and set(varied) - set(keys):
            raise UserError(
                f"report --pick {k}: every run has {k}={_shown(settings[0][k])}, so there is nothing "
                f"to pick; settings that vary here: {', '.join(varied)}"
            )
    for r in runs:
        if r.final.get(pick_on) is None:
            raise UserError(
                f"report --pick: {r.path} has no {pick_on} (trained without a validation split, "
                f"val_fraction=0); the pick is made on validation, never on test"
            )


def _by_group(runs: list[Run], keys: tuple[str, ...]) -> dict[tuple, list[Run]]:
    """Runs by setting less alpha and the picked keys. A key a run's config predates counts as
    null (records of older code lack keys added since, such as ``init_from``)."""
    out: dict[tuple, list[Run]] = {}
    for r in runs:
        rest = tuple((k, v) for k, v in r.setting if k != "alpha" and k not in keys and v != "null")
        out.setdefault(rest, []).append(r)
    return out


def _candidates(
    runs: list[Run], keys: tuple[str, ...], pick_on: str
) -> dict[float, list[Candidate]]:
    """Per alpha (falling), its candidates sorted by value, each holding one run per seed."""
    scale = 100.0 if pick_on in PERCENT else 1.0
    found: dict[float, dict[str, Candidate]] = {}
    for r in runs:
        values = tuple(r.config.get(k) for k in keys)
        seed = int(r.config["seed"])
        c = found.setdefault(float(r.config["alpha"]), {}).setdefault(
            json.dumps(values), Candidate(values, {}, {}, [])
        )
        if seed in c.val:
            raise UserError(
                f"report --pick: two runs of one setting and seed {seed}: {c.runs[list(c.val).index(seed)]} "
                f"and {r.path}; give one of them"
            )
        c.val[seed] = scale * float(r.final[pick_on])
        c.test[seed] = 100.0 * float(r.final["test_acc"])
        c.runs.append(str(r.path))
    return {
        a: sorted(cs.values(), key=lambda c: tuple(map(_sort_key, c.values)))
        for a, cs in sorted(found.items(), reverse=True)
    }


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


def _pick(
    alpha: float,
    cands: list[Candidate],
    keys: tuple[str, ...],
    pick_on: str,
    allowed: tuple[int, ...] | None,
) -> Arm:
    """The candidate with the best mean ``pick_on`` over the seeds every candidate shares."""
    label = f"alpha {alpha:g}"
    pool = [set(c.val) & set(allowed) if allowed else set(c.val) for c in cands]
    left_out = [c for c, s in zip(cands, pool) if not s]
    cands = [c for c, s in zip(cands, pool) if s]
    if not cands:
        raise UserError(f"report --pick: {label} has no run on the seeds named by --pick-seeds")
    shared = tuple(sorted(set.intersection(*[s for s in pool if s])))
    if not shared:
        raise UserError(
            f"report --pick: {label}: the values tried share no seed, so they cannot be compared "
            f"on the same seeds; run them on common seeds or name --pick-seeds"
        )
    higher = PICK_ON[pick_on]
    for c in cands:
        c.score = statistics.fmean(c.val[s] for s in shared)
    best = max(cands, key=lambda c: c.score if higher else -c.score)  # the first of a tie
    tied = [c for c in cands if math.isclose(c.score, best.score, rel_tol=1e-9, abs_tol=1e-9)]
    for c in cands:
        if c is not best:
            sign = 1 if higher else -1
            c.val_vs_pick = paired(
                {s: sign * best.val[s] for s in shared}, {s: sign * c.val[s] for s in shared}
            )
            c.test_vs_pick = paired(
                {s: best.test[s] for s in shared}, {s: c.test[s] for s in shared}
            )
    arm = Arm(alpha, cands, shared, best, tied=tied[1:])
    arm.warnings += [
        f"{label}: {_named(keys, c.values)} has no run on the --pick-seeds: left out of the pick"
        for c in left_out
    ]
    if len(tied) > 1:
        arm.warnings.append(
            f"{label}: {' and '.join(_named(keys, c.values) for c in tied)} tie on mean "
            f"{pick_on} ({best.score:.2f}): {_named(keys, best.values)} taken, the first in the "
            f"table; the data do not choose between them (more seeds, or a larger val split)"
        )
    # A tie's edge warnings: only those that hold whichever tied value is taken.
    edges = [_edge_warnings(label, cands, c, keys) for c in tied]
    arm.warnings += [w for w in edges[0] if all(w in e for e in edges[1:])]
    unused = sorted(set().union(*(s for s in pool)) - set(shared))
    if unused:
        arm.warnings.append(
            f"{label}: picked on seeds {', '.join(map(str, shared))}, the ones every value tried "
            f"shares; seeds {', '.join(map(str, unused))} were not used for the pick"
        )
    return arm


def _edge_warnings(
    label: str, cands: list[Candidate], best: Candidate, keys: tuple[str, ...]
) -> list[str]:
    """Per key, along the line of candidates that agree with the pick on every other key."""
    out = []
    for i, k in enumerate(keys):
        line = [
            c.values[i]
            for c in cands
            if all(c.values[j] == best.values[j] for j in range(len(keys)) if j != i)
        ]
        v = best.values[i]
        if len(line) == 1:
            out.append(f"{label}: {k} {_value(v)} is the only value tried: taken as is, not picked")
            continue
        if not all(_sort_key(x)[0] == 0 for x in line):
            continue  # names (a schedule, a model) have no edge
        tried = ", ".join(_value(x) for x in sorted(line))
        if v == max(line):
            out.append(
                f"{label}: {k} {_value(v)} is the largest tried ({tried}): the best may lie beyond"
            )
        elif v == min(line):
            out.append(
                f"{label}: {k} {_value(v)} is the smallest tried ({tried}): the best may lie beyond"
            )
    return out


def _compare(arms: list[Arm], test_seeds: tuple[int, ...] | None) -> list[Comparison]:
    base = next((a for a in arms if a.alpha == 1.0), None)
    others = [a for a in arms if a.alpha != 1.0]
    if base is None:
        if others:
            raise UserError("report --pick: no alpha = 1 runs to compare the other alphas with")
        return []
    diffs = []
    for a in others:
        mine, ref = a.pick.test, base.pick.test
        if test_seeds:
            mine = {s: x for s, x in mine.items() if s in test_seeds}
        diffs.append(paired(mine, ref))
    adjusted = holm([d.p if d else math.nan for d in diffs])
    return [
        Comparison(a.alpha, d, h, verdict(d, None if math.isnan(h) else h))
        for a, d, h in zip(others, diffs, adjusted)
    ]


def _untestable(c: Comparison) -> str:
    """Why a comparison has no test, or ''."""
    n = len(c.diff.seeds) if c.diff else 0
    if n < 2:
        return f"alpha {c.alpha:g}: {n} seed pair(s) with alpha = 1's pick: no interval"
    if c.diff and math.isnan(c.diff.p):
        return (
            f"alpha {c.alpha:g}: all {n} seed pairs differ by the same {c.diff.mean:+.2f} "
            f"points: no spread to test against (more seeds needed)"
        )
    return ""


def pick_results(
    runs: list[Run],
    keys: tuple[str, ...],
    pick_on: str = "val_acc",
    pick_seeds: tuple[int, ...] | None = None,
    test_seeds: tuple[int, ...] | None = None,
) -> list[PickResult]:
    """One result per group of runs that differ only in alpha, the picked keys and the seed."""
    _check(runs, keys, pick_on)
    have = sorted({int(r.config["seed"]) for r in runs})
    if test_seeds and not set(test_seeds) & set(have):
        raise UserError(
            f"report --test-seeds: no run has seed {', '.join(map(str, test_seeds))}; "
            f"the runs have seeds {', '.join(map(str, have))}"
        )
    groups = _by_group(runs, keys)
    keys_seen = sorted({k for g in groups for k, _ in g})
    varying = [k for k in keys_seen if len({dict(g).get(k) for g in groups}) > 1]
    out = []
    for rest, members in groups.items():
        arms = [
            _pick(a, cs, keys, pick_on, pick_seeds)
            for a, cs in _candidates(members, keys, pick_on).items()
        ]
        comparisons = _compare(arms, test_seeds)
        setting = " ".join(f"{k}={_shown(dict(rest).get(k, 'null'))}" for k in varying)
        warnings = [w for a in arms for w in a.warnings]
        warnings += [w for c in comparisons if (w := _untestable(c))]
        out.append(PickResult(keys, pick_on, setting, arms, comparisons, warnings))
    return out


# ---- rendering -------------------------------------------------------------------------------


def _ci(d: Paired | None) -> str:
    if d is None:
        return "-"
    if math.isnan(d.lo):
        return signed(d.mean)
    if math.isnan(d.p):  # every pair differs alike: a zero-width interval would look precise
        return f"{signed(d.mean)} (every pair alike)"
    return f"{signed(d.mean)} [{signed(d.lo)}, {signed(d.hi)}]"


def _p(p: float) -> str:
    return "-" if math.isnan(p) else f"{p:.2g}"


def _mean_sd(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.2f}"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def _picked(c: Candidate, a: Arm) -> str:
    """The table's word for a candidate: one value tried alone was taken, not picked; a value
    as good on val as the pick is a tie."""
    if any(c is t for t in a.tied):
        return "tie"
    if c is not a.pick:
        return ""
    return "yes" if len(a.candidates) > 1 else "only value"


def md_picks(r: PickResult) -> list[str]:
    keys = list(r.keys)
    unit = " %" if r.pick_on in PERCENT else ""
    lines = [
        f"Picks: for each alpha, the {' and '.join(keys)} with the best mean {r.pick_on} over the "
        f"seeds every value tried shares (test accuracy is shown, never used to pick):",
        "",
        "| alpha | " + " | ".join(keys) + f" | picked | seeds | {r.pick_on}{unit} | test % "
        f"| pick's lead on {r.pick_on} [95% CI] | pick's lead on test % [95% CI] |",
        "|" + "---|" * (len(keys) + 7),
    ]
    for a in r.arms:
        for c in a.candidates:
            val = _mean_sd([c.val[s] for s in a.pick_seeds])
            test = _mean_sd([c.test[s] for s in a.pick_seeds])
            lines.append(
                f"| {a.alpha:g} | "
                + " | ".join(map(_value, c.values))
                + f" | {_picked(c, a)} | {_seed_list(a.pick_seeds)} | {val} "
                f"| {test} | {_ci(c.val_vs_pick)} | {_ci(c.test_vs_pick)} |"
            )
    return lines


def md_comparisons(r: PickResult) -> list[str]:
    keys, base, n = list(r.keys), r.arm(1.0), len(r.comparisons)
    if not n or base is None:
        return []
    at = " ".join(f"{k}={_value(v)}" for k, v in zip(keys, base.pick.values))
    lines = [
        f"Each alpha at its pick against alpha = 1 at its pick ({at}): test accuracy, points, "
        f"paired by seed, 95% t-interval; Holm over the {n} alpha{'s' if n > 1 else ''}:",
        "",
        "| alpha | "
        + " | ".join(keys)
        + f" | seed pairs | Δ test % [95% CI] | p (paired t) | Holm p (family of {n}) | verdict |",
        "|" + "---|" * (len(keys) + 6),
    ]
    for c in r.comparisons:
        arm = r.arm(c.alpha)
        assert arm is not None
        d = c.diff
        lines.append(
            f"| {c.alpha:g} | "
            + " | ".join(map(_value, arm.pick.values))
            + f" | {_seed_list(d.seeds) if d else '0'} | {_ci(d)} "
            f"| {_p(d.p) if d else '-'} | {_p(c.holm_p)} | {c.verdict} |"
        )
    compared = {s for c in r.comparisons if c.diff for s in c.diff.seeds}
    both = sorted(compared & {s for a in r.arms for s in a.pick_seeds})
    if both:
        lines += [
            "",
            f"{'Seeds' if len(both) > 1 else 'Seed'} {', '.join(map(str, both))} served both the "
            f"pick (the validation split) and the comparison (the test split); --test-seeds "
            f"restricts the comparison to fresh seeds.",
        ]
    return lines


def _md_one(r: PickResult) -> str:
    comparisons = md_comparisons(r)
    lines = md_picks(r) + ([""] + comparisons if comparisons else [])
    if r.warnings:
        lines += ["", *(f"- warning: {w}" for w in r.warnings)]
    return "\n".join(lines)


def rows(results: list[PickResult]) -> list[dict[str, Any]]:
    """One flat row per group and alpha: its pick, and its comparison with alpha = 1's pick."""
    out = []
    for r in results:
        by_alpha = {c.alpha: c for c in r.comparisons}
        base = r.arm(1.0)
        for a in r.arms:
            c = by_alpha.get(a.alpha)
            d = c.diff if c else None
            row: dict[str, Any] = {"setting": r.setting, "alpha": a.alpha}
            row.update({k: v for k, v in zip(r.keys, a.pick.values)})
            row.update(
                {
                    "pick_on": r.pick_on,
                    "pick_score": a.pick.score,
                    "pick_seeds": " ".join(map(str, a.pick_seeds)),
                    "values_tried": "; ".join(
                        " ".join(map(_value, x.values)) for x in a.candidates
                    ),
                    "reference": " ".join(map(_value, base.pick.values)) if base and c else None,
                    "seed_pairs": " ".join(map(str, d.seeds)) if d else None,
                    "pairs": len(d.seeds) if d else 0,
                    "d_test": d.mean if d else None,
                    "d_test_lo": d.lo if d and not math.isnan(d.lo) else None,
                    "d_test_hi": d.hi if d and not math.isnan(d.hi) else None,
                    "p": d.p if d and not math.isnan(d.p) else None,
                    "holm_p": c.holm_p if c and not math.isnan(c.holm_p) else None,
                    "verdict": c.verdict if c else None,
                    "warnings": "; ".join(
                        w for w in r.warnings if w.startswith(f"alpha {a.alpha:g}:")
                    ),
                }
            )
            out.append(row)
    return out


def _no_nan(x: Any) -> Any:
    """JSON has no NaN: a number that does not exist (no p-value, no interval) is null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def format_pick(results: list[PickResult], fmt: str = "md") -> str:
    if fmt == "json":
        return json.dumps(_no_nan([asdict(r) for r in results]), indent=2)
    if fmt == "csv":
        table = rows(results)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
        w.writeheader()
        for row in table:
            w.writerow({k: "" if v is None else v for k, v in row.items()})
        return buf.getvalue().rstrip("\n")
    if fmt != "md":
        raise UserError(f"report --pick: --format must be md, csv or json, got {fmt!r}")
    if len(results) == 1:
        return _md_one(results[0])
    return "\n\n".join(f"### {r.setting}\n\n{_md_one(r)}" for r in results)


def load_picks(
    paths: list[str | Path],
    keys: list[str],
    pick_on: str = "val_acc",
    pick_seeds: tuple[int, ...] | None = None,
    test_seeds: tuple[int, ...] | None = None,
    alphas: tuple[float, ...] | None = None,
    warn: bool = False,
) -> list[PickResult]:
    """The runs at or under ``paths``, picked and compared (``pick_results``). ``alphas``: only
    these (the Holm family is the alphas compared), 1 among them. ``warn``: also log the
    warnings (for renderers with no place of their own for them: csv, json, html)."""
    done, _, _ = finished_runs(paths)
    if alphas:
        done = _only_alphas(done, alphas)
    names = tuple(dict.fromkeys(k for key in keys for k in key.split(",") if k))
    results = pick_results(done, names, pick_on, pick_seeds, test_seeds)
    if warn:
        for r in results:
            for w in r.warnings:
                log.warning("report: %s", w)
    return results


def pick_report(
    paths: list[str | Path],
    keys: list[str],
    fmt: str = "md",
    pick_on: str = "val_acc",
    pick_seeds: tuple[int, ...] | None = None,
    test_seeds: tuple[int, ...] | None = None,
    alphas: tuple[float, ...] | None = None,
) -> str:
    """`powergrad report PATH ... --pick KEY` as text (md, csv or json)."""
    results = load_picks(paths, keys, pick_on, pick_seeds, test_seeds, alphas, warn=fmt != "md")
    return format_pick(results, fmt)
