"""The training loop, read top to bottom as torchvision's reference script.

:func:`run_training` is the table of contents: from the start plan (engine/resume.py) build the
:class:`~powergrad.engine.state.TrainingState`, then for each epoch :func:`train_one_epoch`,
:func:`evaluate_epoch`, :func:`record_epoch` and the :class:`~powergrad.engine.saver.CheckpointSaver`
(which decides the best epoch and every save).
The public ``train`` / ``fit`` / ``evaluate`` live one level up (powergrad.workflows): they
build data and a model (or a probe's features and head) and call :func:`run_training`.

Speed notes (see docs/performance.md for the measured effect):
- per-step metrics are summed on the device and read once per epoch (monitor.stats), so a step
  makes no host-device sync; the divergence and pre-emption flags are read at a check-in every
  ``SYNC_EVERY`` steps on a GPU (every step on the CPU, where a read is free).
- the tampering is one fused autograd function (tamper.py), the same cost as cross-entropy.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad
from torch import nn

from ..config import Config, config_hash
from ..errors import DivergenceError, UserError
from ..models import get_head, param_groups, set_train_mode
from ..monitor import Diagnostic, EpochStats, Monitor
from ..monitor.filters import FilterNormRecorder
from ..progress import StepProgress, track
from ..rundir import BEST, LAST, RunDir, environment, git_commit
from ..tamper import PowerGradLoss
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, check_same_everywhere
from .optim import create_optimizer, create_scheduler
from .preemption import PreemptionFlag
from .resume import StartPlan
from .saver import CheckpointSaver, selection_split
from .state import TrainingState, load_model_state

__all__ = ["RunResult", "run_training", "train_one_epoch", "evaluate_loader", "StepHook"]

log = logging.getLogger("powergrad")

SYNC_EVERY = 25  # GPU steps between check-ins (reads of the divergence / pre-emption flags)

# Called after every optimiser step with the state (global_step, lr) and the step's loss, a
# device tensor: reading it (float(loss)) is a host-device sync, so a hook decides how often.
StepHook = Callable[[TrainingState, torch.Tensor], None]


@dataclass
class RunResult:
    """What a run returns: its record on disk and the numbers in it."""

    run_dir: Path | None  # None where nothing was written (other ranks; a run already complete)
    status: str  # finished | preempted | stopped
    final: dict[str, Any]
    best: dict[str, Any]
    history: list[dict[str, Any]]
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0  # the whole run's, over every process that worked on it


@dataclass
class Trainer:
    """What the epochs share: the state, the wrapped model, the data, the record and the checks."""

    cfg: Config
    dist: DistInfo
    state: TrainingState
    net: nn.Module  # the model as stepped: DDP-wrapped when distributed
    forward: Callable  # net, compiled when cfg.compile
    criterion: PowerGradLoss
    train_loader: Any
    test_loader: Any
    val_loader: Any
    run: RunDir | None
    saver: CheckpointSaver
    filters: Any
    stopper: PreemptionFlag
    steps_per_epoch: int
    bad_step: torch.Tensor  # first non-finite loss's step, -1: none (on the device)
    step_hooks: list[StepHook] = field(default_factory=list)
    optimizer_steps: list[int] = field(default_factory=lambda: [0])  # counted by a step hook

    @property
    def sync_every(self) -> int:
        return 1 if self.dist.device.type == "cpu" else SYNC_EVERY


# ----------------------------------------------------------------------------- the loop


def run_training(
    model: nn.Module,
    train_loader: Any,
    test_loader: Any,
    plan: StartPlan,
    dist: DistInfo,
    *,
    val_loader: Any = None,
    extra_summary: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], bool] | None = None,
    watch_features: bool = True,
    class_names: list[str] | None = None,
) -> RunResult:
    """Train ``model`` from ``plan`` (engine/resume.py: plan_start): set up, then for each epoch
    train, evaluate, record, save.

    ``on_epoch(row)`` is called after each epoch's record; True stops the run (status
    ``stopped``). ``watch_features`` hooks the head's input for dead_feature_share.
    """
    cfg = plan.cfg
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UserError(
            "the training set gives no batches: batch_size is larger than the data set?"
        )
    state = new_state(model, cfg, dist, steps_per_epoch, class_names, val_loader is not None)
    restore(state, plan, steps_per_epoch)  # a finished run's file must fit the model too
    if plan.complete:
        return already_complete(plan)
    check_same_everywhere(  # else the processes fall out of step and wait forever
        {"epoch": state.epoch, "step": state.step_in_epoch, "steps_per_epoch": steps_per_epoch},
        dist,
    )
    run = open_record(plan, dist, state)
    if run is not None and state.best_split == "test" and state.epoch == 0:
        log.info(  # else the best checkpoint's test accuracy reads as unbiased
            "no validation split: %s will be the epoch with the best test accuracy "
            "(val_fraction=0.1 holds out a split to choose on)",
            BEST,
        )
    t = make_trainer(
        state,
        cfg,
        dist,
        run,
        train_loader,
        test_loader,
        val_loader,
        steps_per_epoch,
        watch_features,
    )

    status = "finished"
    try:
        for epoch in range(state.epoch, cfg.epochs):
            trained = train_one_epoch(t, epoch)
            if trained is None:
                status = "preempted"
                break
            row = evaluate_epoch(t, epoch, *trained)
            record_epoch(t, row)
            state.epoch, state.step_in_epoch = epoch + 1, 0
            t.saver.after_epoch(state, row)
            status = stop_requested(t, row, on_epoch)
            if status != "finished":
                t.saver.save_on_stop(state)
                break
    except DivergenceError as e:
        record_divergence(t, e, extra_summary)
        raise
    finally:
        t.stopper.restore()
        state.monitor.close()
        if t.filters is not None:
            t.filters.close()
    return finish(t, status, extra_summary)


def train_one_epoch(t: Trainer, epoch: int) -> tuple[dict[str, float], float, float] | None:
    """The optimiser steps of one epoch: (train stats, seconds, lr at its start), or None when
    pre-empted. Resumed mid-epoch, it skips the steps the checkpoint already made."""
    state, cfg, device = t.state, t.cfg, t.dist.device
    first = state.step_in_epoch
    stats = begin_epoch(t, epoch)
    lr_at_start = state.epoch_lr = (
        state.epoch_lr if first and state.epoch_lr is not None else state.lr
    )
    tic = time.perf_counter()
    batches = islice(t.train_loader, first, None) if first else t.train_loader
    progress = StepProgress(
        epoch + 1,
        cfg.epochs,
        t.steps_per_epoch,
        cfg.batch_size,
        first=first,
        steps_left_after=(cfg.epochs - epoch - 1) * t.steps_per_epoch,
        enabled=t.dist.is_main,
    )
    try:
        for step, (x, y) in enumerate(batches, start=first):
            x, y = _to_device(x, y, device, cfg.channels_last)
            taken = t.optimizer_steps[0]
            loss, logits = _train_step(
                t.forward, t.criterion, state.optimizer, state.scaler, x, y, cfg, t.net
            )
            state.skipped_updates += t.optimizer_steps[0] == taken  # fp16: the scaler skipped it
            if state.global_step == 0 and step == 0:
                state.monitor.check_outputs(logits, epoch + 1)
            stats.update(loss, logits, y)
            t.bad_step = torch.where(
                (t.bad_step < 0) & ~torch.isfinite(loss.detach()), state.global_step, t.bad_step
            )
            state.global_step += 1
            state.scheduler.step_update(state.global_step)
            progress.step(loss, state.lr)
            for hook in t.step_hooks:  # the one place per step where step, loss and lr are known
                hook(state, loss)
            if t.filters is not None:
                t.filters.after_step(state.global_step)
            if check_in_due(t, step) and check_in(t, epoch, step, stats):
                return None
        return stats.compute(t.dist), time.perf_counter() - tic, lr_at_start
    finally:
        progress.close()  # the bar goes before the epoch's line is printed


def _train_step(forward, criterion, optimizer, scaler, x, y, cfg: Config, net: nn.Module):
    """One optimiser update over the batch, split into ``accum_steps`` micro-batches."""
    n = x.shape[0]
    chunks = max(1, min(cfg.accum_steps, n))
    xs, ys = x.chunk(chunks), y.chunk(chunks)
    total_loss = torch.zeros((), device=x.device)
    logits_all = []
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        last = i == len(xs) - 1  # DDP all-reduces the gradients on the last micro-batch only
        ddp = net if isinstance(net, nn.parallel.DistributedDataParallel) else None
        ctx = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
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


def evaluate_epoch(
    t: Trainer, epoch: int, train_stats: dict[str, float], epoch_s: float, lr: float
) -> dict[str, Any]:
    """The epoch's row: its training numbers, then test (and validation) accuracy and loss."""
    test = evaluate_loader(t.net, t.test_loader, t.cfg, t.dist)
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train_stats["train_loss"],
        "train_acc": train_stats["train_acc"],
        "test_loss": test["loss"],
        "test_acc": test["top1"],
        "test_top5": test["top5"],
        "gap": train_stats["train_acc"] - test["top1"],
        "epoch_s": epoch_s,
        "train_img_s": train_stats["n"] / max(epoch_s, 1e-9),
    }
    for k in ("logit_norm", "logit_mean", "logit_max", "logit_var"):
        row[k] = train_stats.get(k)
    if t.val_loader is not None:
        val = evaluate_loader(t.net, t.val_loader, t.cfg, t.dist)
        row["val_loss"], row["val_acc"] = val["loss"], val["top1"]
    return row


def record_epoch(t: Trainer, row: dict[str, Any]) -> None:
    """Append the row to the history and the record, run the checks."""
    state = t.state
    state.history.append(row)
    _share_feature_mask(state.monitor, t.dist)  # every rank: a collective
    state.monitor.after_epoch(state.history, state.model)
    if t.filters is not None:
        t.filters.end_epoch(state.global_step, t.run.path if t.run else None)
    if t.dist.is_main:
        _print_epoch(row, t.cfg.epochs)
    if t.run is not None:  # the main process's record
        t.run.append_metrics(row)


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
        sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum").double(),
                (topk[:, 0] == hard).sum().double(),
                (topk == hard.unsqueeze(1)).any(1).sum().double(),
                # a fill on the device: torch.tensor(n, device=...) copies and waits for the GPU
                torch.full((), float(len(hard)), dtype=torch.float64, device=device),
            ]
        )
    loss, top1, top5, n = all_reduce_sum(sums, dist).tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "n": int(n)}


# ----------------------------------------------------------------------------- set-up


def new_state(
    model: nn.Module,
    cfg: Config,
    dist: DistInfo,
    steps_per_epoch: int,
    class_names: list[str] | None,
    has_val: bool,
) -> TrainingState:
    """Model on the device, optimiser, schedule, scaler and monitor, at epoch 0."""
    model.to(dist.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = create_optimizer(param_groups(model, cfg), cfg)
    return TrainingState(
        model=model,
        optimizer=optimizer,
        scheduler=create_scheduler(optimizer, cfg, steps_per_epoch),
        scaler=torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16"),
        monitor=Monitor(cfg.monitor, num_classes=_num_classes(model)),
        cfg=cfg,
        device=dist.device,
        world_size=dist.world_size,
        best_split=selection_split(has_val),
        class_names=class_names,
    )


def restore(state: TrainingState, plan: StartPlan, steps_per_epoch: int) -> None:
    """Load what the plan starts from into the state: a resume's checkpoint (all of it, a timm
    one's weights and momentum), or init_from's weights (and nothing else: a new run)."""
    ckpt, path, cfg = plan.checkpoint, plan.checkpoint_path, state.cfg
    if ckpt is None:
        if plan.resuming:  # a mistyped --out would otherwise start over without a word
            log.info("resume=auto: no checkpoint in %s, so a new run starts there", plan.run_path)
        return
    if plan.init_from:
        load_model_state(state.model, ckpt["model"], path)
        state.parent = plan.parent
        log.info(
            "init_from %s: a new run from its weights (%d epochs done there); optimiser, schedule "
            "and epochs start fresh",
            path,
            int(ckpt.get("epoch", 0)),
        )
        return
    # A run with nothing left to do says so in one line (already_complete), not these.
    say = log.debug if plan.complete else log.info
    if plan.note:
        say("%s", plan.note)
    if plan.official:
        state.from_official(ckpt, steps_per_epoch, path)
        say("official checkpoint %s: arch %s, %d epochs done", path, ckpt.get("arch"), state.epoch)
    else:
        saved_epochs = int((ckpt.get("config") or {}).get("epochs", cfg.epochs))
        extended = (
            saved_epochs != cfg.epochs
        )  # the schedule is the longer run's (docs/reliability.md)
        state.from_checkpoint({**ckpt, "scheduler": None} if extended else ckpt, path)
        if extended:
            say(
                "epochs %d -> %d: from epoch %d the learning rate follows a %d-epoch schedule",
                saved_epochs,
                cfg.epochs,
                state.epoch + 1,
                cfg.epochs,
            )
    if plan.parent is not None:  # another folder's checkpoint: a new run, continued from it
        state.parent = plan.parent
    # The lr this step has on the schedule: what the first epoch line shows and trains with.
    state.scheduler.step_update(state.global_step)
    say("resumed from %s at epoch %d, step %d", path, state.epoch + 1, state.step_in_epoch)


def already_complete(plan: StartPlan) -> RunResult:
    """A resume with no epoch left: one line, nothing written, the checkpoint's record returned."""
    ckpt, path, cfg = plan.checkpoint or {}, plan.checkpoint_path, plan.cfg
    assert path is not None  # plan_start says "complete" only of a checkpoint
    done = f"{int(ckpt.get('epoch', 0))} of {cfg.epochs} epochs"
    if plan.own_folder:
        log.info(
            "%s is already complete (%s, %s); nothing to do (raise epochs= to extend it)",
            plan.run_path,
            done,
            path.name,
        )
    else:
        log.info(
            "%s is a finished run (%s): nothing to train into %s; raise epochs= to extend it there, or "
            "use init_from= to start a new run from its weights",
            path,
            done,
            plan.run_path,
        )
    history = list(ckpt.get("history") or [])
    return RunResult(
        run_dir=None,
        status="finished",
        final=history[-1] if history else {},
        best=dict(ckpt.get("best") or {}),
        history=history,
        diagnostics=list(ckpt.get("diagnostics") or []),
        wall_s=float(ckpt.get("wall_s") or 0.0),
    )


def open_record(plan: StartPlan, dist: DistInfo, state: TrainingState) -> RunDir | None:
    """The run folder, on the main process, once the start can no longer fail on its input."""
    if not dist.is_main:
        return None
    run = RunDir(plan.run_path, resume=plan.continues_record, overwrite=plan.overwrite)
    run.write_config(plan.cfg.to_yaml())
    if plan.resuming:  # the checkpoint's history is the record up to where it stopped
        run.rewrite_metrics(state.history[: state.epoch])
    return run


def make_trainer(
    state: TrainingState,
    cfg: Config,
    dist: DistInfo,
    run: RunDir | None,
    train_loader: Any,
    test_loader: Any,
    val_loader: Any,
    steps_per_epoch: int,
    watch_features: bool,
) -> Trainer:
    """Wrap the model (DDP, compile), hook the monitor, open the saver: ready for the first epoch."""
    device, model = dist.device, state.model
    ids = [device.index] if device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=ids) if dist.enabled else model
    if watch_features and not cfg.compile:  # hook the head's input: features zero for every image
        state.monitor.watch_features(model)
    else:
        state.monitor.feature_alive = None
    saver = CheckpointSaver(run.path if run else None, cfg)
    optimizer_steps = [0]  # steps the optimiser took: the scaler's fp16 skips are the others
    state.optimizer.register_step_post_hook(lambda *_: _count(optimizer_steps))
    hooks: list[StepHook] = []
    if run is not None:
        hooks.append(
            lambda s, loss: run.after_step(s.global_step, loss, s.lr, cfg.batch_size)
        )  # TensorBoard
    return Trainer(
        cfg=cfg,
        dist=dist,
        state=state,
        net=net,
        forward=torch.compile(net) if cfg.compile else net,
        criterion=PowerGradLoss(cfg.alpha, cfg.label_smoothing),
        train_loader=train_loader,
        test_loader=test_loader,
        val_loader=val_loader,
        run=run,
        saver=saver,
        filters=_filter_recorder(model, cfg, run, state.global_step),
        stopper=PreemptionFlag(),
        steps_per_epoch=steps_per_epoch,
        bad_step=torch.full((), -1, dtype=torch.long, device=device),
        step_hooks=hooks,
        optimizer_steps=optimizer_steps,
    )


def _count(counter: list[int]) -> None:
    counter[0] += 1


# ----------------------------------------------------------------------------- the epoch's pieces


def begin_epoch(t: Trainer, epoch: int) -> EpochStats:
    """Data order, train mode, and the epoch's sums (a mid-epoch resume's so far)."""
    if hasattr(t.train_loader, "set_epoch"):
        t.train_loader.set_epoch(epoch)
    set_train_mode(t.state.model, t.cfg)
    stats = EpochStats(t.dist.device, t.cfg.monitor.logit_stats)
    if t.state.epoch_stats is not None and t.state.step_in_epoch:
        stats.load_state_dict(t.state.epoch_stats)
        if not t.dist.is_main:  # the saved sums are over all processes: count them once
            stats.zero_()
    t.state.epoch_stats = None
    return stats


def check_in_due(t: Trainer, step: int) -> bool:
    """Reading the divergence and pre-emption flags waits for the device (a host-device sync
    point), so on a GPU it happens every SYNC_EVERY steps, at the epoch's end, and before a
    mid-epoch save; not every step."""
    mid_save = t.saver.mid_epoch_due(t.state.global_step, step, t.steps_per_epoch)
    return mid_save or (step + 1) % t.sync_every == 0 or step + 1 == t.steps_per_epoch


def check_in(t: Trainer, epoch: int, step: int, stats: EpochStats) -> bool:
    """Stop on divergence (DivergenceError), save and stop when pre-empted (True), save when a
    mid-epoch checkpoint is due."""
    if int(t.bad_step) >= 0:
        raise DivergenceError(_divergence_message(int(t.bad_step), epoch, t.cfg))
    if t.stopper.agreed(t.dist):
        save_mid_epoch(t, epoch, step, stats)
        return True
    if t.saver.mid_epoch_due(t.state.global_step, step, t.steps_per_epoch):
        save_mid_epoch(t, epoch, step, stats)
    return False


def save_mid_epoch(t: Trainer, epoch: int, step: int, stats: EpochStats) -> None:
    """The last checkpoint after ``step``: the epoch's sums so far over all processes go in (a
    collective: every rank calls this), so any number of processes can resume it exactly."""
    state = t.state
    state.epoch, state.step_in_epoch = epoch, step + 1
    state.epoch_stats = _global_epoch_stats(stats, state.monitor, t.dist)
    t.saver.save_mid_epoch(state)
    state.epoch_stats = None


def stop_requested(t: Trainer, row: dict[str, Any], on_epoch: Callable | None) -> str:
    """After an epoch's save: pre-empted (a signal) or stopped (the caller: a sweep's pruner)?"""
    last = row["epoch"] == t.cfg.epochs
    if t.stopper.agreed(t.dist):
        return "finished" if last else "preempted"
    if on_epoch is not None and on_epoch(row) and not last:
        return "stopped"
    return "finished"


def record_divergence(t: Trainer, e: DivergenceError, extra_summary: dict[str, Any] | None) -> None:
    if t.run:
        t.state.monitor.diagnostics.append(
            Diagnostic("non_finite", len(t.state.history) + 1, str(e))
        )
        t.run.write_summary(_summary(t, "diverged", extra_summary))
        t.run.close()


def finish(t: Trainer, status: str, extra_summary: dict[str, Any] | None) -> RunResult:
    """The run's summary and curves; the result."""
    state, run = t.state, t.run
    history = state.history
    result = RunResult(
        run_dir=run.path if run else None,
        status=status,
        final=history[-1] if history else {},
        best=state.best,
        history=history,
        diagnostics=[d.to_dict() for d in state.monitor.diagnostics],
        wall_s=state.wall_s,
    )
    if run:
        extra = dict(extra_summary or {})
        if t.cfg.amp == "fp16":
            extra["fp16_skipped_updates"] = int(state.skipped_updates)
        run.write_summary(_summary(t, status, extra))
        if history:
            run.hparams(t.cfg.to_dict(), history[-1], state.best)
        run.close()
        if history:
            from ..plots import plot_curves  # matplotlib: needed at the run's end only

            plot_curves(run.path)
        if status == "preempted":
            print(
                f"pre-empted: checkpoint saved to {run.path / LAST}; continue with "
                f"resume={run.path / LAST}",
                file=sys.stderr,
            )
    return result


# ----------------------------------------------------------------------------- helpers


def _autocast(amp: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _to_device(x, y, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _global_epoch_stats(
    stats: EpochStats, monitor: Monitor, dist: DistInfo
) -> dict[str, torch.Tensor]:
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
        if cfg.amp == "fp16"
        else f"a learning rate too high (lr={cfg.lr:g})"
    )
    return (
        f"training diverged: non-finite loss at step {step} (epoch {epoch + 1}); likely cause: "
        f"{cause}; the last good checkpoint is kept"
    )


def _summary(t: Trainer, status: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    state, cfg, dist = t.state, t.cfg, t.dist
    history = state.history
    summary = {
        "status": status,
        "final": history[-1] if history else {},
        "best": state.best,
        "best_split": state.best_split,  # the split whose accuracy chose the best checkpoint
        "epochs_done": len(history),
        "wall_s": state.wall_s,  # every process that worked on this run, added up
        "env": {**environment(str(dist.device)), "world_size": dist.world_size},
        "git_commit": git_commit(),
        "config_hash": config_hash(cfg),
        "config": cfg.to_dict(),
        "diagnostics": [d.to_dict() for d in state.monitor.diagnostics],
        **(extra or {}),
    }
    if state.parent:
        summary["parent"] = state.parent
    return summary


def _print_epoch(row: dict[str, Any], epochs: int) -> None:
    val = (
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  "
        if row.get("val_acc") is not None
        else ""
    )
    print(
        f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  "
        f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  {val}"
        f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f} top5 {row['test_top5']:.4f}  "
        f"gap {row['gap']:+.4f}  {row['epoch_s']:.1f}s {row['train_img_s']:.0f} img/s",
        flush=True,
    )


def _filter_recorder(model: nn.Module, cfg: Config, run: RunDir | None, global_step: int):
    """monitor.filter_norms: per-filter and pooled-feature norms every K steps (monitor/filters.py)."""
    if not cfg.monitor.filter_norms:
        return None
    try:
        head = get_head(model)[1]
    except UserError:
        head = None
    recorder = FilterNormRecorder(model, head, cfg.monitor.filter_norms_every)
    if run is not None and global_step:
        recorder.load(run.path, global_step)
    return recorder


def _num_classes(model: nn.Module) -> int:
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int):
        return declared
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 10


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
