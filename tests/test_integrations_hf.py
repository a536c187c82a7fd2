"""docs/integrations.md's Hugging Face `Trainer` loss, run by the Trainer (transformers and
accelerate) for a few steps on a tiny ViT made from its config (nothing is downloaded).

With label smoothing and gradient accumulation: each logged training loss is the smoothed
cross-entropy of its accumulated batch, the logits' gradient is (softmax(alpha z) - q) / N over
the accumulated batch, and `eval_loss` is plain cross-entropy (no smoothing, no tampering).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from integrations_doc import run_block
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

N, C, ACCUMULATE, ALPHA, SMOOTHING = 4, 3, 2, 0.25, 0.1


class Images(Dataset):
    """Random 8x8 images; pixel (0, 0) of channel 0 holds the index, so a step's labels can be
    found from its inputs whatever order the Trainer's sampler draws."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float)
        self.y = torch.arange(n) % C

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_hf_trainer_trains_tampered_and_evaluates_plain(tmp_path):
    powergrad_loss = run_block("A Hugging Face `Trainer`")["powergrad_loss"]
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=C,
    )
    model = ViTForImageClassification(config)
    train, val = Images(4 * N, seed=1), Images(2 * N, seed=2)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logits, labels) of each training step

    def keep(module, args, kwargs, output):
        if output.logits.requires_grad:  # training; evaluation runs without gradients
            output.logits.retain_grad()
            index = kwargs["pixel_values"][:, 0, 0, 0].round().long()
            seen.append((output.logits, train.y[index]))

    model.register_forward_hook(keep, with_kwargs=True)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=N,
        per_device_eval_batch_size=2 * N,
        gradient_accumulation_steps=ACCUMULATE,
        num_train_epochs=1,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=val,
        compute_loss_func=powergrad_loss(alpha=ALPHA, label_smoothing=SMOOTHING),
    )
    trainer.train()
    assert len(seen) == 4

    for logits, labels in seen:
        z = logits.detach().double()
        q = F.one_hot(labels, C).double() * (1 - SMOOTHING) + SMOOTHING / C
        tampered = (torch.softmax(ALPHA * z, 1) - q) / (N * ACCUMULATE)
        plain = (torch.softmax(z, 1) - q) / (N * ACCUMULATE)
        grad = logits.grad.double()
        torch.testing.assert_close(grad, tampered, rtol=1e-5, atol=1e-8)
        assert (grad - plain).abs().max() > 100 * (grad - tampered).abs().max()

    logged = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    want = [
        F.cross_entropy(
            torch.cat([z.detach() for z, _ in pair]),
            torch.cat([t for _, t in pair]),
            label_smoothing=SMOOTHING,
        ).item()
        for pair in zip(seen[0::2], seen[1::2])
    ]
    torch.testing.assert_close(logged, want, rtol=1e-6, atol=0)

    eval_loss = trainer.evaluate()["eval_loss"]
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=val.x).logits
    torch.testing.assert_close(eval_loss, F.cross_entropy(logits, val.y).item(), rtol=1e-6, atol=0)
    assert abs(eval_loss - F.cross_entropy(logits, val.y, label_smoothing=SMOOTHING).item()) > 1e-3
