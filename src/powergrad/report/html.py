"""A sweep's results on one self-contained HTML page: ``powergrad report DIR --format html``.

For the runs at or under the paths given, the page holds:

- the results table of ``powergrad report``, cell for cell (tables.format_table's markdown), with
  a verdict for each tampered row, worded by the rules of docs/results.md;
- what was run: recipe, the keys that vary, seeds, code version, dates, compute;
- the runs that did not finish;
- the figures of ``powergrad plot`` (figures.make_figures), embedded as base64 PNG.

It opens offline and anywhere: one file, no script, no external style, font or image, and a
Content-Security-Policy that lets the browser load nothing but the page's own styles and data:
images. Every text is escaped. The page is a list of :class:`Table` (any markdown table powergrad
prints, with columns added) and sections, so further tables join it as they are made.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import os
import re
import statistics
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import shared_description
from ..errors import UserError
from ..rundir import CONFIG, SUMMARY
from .figures import make_figures
from .pick import PickResult, md_comparisons, md_picks
from .stats import PAPER_SMALLEST_GAIN, verdict_of
from .tables import (
    MACHINERY,
    Run,
    find_runs,
    finished_runs,
    format_table,
    identical_run_warnings,
    results_table,
)

__all__ = ["Table", "html_report", "write_html_report", "verdict", "markdown_cells", "pick_tables"]


@dataclass
class Table:
    """A table of the page: a markdown table as powergrad prints it (its cells are shown as they
    are), with ``extra`` columns (header -> one cell per row) appended, and a note under it."""

    title: str
    markdown: str
    note: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict)


def markdown_cells(text: str) -> tuple[list[str], list[list[str]]]:
    """A markdown table (``| a | b |`` lines, the second one the rule) -> header, rows."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    header, _rule, *rows = ([c.strip() for c in ln[1:-1].split(" | ")] for ln in lines)
    return header, rows


def verdict(row: dict[str, Any]) -> str:
    """The verdict on the paper's claim (tampering, 0 < alpha < 1, raises test accuracy) that a
    results-table row's paired interval gives, in docs/results.md's words. Each interval is
    read on its own: no allowance for multiplicity (no Holm adjustment) is made here."""
    alpha, lo, hi = row["alpha"], row["d_test_lo"], row["d_test_hi"]
    if alpha == 1:
        return "baseline"
    if not 0 < alpha < 1:
        return "outside the paper's range (0 < alpha <= 1)"
    if row["d_test_paired"] is None:
        return "not testable here (no two seeds paired with alpha = 1)"
    return verdict_of(lo, hi)  # each interval on its own: no Holm family here


VERDICT_NOTE = (
    "Verdict, on the paper's claim that tampering raises test accuracy, from the paired 95% "
    'interval (docs/results.md, "How verdicts are worded"): holds here if it lies above zero; '
    f"contradicted here if it lies below +{PAPER_SMALLEST_GAIN:g} points, the paper's smallest "
    "reported gain; not detected here if it holds zero and effects of the paper's size. Each "
    "interval is read on its own, with no allowance for multiplicity, and holds for the setting "
    "and budget of its row."
)


# ----------------------------------------------------------------------------- what was run


def _fmt(v: Any) -> str:
    """A config value as a recipe writes it (true, null, [1, 2])."""
    return v if isinstance(v, str) else json.dumps(v)


def _git_dates(where: Path, *args: str) -> list[str]:
    """Commit dates (UTC) that ``git log ARGS`` lists, where ``where`` lies in a git clone; none
    elsewhere."""
    try:
        out = subprocess.run(
            ["git", "log", "--format=%cd", "--date=format-local:%Y-%m-%d %H:%M UTC", *args],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "TZ": "UTC"},
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.split("\n")[:-1] if out.returncode == 0 else []


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_facts(runs: list[Run], where: Path) -> list[tuple[str, str]]:
    """What was run, as (label, text) pairs: recipe, settings shared, keys that vary, seeds,
    code version, dates, compute."""
    configs = [r.config for r in runs]
    keys = sorted({k for c in configs for k in c} - MACHINERY - {"description"})
    values = {k: list(dict.fromkeys(_fmt(c.get(k)) for c in configs)) for k in keys}
    varying = {k for k, v in values.items() if len(v) > 1} | {"seed"}
    described = list(
        dict.fromkeys(shared_description(c.get("description") or "", varying) for c in configs)
    )
    commits = list(dict.fromkeys(r.summary.get("git_commit") or "not recorded" for r in runs))
    facts = [
        ("recipe", "; ".join(d for d in described if d) or "no description recorded"),
        ("settings shared", " ".join(f"{k}={v[0]}" for k, v in values.items() if len(v) == 1)),
        (
            "keys that vary",
            "; ".join(f"{k}: {', '.join(v)}" for k, v in values.items() if len(v) > 1)
            or "none (one setting)",
        ),
        ("seeds", ", ".join(map(_fmt, sorted({c.get("seed") for c in configs}, key=_order)))),
        ("code version", "; ".join(_commit(c, where) for c in commits)),
        ("dates", _dates(runs, where)),
        ("compute", _compute(runs)),
    ]
    return facts


def _order(v: Any) -> tuple[bool, Any]:
    return (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v))


def _commit(commit: str, where: Path) -> str:
    date = _git_dates(where, "-1", commit, "--") if commit != "not recorded" else []
    return f"{commit[:12]} (committed {date[0]})" if date else commit[:12]


def _dates(runs: list[Run], where: Path) -> str:
    """Run folders record no dates. What does: the times their summaries (SUMMARY) were written
    (the runs' ends, unless the folders were copied or checked out since), and, for records kept
    in git, the commits that added them."""
    times = [(r.path / SUMMARY).stat().st_mtime for r in runs]
    parts = [
        f"{SUMMARY} files written {_utc(min(times))} to {_utc(max(times))} (file times: the "
        "runs' ends, unless the folders were copied or checked out since)"
    ]
    summaries = [str(r.path.resolve() / SUMMARY) for r in runs]
    committed = _git_dates(where, "--", *summaries)
    if committed:
        parts.append(f"records committed to git {min(committed)} to {max(committed)}")
    made = _utc(dt.datetime.now(dt.timezone.utc).timestamp())
    return "; ".join([*parts, f"this page made {made} by powergrad {__version__}"])


def _compute(runs: list[Run]) -> str:
    wall = [float(r.summary["wall_s"]) for r in runs if r.summary.get("wall_s") is not None]
    envs = [r.summary.get("env") or {} for r in runs]
    where = sorted(
        {
            f"{e.get('device', '?')} x{e.get('world_size', 1)}, {e.get('cpu_threads', '?')} "
            f"CPU threads, torch {e.get('torch', '?')}"
            for e in envs
        }
    )
    speed = [float(r.final["train_img_s"]) for r in runs if r.final.get("train_img_s")]
    parts = [f"{len(runs)} runs, {_duration(sum(wall))} in all" if wall else f"{len(runs)} runs"]
    if wall:
        parts.append(f"{_duration(statistics.fmean(wall))} a run")
    if speed:
        parts.append(f"{statistics.fmean(speed):.0f} train images/s (last epoch, mean)")
    return "; ".join(parts + where)


def _duration(seconds: float) -> str:
    """In the unit that shows it: a digits run takes seconds, a CIFAR-10 study hours."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def unfinished(paths: list[str | Path], others: list[Run]) -> list[list[str]]:
    """The runs that did not finish: a summary (SUMMARY) whose status is not ``finished``, a run
    folder (its CONFIG) with no summary yet, and a sweep's points (sweep.json) that never ran."""
    rows = []
    for r in others:
        notes = [d.get("message", "") for d in r.summary.get("diagnostics") or []]
        done = r.summary.get("epochs_done")
        epochs = f"{done} of {r.config.get('epochs', '?')}" if done is not None else "-"
        rows.append([str(r.path), r.summary.get("status") or "?", epochs, "; ".join(notes)])
    seen = {r.path.resolve() for r in others} | {p.resolve() for p in find_runs(paths)}
    for p in map(Path, paths):
        for cfg in sorted(p.rglob(CONFIG)) if p.is_dir() else []:
            if not (cfg.parent / SUMMARY).exists() and cfg.parent.resolve() not in seen:
                seen.add(cfg.parent.resolve())
                rows.append([str(cfg.parent), f"no {SUMMARY}", "-", "running, or stopped"])
        for trial in _sweep_points(p):
            where = Path(trial.get("run_dir") or p / str(trial.get("point")))
            if trial.get("state") not in ("COMPLETE", "PRUNED") and where.resolve() not in seen:
                seen.add(where.resolve())
                rows.append([str(where), trial.get("state", "?"), "-", trial.get("error") or ""])
    return rows


def _sweep_points(folder: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((folder / "sweep.json").read_text()).get("trials", [])
    except (OSError, ValueError, AttributeError):
        return []


# ----------------------------------------------------------------------------- the page


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 84em; padding: 0 1em;
       color: #1b1b1b; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
.wide { overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f2f2f2; } td { white-space: nowrap; }
td.text { text-align: left; white-space: normal; } td.long { min-width: 13em; }
tr:nth-child(even) td { background: #fafafa; }
td.holds { color: #0a6b0a; font-weight: 600; } td.contradicted { color: #a11; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.3em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
.note { color: #555; font-size: 0.88em; max-width: 60em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.85em; }
"""
# Only the page's own style and data: images may load: the page stands alone, offline.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table_html(t: Table) -> str:
    header, rows = markdown_cells(t.markdown)
    if t.extra:
        header = header + list(t.extra)
        rows = [cells + list(more) for cells, more in zip(rows, zip(*t.extra.values()))]
    lines = [f"<h3>{_e(t.title)}</h3>", _grid_html(header, rows)]
    if t.note:
        lines.append(f'<p class="note">{_e(t.note)}</p>')
    return "\n".join(lines)


def _grid_html(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        '<div class="wide"><table><thead><tr>',
        *(f"<th>{_e(h)}</th>" for h in header),
        "</tr></thead><tbody>",
    ]
    lines += ["<tr>" + "".join(_td(c) for c in cells) + "</tr>" for cells in rows]
    return "\n".join([*lines, "</tbody></table></div>"])


NUMBER = re.compile(r"^([+-]?[\d.]+( ± [\d.]+)?( \[[+-][\d.]+, [+-][\d.]+\])?|-|)$")


def _td(cell: str) -> str:
    """A cell: numbers right-aligned, text left, verdicts that decide coloured."""
    kind = "holds" if cell == "holds here" else "contradicted" if cell.startswith("contra") else ""
    text = "" if NUMBER.match(cell) else "text long" if len(cell) > 40 else "text"
    cls = " ".join(c for c in (kind, text) if c)
    return f'<td class="{cls}">{_e(cell)}</td>' if cls else f"<td>{_e(cell)}</td>"


def _figure_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(path.stem)}">'
        f"<figcaption>{_e(path.name)}</figcaption></figure>"
    )


def render_page(
    title: str,
    tables: Iterable[Table],
    facts: list[tuple[str, str]],
    not_finished: list[list[str]],
    figures: Iterable[Path],
    warnings: Iterable[str] = (),
) -> str:
    """The page: title, tables, what was run, the runs that did not finish, figures."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        '<p class="note">Accuracies in percent; mean ± standard deviation over seeds; Δ from '
        "alpha = 1 of the same setting; the paired Δ over the seeds both hold, with its 95% "
        "t-interval (powergrad report).</p>",
        "<h2>Results</h2>",
        *(_table_html(t) for t in tables),
    ]
    parts += [f'<p class="note">warning: {_e(w)}</p>' for w in warnings]
    parts += ["<h2>What was run</h2>", "<dl>"]
    parts += [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts]
    parts += ["</dl>", "<h2>Runs that did not finish</h2>"]
    if not_finished:
        parts.append(_grid_html(["run", "status", "epochs", "why"], not_finished))
    else:
        parts.append("<p>none: every run finished.</p>")
    parts.append("<h2>Figures</h2>")
    parts += [_figure_html(p) for p in figures]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def pick_tables(results: list[PickResult]) -> list[Table]:
    """`report --pick`'s tables (report/pick.py's Markdown, cell for cell), their sentences and
    warnings as notes: the pick on validation, then each alpha against alpha = 1 at their picks."""
    tables = []
    for r in results:
        where = f" ({r.setting})" if len(results) > 1 else ""
        parts = (
            ("the pick on validation", md_picks(r)),
            ("each alpha at its pick against alpha = 1 at its pick, on test", md_comparisons(r)),
        )
        for title, lines in parts:
            if lines:
                prose = " ".join(ln for ln in lines if ln and not ln.startswith("|"))
                tables.append(Table(title + where, "\n".join(lines), prose))
        if r.warnings and tables:
            tables[-1].note += " Warnings: " + "; ".join(r.warnings) + "."
    return tables


def html_report(paths: list[str | Path], tables: Iterable[Table] = ()) -> str:
    """The page for the runs at or under ``paths``; ``tables`` follow the results table (any
    other table of the same runs, as markdown: ``Table(title, text)``)."""
    done, others, repeated = finished_runs(paths)
    rows = results_table(done)
    results = Table(
        "test accuracy against alpha = 1, by setting",
        format_table(rows, "md"),
        VERDICT_NOTE,
        {"verdict": [verdict(r) for r in rows]},
    )
    first = Path(paths[0])
    with tempfile.TemporaryDirectory(prefix="powergrad-report-") as tmp:
        figures = make_figures(paths, tmp)
        return render_page(
            f"powergrad report: {', '.join(map(str, paths))}",
            [results, *tables],
            run_facts(done, first if first.is_dir() else first.parent),
            unfinished(paths, others),
            figures,
            [*repeated, *identical_run_warnings(done)],
        )


def _default_page(paths: list[str | Path]) -> Path:
    """Where the page goes without --out: in the one folder named, never into a run's record."""
    if len(paths) != 1:
        raise UserError(
            "report --format html: several folders are named, so there is no one place for the "
            "page; name it with --out FILE"
        )
    folder = Path(paths[0])
    if (folder / CONFIG).exists() or (folder / SUMMARY).exists():
        raise UserError(
            f"report --format html: {folder} is a run folder, and its files are that run's "
            "record; name the page with --out FILE"
        )
    return folder / "report.html"


def write_html_report(
    paths: list[str | Path], out: str | Path | None = None, tables: Iterable[Table] = ()
) -> Path:
    """Write the page to ``out`` (default: report.html in the one folder named); return its
    path."""
    target = Path(out) if out else _default_page(paths)
    text = html_report(paths, tables)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
    return target
