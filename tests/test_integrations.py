"""The loss among timm's own training parts, as docs/integrations.md puts it into timm's train.py:
Mixup/CutMix soft targets (label smoothing inside them), create_optimizer_v2, a warm-up cosine
scheduler, bf16 autocast. At every step the gradient reaching the logits is (softmax(alpha z) - q) / N."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from powergrad import PowerGradLoss


def test_with_timm_mixup_optimizer_scheduler_and_bf16_the_logits_get_the_tampered_gradient():
    torch.manual_seed(0)
    n, classes, alpha, epochs = 16, 10, 0.3, 3
    model = timm.create_model("test_resnet", num_classes=classes)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=classes)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=1
    )
    # What train.py's loss set-up becomes: Mixup already smoothed the targets.
    train_loss_fn = PowerGradLoss(alpha=alpha)
    images, labels = torch.randn(n, 3, 64, 64), torch.arange(n) % classes

    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(2):
            x, q = mixup(images.clone(), labels)
            assert q.shape == (n, classes) and q.min() > 0  # soft, smoothed targets
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            assert logits.dtype == torch.bfloat16
            logits.retain_grad()
            loss = train_loss_fn(logits, q)
            optimizer.zero_grad()
            loss.backward()

            z = logits.detach().float()
            torch.testing.assert_close(
                loss, SoftTargetCrossEntropy()(z, q)
            )  # the value: cross-entropy
            tampered = (torch.softmax(alpha * z, -1) - q) / n
            plain = (torch.softmax(z, -1) - q) / n
            grad = logits.grad.float()
            # One bf16 rounding of the float32 gradient: 2**-9 relative.
            torch.testing.assert_close(grad, tampered, rtol=1e-2, atol=1e-6)
            assert (grad - plain).abs().max() > 10 * (grad - tampered).abs().max()
            optimizer.step()
        scheduler.step(epoch + 1)
    assert lrs[0] < lrs[1] and lrs[1] > lrs[2] > 0  # warm-up, then cosine decay
    # timm's validate(): no gradient, nothing tampered: the loss is F.cross_entropy itself.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(images).float()
        assert torch.equal(train_loss_fn(z, labels), F.cross_entropy(z, labels))
