"""Every built-in recipe validates and trains one step; the official checkpoints load, evaluate,
resume, and a malicious one is refused with nothing run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.utils import dispatch_clip_grad

from powergrad.cli import main
from powergrad.config import list_recipes, load_config
from powergrad.data import create_loaders
from powergrad.engine.official import read_official
from powergrad.engine.optim import create_optimizer, create_scheduler
from powergrad.errors import UserError
from powergrad.models import create_model, param_groups
from powergrad.rundir import read_metrics
from powergrad.tamper import PowerGradLoss
from powergrad.workflows import train

RECIPES = [n for n in list_recipes() if n.startswith(("imagenet/", "cifar10/"))]
SMALL = {  # the recipe's shape at reduced size: synthetic images, 32 px, a batch of 2, one step
    "dataset": "synthetic",
    "img_size": 32,
    "batch_size": 2,
    "synthetic_size": 2,
    "epochs": 1,
    "warmup_epochs": 0,
    "device": "cpu",
    "amp": "none",
    "workers": 0,
    "data_dir": None,
}


def test_the_paper_tables_have_recipes():
    names = set(RECIPES)
    for arch, sched, alpha in [
        ("resnet18", "step", "0.25"),
        ("resnet18", "cosine", "0.25"),
        ("resnet50", "step", "0.3"),
        ("resnet50", "cosine", "0.3"),
        ("resnet101", "cosine", "0.3"),
        ("seresnet18", "cosine", "0.25"),
        ("seresnet50", "cosine", "0.3"),
    ]:
        assert {f"imagenet/{arch}-{sched}-a1", f"imagenet/{arch}-{sched}-a{alpha}"} <= names
    for variant in ("", "gc-", "agc-"):
        assert {
            f"imagenet/resnet18nobn-b256-{variant}a1",
            f"imagenet/resnet18nobn-b256-{variant}a0.25",
        } <= names
    assert {"imagenet/resnet18nobn-b512-a0.25", "imagenet/resnet18nobn-b1024-a0.92"} <= names
    for alpha in ("1", "0.3", "0.05"):
        assert {
            f"imagenet/resnet50-cosine-a{alpha}",
            f"imagenet/resnet50-cosine-a{alpha}-ls0.1",
        } <= names
    assert {"cifar10/resnet20", "cifar10/resnet20-jpeg"} <= names


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_with_the_paper_hyperparameters(name):
    cfg = load_config(name)
    if name.startswith("imagenet/"):
        assert (cfg.optimizer, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (
            "sgd",
            0.9,
            True,
            5e-4,
        )
        assert (cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr, cfg.img_size) == (100, 5, 4e-4, 224)
        assert cfg.lr == pytest.approx(
            0.4 * cfg.batch_size / 1024
        )  # linear scaling from 0.4 @ 1024
        assert cfg.sched in ("step", "cosine") and (
            cfg.sched == "cosine" or cfg.decay_milestones == [30, 60, 90]
        )
        if "/_" not in name:  # the shared bases (imagenet/_base, _step, _nobn) name no alpha
            assert cfg.alpha == float(name.split("-a")[-1].split("-")[0])
        assert cfg.label_smoothing == (0.1 if name.endswith("-ls0.1") else 0.0)
    else:
        assert (cfg.model, cfg.epochs) == ("resnet20", 360)


def _one_of_each_model_and_clip() -> list[str]:
    seen, out = set(), []
    for name in RECIPES:
        cfg = load_config(name)
        if (cfg.model, cfg.clip) not in seen:
            seen.add((cfg.model, cfg.clip))
            out.append(name)
    return out


@pytest.mark.parametrize("name", _one_of_each_model_and_clip())
def test_recipe_model_takes_a_step(name):
    """The recipe's model, optimiser groups, schedule, loss and clipping: one update on a
    synthetic batch of the recipe's shape at 32 px (the loop itself is tested in test_engine)."""
    classes = 1000 if name.startswith("imagenet/") else 10
    cfg = load_config(name, {**SMALL, "num_classes": classes})
    loaders = create_loaders(cfg, torch.device("cpu"))
    model = create_model(
        cfg, loaders.info.num_classes, loaders.info.in_chans, loaders.info.img_size
    )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(param_groups(model, cfg), cfg)
    scheduler = create_scheduler(optimizer, cfg, len(loaders.train))
    x, y = next(iter(loaders.train))
    before = [p.detach().clone() for p in model.parameters()]
    loss = PowerGradLoss(cfg.alpha, cfg.label_smoothing)(model(x), y)
    loss.backward()
    if cfg.clip != "none":
        dispatch_clip_grad(list(model.parameters()), cfg.clip_value, mode=cfg.clip)
    optimizer.step()
    scheduler.step_update(1)
    assert torch.isfinite(loss) and x.shape[1:] == (3, 32, 32)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ---------------------------------------------------------------- official checkpoints


def _image_folder(root, classes=3, per_class=4, side=32):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )
    return root


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A powergrad run on a tiny folder, and its weights re-saved in the official timm format."""
    tmp = tmp_path_factory.mktemp("official")
    data = _image_folder(tmp / "data")
    common = {
        "dataset": "imagefolder",
        "data_dir": str(data),
        "img_size": 32,
        "device": "cpu",
        "workers": 0,
    }
    run = train(None, out=tmp / "run", model="resnet18_nobn", batch_size=6, epochs=1, **common)
    state = torch.load(run.run_dir / "last.pt", weights_only=True)
    model = state["model"]
    # timm's optimizer: the no-decay group first (the reverse of ours), momentum buffers by index.
    mom = {
        i: {"momentum_buffer": torch.randn_like(t)}
        for i, t in enumerate(model.values())
        if t.is_floating_point()
    }
    nodecay = [i for i, (k, t) in enumerate(model.items()) if t.ndim <= 1]
    decay = [i for i, (k, t) in enumerate(model.items()) if t.ndim > 1]
    optim = {
        "state": mom,
        "param_groups": [
            {"params": nodecay, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": True},
            {"params": decay, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
        ],
    }
    args = argparse.Namespace(
        model="resnet18_wobn",
        modify_softmax=0.25,
        smoothing=0.0,
        batch_size=256,
        data_dir="/imagenet",
        lr=0.1,
        epochs=90,
        sched="cosine",
    )
    path = tmp / "model_best.pth.tar"
    torch.save(
        {
            "epoch": 2,
            "arch": "resnet18_wobn",
            "state_dict": model,
            "optimizer": optim,
            "version": 2,
            "args": args,
            "metric": 12.5,
        },
        path,
    )
    return {"path": path, "pg": run.run_dir / "last.pt", "common": common, "tmp": tmp}


def _eval(capsys, checkpoint, overrides):
    assert main(["eval", "--checkpoint", str(checkpoint), *overrides]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_official_checkpoint_reads_as_ours(official):
    state = read_official(official["path"])
    assert state["config"]["model"] == "resnet18_nobn"  # resnet18_wobn maps to our name
    assert state["config"]["alpha"] == 0.25 and state["epoch"] == 3  # timm's epoch is 0-based
    assert read_official(official["pg"]) is None  # our own checkpoints are not official


def test_eval_official_checkpoint_equals_eval_of_the_same_weights(official, capsys):
    # One batch size for both: the file's args say 256 and ours 6, and a loss averaged over one
    # batch of 12 or two of 6 may differ in the last bits (summation order), which is not what
    # this test is about.
    overrides = [f"{k}={v}" for k, v in official["common"].items()] + ["batch_size=6"]
    theirs = _eval(capsys, official["path"], overrides)  # model from the file's arch
    ours = _eval(capsys, official["pg"], overrides)
    assert theirs == ours and theirs["n"] == 12


def test_resume_from_official_checkpoint_continues(official):
    result = train(
        None,
        out=official["tmp"] / "resumed",
        model="resnet18_nobn",
        batch_size=6,
        epochs=4,
        resume=str(official["path"]),
        **official["common"],
    )
    assert [r["epoch"] for r in result.history] == [4]  # 3 epochs done in the file, one more here


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (str(self.marker), "w"))


def test_malicious_official_checkpoint_is_refused_and_nothing_runs(official, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 0, "arch": "resnet18", "state_dict": {}, "args": _Evil(marker)}, path)
    c = [f"{k}={v}" for k, v in official["common"].items()]
    assert main(["eval", "--checkpoint", str(path), *c]) == 2
    assert "refused" in capsys.readouterr().err
    assert (
        main(["train", "model=resnet18", f"resume={path}", "--out", str(tmp_path / "r"), *c]) == 2
    )
    assert not marker.exists()
    with pytest.raises(UserError, match="refused"):
        read_official(path)


def _official_with_args(official, path, **args):
    """The fixture's timm file with other args (as timm's train.py would have saved them)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(official["path"], map_location="cpu", weights_only=True)
    state["args"] = argparse.Namespace(**{**vars(state["args"]), **args})
    torch.save(state, path)
    return path


def test_train_resumes_a_timm_checkpoint_with_its_arch_and_args(official, tmp_path, capsys):
    """No model=, no label_smoothing=, no img_size=: the file's arch and args say them (issue 12,
    docs/reproducing.md); a key on the command line still wins; "epochs done" is said once."""
    path = _official_with_args(official, tmp_path / "last.pth.tar", smoothing=0.1, img_size=32)
    common = [f"{k}={v}" for k, v in official["common"].items() if k != "img_size"]
    out = tmp_path / "resumed"
    assert (
        main(["train", f"resume={path}", "batch_size=6", "epochs=4", *common, "--out", str(out)])
        == 0
    )
    stdout = capsys.readouterr().out
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["model"], cfg["label_smoothing"], cfg["img_size"], cfg["alpha"]) == (
        "resnet18_nobn",
        0.1,
        32,
        0.25,
    )
    assert stdout.count("3 epochs done") == 1 and "official checkpoint" in stdout
    assert [int(r["epoch"]) for r in read_metrics(out)] == [4]
    out2 = tmp_path / "overridden"
    assert (
        main(
            [
                "train",
                f"resume={path}",
                "batch_size=6",
                "epochs=4",
                "label_smoothing=0.2",
                *common,
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    assert yaml.safe_load((out2 / "config.yaml").read_text())["label_smoothing"] == 0.2


def test_a_failed_timm_resume_leaves_no_trace_in_out(official, tmp_path, capsys):
    out = tmp_path / "r"
    c = [f"{k}={v}" for k, v in official["common"].items()]
    assert (
        main(
            [
                "train",
                f"resume={official['path']}",
                "model=convnet",
                "batch_size=6",
                "epochs=4",
                *c,
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "does not fit the model" in capsys.readouterr().err
    assert not out.exists()  # not even an empty plots/
