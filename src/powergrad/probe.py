"""The linear-probe workflow (``probe_layer=NAME``): one backbone pass, then the ordinary loop.

1. Build the recipe's backbone as a :class:`powergrad.models.Probe` (pretrained / weights as
   usual) and the data without augmentation.
2. Run the backbone once over train, test (and val) up to ``probe_layer``; pool the outputs;
   keep the features on the device (and in ``probe_cache`` if set).
3. Standardise with the training set's per-feature mean and std (``probe_standardize``): the
   statistics become buffers of the head, so a checkpoint evaluates on images as it trained.
4. Train the head (softmax regression) with :func:`powergrad.engine.loop.run_training` on
   in-memory feature loaders: logging, checkpoints, resume, the tampering and the diagnostics
   are those of every run.

A probe checkpoint holds the head only (``fc`` and the two statistics buffers); evaluation
rebuilds the backbone from the run's recipe, so it needs the same weights (pretrained or
``weights=PATH``) the run used.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .config import Config, probe_feature_keys
from .engine.resume import StartPlan
from .errors import UserError, extra

with extra("train"):
    from .data import create_loaders
    from .data.memory import MemoryEvalLoader, MemoryTrainLoader
    from .engine.distributed import DistInfo, cleanup, init_distributed, pick_device
    from .engine.loop import evaluate_loader, run_training
    from .engine.state import load_model_state, seed_everything
    from .models import Probe, create_model

log = logging.getLogger("powergrad")

# Cached features live on the training device as float32; above this many bytes, ask for pooling
# instead (CIFAR-10's 60,000 images at layer3 of ResNet-18 at 224 px flattened: 12 GB).
FEATURE_LIMIT_BYTES = 4 * 1024**3


class _NoTransform:
    """The memory loaders' transform interface, for features that need none."""

    def draw(self, gen: torch.Generator, n: int, side: int) -> dict[str, torch.Tensor]:
        return {}

    def __call__(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        return x


def train_probe(plan: StartPlan, **loop_options: Any):
    """Train a linear probe on the frozen features of ``plan.cfg.model`` at its ``probe_layer``.

    ``loop_options`` go to :func:`run_training` as they do from :func:`powergrad.workflows.train`."""

    cfg = plan.cfg
    dist = init_distributed(cfg.device)
    try:
        if dist.enabled:
            raise UserError(
                "probe_layer trains in one process (its head is one linear layer): drop nproc"
            )
        probe, loaders = _build(cfg, dist.device)
        feats = _features(probe, loaders, cfg, dist.device)
        mean, std = standardisation(feats["train_x"]) if cfg.probe_standardize else (None, None)
        if mean is not None:
            probe.feat_mean.copy_(mean)
            probe.feat_std.copy_(std)
        _log_scale(feats["train_x"], cfg)
        head = probe.head_module()  # after probe.to(device): shares its fc and buffers
        none = _NoTransform()
        b = cfg.batch_size
        train = MemoryTrainLoader(feats["train_x"], feats["train_y"], none, b, cfg.seed)
        test = MemoryEvalLoader(feats["test_x"], feats["test_y"], none, b)
        val = (
            MemoryEvalLoader(feats["val_x"], feats["val_y"], none, b) if "val_x" in feats else None
        )
        extra = {
            "probe": {
                "layer": cfg.probe_layer,
                "features": int(feats["train_x"].shape[1]),
                "train_examples": int(len(feats["train_y"])),
                "standardized": cfg.probe_standardize,
            }
        }
        # The head's input is standardised features, not activations: no dead-feature watch.
        return run_training(
            head,
            train,
            test,
            plan,
            dist,
            val_loader=val,
            extra_summary=extra,
            watch_features=False,
            class_names=list(loaders.info.class_names),
            **loop_options,
        )
    finally:
        cleanup(dist)


def evaluate_probe(cfg: Config, state: dict[str, Any], checkpoint: str | Path) -> dict[str, float]:
    """Evaluate a probe checkpoint on images: the recipe's backbone plus the saved head."""
    device = pick_device(cfg.device)
    try:
        probe, loaders = _build(cfg, device)
    except UserError as e:
        raise UserError(
            f"{e} (a probe checkpoint holds only the head; its backbone comes from "
            "the recipe's pretrained / weights)"
        ) from None
    load_model_state(probe.head_module(), state["model"], checkpoint)
    return evaluate_loader(probe, loaders.test, cfg, DistInfo(device=device))


def standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of (N, D) training features; a (near-)constant feature keeps std 1,
    so test values off its constant are not blown up by a tiny divisor."""
    x64 = x.double()
    mean, std = x64.mean(0), x64.std(0)
    constant = std <= 1e-6 * std.max().clamp_min(1e-12)
    std = torch.where(constant, torch.ones_like(std), std)
    return mean.float(), std.float()


# ----------------------------------------------------------------------------- helpers


def create_probe(cfg: Config, num_classes: int, in_chans: int, img_size: int):
    """``cfg.model`` built as any run builds it (weights, pretrained), wrapped in a
    :class:`powergrad.models.Probe` at ``cfg.probe_layer``: the backbone frozen, ``fc`` trains."""
    if cfg.probe_layer is None:
        raise ValueError("create_probe: cfg.probe_layer names no layer to probe")
    backbone = create_model(
        dataclasses.replace(cfg, probe_layer=None, freeze="none"), num_classes, in_chans, img_size
    )
    if not (cfg.weights or cfg.pretrained):
        log.warning("probe_layer with neither pretrained nor weights: probing a random network")
    probe = Probe(backbone, cfg.probe_layer, num_classes, in_chans, img_size, cfg.probe_pool)
    log.info(
        "linear probe on %s at layer %s: %d features -> %d classes (backbone frozen)",
        cfg.model,
        cfg.probe_layer,
        probe.fc.in_features,
        num_classes,
    )
    return probe


def _build(cfg: Config, device: torch.device):
    """The Probe and the loaders, seeded as train() seeds them (a random backbone comes out the same)."""
    seed_everything(cfg.seed)
    loaders = create_loaders(dataclasses.replace(cfg, augment="none"), device)
    seed_everything(cfg.seed)
    info = loaders.info
    probe = create_probe(cfg, info.num_classes, info.in_chans, info.img_size)
    return probe.to(device).eval(), loaders


def _features(probe, loaders, cfg: Config, device: torch.device) -> dict[str, torch.Tensor]:
    key = {
        k: getattr(cfg, k) for k in probe_feature_keys()
    }  # a cache made with others is recomputed
    cache = Path(cfg.probe_cache) if cfg.probe_cache else None
    if cache is not None and cache.is_file():
        try:
            saved = torch.load(cache, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable cache is recomputed
            log.warning("probe_cache %s unreadable (%s): recomputing", cache, type(e).__name__)
            saved = None
        if saved is not None and saved.get("key") == key:
            log.info("probe features read from %s", cache)
            return {k: v for k, v in saved.items() if k != "key"}
        if saved is not None:
            log.info("probe_cache %s was made with other settings: recomputing", cache)

    train = loaders.train
    if isinstance(train, MemoryTrainLoader):  # every training image once, in order
        train = MemoryEvalLoader(train.x, train.y, train.transform, cfg.batch_size)
    else:
        log.info("probe: streaming train set read once; the last partial batch is left out")
    n_total = loaders.info.num_train + loaders.info.num_test
    feats = {}
    for split, loader in (("train", train), ("test", loaders.test), ("val", loaders.val)):
        if loader is not None:
            feats[f"{split}_x"], feats[f"{split}_y"] = _extract(probe, loader, n_total, cfg)
    log.info(
        "probe features at %s: %d train and %d test examples x %d",
        cfg.probe_layer,
        len(feats["train_y"]),
        len(feats["test_y"]),
        feats["train_x"].shape[1],
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, **{k: v.cpu() for k, v in feats.items()}}, cache)
        log.info("probe features written to %s", cache)
    return feats


@torch.no_grad()
def _extract(
    probe, loader: Iterable, n_total: int, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for x, y in loader:
        f = probe.features(x).float()
        if not xs and n_total * f.shape[1] * 4 > FEATURE_LIMIT_BYTES:
            raise UserError(
                f"probe features at {cfg.probe_layer} have {f.shape[1]} numbers per image: "
                f"{n_total * f.shape[1] * 4 / 1e9:.1f} GB for the data set; use probe_pool=avg or a "
                "smaller img_size"
            )
        xs.append(f)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _log_scale(train_x: torch.Tensor, cfg: Config) -> None:
    """Log the numbers that decide whether plain SGD can train on these features.

    In softmax regression the batch gradient moves image i's logits by lr * mean_j <f_i, f_j>
    (p_j - q_j). Features that share a large common part m (ReLU outputs are all >= 0) move every
    image's logits together by about lr * ||m||^2 * mean(p - q): above ~10 the first steps push
    all images to one class and saturate the softmax. Centring removes m; scaling bounds the rest.
    """
    x = train_x.double()
    common = float(x.mean(0).pow(2).sum())
    log.info(
        "probe features (raw): mean |f| %.3g, max %.3g, mean ||f||^2 %.3g, ||mean f||^2 %.3g; "
        "lr * ||mean f||^2 = %.3g%s",
        float(x.abs().mean()),
        float(x.max()),
        float(x.pow(2).sum(1).mean()),
        common,
        cfg.lr * common,
        " (standardised before training)" if cfg.probe_standardize else " (not standardised)",
    )
    if not cfg.probe_standardize and cfg.lr * common > 10:
        log.warning(
            "probe_standardize=false with lr * ||mean f||^2 = %.3g: the first steps will push "
            "every image to one class (seed 002's stuck probe); standardise or lower lr",
            cfg.lr * common,
        )
