"""Every benchmark runs end to end at tiny sizes and prints its JSON lines (so they cannot rot).

Not timed tests: nothing here checks a speed.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_bench(monkeypatch, capsys, tmp_path):
    """Run benchmarks/SCRIPT in this process (no second torch import) and parse its JSON lines."""
    monkeypatch.setenv(
        "POWERGRAD_CACHE", str(tmp_path / "cache")
    )  # restored after, whatever the script sets
    monkeypatch.chdir(tmp_path)  # run directories of the trainer land here

    def run(script: str, *args: str) -> list[dict]:
        path = ROOT / "benchmarks" / script
        monkeypatch.setattr(sys, "argv", [str(path), *args])
        capsys.readouterr()
        runpy.run_path(str(path), run_name="__main__")
        return [
            json.loads(line)
            for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")
        ]

    return run


@pytest.fixture
def jpeg_folder(tmp_path: Path) -> Path:
    """train/ and test/ with 2 classes of 32x32 JPEGs, 16 and 4 per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 4)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i:04d}.jpg", quality=75)
    return tmp_path


def test_loss_benchmark(run_bench):
    rows = run_bench("loss.py", "--sizes", "64x10,8x3", "--rounds", "2", "--threads", "1,2")
    assert {r["impl"] for r in rows} == {"power_grad", "power_grad_pytorch_ops", "reference_hook"}
    cases = {(r["n"], r["c"], r["label_smoothing"], r["target"], r["threads"]) for r in rows}
    assert len(cases) == 2 * 2 * 2 * 2 == len(rows) / 3  # sizes x smoothing x targets x threads
    first = rows[0]  # the default case first: no label smoothing, index targets
    assert (first["n"], first["label_smoothing"], first["target"], first["threads"]) == (
        64,
        0.0,
        "index",
        1,
    )
    assert all(r["ratio"] > 0 and len(r["load_average"]) == 3 for r in rows)


def test_trainer_overhead_benchmark(run_bench):
    rows = run_bench(
        "trainer_overhead.py",
        "--model",
        "mlp",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--epochs",
        "2",
        "--rounds",
        "1",
        "--alphas",
        "1,0.25",
    )
    ratios = [r for r in rows if r["benchmark"] == "trainer_overhead"]
    assert [r["impl"] for r in ratios] == ["trainer_alpha1", "trainer_alpha0.25"]
    assert all(r["ratio"] > 0 and r["bare_steps_per_s"] > 0 for r in ratios)
    assert [r["seconds_per_step"] > 0 for r in rows if r["benchmark"] == "trainer_bookkeeping"] == [
        True
    ]


def test_data_pipeline_benchmark(run_bench, jpeg_folder):
    rows = run_bench(
        "data_pipeline.py",
        "--data",
        str(jpeg_folder),
        "--workers",
        "0",
        "--batch-size",
        "8",
        "--rounds",
        "1",
    )
    by = {r["impl"]: r for r in rows}
    assert by["powergrad_cached"]["ratio"] > 0
    firsts = [r for r in rows if r["impl"] == "powergrad_first_epoch"]
    assert [r["jpeg_decoder"] for r in firsts] == ["pil", "torchvision"]
    assert all(r["images"] == 32 for r in firsts)  # 2 classes x 16, batch 8: 4 full batches


def test_time_to_accuracy_benchmark(run_bench, jpeg_folder, tmp_path):
    rows = run_bench(
        "time_to_accuracy.py",
        "--data",
        str(jpeg_folder),
        "--model",
        "softmax_regression",
        "--epochs",
        "1",
        "--subset",
        "16",
        "--batch-size",
        "8",
        "--alphas",
        "1,0.5",
        "--target",
        "0",
        "--workers",
        "0",
        "--test-per-class",
        "2",
        "--out",
        str(tmp_path / "runs"),
    )
    assert [r["alpha"] for r in rows[:2]] == [1.0, 0.5]
    assert rows[0]["epochs_to_target"] == 1
    assert rows[-1]["benchmark"] == "time_to_accuracy_best"


def test_gpu_resnet50_benchmark_runs_on_cpu(run_bench):
    rows = run_bench(
        "gpu_resnet50.py",
        "--model",
        "resnet20",
        "--img-size",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--amp",
        "none",
        "--modes",
        "eager,channels_last",
        "--device",
        "cpu",
    )
    assert [r["impl"] for r in rows] == ["eager", "channels_last"] and rows[0]["ratio"] == 1.0


# ----------------------------------------------------------------------------- the GPU suite's CPU mode


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = suite  # its dataclasses look their module up there
    spec.loader.exec_module(suite)
    return suite


@pytest.fixture
def suite_env(monkeypatch, tmp_path):
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(
        "POWERGRAD_DATA", raising=False
    )  # generated data only: tests never read ../shared
    monkeypatch.chdir(tmp_path)
    return tmp_path


def read_report(out: Path) -> tuple[dict, dict[str, dict]]:
    report = json.loads((out / "gpu_suite.json").read_text())
    return report, {s["id"]: s for s in report["sections"]}


def checks(section: dict) -> dict[str, bool | None]:
    return {c["name"]: c["ok"] for c in section["checks"]}


def test_gpu_suite_dry_run_runs_every_section(suite_env):
    suite = load_suite()
    out = suite_env / "out"
    assert suite.main(["--out", str(out), "--dry-run"]) == 0
    report, by = read_report(out)
    assert report["exit_code"] == 0 and report["dry_run"] and list(by) == list(suite.SECTIONS)
    assert {k: s["status"] for k, s in by.items()} == dict.fromkeys(suite.SECTIONS, "ok"), {
        k: s["error"] for k, s in by.items() if s["error"]
    }
    # every correctness check was judged and passed, except those that need hardware this is not
    not_judged = [
        n
        for s in by.values()
        for c in s["checks"]
        if c["ok"] is None and c["kind"] == "correctness"
        for n in [c["name"]]
    ]
    assert all("learns" in n or "2 processes" in n for n in not_judged), not_judged

    loss = by["loss"]["rows"]
    assert {(r["dtype"], r["label_smoothing"]) for r in loss if r["part"] == "exactness"} == {
        (d, ls) for d in ("float32", "bfloat16", "float16") for ls in (0.0, 0.1)
    }
    assert {r["mode"] for r in loss if r["part"] == "cost"} == {"eager", "compile"}
    # the sync attribution found the loop's flag read (the CPU stand-in reads it every step)
    assert all("engine/" in r["sites"] for r in by["sync"]["rows"])
    assert [r["mode"] for r in by["train"]["rows"]] == list(suite.TRAIN_MODES)
    assert all(r["img_per_s"] > 0 and 0 <= r["data_share"] for r in by["train"]["rows"])
    assert [r["bitwise"] for r in by["resume"]["rows"]] == [True, True]  # the CPU is deterministic
    assert (
        checks(by["resume"])["killed mid-epoch"]
        and checks(by["nccl"])["a gloo process group initialises and all-reduces"]
    )
    assert [r["mode"] for r in by["resnet50"]["rows"]][:3] == ["eager", "channels_last", "compile"]
    assert by["resnet50"]["rows"][3]["mode"].startswith("trainer")
    assert {r["impl"] for r in by["cifar94"]["rows"]} >= {"airbench94", "speed/cifar10-94"}
    assert by["stream"]["rows"][-1]["bottleneck"] in ("loader", "model")
    md = (out / "gpu_suite.md").read_text()
    assert "dry run" in md and all(f"| {s} | ok |" in md for s in suite.SECTIONS)


def test_gpu_suite_records_a_failing_section_and_goes_on(suite_env):
    suite = load_suite()

    def broken(ctx):
        ctx.rec.row(before="the failure")
        raise RuntimeError("planted failure")

    suite.RUNNERS["loss"] = broken
    out = suite_env / "out"
    assert suite.main(["--out", str(out), "--dry-run", "--sections", "loss,stream"]) == 1
    report, by = read_report(out)
    assert report["exit_code"] == 1
    assert by["loss"]["status"] == "error" and "planted failure" in by["loss"]["error"]
    assert by["loss"]["rows"] == [
        {"before": "the failure"}
    ]  # what it measured before failing is kept
    assert by["stream"]["status"] == "ok"
    assert "| loss | error |" in (out / "gpu_suite.md").read_text()


def test_gpu_suite_runs_a_section_in_its_own_process(suite_env):
    """The GPU default: each section in a child process that writes its record as it goes."""
    out = suite_env / "out"
    assert (
        load_suite().main(["--out", str(out), "--dry-run", "--isolate", "--sections", "stream"])
        == 0
    )
    report, by = read_report(out)
    assert report["isolated"] and by["stream"]["status"] == "ok" and by["stream"]["rows"]
    assert "===== stream (exit 0)" in (out / "gpu_suite.log").read_text()


def test_gpu_suite_sync_rule():
    """At most ceil(S / every) + 1 steps of an epoch may sync, at most per_read times each;
    the first epoch (lazy set-up, the first-step output check) is not judged."""
    judge = load_suite().judge_syncs
    steps = Counter({0: 60, 1: 60})

    def at(*where):
        return [(("step", e, k), f"site{k % 2}") for e, k in where]

    flag_reads = at((1, 24), (1, 49), (1, 59), (1, 59))
    assert judge(flag_reads, steps, every=25, per_read=2)[0]
    assert judge(flag_reads + at(*((0, k) for k in range(60))), steps, 25, 2)[
        0
    ]  # epoch 1: not judged
    every_step = at(*((1, k) for k in range(60)))
    ok, detail, sites = judge(every_step, steps, 25, 2)
    assert (
        not ok
        and "60 of 60 steps synced (allowed 4)" in detail
        and sites == {"site0": 30, "site1": 30}
    )
    assert not judge(at((1, 24), (1, 24), (1, 24)), steps, 25, 2)[0]  # three syncs in one step
    outside = [(("epoch_end", 1, -1), "eval")] * 100
    assert judge(outside, steps, 25, 2)[0]


def test_gpu_suite_catches_sync_warnings_where_raised(monkeypatch):
    """The CUDA branch of record_syncs, without a GPU: torch's sync warning is caught with the
    step it fell in and its call site; other warnings pass through."""
    suite = load_suite()
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    tap, events = suite.StepTap(), []

    def step_that_syncs():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    with pytest.warns(UserWarning, match="unrelated"):
        with suite.record_syncs(tap, events, cuda=True):
            for _ in tap.wrap([1, 2]):
                step_that_syncs()
            warnings.warn("unrelated", UserWarning, stacklevel=1)
    assert modes == ["warn", "default"]
    assert [ph for ph, _ in events] == [("step", 0, 0), ("step", 0, 1)]
    assert all(
        "step_that_syncs" in site and "test_benchmarks_smoke.py" in site for _, site in events
    )


def test_gpu_suite_stops_a_section_past_its_budget(suite_env):
    """A section's process still running 30 s past its budget is killed, with its children, and
    recorded as timed out (budget -29: stopped after 1 s, while it is still starting)."""
    suite = load_suite()
    out, work = suite_env / "out", suite_env / "work"
    out.mkdir(), work.mkdir()
    args = suite.parse(["--out", str(out), "--dry-run"])
    tic = time.monotonic()
    rec = suite.run_child("stream", args, work, None, {}, budget=-29)
    assert rec.status == "timeout" and "stopped after" in rec.error and time.monotonic() - tic < 20
    assert "===== stream (exit -9, timed out)" in (out / "gpu_suite.log").read_text()
