"""docs/integrations.md's Lightning module, run by Lightning's Trainer for a few steps.

The module is left in eval mode before `fit` (Lightning 2.6 does not call `.train()`): it must
train tampered all the same. Each step's logged loss is cross-entropy's value, the logits'
gradient is (softmax(alpha z) - q) / N (over the accumulated batches), and the logged
validation loss is plain cross-entropy.
"""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from integrations_doc import run_block
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N, C, ACCUMULATE = 8, 4, 2


# Lightning's own notices: the eval-mode one is this test's point; the other is its pytree code.
@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_lightning_trains_tampered_even_left_in_eval_mode_and_validates_plain(tmp_path):
    Classifier = run_block("A Lightning module")["Classifier"]
    torch.manual_seed(0)
    x, y = torch.randn(4 * N, 6) * 3, torch.arange(4 * N) % C
    xv, yv = torch.randn(2 * N, 6) * 3, torch.arange(2 * N) % C
    net = nn.Linear(6, C)
    seen: list[torch.Tensor] = []  # the logits of each training step

    def keep(module, inputs, logits):
        if logits.requires_grad:  # training; validation runs without gradients
            logits.retain_grad()
            seen.append(logits)

    net.register_forward_hook(keep)
    module = Classifier(net)  # the doc's defaults: alpha 0.25, label smoothing 0.1
    alpha, ls = module.criterion.alpha, module.criterion.label_smoothing
    module.eval()  # the trap: nothing in fit() puts it back in train mode
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        accumulate_grad_batches=ACCUMULATE,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(
        module, DataLoader(TensorDataset(x, y), N), DataLoader(TensorDataset(xv, yv), 2 * N)
    )
    assert not module.training and len(seen) == 4

    for logits, target in zip(seen, y.split(N)):
        z = logits.detach().double()
        q = F.one_hot(target, C).double() * (1 - ls) + ls / C
        tampered = (torch.softmax(alpha * z, 1) - q) / (N * ACCUMULATE)
        plain = (torch.softmax(z, 1) - q) / (N * ACCUMULATE)
        grad = logits.grad.double()
        torch.testing.assert_close(grad, tampered, rtol=1e-5, atol=1e-8)
        assert (grad - plain).abs().max() > 100 * (grad - tampered).abs().max()

    logged = _metrics(trainer.logger.log_dir)
    train_losses = [float(r["train_loss"]) for r in logged if r["train_loss"]]
    want = [
        F.cross_entropy(z.detach(), t, label_smoothing=ls).item() for z, t in zip(seen, y.split(N))
    ]
    # Logged once per optimiser step: the last micro-batch's value (float32, as logged).
    torch.testing.assert_close(train_losses, want[ACCUMULATE - 1 :: ACCUMULATE], rtol=1e-6, atol=0)
    (val_loss,) = [float(r["val_loss"]) for r in logged if r["val_loss"]]
    with torch.no_grad():
        plain_val = F.cross_entropy(net(xv), yv).item()
        smoothed_val = F.cross_entropy(net(xv), yv, label_smoothing=ls).item()
    assert abs(val_loss - plain_val) < 1e-6 and abs(val_loss - smoothed_val) > 1e-3


def _metrics(log_dir: str) -> list[dict[str, str]]:
    with open(f"{log_dir}/metrics.csv", newline="") as f:
        return list(csv.DictReader(f))
