"""The training loop, top to bottom: set-up, resume, epochs of steps, evaluation, records.

``train(config)`` builds data and model from a recipe; ``fit(model, train_loader, test_loader)``
runs the same loop on a user's own model and loaders. Both write a run directory (see
powergrad.rundir) and return a :class:`RunResult`.

Speed notes (see docs/performance.md for the measured effect):
- per-step metrics are summed on the device and read once per epoch (monitor.stats), so a step
  makes no host-device sync; the non-finite and pre-emption checks read one flag every
  ``SYNC_EVERY`` steps on a GPU (every step on the CPU, where a read is free).
- the tampering is one fused autograd function (tamper.py), the same cost as cross-entropy.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad
from torch import nn

from ..config import Config, config_hash, load_config
from ..errors import DivergenceError, UserError
from ..monitor import EpochStats, Monitor
from ..progress import StepProgress, track
from ..rundir import RunDir, environment, git_commit, new_run_name
from ..tamper import PowerGradLoss
from .checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from .distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    check_same_everywhere,
    cleanup,
    init_distributed,
    raise_if_peer_failed,
)
from .optim import create_optimizer, create_scheduler

log = logging.getLogger("powergrad")

SYNC_EVERY = 25  # GPU steps between reads of the divergence / pre-emption flags


@dataclass
class RunResult:
    """What a run returns: its record on disk and the numbers in it."""

    run_dir: Path | None
    status: str  # finished | preempted
    final: dict[str, Any]
    best: dict[str, Any]
    history: list[dict[str, Any]]
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


# ----------------------------------------------------------------------------- public API


def train(
    config: Config | dict | str | Path | None = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    on_epoch: Callable[[dict[str, Any]], bool] | None = None,
    **overrides: Any,
) -> RunResult:
    """Train the recipe ``config`` (a Config, a dict of keys, a recipe name or YAML path).

    ``on_epoch(row)`` is called after each epoch's record (every process, same row); returning
    True stops the run there with status ``stopped`` (a sweep's pruner uses it).
    """
    cfg = _as_config(config, overrides)
    if cfg.probe_layer:  # features computed once, then this loop on the head (powergrad.probe)
        from ..probe import train_probe

        return train_probe(cfg, out, overwrite=overwrite, on_epoch=on_epoch)
    from ..data import create_loaders
    from ..models import create_model

    dist = init_distributed(cfg.device)
    try:
        _seed_everything(cfg.seed)
        loaders = create_loaders(cfg, dist.device, dist.rank, dist.world_size)
        info = loaders.info
        if dist.is_main:
            log.info(info.describe(cfg.dataset))
        _seed_everything(cfg.seed)  # the model's initial weights do not depend on the data code
        model = create_model(cfg, info.num_classes, info.in_chans, info.img_size)
        return run_training(
            model, loaders.train, loaders.test, cfg, dist, out=out, overwrite=overwrite,
            val_loader=loaders.val, extra_summary={"bad_images": info.bad_images},
            on_epoch=on_epoch,
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
    cfg = _as_config(None, {"model": "custom", "dataset": "custom", **options})
    dist = init_distributed(cfg.device)
    try:
        _seed_everything(cfg.seed)
        return run_training(model, train_loader, test_loader, cfg, dist, out=out, overwrite=overwrite)
    except RuntimeError as e:
        raise_if_peer_failed(e, dist)
        raise
    finally:
        cleanup(dist)


@torch.no_grad()
def evaluate_loader(
    model: nn.Module, loader: Any, cfg: Config, dist: DistInfo | None = None
) -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy over a loader (summed over all processes)."""
    dist = dist or DistInfo(device=_model_device(model))
    device = dist.device
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    for x, y in track(loader, "evaluating", enabled=dist.is_main):
        x, y = _to_device(x, y, device, cfg.channels_last)
        with _autocast(cfg.amp, device):
            logits = model(x)
        logits = logits.float()
        hard = y.argmax(1) if y.is_floating_point() else y
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        sums += torch.stack([
            F.cross_entropy(logits, y, reduction="sum").double(),
            (topk[:, 0] == hard).sum().double(),
            (topk == hard.unsqueeze(1)).any(1).sum().double(),
            torch.tensor(float(len(hard)), dtype=torch.float64, device=device),
        ])
    loss, top1, top5, n = all_reduce_sum(sums, dist).tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "n": int(n)}


def evaluate(checkpoint: str | Path, overrides: list[str] | dict | None = None) -> dict[str, float]:
    """Evaluate a checkpoint on its recipe's test split: ``{top1, top5, loss, n}``."""
    from ..data import check_checkpoint_classes, create_loaders
    from ..models import create_model

    state = _read_checkpoint(checkpoint)
    raw = dict(state.get("config") or {})
    raw.pop("resume", None)
    cfg = load_config(None, {**raw, **_overrides_dict(overrides)})
    if cfg.probe_layer:  # the checkpoint holds the head; the backbone comes from the recipe
        from ..probe import evaluate_probe

        return evaluate_probe(cfg, state, checkpoint)
    cfg.weights, cfg.pretrained = None, False
    dist = DistInfo(device=init_distributed(cfg.device).device)
    loaders = create_loaders(cfg, dist.device)
    info = loaders.info
    check_checkpoint_classes(state.get("class_names"), info.class_names, checkpoint)
    model = create_model(cfg, info.num_classes, info.in_chans, info.img_size)
    _load_model_state(model, state["model"], checkpoint)
    model.to(dist.device)
    return evaluate_loader(model, loaders.test, cfg, dist)


# ----------------------------------------------------------------------------- the loop


def run_training(
    model: nn.Module,
    train_loader: Any,
    test_loader: Any,
    cfg: Config,
    dist: DistInfo,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    val_loader: Any = None,
    extra_summary: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], bool] | None = None,
) -> RunResult:
    """The loop shared by :func:`train` and :func:`fit`."""
    wall0 = time.time()
    device = dist.device

    # --- where the record goes, and what we resume from
    resume_path = _resume_path(cfg, out)
    run_path = Path(out) if out else (resume_path.parent if resume_path else _default_out(cfg))
    continuing = resume_path is not None or cfg.resume == "auto"  # auto with no checkpoint: start there
    run = RunDir(run_path, resume=continuing, overwrite=overwrite) if dist.is_main else None

    # --- model, loss, optimiser, schedule, scaler
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    criterion = PowerGradLoss(cfg.alpha, cfg.label_smoothing)
    optimizer = create_optimizer(_param_groups(model, cfg), cfg)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UserError("the training set gives no batches: batch_size is larger than the data set?")
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    # --- resume: weights into the raw model, before DDP or compile wrap it
    start_epoch, skip_steps, global_step, epoch_lr, partial_alive = 0, 0, 0, None, None
    diagnostics_so_far: list[dict[str, Any]] = []
    skipped_updates = torch.zeros((), dtype=torch.long, device=device)  # fp16 steps the scaler skipped
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    partial: dict[str, Any] | None = None
    if resume_path is not None:
        state = _read_checkpoint(resume_path)
        _load_model_state(model, state["model"], resume_path)
        if state.get("official"):  # timm-style file (engine/official.py): no steps, no history
            from .official import load_optimizer_where_it_fits

            load_optimizer_where_it_fits(optimizer, state["optimizer"])
            state["global_step"] = int(state["epoch"]) * steps_per_epoch
            scheduler.step_update(state["global_step"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, skip_steps = int(state["epoch"]), int(state.get("step_in_epoch", 0))
        global_step = int(state["global_step"])
        history, best = list(state.get("history", [])), dict(state.get("best", {}))
        partial, epoch_lr = state.get("epoch_stats"), state.get("epoch_lr")
        partial_alive = state.get("feature_alive") if skip_steps else None
        diagnostics_so_far = list(state.get("diagnostics", []))
        skipped_updates += int(state.get("fp16_skipped_updates", 0))
        _set_rng_state(state.get("rng"))
        log.info("resumed from %s at epoch %d, step %d", resume_path, start_epoch + 1, skip_steps)
    where = {"epoch": start_epoch, "step": skip_steps, "steps_per_epoch": steps_per_epoch}
    check_same_everywhere(where, dist)  # else the processes fall out of step and wait forever
    if run:  # written only now, so a resume that fails leaves the run's record as it was
        run.write_config(cfg.to_yaml())
        if continuing:  # the checkpoint's history is the record up to where it stopped
            run.rewrite_metrics(history[:start_epoch])

    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model
    forward = torch.compile(net) if cfg.compile else net
    monitor = Monitor(cfg.monitor, num_classes=_num_classes(model))
    monitor.load_diagnostics(diagnostics_so_far)  # a resumed run reports what it found before
    if not (cfg.compile or cfg.probe_layer):  # hook the head's input: features zero for every image
        monitor.watch_features(model)
        if partial_alive is not None:  # the epoch's feature mask so far: exact mid-epoch resume
            monitor.feature_alive = partial_alive.to(device)
    filters = _filter_recorder(model, cfg, run, global_step)
    stopper = _PreemptionFlag()
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    status = "finished"
    progress: StepProgress | None = None

    def checkpoint_state(epoch: int, step_in_epoch: int, stats: dict | None) -> dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "epoch_stats": stats,
            "history": history, "best": best, "rng": _rng_state(),
            "config": cfg.to_dict(), "world_size": dist.world_size,
            "epoch_lr": lr_at_start, "fp16_skipped_updates": int(skipped_updates),
            "feature_alive": monitor.feature_alive.cpu() if stats is not None and monitor.feature_alive is not None else None,
            "diagnostics": [d.to_dict() for d in monitor.diagnostics],
        }

    try:
        for epoch in range(start_epoch, cfg.epochs):
            # ---------------------------------------------------------------- train one epoch
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            _set_train_mode(model, cfg)
            criterion.train()
            stats = EpochStats(device, cfg.monitor.logit_stats)
            if partial is not None and skip_steps:
                stats.load_state_dict(partial)
                if not dist.is_main:  # the saved sums are over all processes: count them once
                    stats.zero_()
            partial = None
            # Resumed mid-epoch, the optimiser's lr has moved on: the row reports the epoch's first.
            lr_at_start = epoch_lr if skip_steps and epoch_lr is not None else optimizer.param_groups[0]["lr"]
            tic = time.perf_counter()
            progress = StepProgress(epoch + 1, cfg.epochs, steps_per_epoch, cfg.batch_size, first=skip_steps,
                                    steps_left_after=(cfg.epochs - epoch - 1) * steps_per_epoch,
                                    enabled=dist.is_main)
            batches = islice(train_loader, skip_steps, None) if skip_steps else train_loader
            for step, (x, y) in enumerate(batches, start=skip_steps):
                x, y = _to_device(x, y, device, cfg.channels_last)
                scale = _scale(scaler, device) if cfg.amp == "fp16" else None
                loss, logits = _train_step(forward, criterion, optimizer, scaler, x, y, cfg, net)
                if scale is not None:  # the scaler lowers its scale exactly when it skips a step
                    skipped_updates += _scale(scaler, device) < scale
                if global_step == 0 and step == 0:
                    monitor.check_outputs(logits, epoch + 1)
                stats.update(loss, logits, y)
                bad_step = torch.where(
                    (bad_step < 0) & ~torch.isfinite(loss.detach()), global_step, bad_step
                )
                global_step += 1
                scheduler.step_update(global_step)
                progress.step(loss, optimizer.param_groups[0]["lr"])
                if run is not None:
                    run.after_step(global_step, loss, optimizer.param_groups[0]["lr"], cfg.batch_size)
                if filters is not None:
                    filters.after_step(global_step)
                mid_save = cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0
                if mid_save or (step + 1) % sync_every == 0 or step + 1 == steps_per_epoch:
                    if int(bad_step) >= 0:
                        raise DivergenceError(_divergence_message(int(bad_step), epoch, cfg))
                    if stopper.agreed(dist):
                        sums = _global_epoch_stats(stats, monitor, dist)  # every rank: a collective
                        if dist.is_main:
                            save_checkpoint(checkpoint_state(epoch, step + 1, sums), run.path / "last.pt")
                        status = "preempted"
                        break
                    if mid_save and step + 1 < steps_per_epoch:
                        sums = _global_epoch_stats(stats, monitor, dist)
                        if dist.is_main:
                            save_checkpoint(checkpoint_state(epoch, step + 1, sums), run.path / "last.pt")
            progress.close()  # the bar goes before the epoch's line is printed
            if status == "preempted":
                break
            skip_steps = 0
            epoch_s = time.perf_counter() - tic
            train_stats = stats.compute(dist)

            # ---------------------------------------------------------------- evaluate, record
            criterion.eval()
            test = evaluate_loader(net, test_loader, cfg, dist)
            row: dict[str, Any] = {
                "epoch": epoch + 1, "lr": lr_at_start,
                "train_loss": train_stats["train_loss"], "train_acc": train_stats["train_acc"],
                "test_loss": test["loss"], "test_acc": test["top1"], "test_top5": test["top5"],
                "gap": train_stats["train_acc"] - test["top1"],
                "epoch_s": epoch_s, "train_img_s": train_stats["n"] / max(epoch_s, 1e-9),
            }
            for k in ("logit_norm", "logit_mean", "logit_max", "logit_var"):
                row[k] = train_stats.get(k)
            if val_loader is not None:
                val = evaluate_loader(net, val_loader, cfg, dist)
                row["val_loss"], row["val_acc"] = val["loss"], val["top1"]
            history.append(row)
            _share_feature_mask(monitor, dist)  # every rank: a collective
            monitor.after_epoch(history, model)
            if filters is not None:
                filters.end_epoch(global_step, run.path if run else None)
            key = "val_acc" if val_loader is not None else "test_acc"
            is_best = not best or row[key] > best.get(key, -1)
            if is_best:
                best = dict(row)
            if dist.is_main:
                _print_epoch(row, cfg.epochs)
                run.append_metrics(row)
                if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                    state = checkpoint_state(epoch + 1, 0, None)
                    save_checkpoint(state, run.path / "last.pt")
                    if is_best:
                        save_checkpoint(state, run.path / "best.pt")
                    if cfg.keep_checkpoints:
                        save_checkpoint(state, run.path / f"epoch{epoch + 1}.pt")
            if stopper.agreed(dist):
                status = "preempted" if epoch + 1 < cfg.epochs else status
                break
            if on_epoch is not None and on_epoch(row) and epoch + 1 < cfg.epochs:
                status = "stopped"  # the caller asked (a sweep's pruner)
                break
    except DivergenceError as e:
        if run:
            monitor.diagnostics.append(_diag("non_finite", len(history) + 1, str(e)))
            run.write_summary(_summary(cfg, dist, history, best, monitor, wall0, "diverged", extra_summary))
            run.close()
        raise
    finally:
        if progress is not None:
            progress.close()
        stopper.restore()
        monitor.close()
        if filters is not None:
            filters.close()

    result = RunResult(
        run_dir=run.path if run else None, status=status, final=history[-1] if history else {},
        best=best, history=history, diagnostics=[d.to_dict() for d in monitor.diagnostics],
        wall_s=time.time() - wall0,
    )
    if run:
        extra = dict(extra_summary or {})
        if cfg.amp == "fp16":
            extra["fp16_skipped_updates"] = int(skipped_updates)
        run.write_summary(_summary(cfg, dist, history, best, monitor, wall0, status, extra))
        if history:
            run.hparams(cfg.to_dict(), history[-1], best)
        run.close()
        if history:
            from ..report.plots import plot_curves

            plot_curves(run.path)
        if status == "preempted":
            print(f"pre-empted: checkpoint saved to {run.path / 'last.pt'}; continue with "
                  f"resume={run.path / 'last.pt'}", file=sys.stderr)
    return result


def _train_step(forward, criterion, optimizer, scaler, x, y, cfg: Config, net: nn.Module):
    """One optimiser update over the batch, split into ``accum_steps`` micro-batches."""
    n = x.shape[0]
    chunks = max(1, min(cfg.accum_steps, n))
    xs, ys = x.chunk(chunks), y.chunk(chunks)
    total_loss = torch.zeros((), device=x.device)
    logits_all = []
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        sync = i == len(xs) - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
        ctx = net.no_sync() if not sync else contextlib.nullcontext()
        with ctx:
            with _autocast(cfg.amp, x.device):
                logits = forward(xi)
            loss = criterion(logits, yi)
            scaler.scale(loss * (xi.shape[0] / n)).backward()
        total_loss += loss.detach().float() * (xi.shape[0] / n)
        logits_all.append(logits.detach())
    if cfg.clip != "none":
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        dispatch_clip_grad(params, cfg.clip_value, mode=cfg.clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    logits = logits_all[0] if len(logits_all) == 1 else torch.cat(logits_all)
    return total_loss, logits


# ----------------------------------------------------------------------------- helpers


def _autocast(amp: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _to_device(x, y, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _scale(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor:
    """The scaler's current scale as a device tensor (no host sync, unlike get_scale())."""
    if scaler._scale is None:  # created lazily by the first scale() call
        return torch.full((), scaler._init_scale, device=device)
    return scaler._scale.clone()


class _PreemptionFlag:
    """SIGTERM / SIGUSR1 (how SLURM and friends warn a job) ask every process to stop cleanly."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: no handlers, no pre-emption
            self._old = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, dist: DistInfo) -> bool:
        """True on every rank if any rank was signalled."""
        if not dist.enabled:
            return self.requested
        flag = torch.tensor(float(self.requested), device=dist.device)
        return bool(all_reduce_sum(flag, dist) > 0)

    def restore(self) -> None:
        if self.requested:
            # Stopping: keep catching. SLURM signals every process of a job and torchrun passes the
            # signal on as well, so a second one can arrive while rank 0 writes its records.
            return
        for s, h in self._old.items():
            signal.signal(s, h)


def _global_epoch_stats(stats: EpochStats, monitor: Monitor, dist: DistInfo) -> dict[str, torch.Tensor]:
    """The epoch's running sums over all processes, for a mid-epoch checkpoint that any number
    of processes can resume (rank 0 loads them, the others start from zero)."""
    state = stats.state_dict()
    state["sums"] = all_reduce_sum(state["sums"].to(dist.device), dist).cpu()
    state["logit_max"] = all_reduce_max(state["logit_max"].to(dist.device), dist).cpu()
    _share_feature_mask(monitor, dist)
    return state


def _share_feature_mask(monitor: Monitor, dist: DistInfo) -> None:
    """Every process's mask of head-input features seen nonzero becomes their union, so that
    dead_feature_share counts a feature alive if any image on any process lit it (a union is
    idempotent: sharing mid-epoch and again at the epoch's end gives the same answer)."""
    if dist.enabled and monitor.feature_alive is not None:
        union = all_reduce_max(monitor.feature_alive.to(dist.device, torch.uint8), dist)
        monitor.feature_alive = union.bool().to(monitor.feature_alive.device)


def _divergence_message(step: int, epoch: int, cfg: Config) -> str:
    cause = (
        "fp16 overflow (try amp=bf16) or a learning rate too high"
        if cfg.amp == "fp16" else f"a learning rate too high (lr={cfg.lr:g})"
    )
    return (
        f"training diverged: non-finite loss at step {step} (epoch {epoch + 1}); likely cause: "
        f"{cause}; the last good checkpoint is kept"
    )


def _diag(code: str, epoch: int, message: str):
    from ..monitor import Diagnostic

    return Diagnostic(code, epoch, message)


def _summary(cfg, dist, history, best, monitor, wall0, status, extra) -> dict[str, Any]:
    return {
        "status": status,
        "final": history[-1] if history else {},
        "best": best,
        "epochs_done": len(history),
        "wall_s": time.time() - wall0,
        "env": {**environment(str(dist.device)), "world_size": dist.world_size},
        "git_commit": git_commit(),
        "config_hash": config_hash(cfg),
        "config": cfg.to_dict(),
        "diagnostics": [d.to_dict() for d in monitor.diagnostics],
        **(extra or {}),
    }


def _print_epoch(row: dict[str, Any], epochs: int) -> None:
    print(
        f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  "
        f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
        f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f} top5 {row['test_top5']:.4f}  "
        f"gap {row['gap']:+.4f}  {row['epoch_s']:.1f}s {row['train_img_s']:.0f} img/s",
        flush=True,
    )


def _as_config(config, overrides: dict[str, Any]) -> Config:
    if isinstance(config, Config):
        if overrides:
            return load_config(None, {**_config_raw(config), **overrides})
        return config
    if isinstance(config, dict):
        return load_config(None, {**config, **overrides})
    return load_config(config, overrides or None)


def _config_raw(cfg: Config) -> dict[str, Any]:
    d = cfg.to_dict()
    d["monitor"] = dict(d["monitor"])
    return d


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


def _resume_path(cfg: Config, out: str | Path | None) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        if out is None:
            raise UserError("resume=auto needs --out RUN_DIR (the run to continue)")
        return find_resume_checkpoint(out)  # None: nothing to resume, start fresh
    path = Path(cfg.resume)
    if path.is_dir():
        found = find_resume_checkpoint(path)
        if found is None:
            raise UserError(f"no loadable checkpoint in {path}")
        return found
    _read_checkpoint(path)  # fail early, one line, if it is not a checkpoint
    return path


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A powergrad checkpoint, or an official timm-style one (engine/official.py)."""
    try:
        return load_checkpoint(path)
    except UserError as not_ours:
        if "refused" not in str(not_ours) and "not a powergrad checkpoint" not in str(not_ours):
            raise  # truncated or garbage: the official reader would fail the same way
        from .official import read_official

        try:
            state = read_official(path)  # refuses code as load_checkpoint does
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - garbage: the first message already says what is wrong
            raise not_ours from None
        if state is None:
            raise
        return state


def _filter_recorder(model: nn.Module, cfg: Config, run: RunDir | None, global_step: int):
    """monitor.filter_norms: per-filter and pooled-feature norms every K steps (monitor/filters.py)."""
    if not cfg.monitor.filter_norms:
        return None
    from ..monitor.filters import FilterNormRecorder

    try:
        from ..models import get_head

        head = get_head(model)[1]
    except (ImportError, UserError):
        head = None
    recorder = FilterNormRecorder(model, head, cfg.monitor.filter_norms_every)
    if run is not None and global_step:
        recorder.load(run.path, global_step)
    return recorder


def _default_out(cfg: Config) -> Path:
    return Path("runs") / new_run_name(cfg.model, cfg.dataset, cfg.alpha)


def _load_model_state(model: nn.Module, state: dict[str, Any], path) -> None:
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    wrong = {
        "shape mismatch": [f"{k} (file {list(v.shape)} vs model {list(own[k].shape)})"
                           for k, v in state.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape],
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
    }
    problems = [f"{len(keys)} {what}: {', '.join(keys[:2])}{' ...' if len(keys) > 2 else ''}"
                for what, keys in wrong.items() if keys]
    if problems:  # one line that says which model the file was for, not torch's page of keys
        raise UserError(f"{path}: checkpoint does not fit the model ({'; '.join(problems)})")
    model.load_state_dict(state)


def _param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    try:
        from ..models import param_groups

        return param_groups(model, cfg)
    except (ImportError, UserError, ValueError):
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def _set_train_mode(model: nn.Module, cfg: Config) -> None:
    try:
        from ..models import set_train_mode
    except ImportError:
        model.train()
        return
    set_train_mode(model, cfg)


def _num_classes(model: nn.Module) -> int:
    for attr in ("num_classes",):
        if isinstance(getattr(model, attr, None), int):
            return getattr(model, attr)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 10


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": list(np.random.get_state()[1].tolist()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

