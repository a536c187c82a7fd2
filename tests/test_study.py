"""studies/study.py on top of the sweep (powergrad.sweep.run_points): the records' layout and run
order, finished and diverged records kept by a second invocation, an unfinished run redone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import torch

from powergrad.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = {"epochs": 1, "train_subset": 100}
# What a run's folder keeps once stripped: no checkpoints, log, events or plots.
RECORD = {"config.yaml", "metrics.csv", "summary.json"}


def load_study() -> ModuleType:
    spec = importlib.util.spec_from_file_location("study", ROOT / "studies" / "study.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_settings_share_one_seed_major_queue(monkeypatch):
    study = load_study()
    settings = {
        "a": ("digits", {}, [1.0, 0.5], [0, 1]),
        "x": ("digits", {"lr": 0.1}, [1.0], [0, 1]),
        "y": ("digits", {"lr": 0.2}, [1.0], [1]),
    }
    monkeypatch.setattr(study, "SETTINGS", settings)
    monkeypatch.setattr(study, "INTERLEAVED", [["x", "y"]])
    root = Path("/results")
    names = [[str(out.relative_to(root)) for _, out, _ in g] for g in study.queue(None, root)]
    assert names == [
        ["a/a1-s0", "a/a0.5-s0", "a/a1-s1", "a/a0.5-s1"],
        ["x/a1-s0", "x/a1-s1", "y/a1-s1"],
    ]
    assert [len(g) for g in study.queue(["y"], root)] == [1]


def test_study_runs_as_a_sweep_keeps_finished_records_and_redoes_an_unfinished_run(
    tmp_path, monkeypatch
):
    study = load_study()
    monkeypatch.setattr(study, "SETTINGS", {"tiny": ("digits", TINY, [1.0, 0.5], [0, 1])})
    monkeypatch.setattr(study, "INTERLEAVED", [])
    args = ["--results", str(tmp_path), "--threads", str(torch.get_num_threads())]
    study.main(args)

    runs = {p.name: p for p in (tmp_path / "tiny").iterdir()}
    assert set(runs) == {"a1-s0", "a0.5-s0", "a1-s1", "a0.5-s1"}
    assert all({f.name for f in run.iterdir()} == RECORD for run in runs.values())
    summaries = {n: json.loads((r / "summary.json").read_text()) for n, r in runs.items()}
    assert all(s["status"] == "finished" for s in summaries.values())
    assert {n: (s["config"]["alpha"], s["config"]["seed"]) for n, s in summaries.items()} == {
        "a1-s0": (1.0, 0),
        "a0.5-s0": (0.5, 0),
        "a1-s1": (1.0, 1),
        "a0.5-s1": (0.5, 1),
    }
    ended = sorted(runs, key=lambda n: (runs[n] / "summary.json").stat().st_mtime_ns)
    assert ended == ["a1-s0", "a0.5-s0", "a1-s1", "a0.5-s1"]  # seed-major

    diverged = runs["a1-s1"] / "summary.json"
    diverged.write_text(json.dumps({**summaries["a1-s1"], "status": "diverged"}))
    (runs["a0.5-s0"] / "summary.json").unlink()  # a run killed before it ended
    kept = {n: (r / "summary.json").stat().st_mtime_ns for n, r in runs.items() if n != "a0.5-s0"}
    study.main(args)

    assert {n: (runs[n] / "summary.json").stat().st_mtime_ns for n in kept} == kept
    redone = runs["a0.5-s0"]
    assert json.loads((redone / "summary.json").read_text())["status"] == "finished"
    assert len(read_metrics(redone)) == 1 and {f.name for f in redone.iterdir()} == RECORD
