"""The public training API, above the engine: build what a recipe asks for, then run the loop.

``train(config)`` builds data and model from a recipe (a linear probe's features and head when
``probe_layer`` is set: powergrad.probe), ``fit(model, train_loader, test_loader)`` runs the same
loop on a user's own model and loaders, ``evaluate(checkpoint)`` scores a checkpoint on its
recipe's test split. Each returns what powergrad.engine gives back (a RunResult, or metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .config import Config, load_config
from .data import check_checkpoint_classes, create_loaders
from .engine.distributed import DistInfo, cleanup, init_distributed, raise_if_peer_failed
from .engine.loop import RunResult, already_complete, evaluate_loader, run_training
from .engine.resume import StartPlan, plan_start, read_checkpoint
from .engine.state import load_model_state, seed_everything
from .errors import UserError
from .models import create_model
from .probe import evaluate_probe, train_probe
from .rundir import checkpoint_in, hold_folder, hold_folder_or_none, run_folder_of

__all__ = ["train", "fit", "evaluate"]

log = logging.getLogger("powergrad")


def train(
    config: Config | dict | str | Path | None = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    on_epoch: Callable[[dict[str, Any]], bool] | None = None,
    plan: StartPlan | None = None,
    **overrides: Any,
) -> RunResult:
    """Train the recipe ``config`` (a Config, a dict of keys, a recipe name or YAML path).

    ``on_epoch(row)`` is called after each epoch's record (every process, same row); returning
    True stops the run there with status ``stopped`` (a sweep's pruner uses it). ``plan``: a
    start already planned (the CLI's), instead of ``config``, ``out`` and the overrides.
    """
    if plan is None:
        resume = overrides.get("resume") or getattr(config, "resume", None)
        if isinstance(config, dict):
            resume = {**config, **overrides}.get("resume")
        with hold_folder_or_none(run_folder_of(resume, out)):
            plan = plan_start(config, overrides, out, overwrite=overwrite)
            return train(plan=plan, on_epoch=on_epoch)
    with hold_folder(plan.run_path):  # (held already when planned here or by the CLI)
        return _train(plan, on_epoch)


def _train(plan: StartPlan, on_epoch: Callable[[dict[str, Any]], bool] | None) -> RunResult:
    cfg = plan.cfg
    if plan.complete and plan.own_folder:  # (another run's file must still fit the model:
        return already_complete(plan)  # run_training checks, then says so)
    if cfg.probe_layer:  # features computed once, then the loop on the head
        return train_probe(plan, on_epoch=on_epoch)
    dist = init_distributed(cfg.device)
    try:
        seed_everything(cfg.seed)
        loaders = create_loaders(cfg, dist.device, dist.rank, dist.world_size)
        info = loaders.info
        if dist.is_main:
            log.info(info.describe(cfg.dataset))
        seed_everything(cfg.seed)  # the model's initial weights do not depend on the data code
        model = create_model(cfg, info.num_classes, info.in_chans, info.img_size)
        return run_training(
            model,
            loaders.train,
            loaders.test,
            plan,
            dist,
            val_loader=loaders.val,
            extra_summary={"bad_images": info.bad_images},
            on_epoch=on_epoch,
            class_names=list(info.class_names),
        )
    except RuntimeError as e:
        raise_if_peer_failed(e, dist)
        raise
    finally:
        cleanup(dist)


def fit(
    model: nn.Module,
    train_loader: Any,
    test_loader: Any,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    **options: Any,
) -> RunResult:
    """Train a user's own ``model`` on their loaders with powergrad's loop.

    ``options`` are recipe keys (``alpha=0.25, epochs=10, lr=0.05, ...``). Loaders yield
    ``(inputs, targets)``; a ``set_epoch(epoch)`` method, if present, is called each epoch.
    """
    keys = {"model": "custom", "dataset": "custom", **options}
    with hold_folder_or_none(run_folder_of(keys.get("resume"), out)):
        plan = plan_start(None, keys, out, overwrite=overwrite)
        with hold_folder(plan.run_path):
            dist = init_distributed(plan.cfg.device)
            try:
                seed_everything(plan.cfg.seed)
                return run_training(model, train_loader, test_loader, plan, dist)
            except RuntimeError as e:
                raise_if_peer_failed(e, dist)
                raise
            finally:
                cleanup(dist)


def evaluate(checkpoint: str | Path, overrides: list[str] | dict | None = None) -> dict[str, float]:
    """Evaluate a checkpoint on its recipe's test split: ``{top1, top5, loss, n}``.

    ``checkpoint`` is a checkpoint file or a run folder (its best checkpoint, else its last:
    rundir.checkpoint_in)."""
    if (named := checkpoint_in(checkpoint)) != Path(checkpoint):
        log.info("evaluating %s", named)  # the file chosen in the run folder given
    checkpoint = named
    state = read_checkpoint(checkpoint)
    raw = {k: v for k, v in (state.get("config") or {}).items() if k not in ("resume", "init_from")}
    cfg = load_config(None, {**raw, **_overrides_dict(overrides)})
    if cfg.probe_layer:  # the checkpoint holds the head; the backbone comes from the recipe
        return evaluate_probe(cfg, state, checkpoint)
    cfg.weights, cfg.pretrained = None, False
    dist = DistInfo(device=init_distributed(cfg.device).device)
    loaders = create_loaders(cfg, dist.device)
    info = loaders.info
    check_checkpoint_classes(state.get("class_names"), info.class_names, checkpoint)
    model = create_model(cfg, info.num_classes, info.in_chans, info.img_size)
    load_model_state(model, state["model"], checkpoint)
    model.to(dist.device)
    return evaluate_loader(model, loaders.test, cfg, dist)


def _overrides_dict(overrides) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return overrides
    out = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out
