"""The statistics every table and study script uses: paired differences over seeds, their 95%
t-interval and p-value, Holm's adjustment over a family, and the verdict words of
docs/results.md ("How verdicts are worded").

One home: `report` and `report --pick` compute with these, and so do `studies/analyze.py` and
`studies/round2_tables.py`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

__all__ = [
    "PAPER_SMALLEST_GAIN",
    "Paired",
    "holm",
    "no_spread",
    "p_value",
    "paired",
    "t_interval",
    "verdict",
    "verdict_of",
]

# The smallest test-accuracy gain the paper reports, in points (its ImageNet gains are +0.09 to
# +0.73, ../shared/paper-notes.md): an interval wholly below it excludes the paper's effect.
PAPER_SMALLEST_GAIN = 0.1

HOLDS = "holds here"
NOT_DETECTED = "not detected here (effects of the paper's size not excluded)"
CONTRADICTED = "contradicted here (interval excludes the paper's effect)"
NOT_TESTABLE = "not testable here"


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences (NaN bounds with fewer than two)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def p_value(diffs: list[float]) -> float:
    """Two-sided paired t-test p-value of the differences against zero. NaN with fewer than two,
    or when every pair differs by the same amount (no spread to test against: with 360 test
    images, two seeds can both differ by exactly 2 images)."""
    if len(diffs) < 2 or no_spread(diffs):
        return math.nan
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def no_spread(diffs: list[float]) -> bool:
    """Every difference equal, to rounding."""
    return max(diffs) - min(diffs) <= 1e-9 * max(1.0, abs(statistics.fmean(diffs)))


@dataclass(frozen=True)
class Paired:
    """A paired difference over seeds: which seeds paired, the mean, its 95% t-interval and p."""

    seeds: tuple[int, ...]
    mean: float
    lo: float
    hi: float
    p: float

    @property
    def includes_zero(self) -> bool:
        return self.lo <= 0 <= self.hi


def paired(a: dict[int, float], b: dict[int, float]) -> Paired | None:
    """``a`` minus ``b`` over the seeds both hold (values keyed by seed); None without a pair."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    return Paired(seeds, *t_interval(diffs), p_value(diffs))


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment: controls the family-wise error rate over the family given.

    A comparison without a p-value yet (NaN: runs not finished) still counts in the family size,
    so a partial family is adjusted as strictly as the pre-registered whole.
    """
    order = sorted((i for i, p in enumerate(ps) if not math.isnan(p)), key=ps.__getitem__)
    out, running = [math.nan] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def verdict(
    d: Paired | None, holm_p: float | None = None, smallest: float = PAPER_SMALLEST_GAIN
) -> str:
    """docs/results.md's verdict for a difference in points (positive = the paper's side).

    Fewer than two pairs, or pairs that all differ by the same amount, give no test: "not
    testable here". Otherwise `verdict_of` its interval.
    """
    if d is None or math.isnan(d.lo) or math.isnan(d.p):
        return NOT_TESTABLE
    return verdict_of(d.lo, d.hi, holm_p, smallest)


def verdict_of(
    lo: float, hi: float, holm_p: float | None = None, smallest: float = PAPER_SMALLEST_GAIN
) -> str:
    """The verdict words for a 95% interval [lo, hi], in the order the pre-registration
    (section 2c) writes them: "holds here" when it lies above zero (and, in a Holm-adjusted
    family, the adjusted p is below 0.05); "contradicted here" when its upper bound is below the
    paper's smallest effect; otherwise "not detected here (effects of the paper's size not
    excluded)"."""
    if lo > 0 and (holm_p is None or holm_p < 0.05):
        return HOLDS
    if hi < smallest:
        return CONTRADICTED
    return NOT_DETECTED
