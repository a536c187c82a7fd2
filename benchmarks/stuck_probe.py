"""Why seed 002's intermediate-layer probe sat at 10% with its loss frozen at 2.361.

Features of a frozen ResNet-18 at one layer (random weights: no pretrained weights offline; the
activations are of the same order, |f| ~ 1 after ReLU), then softmax regression trained with
powergrad.fit under seed 002's settings (plain SGD, lr 0.05, constant, batch 256, 10 epochs).
The heads differ in two things only: whether the model ends in softmax (seed 002's notebooks:
probabilities fed to a cross-entropy that applies softmax again) and whether the features are
standardised with train-set statistics (powergrad's default). One JSON line per variant.

    python benchmarks/stuck_probe.py [--dataset digits] [--img-size 64] [--layer layer3]
        [--pool flatten] [--lr 0.05] [--out runs/stuck_probe]

(log(e + 9) - 1 = 1.461 and log(e + 9) = 2.461 are the cross-entropies of a one-hot
"probability" row taken as logits, right and wrong: a stuck model that is right 10% of the
time has loss 0.9 * 2.461 + 0.1 * 1.461 = 2.361.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from powergrad import fit
from powergrad.config import load_config
from powergrad.probe import _build, _features, standardisation


def head(dim: int, num_classes: int, softmax: bool) -> nn.Module:
    layers = [nn.Linear(dim, num_classes)]
    if softmax:
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--model", default="tv/resnet18")
    ap.add_argument("--layer", default="layer3")
    ap.add_argument("--pool", default="flatten", choices=("avg", "flatten"))
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default="runs/stuck_probe")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    cfg = load_config(
        "digits",
        {
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "img_size": args.img_size,
            "model": args.model,
            "probe_layer": args.layer,
            "probe_pool": args.pool,
            "batch_size": args.batch_size,
            "workers": 0,
        },
    )
    probe, loaders = _build(cfg, torch.device("cpu"))
    feats = _features(probe, loaders, cfg, torch.device("cpu"))
    tx, ty, vx, vy = feats["train_x"], feats["train_y"], feats["test_x"], feats["test_y"]
    mean, std = standardisation(tx)
    common = float(tx.double().mean(0).pow(2).sum())
    num_classes = loaders.info.num_classes
    print(
        json.dumps(
            {
                "features": tx.shape[1],
                "train": len(ty),
                "test": len(vy),
                "mean_abs_f": round(float(tx.abs().mean()), 4),
                "mean_sq_norm": round(float(tx.double().pow(2).sum(1).mean()), 1),
                "sq_norm_of_mean": round(common, 1),
                "lr_x_sq_norm_of_mean": round(args.lr * common, 1),
                "stuck_loss_at_10pct": round(math.log(math.e + 9) - 0.1, 4),
            }
        ),
        flush=True,
    )

    options = dict(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer="sgd",
        momentum=0.0,
        weight_decay=0.0,
        sched="const",
        device="cpu",
        seed=0,
    )
    for softmax in (True, False):
        for standardised in (False, True):
            name = (
                f"{'softmax' if softmax else 'logits'}-{'standardised' if standardised else 'raw'}"
            )
            a, b = ((tx - mean) / std, (vx - mean) / std) if standardised else (tx, vx)
            gen = torch.Generator().manual_seed(0)
            train = DataLoader(
                TensorDataset(a, ty),
                batch_size=args.batch_size,
                shuffle=True,
                drop_last=True,
                generator=gen,
            )
            test = DataLoader(TensorDataset(b, vy), batch_size=1024)
            torch.manual_seed(0)
            model = head(tx.shape[1], num_classes, softmax)
            r = fit(model, train, test, out=f"{args.out}/{name}", overwrite=True, **options)
            losses = [round(h["train_loss"], 4) for h in r.history]
            print(
                json.dumps(
                    {
                        "variant": name,
                        "train_loss_per_epoch": losses,
                        "final_train_acc": round(r.final["train_acc"], 4),
                        "final_test_acc": round(r.final["test_acc"], 4),
                        "diagnostics": [d["code"] for d in r.diagnostics],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
