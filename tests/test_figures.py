"""The figures as a reader sees them: labels, units, notes; and the user's matplotlib backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from powergrad.plots import new_figure, plain_log_ticks
from powergrad.report import figures
from powergrad.rundir import METRIC_COLUMNS


def _fake_run(folder: Path, alpha: float, seed: int, epochs: int = 4, val: bool = True) -> None:
    """A finished run's record: metrics.csv and summary.json, numbers made up but plausible."""
    folder.mkdir(parents=True)
    rows = []
    for e in range(1, epochs + 1):
        acc = 0.5 + 0.1 * e - 0.02 * alpha + 0.005 * seed
        row = {
            "epoch": e,
            "lr": 0.1,
            "train_loss": 1.0 / e + 0.01 * seed,
            "train_acc": acc,
            "test_loss": 1.1 / e,
            "test_acc": acc - 0.05,
            "test_top5": 1.0,
            "gap": 0.05,
            "logit_norm": 10 * e / alpha + seed,
            "logit_mean": 0.01,
            "logit_max": 5.0 * e,
            "logit_var": 2.0 * e,
        }
        if val:
            row.update(val_loss=1.05 / e, val_acc=acc - 0.03)
        rows.append(row)
    lines = [",".join(METRIC_COLUMNS)] + [
        ",".join(str(r.get(k, "")) for k in METRIC_COLUMNS) for r in rows
    ]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    summary = {
        "status": "finished",
        "final": rows[-1],
        "config": {
            "model": "mlp",
            "dataset": "digits",
            "alpha": alpha,
            "seed": seed,
            "epochs": epochs,
        },
    }
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def drawn(monkeypatch):
    """Every figure make_figures draws, by file name, kept open for inspection."""
    kept = {}
    real = figures.save_figure

    def keep(fig, path):
        kept[Path(path).name] = fig
        return real(fig, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    return kept


def test_figures_say_what_they_show(tmp_path, drawn):
    for alpha in (1.0, 0.5):
        for seed in range(3):
            _fake_run(tmp_path / "runs" / f"a{alpha}-s{seed}", alpha, seed)
    figures.make_figures([tmp_path / "runs"], tmp_path / "figs")

    ax = drawn["accuracy_loglog.png"].axes[0]
    assert "means over 3 seeds" in ax.get_title()
    labels = [line.get_label() for line in ax.get_lines()]
    assert "alpha=0.5 val" in labels and "alpha=1 test" in labels  # validation is drawn
    assert max(max(line.get_ydata()) for line in ax.get_lines()) > 1  # percent, as `report`
    assert "%" in ax.get_ylabel()

    for name in ("logit_stats.png", "logit_stats_vs_alpha.png"):
        for panel in drawn[name].axes:
            assert panel.get_ylabel() and panel.get_legend() is not None, name

    ax = drawn["accuracy_vs_alpha.png"].axes[0]
    assert "mean over 3 seeds" in ax.get_title() and "%" in ax.get_ylabel()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"train", "val", "test"}

    # 3 runs per alpha: one fitted line within each alpha, none across them.
    ax = drawn["loss_vs_logit_norm.png"].axes[0]
    fits = [line for line in ax.get_lines() if line.get_label().startswith("fit within")]
    assert len(fits) == 2 and "none across alphas" in ax.get_title()

    # The transform's illustration: made-up logits, said so, at the swept alphas only.
    fig = drawn["transformed_distribution.png"]
    assert "illustration" in fig.get_suptitle()
    assert {line.get_label() for line in fig.axes[0].get_lines()} == {"alpha=1", "alpha=0.5"}


def test_one_run_figures_say_a_curve_needs_a_sweep(tmp_path, drawn):
    _fake_run(tmp_path / "run", 1.0, 0, val=False)
    _fake_run(tmp_path / "run2", 0.25, 0, val=False)
    figures.make_figures([tmp_path / "run"], tmp_path / "figs")
    ax = drawn["accuracy_vs_alpha.png"].axes[0]
    assert any("a curve needs a sweep" in t.get_text() for t in ax.texts)
    assert "one run each" in ax.get_title()
    assert not any(
        "val" in line.get_label() for line in drawn["accuracy_loglog.png"].axes[0].get_lines()
    )
    assert "no line" in drawn["loss_vs_logit_norm.png"].axes[0].get_title()

    figures.make_figures([tmp_path / "run", tmp_path / "run2"], tmp_path / "figs2")
    ax = drawn["accuracy_vs_alpha.png"].axes[0]
    assert not any("a curve needs a sweep" in t.get_text() for t in ax.texts)


def test_log_axes_are_labelled_with_plain_numbers():
    fig, ax = new_figure()
    ax.plot([1, 2, 3, 4], [62.0, 90.0, 95.0, 97.0])
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    fig.canvas.draw()
    xs = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    ys = [t.get_text() for t in ax.get_yticklabels() + ax.get_yminorticklabels() if t.get_text()]
    assert xs == ["1", "2", "3", "4"]
    assert ys and all(s.replace(".", "").isdigit() for s in ys), ys  # not 9x10^-1


def test_drawing_leaves_the_users_matplotlib_backend_alone(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, 1.0, 0)
    code = (
        "import matplotlib; matplotlib.use('svg')\n"
        "from powergrad.report.figures import make_figures\n"
        "from powergrad.plots import plot_curves\n"
        f"make_figures([{str(run)!r}]); plot_curves({str(run)!r})\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "svg"
    assert (run / "figures" / "accuracy_loglog.png").is_file() and (
        run / "plots" / "curves.png"
    ).is_file()
