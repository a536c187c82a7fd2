"""The seed workflows: linear probes, fine-tuning from local weights, the seed recipes, and the
training-pathology diagnostics firing where they should and staying quiet where they should not."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import powergrad
from powergrad.config import MonitorConfig, list_recipes, load_config
from powergrad.data import create_loaders
from powergrad.errors import UserError
from powergrad.monitor.checks import Monitor, identical_runs
from powergrad.rundir import read_metrics
from powergrad.workflows import evaluate

QUIET = dict(epochs=3, batch_size=64, workers=0, device="cpu")
# A small backbone on digits: ResNet-8 at 8x8 px, random weights (no network in tests).
PROBE = dict(
    QUIET,
    model="resnet20",
    model_kwargs={"depth": 8},
    lr=0.5,
    sched="const",
    momentum=0.0,
    weight_decay=0.0,
)


def digits_tensors():
    """Digits as float tensors (normalised by the data module), for fit() with own loaders."""
    loaders = create_loaders(
        load_config("digits", {"batch_size": 2000, "augment": "none"}), torch.device("cpu")
    )
    ((tx, ty),) = list(loaders.train)
    ((vx, vy),) = list(loaders.test)
    return tx, ty, vx, vy


# ----------------------------------------------------------------------------- linear probes


def test_probe_trains_caches_and_its_checkpoint_evaluates(tmp_path):
    cache = tmp_path / "feats.pt"
    run = powergrad.train(
        "digits", out=tmp_path / "probe", probe_layer="layer3", probe_cache=str(cache), **PROBE
    )
    assert run.final["test_acc"] > 0.75, run.final  # chance: 0.1
    assert run.diagnostics == []
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["probe"]["layer"] == "layer3" and summary["probe"]["features"] == 64
    assert cache.is_file()
    # The checkpoint holds the head; eval rebuilds the (seeded, random) backbone and agrees.
    result = evaluate(run.run_dir / "last.pt")
    assert abs(result["top1"] - run.final["test_acc"]) < 1e-6
    # Read back from the cache, a second run is the same run.
    again = powergrad.train(
        "digits", out=tmp_path / "again", probe_layer="layer3", probe_cache=str(cache), **PROBE
    )
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in run.history]


def test_probe_resume_continues_the_same_run(tmp_path):
    probe = dict(PROBE, probe_layer="input")  # no backbone pass: the cheapest probe
    full = powergrad.train("digits", out=tmp_path / "full", **probe)
    powergrad.train("digits", out=tmp_path / "part", **{**probe, "epochs": 2})
    resumed = powergrad.train(
        "digits", out=tmp_path / "part", resume=str(tmp_path / "part" / "last.pt"), **probe
    )
    assert len(resumed.history) == 3
    for a, b in zip(full.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["test_acc"] == b["test_acc"]


def test_probe_on_the_input_is_softmax_regression_on_pixels(tmp_path):
    run = powergrad.train("digits", out=tmp_path / "input", probe_layer="input", **PROBE)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["probe"]["features"] == 64  # 1 x 8 x 8 pixels
    assert run.final["test_acc"] > 0.85


def test_wrong_probe_layer_lists_the_valid_names(tmp_path):
    with pytest.raises(
        UserError, match=r"did you mean 'layer2'.*valid names: input, conv1, bn1, layer1"
    ):
        powergrad.train("digits", out=tmp_path / "bad", probe_layer="layer_2", **PROBE)


def test_unscaled_features_are_standardised_by_default(tmp_path):
    """Seed 002's failure in miniature: flattened layer3 features, unscaled, at a high lr."""
    big = dict(
        PROBE,
        lr=0.5,
        probe_layer="layer3",
        probe_pool="flatten",
        probe_cache=str(tmp_path / "f.pt"),
    )
    good = powergrad.train("digits", out=tmp_path / "std", **big)
    raw = powergrad.train("digits", out=tmp_path / "raw", probe_standardize=False, **big)
    assert good.final["test_acc"] > 0.9
    assert raw.final["test_acc"] < good.final["test_acc"] - 0.1
    assert raw.final["train_loss"] > 5 * good.final["train_loss"]


# ----------------------------------------------------------------------------- fine-tuning


def test_fine_tune_from_local_weights_with_a_frozen_backbone(tmp_path):
    pre = powergrad.train("digits", out=tmp_path / "pre", model="mlp", **{**QUIET, "epochs": 2})
    tuned = powergrad.train(
        "digits",
        out=tmp_path / "tuned",
        model="mlp",
        weights=str(pre.run_dir / "last.pt"),
        freeze="backbone",
        head_lr=0.1,
        **{**QUIET, "epochs": 1},
    )
    # Started from the pretrained weights: already past where a fresh net is after one epoch.
    fresh = powergrad.train("digits", out=tmp_path / "fresh", model="mlp", **{**QUIET, "epochs": 1})
    assert tuned.final["test_acc"] >= pre.final["test_acc"] - 0.02
    assert tuned.history[0]["train_loss"] < fresh.history[0]["train_loss"]


# ----------------------------------------------------------------------------- the seed recipes


def test_every_seed_recipe_validates():
    names = [
        n
        for n in list_recipes()
        if n.startswith(("seed002/", "seed003/")) and not n.endswith("_base")
    ]
    assert len(names) == 8
    for name in names:
        cfg = load_config(name)
        assert cfg.epochs in (10, 100) and cfg.lr in (0.05, 0.1)
        if "finetune" in name or name.startswith("seed002/probe-") and cfg.probe_layer != "input":
            assert cfg.pretrained, name
        if cfg.model == "tv/alexnet":
            assert cfg.img_size >= 63, "AlexNet's conv and pools need >= 63 px"
    exp = load_config("seed003/convnet")
    assert exp.sched == "exp" and exp.decay_rate == 0.9 and exp.dataset == "tiny_imagenet"
    assert load_config("seed002/probe-intermediate").probe_layer == "layer3"
    assert load_config("seed002/probe-input", ["alpha=0.3"]).alpha == 0.3  # any alpha


# ----------------------------------------------------------------------------- diagnostics


def test_a_model_ending_in_softmax_on_large_positive_features_is_reported(tmp_path):
    """Seed 002's stuck probe and seed 003's softmax-before-the-loss, through fit(): features with
    a large common positive part (as ReLU features have) into a model that ends in softmax."""
    tx, ty, vx, vy = digits_tensors()
    feats = lambda x: (x.flatten(1) + 2) * 20  # noqa: E731 - pixels are ~N(0, 1) after normalising
    train = DataLoader(
        TensorDataset(feats(tx), ty),
        batch_size=256,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    test = DataLoader(TensorDataset(feats(vx), vy), batch_size=512)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10), nn.Softmax(dim=1))
    run = powergrad.fit(
        model,
        train,
        test,
        out=tmp_path / "stuck",
        lr=0.05,
        momentum=0.0,
        sched="const",
        epochs=3,
        batch_size=256,
        device="cpu",
    )
    codes = {d["code"]: d for d in run.diagnostics}
    assert "probabilities_as_logits" in codes and codes["probabilities_as_logits"]["epoch"] == 1
    assert "stalled" in codes and "log(e + 9)" in codes["stalled"]["message"]
    assert abs(run.final["train_acc"] - 0.1) < 0.03
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert {d["code"] for d in summary["diagnostics"]} == set(codes)

    # The diagnostics travel in the checkpoint: a resumed run still reports them, once each.
    again = powergrad.fit(
        model,
        train,
        test,
        out=tmp_path / "stuck",
        lr=0.05,
        momentum=0.0,
        sched="const",
        epochs=4,
        batch_size=256,
        device="cpu",
        resume="auto",
    )
    assert [d["code"] for d in again.diagnostics][: len(codes)] == list(codes)
    assert len({d["code"] for d in again.diagnostics}) == len(again.diagnostics)


def test_a_healthy_digits_run_raises_none(tmp_path):
    run = powergrad.train("digits", out=tmp_path / "ok", **{**QUIET, "epochs": 4})
    assert run.diagnostics == []
    assert run.final["dead_feature_share"] < 0.05


def _overfit_diagnostics(losses: list[tuple[float, float]], **cfg) -> list:
    monitor = Monitor(MonitorConfig(**cfg), num_classes=10)
    history = []
    for epoch, (train_loss, test_loss) in enumerate(losses, 1):
        history.append(
            {"epoch": epoch, "train_loss": train_loss, "train_acc": 0.5, "test_loss": test_loss}
        )
        monitor.after_epoch(history, nn.Linear(2, 2))
    return monitor.diagnostics


def test_overfitting_names_the_epoch_it_started():
    # Lowest test loss at epoch 2 (1.4); from epoch 3 on it stays > 20% above it for 3 epochs.
    (d,) = _overfit_diagnostics([(2.0, 1.9), (1.5, 1.4), (1.0, 1.8), (0.7, 1.9), (0.5, 2.0)])
    assert d.code == "overfitting" and d.epoch == 5 and "since epoch 2" in d.message
    assert "1.4 -> 2" in d.message


def test_overfitting_ignores_wobble_and_short_bumps():
    # The demo's false alarm: 0.0904 -> 0.0922 (2%) with train loss falling.
    demo = [
        (0.30, 0.0950),
        (0.20, 0.0910),
        (0.15, 0.0904),
        (0.12, 0.0915),
        (0.10, 0.0922),
        (0.09, 0.0921),
    ]
    assert _overfit_diagnostics(demo) == []
    # A big rise that lasts only two epochs, then recovers: not sustained over the window.
    bump = [(2.0, 1.0), (1.5, 0.8), (1.2, 1.2), (1.0, 1.3), (0.8, 0.85), (0.7, 0.82)]
    assert _overfit_diagnostics(bump) == []
    # The same numbers are an alarm when the user asks for a shorter window.
    (d,) = _overfit_diagnostics(bump, overfit_patience=2)
    assert d.epoch == 4 and "since epoch 2" in d.message
    # Test loss up but train loss up too: a training problem, not overfitting.
    assert _overfit_diagnostics([(1.0, 1.0), (1.1, 1.5), (1.2, 1.6), (1.3, 1.7)]) == []


def test_overfitting_reads_validation_loss_when_recorded():
    monitor = Monitor(MonitorConfig(), num_classes=10)
    history = []
    for epoch, val in enumerate([1.0, 0.9, 1.2, 1.3, 1.4], 1):
        history.append(
            {
                "epoch": epoch,
                "train_loss": 2.0 - 0.2 * epoch,
                "train_acc": 0.5,
                "test_loss": 0.9,
                "val_loss": val,
            }
        )
        monitor.after_epoch(history, nn.Linear(2, 2))
    (d,) = monitor.diagnostics
    assert d.message.startswith("validation loss has risen since epoch 2")


def test_dead_filters_from_weights_and_from_features():
    row = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0}
    conv = nn.Sequential(nn.Conv2d(3, 10, 3), nn.Conv2d(10, 10, 3))
    with torch.no_grad():
        conv[1].weight[:2] = 0  # 2 of 20 filters: 10% > 5%
    monitor = Monitor(MonitorConfig(), num_classes=10)
    monitor.after_epoch([dict(row)], conv)
    assert [d.code for d in monitor.diagnostics] == ["dead_filters"]
    assert "10.0% of 20 conv filters" in monitor.diagnostics[0].message

    # Features entering the classifier: 3 of 8 zero for every image of the epoch.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # head: the last Linear
    with torch.no_grad():
        model[0].bias.zero_()  # each unit is positive for about half the inputs...
        model[0].bias[:3] = -100.0  # ...but these three never are
    monitor = Monitor(MonitorConfig(), num_classes=2)
    monitor.watch_features(model)
    model.train()
    for _ in range(3):
        model(torch.randn(16, 4)).sum().backward()
    history = [dict(row)]
    monitor.after_epoch(history, model)
    monitor.close()
    assert [d.code for d in monitor.diagnostics] == ["dead_filters"]
    assert history[0]["dead_feature_share"] == pytest.approx(3 / 8)
    # The same model with every feature alive stays quiet.
    with torch.no_grad():
        model[0].bias.zero_()
    monitor = Monitor(MonitorConfig(), num_classes=2)
    monitor.watch_features(model)
    model(torch.randn(64, 4)).sum().backward()
    monitor.after_epoch([dict(row)], model)
    assert monitor.diagnostics == []


def test_identical_runs_finds_a_copied_run(tmp_path):
    a = powergrad.train("digits", out=tmp_path / "a", **{**QUIET, "epochs": 2}).run_dir
    b = powergrad.train("digits", out=tmp_path / "b", **{**QUIET, "epochs": 2, "seed": 1}).run_dir
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    # A pasted table keeps the numbers; its timings and stated lr may differ (seed 002's 3.3).
    text = (copy / "metrics.csv").read_text().splitlines()
    header = text[0].split(",")
    rows = [line.split(",") for line in text[1:]]
    for r in rows:
        r[header.index("epoch_s")] = "9.99"
        r[header.index("lr")] = "0.1"
    (copy / "metrics.csv").write_text("\n".join([text[0], *(",".join(r) for r in rows)]) + "\n")
    assert read_metrics(copy)[0]["lr"] == 0.1
    assert identical_runs([a, b, copy]) == [(a, copy)]
    assert identical_runs([a, b]) == []
