"""docs/results.md quotes its tables from the committed run records, not by hand.

Every table under a "`powergrad report results/...`" line is regenerated from results/ and must match
the doc line for line; so must the paired table of `studies/analyze.py ... --baseline ...`. A run
added to a setting without regenerating its table, or a figure typed by hand, fails here.
"""

from __future__ import annotations

import glob
import importlib.util
import re
from pathlib import Path

import pytest

from powergrad.cli import main
from powergrad.report.tables import report

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"


def table_after(lines: list[str], i: int) -> str:
    """The markdown table that starts at the first '|' line after line i."""
    j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("|"))
    end = next((k for k in range(j, len(lines)) if not lines[k].startswith("|")), len(lines))
    return "\n".join(lines[j:end])


def doc_tables(command: re.Pattern[str]) -> list[tuple[re.Match[str], str]]:
    lines = DOC.read_text().splitlines()
    return [
        (m, table_after(lines, i)) for i, line in enumerate(lines) if (m := command.fullmatch(line))
    ]


def load_analyze():
    spec = importlib.util.spec_from_file_location("analyze", ROOT / "studies" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_report_table_in_the_doc_is_what_report_prints(monkeypatch):
    monkeypatch.chdir(ROOT)  # the doc's commands name folders relative to the repository root
    tables = doc_tables(re.compile(r"`powergrad report (results/[\w.-]+)`"))
    assert len(tables) >= 5
    for m, doc_table in tables:
        assert report([m.group(1)]) == doc_table, m.group(0)


def test_every_pick_table_in_the_doc_is_what_report_pick_prints(monkeypatch, capsys):
    """A line that is a `powergrad report ... --pick ...` command: the first table after it is one
    of those the command prints, as printed (a shell glob is expanded as a shell would)."""
    monkeypatch.chdir(ROOT)
    command = re.compile(r"`powergrad report ((?:results/[\w.*-]+ )+--pick .+)`:?")
    lines = DOC.read_text().splitlines()
    checked = 0
    for i, line in enumerate(lines):
        if (m := command.fullmatch(line)) is None:
            continue
        args = [a for w in m.group(1).split() for a in (sorted(glob.glob(w)) if "*" in w else [w])]
        assert main(["report", *args]) == 0, line
        assert table_after(lines, i) in capsys.readouterr().out, line
        checked += 1
    assert checked >= 2  # 2h's stage-1 and extension tables


def test_the_paired_table_against_the_warm_up_control_is_what_analyze_prints(monkeypatch):
    monkeypatch.chdir(ROOT)
    analyze = load_analyze()
    command = re.compile(
        r"`\.venv/bin/python studies/analyze\.py (results/[\w.-]+) --baseline (results/[\w.-]+)`"
    )
    tables = doc_tables(command)
    if not tables:
        pytest.fail("docs/results.md has no `studies/analyze.py ... --baseline ...` table")
    for m, doc_table in tables:
        runs = analyze.by_alpha_seed(m.group(1))
        runs = {**runs, 1.0: analyze.by_alpha_seed(m.group(2))[1.0]}
        table, _ = analyze.accuracy_table(runs)
        assert table == doc_table, m.group(0)


def test_holm_adjusts_step_down_and_counts_comparisons_not_yet_run():
    holm = load_analyze().holm
    # sorted p 0.01, 0.03, 0.04, 0.5 in a family of 5: 5 x 0.01, 4 x 0.03, max(3 x 0.04, previous), 2 x 0.5
    adjusted = holm([0.01, 0.04, 0.03, float("nan"), 0.5])
    assert adjusted[:3] == pytest.approx([0.05, 0.12, 0.12]) and adjusted[4] == 1.0
    assert adjusted[3] != adjusted[3]  # NaN stays NaN
