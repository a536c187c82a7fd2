"""Every benchmark runs end to end at tiny sizes and prints its JSON lines (so they cannot rot).

Not timed tests: nothing here checks a speed.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
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


def test_trainer_precision_benchmark(run_bench):
    rows = run_bench(
        "trainer_precision.py", "--rounds", "1", "--epochs", "2", "--size", "128", "--threads", "1"
    )
    assert [r["variant"] for r in rows] == ["fp32", "bf16", "bf16+channels_last"]
    assert rows[0]["ratio_to_fp32"] == 1.0
    assert all(r["img_s_median"] > 0 and len(r["img_s_rounds"]) == 1 for r in rows)


def test_parallel_runs_benchmark(run_bench):
    rows = run_bench("parallel_runs.py", "--threads", "2", "--epochs", "2", "--size", "128")
    assert [r["layout"] for r in rows] == ["1 run x 2 threads", "2 runs x 1 thread"]
    assert all(r["img_s"] > 0 for r in rows)


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
