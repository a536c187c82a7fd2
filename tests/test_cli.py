"""The command line around the happy path: messages, help, recipes, version, broken pipes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from powergrad import __version__
from powergrad.cli import main


def _run(*args: str, shell: str | None = None) -> subprocess.CompletedProcess:
    cmd = shell or [sys.executable, "-m", "powergrad", *args]
    return subprocess.run(cmd, shell=shell is not None, capture_output=True, text=True, timeout=120)


def test_parser_errors_name_the_command_once(capsys):
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert err == "powergrad: error: eval: the following arguments are required: --checkpoint\n"


@pytest.mark.parametrize(
    "args, hint",
    [
        (["train", "--epochs", "1"], "did you mean `epochs=1`?"),
        (["train", "digits", "--lr=0.3"], "did you mean `lr=0.3`?"),
        (["train", "--train-subset", "500"], "did you mean `train_subset=500`?"),
        (
            ["sweep", "digits", "alpha=1,0.5", "--out", "x", "--alpha", "0.5"],
            "did you mean `alpha=0.5`?",
        ),
    ],
)
def test_flag_style_keys_get_the_key_value_spelling(capsys, args, hint):
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith(hint) and "recipe keys are written key=value" in err[0]


def test_unknown_options_and_keys_point_at_what_exists(capsys):
    assert main(["train", "--frobnicate"]) == 2
    assert (
        capsys.readouterr().err == "powergrad: error: train: unrecognised arguments: --frobnicate\n"
    )
    assert main(["train", "zzzzzzzz=1"]) == 2
    err = capsys.readouterr().err
    assert "`powergrad train --help` lists every key" in err and "--help-keys" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"powergrad {__version__}\n"


def test_recipes_name_shows_one_recipe(capsys):
    assert main(["recipes", "digits"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("digits: scikit-learn digits")
    assert "  lr: 0.05  (default 0.1)" in out and '  model: "mlp"' in out
    assert main(["recipes", "imagenet/resnet18nobn-b256-a1"]) == 0
    out = capsys.readouterr().out
    assert (
        "base: imagenet/_nobn" in out and "  warmup_epochs: 5  (default 0)" in out
    )  # from the base
    assert main(["recipes", "digts"]) == 2
    assert "did you mean 'digits'?" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly():
    proc = _run(shell=f"{sys.executable} -m powergrad recipes | true")
    assert proc.stderr == ""
    proc = _run(shell=f"{sys.executable} -m powergrad recipes | head -1")
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 1


def test_help_version_recipes_and_config_do_not_import_torch():
    code = (
        "import sys\n"
        "from powergrad.cli import main\n"
        "for args in (['--help'], ['train', '--help'], ['--version'], ['recipes'], ['recipes', 'digits'],\n"
        "             ['config', 'digits', 'lr=0.2'], ['config', 'dataset=imagefolder', 'data_dir=/nowhere']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "False"


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def test_settings_rarely_meant_give_one_warning_line_each(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text(
        "my notes"
    )  # a folder with a stray file holds no run: used as is
    args = [
        "train",
        "digits",
        "alpha=2",
        "train_subset=100",
        "batch_size=128",
        "epochs=1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 2, warned
    assert warned[0].startswith("warning: alpha=2 > 1 sharpens the softmax")
    assert (
        warned[1]
        == "warning: batch_size=128 is larger than the 100 training images: each epoch is one step of 100"
    )
    assert (out / "notes.txt").read_text() == "my notes" and (out / "summary.json").is_file()


def test_alpha_zero_and_both_val_and_test_folders_warn(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "d"
    for split in ("train", "val", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 100, 50, 0)).save(root / split / c / f"{i}.png")
    args = [
        "train",
        "dataset=imagefolder",
        f"data_dir={root}",
        "alpha=0",
        "epochs=1",
        "batch_size=4",
        "workers=0",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(args) == 0
    warned = _warnings(capsys.readouterr().err)
    assert warned[0].startswith("warning: alpha=0: the gradient is 1/C - q for every example")
    assert warned[1] == (
        f"warning: {root} holds both val/ and test/: evaluating on val/, test/ is not used "
        "(remove or rename val/ to evaluate on test/)"
    )


def test_train_help_lists_every_key_by_group(capsys):
    import re

    from powergrad.config import GROUPS, field_info

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    listed = re.findall(r"^  ([a-z_.]+)=(\S*) +(\S+) +(.+)$", out, flags=re.M)
    names = [k for k, *_ in listed]
    assert names == [
        i.name for g in GROUPS for i in field_info() if i.group == g and i.name != "monitor"
    ]
    by_name = {k: (d, t, h) for k, d, t, h in listed}
    assert by_name["alpha"][:2] == ("1.0", "float") and "PowerGrad exponent" in by_name["alpha"][2]
    assert by_name["train_subset"][:2] == ("null", "int?")
    assert by_name["sched"][2].endswith("[cosine|step|exp|const]")
    assert [g for g in GROUPS if f"\n{g}:\n" in out] == list(GROUPS)


def test_config_prints_the_resolved_config_and_checks_paths(tmp_path, capsys):
    import yaml

    from powergrad.config import load_config

    assert main(["config", "digits", "lr=0.2", "train_subset=100"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(text)
    assert load_config(tmp_path / "resolved.yaml") == load_config(
        "digits", ["lr=0.2", "train_subset=100"]
    )
    assert yaml.safe_load(text)["lr"] == 0.2 and not (tmp_path / "runs").exists()

    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "val" / "a").mkdir(parents=True)
    assert main(["config", "dataset=imagefolder", f"data_dir={tmp_path / 'd'}"]) == 0
    assert (
        f"# checked: data: {tmp_path / 'd' / 'train'} (1 class folders), evaluated on"
        in capsys.readouterr().out
    )
    (tmp_path / "afile").write_text("x")
    assert main(["config", "dataset=imagefolder", f"data_dir={tmp_path / 'afile'}"]) == 2
    assert (
        capsys.readouterr().err
        == f"powergrad: error: data_dir {tmp_path / 'afile'} is a file, not a folder (dataset 'imagefolder')\n"
    )


def test_eval_refuses_data_whose_classes_differ_from_the_checkpoints(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))

    def folder(root, classes):
        for split in ("train", "val"):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                for i in range(2):
                    Image.new("RGB", (8, 8), (i * 100, 50, 0)).save(root / split / c / f"{i}.png")
        return root

    cats = folder(tmp_path / "cats", ("cat", "dog"))
    cars = folder(tmp_path / "cars", ("bus", "car"))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "dataset=imagefolder",
                f"data_dir={cats}",
                "epochs=1",
                "batch_size=4",
                "workers=0",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "last.pt")]) == 0  # its own data: fine
    out = capsys.readouterr().out  # the JSON alone, so that `eval ... | jq` works
    assert set(json.loads(out)) == {"top1", "top5", "loss", "n"}
    assert main(["eval", "--checkpoint", str(run / "best.pt")]) == 0
    of_best = capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(run)]) == 0  # the run folder: its best.pt
    named, err = capsys.readouterr()
    assert named == of_best and f"evaluating {run / 'best.pt'}" in err
    assert main(["eval", "--checkpoint", str(run / "last.pt"), f"data_dir={cars}"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"powergrad: error: {run / 'last.pt'}: trained on other classes than the data's (2 vs 2; "
        "only in the checkpoint ['cat', 'dog'], only in the data ['bus', 'car'])\n"
    )
