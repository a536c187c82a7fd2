"""docs/integrations.md's three edits to timm's train.py.

timm's wheel and its PyPI sdist leave out train.py (it lives in the pytorch-image-models
repository only), and tests neither download nor carry a copy of another project's code. So:

- always: the three documented snippets run as train.py runs them (the import, the argument in
  an argparse group, the loss set-up block with train.py's `args`, `mixup_active` and `parser`):
  the loss chosen for each option, and the refusal of `--sgt-alpha` with `--bce-loss` or
  `--jsd-loss`;
- with a checkout of pytorch-image-models (``POWERGRAD_TIMM_TRAIN_PY=/path/to/train.py``): the
  edits applied to that train.py, which then trains for one epoch of a few steps on a tiny
  image folder; the logged loss is cross-entropy's, the logits' gradient the tampered one, and
  the validation loss plain.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from integrations_doc import python_blocks

import powergrad
from powergrad import PowerGradLoss

SECTION = "timm's `train.py`"
ENV_TRAIN_PY = "POWERGRAD_TIMM_TRAIN_PY"


def _edits() -> tuple[str, str, str]:
    """The three snippets; the third up to timm's own branches (`elif args.jsd_loss:`)."""
    imports, argument, loss = python_blocks(SECTION)
    return imports.strip(), argument.strip(), loss[: loss.index("elif args.jsd_loss:")].strip()


def _loss_setup(argv: list[str], mixup_active: bool) -> PowerGradLoss | None:
    """train.py's parser (the options the snippet reads) and its loss set-up, with the snippet."""
    imports, argument, loss = _edits()
    parser = argparse.ArgumentParser(prog="train.py")
    group = parser.add_argument_group("Augmentation and regularization parameters")
    group.add_argument("--jsd-loss", action="store_true", default=False)
    group.add_argument("--bce-loss", action="store_true", default=False)
    group.add_argument("--smoothing", type=float, default=0.1)
    scope = {"parser": parser, "group": group, "mixup_active": mixup_active}
    exec(imports + "\n" + argument, scope)
    scope["args"] = parser.parse_args(argv)
    exec(loss + "\nelse:\n    train_loss_fn = None  # timm's own losses", scope)
    return scope["train_loss_fn"]


def test_the_documented_loss_setup_picks_powergrad_and_refuses_other_losses(capsys):
    assert _loss_setup([], mixup_active=False) is None  # no --sgt-alpha: timm's losses as before
    plain = _loss_setup(["--sgt-alpha", "0.3", "--smoothing", "0.2"], mixup_active=False)
    assert isinstance(plain, PowerGradLoss) and (plain.alpha, plain.label_smoothing) == (0.3, 0.2)
    mixed = _loss_setup(["--sgt-alpha", "0.3"], mixup_active=True)  # Mixup smooths its targets
    assert isinstance(mixed, PowerGradLoss) and mixed.label_smoothing == 0.0
    for other in ("--bce-loss", "--jsd-loss"):
        with pytest.raises(SystemExit) as stop:
            _loss_setup(["--sgt-alpha", "0.3", other], mixup_active=True)
        assert stop.value.code == 2
        assert "--sgt-alpha replaces cross-entropy" in capsys.readouterr().err.splitlines()[-1]


def patched_train_py(source: str) -> str:
    """timm's train.py with the doc's three edits, each at the place the doc names."""
    imports, argument, loss = _edits()
    lines = source.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("from timm.loss import"))
    lines.insert(at + 1, imports)
    at = next(i for i, ln in enumerate(lines) if "add_argument('--smoothing'" in ln)
    while not lines[at].rstrip().endswith(")"):  # the end of that call
        at += 1
    lines.insert(at + 1, argument)
    at = next(i for i, ln in enumerate(lines) if ln.strip() == "# setup loss function") + 1
    assert lines[at] == "    if args.jsd_loss:", lines[at]
    lines[at] = "    elif args.jsd_loss:"
    lines.insert(at, "\n".join("    " + ln if ln else ln for ln in loss.splitlines()))
    return "\n".join(lines) + "\n"


@pytest.fixture
def train_py(tmp_path) -> Path:
    given = os.environ.get(ENV_TRAIN_PY)
    if not given:
        pytest.skip(
            f"{ENV_TRAIN_PY} is not set: timm's train.py is in neither its wheel nor its sdist"
        )
    patched = tmp_path / "train.py"
    patched.write_text(patched_train_py(Path(given).read_text()))
    return patched


def _image_folder(root: Path, per_class: dict[str, int]) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in per_class.items():
        for c in range(3):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")


def _train(train_py: Path, argv: list[str], monkeypatch) -> None:
    """Run train.py in this process (so that the test sees its loss), then undo what it set
    for the whole process: handlers on the root logger, cuDNN's benchmark mode."""
    monkeypatch.setattr(sys, "argv", [str(train_py), *argv])
    monkeypatch.chdir(train_py.parent)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    runpy.run_path(str(train_py), run_name="__main__")


def test_timm_train_py_with_the_documented_patch(train_py, tmp_path, monkeypatch, capsys):
    alpha, smoothing, batch, accumulate = 0.3, 0.1, 4, 2
    _image_folder(tmp_path / "data", {"train": 4, "validation": 2})
    trained: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    validated: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recorded(PowerGradLoss):  # what the patched train.py imports from powergrad
        def forward(self, logits, target):
            loss = super().forward(logits, target)
            assert logits.requires_grad
            logits.retain_grad()
            trained.append((logits, target, loss.item()))
            return loss

    class Validation(torch.nn.CrossEntropyLoss):  # train.py's validate_loss_fn
        def forward(self, logits, target):
            validated.append((logits.detach(), target))
            return super().forward(logits, target)

    monkeypatch.setattr(powergrad, "PowerGradLoss", Recorded)
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", Validation)
    argv = [str(tmp_path / "data"), "--model", "test_resnet", "--num-classes", "3"]
    argv += ["--img-size", "16", "-b", str(batch), "--grad-accum-steps", str(accumulate)]
    argv += ["--epochs", "1", "--warmup-epochs", "0", "--lr", "0.01", "--device", "cpu"]
    argv += ["--no-prefetcher", "--workers", "0", "--output", str(tmp_path / "out")]
    argv += ["--experiment", "run", "--log-interval", "1", "--smoothing", str(smoothing)]
    _train(train_py, [*argv, "--sgt-alpha", str(alpha)], monkeypatch)

    assert len(trained) == 3  # 12 images, batches of 4
    for logits, target, loss in trained:
        z = logits.detach().double()
        assert loss == pytest.approx(
            F.cross_entropy(z, target, label_smoothing=smoothing).item(), rel=1e-6
        )
        q = F.one_hot(target, 3).double() * (1 - smoothing) + smoothing / 3
        # train.py divides each micro-batch's loss by the accumulation steps of its update
        # (the last update of the epoch has one micro-batch left).
        steps = 1 if logits is trained[-1][0] else accumulate
        tampered = (torch.softmax(alpha * z, 1) - q) / (len(target) * steps)
        plain = (torch.softmax(z, 1) - q) / (len(target) * steps)
        grad = logits.grad.double()
        torch.testing.assert_close(grad, tampered, rtol=1e-5, atol=1e-8)
        assert (grad - plain).abs().max() > 100 * (grad - tampered).abs().max()

    with open(tmp_path / "out" / "run" / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    sizes = torch.tensor([len(t) for _, t, _ in trained], dtype=torch.float64)
    losses = torch.tensor([loss for _, _, loss in trained], dtype=torch.float64)
    assert float(row["train_loss"]) == pytest.approx(((losses * sizes).sum() / sizes.sum()).item())
    z = torch.cat([z for z, _ in validated])
    t = torch.cat([t for _, t in validated])
    assert len(t) == 6 and float(row["eval_loss"]) == pytest.approx(F.cross_entropy(z, t).item())
    assert float(row["eval_loss"]) != pytest.approx(
        F.cross_entropy(z, t, label_smoothing=smoothing).item()
    )

    # --sgt-alpha with another loss stops with a usage error rather than silently replacing it.
    with pytest.raises(SystemExit) as stop:
        _train(train_py, [*argv, "--sgt-alpha", str(alpha), "--bce-loss"], monkeypatch)
    assert stop.value.code == 2
    assert "--sgt-alpha replaces cross-entropy" in capsys.readouterr().err.splitlines()[-1]
