"""The promises of docs/reliability.md, one test (or a few) each.

The kill test forks each training process from a forkserver that has already imported torch and
powergrad, so a kill-and-resume costs a fork rather than a 5 s Python start-up.
"""

from __future__ import annotations

import ast
import csv
import json
import multiprocessing
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import powergrad
from powergrad.cli import main
from powergrad.engine.checkpoint import load_checkpoint, save_checkpoint
from powergrad.rundir import TIMING_COLUMNS

PACKAGE = Path(powergrad.__file__).parent
# 3 epochs of 44 steps, last.pt every 5 steps and at each epoch end: 27 saves a run. Small
# batches, so that steps and saves, not evaluation and records, fill most of a run's time.
KILL_ARGS = [
    "train",
    "digits",
    "epochs=3",
    "batch_size=32",
    "alpha=0.5",
    "checkpoint_every_steps=5",
    "resume=auto",
]
MIN_KILLS = 20
SLOW_FSYNC_S = 0.06  # widens each save so that random kills land inside saves too (about 1 in 4)


# ----------------------------------------------------------------------------- helpers


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under a folder with its bytes and mtime: to prove nothing changed."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _train_child(argv: list[str], log: str, slow_fsync: float) -> None:
    """A training process as the CLI runs it; its stdout and stderr go to `log`."""
    if slow_fsync:
        real_fsync = os.fsync

        def fsync(fd):
            time.sleep(slow_fsync)
            real_fsync(fd)

        os.fsync = fsync
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    torch.set_num_threads(1)  # the same threads in every process, so the same float sums
    sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "torch",
            "powergrad.cli",
            "powergrad.engine",
            "powergrad.data",
            "powergrad.models",
            "powergrad.plots",
            "torch.utils.tensorboard",
            "sklearn.datasets",
        ]
    )
    warm = ctx.Process(target=time.sleep, args=(0,))  # starts the server: imports happen here
    warm.start()
    warm.join()
    return ctx


def start(ctx, argv, log, slow_fsync=SLOW_FSYNC_S):
    p = ctx.Process(target=_train_child, args=(argv, str(log), slow_fsync))
    p.start()
    return p


def wait_for_model(p, log: Path, timeout: float) -> float | None:
    """Seconds until the process logged "built <model>" (training starts next), or None if it ended."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if p.exitcode is not None:
            return None
        if log.is_file() and "built " in log.read_text():
            return time.perf_counter() - t0
        time.sleep(0.005)
    return None


def classify_kill(run: Path) -> str:
    """Where the kill landed, read from what it left on disk."""
    if any(run.glob(".*.pt.*.tmp")):
        return "during a checkpoint save"
    if not (run / "last.pt").is_file():
        return "before the first checkpoint"
    state = load_checkpoint(run / "last.pt")
    return (
        "after a mid-epoch checkpoint"
        if state["step_in_epoch"]
        else "after an epoch-end checkpoint"
    )


# ----------------------------------------------------------------------------- 1, 2: kill anywhere, resume exactly


def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path, forkserver):
    ref = tmp_path / "reference"
    t0 = time.perf_counter()
    p = start(forkserver, [*KILL_ARGS, "--out", str(ref)], tmp_path / "ref.log")
    startup_s = wait_for_model(p, tmp_path / "ref.log", 120)
    p.join(120)
    full_s = time.perf_counter() - t0
    train_s = full_s - startup_s  # steps, saves, evaluation, records: where most kills should land
    assert p.exitcode == 0, (tmp_path / "ref.log").read_text()
    want = metrics(ref)
    assert len(want) == 3

    rng = random.Random(8)  # seeded: the same delays every run (the moments they hit still vary)
    kinds: dict[str, int] = {}
    kills, chains, attempts = 0, 0, 0
    while kills < MIN_KILLS:
        chains += 1
        run = tmp_path / f"chain{chains}"
        while True:  # kill and resume this run until a process finishes on its own
            attempts += 1
            log = tmp_path / f"attempt{attempts}.log"
            p = start(forkserver, [*KILL_ARGS, "--out", str(run)], log)
            # One kill in four at any moment from the process start (start-up, resume, folder
            # creation); the others at a moment of the training part, timed from its start.
            # Up to half the training part: a run then takes several kills before one finishes.
            from_start = rng.random() < 0.25
            delay = rng.uniform(0.0, full_s / 2 if from_start else train_s / 2)
            if not from_start:
                wait_for_model(p, log, 60)  # returns early if the process ends: checked below
            p.join(delay)
            if p.exitcode is not None:  # it finished before the kill
                assert p.exitcode == 0, log.read_text()
                break
            os.kill(p.pid, signal.SIGKILL)
            p.join()
            kills += 1
            kind = classify_kill(run) if run.exists() else "before the run folder existed"
            kinds[kind] = kinds.get(kind, 0) + 1
            for ckpt in run.glob("*.pt"):  # every checkpoint present loads
                assert "model" in load_checkpoint(ckpt)
        got = metrics(run)
        assert got == want, f"chain {chains} differs from the uninterrupted run"
        assert not list(run.glob(".*.tmp")) and not list(run.glob("*.tmp"))
        assert json.loads((run / "summary.json").read_text())["status"] == "finished"

    print(
        f"\nkill test: {kills} SIGKILLs over {chains} runs ({attempts} processes), all recovered "
        f"with metrics equal to the uninterrupted run; reference run {full_s:.2f}s "
        f"({startup_s:.2f}s start-up); where: {kinds}"
    )
    assert kinds.get("during a checkpoint save", 0) >= 1, kinds
    assert kinds.get("after a mid-epoch checkpoint", 0) >= 1, kinds


def test_preempted_mid_epoch_resumes_exactly(tmp_path, capsys):
    """SIGTERM mid-epoch (how a cluster warns) saves the step and partial sums; resume is exact."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["train", "digits", "epochs=2", "batch_size=128", "alpha=0.5"]
    assert run_cli([*args, "--out", full], capsys)[0] == 0

    calls = {"n": 0}
    import powergrad.engine.loop as loop

    real_step = loop._train_step

    def step_then_signal(*a, **k):
        calls["n"] += 1
        if calls["n"] == 16:  # step 5 (0-based 4) of epoch 2's 11
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*a, **k)

    loop._train_step = step_then_signal
    try:
        code, _, err = run_cli([*args, "--out", part], capsys)
    finally:
        loop._train_step = real_step
    assert code == 0 and "pre-empted" in err
    state = load_checkpoint(part / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 5)
    assert run_cli([*args, "resume=auto", "--out", part], capsys)[0] == 0
    assert metrics(part) == metrics(full)


# ----------------------------------------------------------------------------- 3: corrupt checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    code = main(
        [
            "train",
            "digits",
            "epochs=2",
            "batch_size=128",
            "keep_checkpoints=true",
            "--out",
            str(run),
        ]
    )
    assert code == 0
    return run


CORRUPTIONS = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "text": lambda good: b"epochs: 3\n",
    "random bytes": lambda good: bytes(random.Random(0).randrange(256) for _ in range(4096)),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_one_line_naming_the_file(kind, finished_run, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(CORRUPTIONS[kind]((finished_run / "last.pt").read_bytes()))
    for args in (
        ["eval", "--checkpoint", bad],
        ["train", f"resume={bad}", "--out", tmp_path / "r"],
    ):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "Traceback" not in err
        assert len(err.splitlines()) == 1 and str(bad) in err, err
    assert not (tmp_path / "r").exists()


def test_state_dict_is_not_a_checkpoint(tmp_path, capsys):
    sd = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, sd)
    code, _, err = run_cli(["eval", "--checkpoint", sd], capsys)
    assert (
        code == 2
        and err.strip() == f"powergrad: error: {sd}: not a powergrad checkpoint (no 'model' entry)"
    )


def test_resume_auto_falls_back_past_a_corrupt_last_pt(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "last.pt", "epoch1.pt"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    (run / "last.pt").write_bytes((finished_run / "last.pt").read_bytes()[:1000])
    os.utime(run / "epoch1.pt", (1, 1))  # older than last.pt: last.pt is the first choice
    code, out, err = run_cli(["train", "resume=auto", "--out", run], capsys)
    assert code == 0, err
    assert "skipping" in err and "last.pt" in err and "epoch1.pt" in err
    assert "at epoch 2, step 0" in out
    assert metrics(run) == metrics(finished_run)
    assert load_checkpoint(run / "last.pt")["epoch"] == 2  # rewritten whole


def test_resume_auto_refuses_a_folder_whose_checkpoints_are_all_bad(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a checkpoint")
    before = snapshot(run)
    code, _, err = run_cli(["train", "epochs=1", "resume=auto", "--out", run], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "no loadable checkpoint in" in err
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- 4: untrusted files


class Payload:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint or batch would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_payload_works_with_plain_pickle(tmp_path):
    """The control: the payload does run when loaded without protection."""
    import pickle

    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("where", ["resume", "eval", "weights", "cifar10"])
def test_pickle_that_runs_code_is_refused_and_nothing_runs(where, tmp_path, capsys, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "epoch": 0}, evil)
    args = {
        "resume": ["train", f"resume={evil}", "--out", tmp_path / "r"],
        "eval": ["eval", "--checkpoint", evil],
        "weights": ["train", f"weights={evil}", "epochs=1", "--out", tmp_path / "r"],
        "cifar10": [
            "train",
            "dataset=cifar10",
            f"data_dir={tmp_path}",
            "epochs=1",
            "--out",
            tmp_path / "r",
        ],
    }[where]
    if where == "cifar10":
        d = tmp_path / "cifar-10-batches-py"
        d.mkdir()
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
            (d / name).write_bytes(pickle.dumps({"data": Payload(marker), "labels": [0]}))
    code, _, err = run_cli(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "refused" in err
    assert not marker.exists()
    assert not (tmp_path / "r").exists()


def test_yaml_with_python_tags_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'epochs: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, _, err = run_cli(["train", evil], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "refused" in err and str(evil) in err
    assert not marker.exists()


def _calls(tree: ast.AST, dotted: str):
    mod, name = dotted.split(".")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == name
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == mod
        ):
            yield node


def test_every_load_in_the_package_is_safe():
    """torch.load with weights_only=True, np.load without pickles, yaml.safe_load, no pickle.load."""
    files = sorted(PACKAGE.rglob("*.py"))
    torch_loads = 0
    for path in files:
        tree = ast.parse(path.read_text())
        for call in _calls(tree, "torch.load"):
            torch_loads += 1
            kw = {k.arg: k.value for k in call.keywords}
            assert (
                isinstance(kw.get("weights_only"), ast.Constant)
                and kw["weights_only"].value is True
            ), f"{path}:{call.lineno}: torch.load without weights_only=True"
        for call in _calls(tree, "np.load"):
            allow = {k.arg: k.value for k in call.keywords}.get("allow_pickle")  # default False
            assert allow is None or (isinstance(allow, ast.Constant) and allow.value is False), (
                f"{path}:{call.lineno}: np.load with allow_pickle"
            )
        for bad in (
            "pickle.load",
            "pickle.loads",
            "yaml.load",
            "yaml.unsafe_load",
            "yaml.full_load",
        ):
            assert not list(_calls(tree, bad)), f"{path}: {bad}"
        for call in _calls(tree, "yaml.compose"):  # nodes only, and with the safe loader's rules
            kw = {k.arg: k.value for k in call.keywords}
            assert ast.unparse(kw["Loader"]) == "yaml.SafeLoader", f"{path}:{call.lineno}"
    assert torch_loads >= 2  # engine/checkpoint.py and models/weights.py at least


# ----------------------------------------------------------------------------- 5: non-finite loss, fp16


def test_divergence_exits_3_and_keeps_the_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    # A schedule that multiplies lr by 1e13 after epoch 1: a resume may not change the recipe
    # (engine/resume.py), only extend it, so the recipe itself must blow up in epoch 2.
    recipe = [
        "train",
        "digits",
        "batch_size=128",
        "sched=step",
        "decay_milestones=[1]",
        "decay_rate=1e13",
    ]
    assert run_cli([*recipe, "epochs=1", "--out", run], capsys)[0] == 0
    before = {
        n: ((run / n).read_bytes(), (run / n).stat().st_mtime_ns) for n in ("last.pt", "best.pt")
    }
    code, _, err = run_cli([*recipe, "epochs=3", "resume=auto", "--out", run], capsys)
    assert code == 3, err
    line = err.strip().splitlines()[-1]
    assert (
        "non-finite loss at step" in line
        and "(epoch 2)" in line
        and "learning rate too high" in line
    )
    assert "Traceback" not in err
    after = {
        n: ((run / n).read_bytes(), (run / n).stat().st_mtime_ns) for n in ("last.pt", "best.pt")
    }
    assert after == before
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"


class _ScaledLoader:
    """Inputs 1,000 times larger than usual: fp16 weight gradients overflow at the default scale."""

    def __init__(self, n=512, batch=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 32, generator=g) * 1000
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.batch = batch

    def __len__(self):
        return len(self.y) // self.batch

    def __iter__(self):
        for i in range(0, len(self.y), self.batch):
            yield self.x[i : i + self.batch], self.y[i : i + self.batch]


def test_fp16_skipped_steps_are_counted_not_divergence(tmp_path):
    """fp16 autocast and GradScaler run on this CPU torch: the scaler's skips are counted in
    summary.json, match the drop of its scale, and do not stop the run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    res = powergrad.fit(
        model,
        _ScaledLoader(),
        _ScaledLoader(seed=1),
        out=tmp_path / "run",
        epochs=2,
        lr=1e-4,
        amp="fp16",
        device="cpu",
    )
    assert res.status == "finished"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    skipped = summary["fp16_skipped_updates"]
    scale = load_checkpoint(tmp_path / "run" / "last.pt")["scaler"]["scale"]
    # 16 steps, far fewer than the 2,000 before the scaler grows: every halving is one skip.
    assert skipped >= 1 and scale == 2.0**16 * 0.5**skipped, (skipped, scale)


# ----------------------------------------------------------------------------- 8: output safety


def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return preexec


def test_full_disk_while_saving_keeps_the_previous_checkpoint(finished_run, tmp_path):
    """The disk "fills" at 100 kB a file (RLIMIT_FSIZE; a checkpoint here is 173 kB): the save
    of epoch 3 fails, the process says so in one line, and last.pt is the epoch-2 one, whole."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.csv"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    before = (run / "last.pt").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "powergrad", "train", "resume=auto", "epochs=3", "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(100_000),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"powergrad: error: cannot write checkpoint {run / 'last.pt'}: File too large; "
        "the previous last.pt, if any, is intact"
    ]
    assert (run / "last.pt").read_bytes() == before
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert not list(run.glob(".*.tmp"))


def test_save_failure_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    """ENOSPC from the fsync (the kernel may report a full disk only there)."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        powergrad.UserError,
        match="No space left on device; the previous last.pt, if any, is intact",
    ):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_existing_run_is_replaced_only_with_overwrite(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_bytes((finished_run / "metrics.csv").read_bytes())
    before = snapshot(run)
    code, _, err = run_cli(["train", "epochs=1", "--out", run], capsys)
    assert code == 2 and "already holds a run" in err and snapshot(run) == before
    assert run_cli(["train", "epochs=1", "--out", run, "--overwrite"], capsys)[0] == 0
    assert len(metrics(run)) == 1


# ----------------------------------------------------------------------------- 9: memory


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class _RssLoader:
    """Synthetic batches that also record resident memory every step they hand out."""

    def __init__(self, samples: list[int], steps=100, batch=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(steps * batch, 64, generator=g)
        self.y = torch.randint(0, 10, (steps * batch,), generator=g)
        self.batch, self.samples = batch, samples

    def __len__(self):
        return len(self.y) // self.batch

    def __iter__(self):
        for i in range(0, len(self.y), self.batch):
            self.samples.append(_rss_kb())
            yield self.x[i : i + self.batch], self.y[i : i + self.batch]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_memory_stays_flat_over_hundreds_of_steps(tmp_path):
    samples: list[int] = []
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    test = _RssLoader([], steps=4)
    powergrad.fit(
        model,
        _RssLoader(samples),
        test,
        out=tmp_path / "run",
        epochs=4,
        lr=0.05,
        device="cpu",
        checkpoint_every_steps=50,
    )
    assert len(samples) == 400
    warm = samples[100:]  # after the first epochs have allocated what they keep
    growth_mb = (max(warm[-50:]) - min(warm[:50])) / 1024
    print(
        f"\nRSS over steps 100-400: first {warm[0] / 1024:.1f} MB, last {warm[-1] / 1024:.1f} MB, "
        f"growth {growth_mb:+.2f} MB"
    )
    assert growth_mb < 8, samples[::20]
