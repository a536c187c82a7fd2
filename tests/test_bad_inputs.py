"""The bad-input catalogue of docs/reliability.md: every row through the CLI.

Each row must end with exit code 2, exactly one line on stderr (the error; progress logs go to
stdout), no traceback, and an untouched existing run directory (``prev``, made once). With
POWERGRAD_CATALOGUE=FILE the rows and their messages are written to FILE as a Markdown table
(how the table in docs/reliability.md was made).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from powergrad.cli import main


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()).save(
        path
    )


def _folders(root: Path, train=("a", "b"), val=("a", "b"), per_class=2) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            for i in range(per_class):
                _png(root / split / c / f"{i}.png", hash((split, c, i)) % 1000)
    return root


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _not_writable(tmp: Path) -> str:
    if os.geteuid() == 0:  # root ignores permission bits; nobody may create folders in /sys
        return "/sys/powergrad-run"
    ro = tmp / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    return str(ro / "run")


# Each row: (name, function of the temporary folder -> CLI arguments, how it is run).
# "subprocess" rows need a process of their own (a file-size limit).
def _rows():
    return [
        ("malformed YAML", lambda t: ["train", _write(t / "bad.yaml", "epochs: [1,\n")]),
        (
            "YAML with a python tag",
            lambda t: [
                "train",
                _write(
                    t / "evil.yaml",
                    f'epochs: !!python/object/apply:os.system ["touch {t}/PWNED"]\n',
                ),
            ],
        ),
        (
            "recipe that is not a mapping",
            lambda t: ["train", _write(t / "list.yaml", "- 1\n- 2\n")],
        ),
        ("unknown recipe", lambda t: ["train", "digit"]),
        ("unknown key", lambda t: ["train", "alhpa=0.3"]),
        ("unknown nested key", lambda t: ["train", "monitor.stall_epoch=2"]),
        ("wrong type", lambda t: ["train", "epochs=two"]),
        ("alpha < 0", lambda t: ["train", "alpha=-1"]),
        ("negative learning rate", lambda t: ["train", "lr=-0.1"]),
        ("value not among the choices", lambda t: ["train", "sched=linear"]),
        ("override without =", lambda t: ["train", "digits", "epochs"]),
        ("unknown model", lambda t: ["train", "model=resnet_9000", "epochs=1"]),
        ("unknown data set", lambda t: ["train", "dataset=imagenet22k", "epochs=1"]),
        (
            "missing data",
            lambda t: ["train", "dataset=cifar10", f"data_dir={t}/nowhere", "epochs=1"],
        ),
        ("image folder without data_dir", lambda t: ["train", "dataset=imagefolder", "epochs=1"]),
        ("image folder without val/", lambda t: _imagefolder(t, lambda r: _rm_tree(r / "val"))),
        ("empty class folder", lambda t: _imagefolder(t, lambda r: _rm_files(r / "train" / "b"))),
        (
            "train/test classes differ",
            lambda t: [
                "train",
                "dataset=imagefolder",
                "epochs=1",
                f"data_dir={_folders(t / 'd', val=('a', 'c'))}",
            ],
        ),
        (
            "corrupt image",
            lambda t: _imagefolder(
                t, lambda r: (r / "train" / "a" / "0.png").write_bytes(b"\x89PNG junk")
            ),
        ),
        ("fraction out of range", lambda t: ["train", "val_fraction=1.5"]),
        ("checkpoint not found", lambda t: ["eval", "--checkpoint", t / "missing.pt"]),
        ("folder without a checkpoint", lambda t: ["eval", "--checkpoint", t]),
        (
            "truncated checkpoint",
            lambda t: [
                "eval",
                "--checkpoint",
                _write_bytes(t / "trunc.pt", (t / "prev" / "last.pt").read_bytes()[:5000]),
            ],
        ),
        ("not a checkpoint", lambda t: ["eval", "--checkpoint", _write(t / "notes.pt", "hello\n")]),
        ("checkpoint that would run code", lambda t: ["eval", "--checkpoint", _evil(t)]),
        (
            "checkpoint for another model",
            lambda t: [
                "train",
                f"resume={t / 'prev' / 'last.pt'}",
                "model=convnet",
                "--out",
                t / "new",
            ],
        ),
        (
            "checkpoint for another class count",
            lambda t: ["train", f"resume={_five_classes(t)}", "--out", t / "new"],
        ),
        (
            "weights for another model",
            lambda t: [
                "train",
                f"weights={t / 'prev' / 'last.pt'}",
                "model=convnet",
                "dataset=synthetic",
                "img_size=8",
                "epochs=1",
                "--out",
                t / "new",
            ],
        ),
        ("resume=auto without --out", lambda t: ["train", "resume=auto"]),
        (
            "existing run directory without resume",
            lambda t: ["train", "epochs=1", "--out", t / "prev"],
        ),
        (
            "output path is a file",
            lambda t: ["train", "epochs=1", "--out", _write(t / "afile", "x")],
        ),
        ("output folder not writable", lambda t: ["train", "epochs=1", "--out", _not_writable(t)]),
        ("num_classes contradicting the data", lambda t: ["train", "num_classes=3", "epochs=1"]),
        (
            "test_subset larger than the test split",
            lambda t: ["train", "test_subset=5000", "epochs=1"],
        ),
        ("not a number", lambda t: ["train", "lr=nan"]),
        (
            "data_dir is a file",
            lambda t: [
                "train",
                "dataset=imagefolder",
                f"data_dir={_write(t / 'afile', 'x')}",
                "epochs=1",
            ],
        ),
        (
            "key given twice in a recipe",
            lambda t: ["train", _write(t / "dup.yaml", "lr: 0.1\nepochs: 1\nlr: 0.4\n")],
        ),
        ("key given twice on the command line", lambda t: ["train", "lr=0.1", "lr=0.2"]),
        ("empty recipe", lambda t: ["train", _write(t / "empty.yaml", "")]),
        (
            "recipe that is not UTF-8 (a latin-1 byte)",
            lambda t: [
                "train",
                _write_bytes(t / "latin1.yaml", b"description: caf\xe9\nepochs: 1\n"),
            ],
        ),
        (
            "recipe with binary content",
            lambda t: ["train", _write_bytes(t / "bin.yaml", bytes(range(256)))],
        ),
        (
            "recipe with a control character",
            lambda t: ["train", _write_bytes(t / "nul.yaml", b"epochs: 1\x00\n")],
        ),
        (
            "recipe with a complex key",
            lambda t: ["train", _write(t / "complex.yaml", "? [a, b]\n: 1\nepochs: 1\n")],
        ),
        ("negative head learning rate", lambda t: ["train", "head_lr=-1", "epochs=1"]),
        (
            "resume and init_from together",
            lambda t: ["train", "resume=prev/last.pt", "init_from=prev/last.pt", "--out", t / "n"],
        ),
        ("option-style key (timm's habit)", lambda t: ["train", "--epochs", "1"]),
        (
            "option the command does not have",
            lambda t: ["eval", "--checkpoint", t / "prev" / "last.pt", "--out", "x"],
        ),
        (
            "checkpoint trained on other classes",
            lambda t: ["eval", "--checkpoint", _other_classes(t)],
        ),
        (
            "disk full while saving (file-size limit)",
            lambda t: ["train", "epochs=1", "--out", t / "new"],
            "subprocess",
        ),
    ]


ROWS = _rows()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _evil(t: Path) -> Path:
    torch.save({"model": _Payload(str(t / "PWNED"))}, t / "evil.pt")
    return t / "evil.pt"


def _five_classes(t: Path) -> Path:
    """prev's checkpoint as if trained on 5 classes: its last layer cut to 5 rows."""
    from powergrad.engine.checkpoint import load_checkpoint

    state = load_checkpoint(t / "prev" / "last.pt")
    last = [k for k in state["model"] if k.endswith(".weight")][-1]
    state["model"][last] = state["model"][last][:5]
    state["model"][last.replace(".weight", ".bias")] = state["model"][
        last.replace(".weight", ".bias")
    ][:5]
    torch.save(state, t / "five.pt")
    return t / "five.pt"


def _other_classes(t: Path) -> Path:
    """prev's checkpoint as if trained on ten other classes (an image folder of letters)."""
    from powergrad.engine.checkpoint import load_checkpoint

    state = load_checkpoint(t / "prev" / "last.pt")
    state["class_names"] = list("abcdefghij")
    torch.save(state, t / "letters.pt")
    return t / "letters.pt"


def _rm_tree(p: Path) -> None:
    import shutil

    shutil.rmtree(p)


def _rm_files(p: Path) -> None:
    for f in p.iterdir():
        f.unlink()


def _imagefolder(t: Path, spoil) -> list:
    root = _folders(t / "d")
    spoil(root)
    return ["train", "dataset=imagefolder", f"data_dir={root}", "epochs=1", "batch_size=2"]


@pytest.fixture(scope="module")
def prev_run(tmp_path_factory):
    """A finished run: the existing run directory that no bad input may change."""
    run = tmp_path_factory.mktemp("prev") / "prev"
    assert main(["train", "digits", "epochs=1", "batch_size=256", "--out", str(run)]) == 0
    return run


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing
    resource.setrlimit(
        resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY)
    )  # a checkpoint is 173 kB


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gives_one_line_exit_2(row, prev_run, tmp_path, capsys, monkeypatch):
    name, make = row[0], row[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "prev").symlink_to(prev_run, target_is_directory=True)
    before = snapshot(prev_run)
    args = [str(a) for a in make(tmp_path)]
    if len(row) > 2 and row[2] == "subprocess":
        proc = subprocess.run(
            [sys.executable, "-m", "powergrad", *args],
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=_limit_file_size,
        )
        code, err = proc.returncode, proc.stderr
    else:
        code = main(args)
        err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("powergrad: error: "), err
    assert "Traceback" not in err
    assert snapshot(prev_run) == before
    assert not (tmp_path / "PWNED").exists()
    out = os.environ.get("POWERGRAD_CATALOGUE")
    if out:
        message = lines[0].replace(str(tmp_path), "TMP").replace(str(prev_run), "TMP/prev")
        shown = " ".join(a.replace(str(tmp_path), "TMP") for a in args)
        with open(out, "a") as f:
            f.write(f"| {name} | `powergrad {shown}` | `{message}` |\n")
