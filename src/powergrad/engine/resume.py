"""How a run starts: fresh, resumed from a checkpoint, or new from another run's weights.

:func:`plan_start` is the one start: it turns (recipe, overrides, ``--out``) into a
:class:`StartPlan`, reading the checkpoint it starts from once, and writes nothing, so that a
start that fails leaves ``--out`` as it was. The caller holds the folder (rundir.hold_folder)
while it plans and runs. The rules (docs/reliability.md, "Resume"):

- ``resume=auto`` (or ``resume=RUN_DIR``) takes, among the checkpoints rundir lets resume read
  (rundir.resume_candidates: the last checkpoint and the per-epoch ones), the one that loads and
  records the most progress (epoch, then step inside it): read with its tensors mapped, not
  loaded; file times play no part. The best checkpoint is taken only when named by path. The log says which file was taken and why the
  others were not.
- Keys that change the result must equal the checkpoint's (config.check_resume says which
  differ); ``epochs`` may be raised to extend a run; a run already complete says so and nothing
  is written.
- A checkpoint from another folder never writes into an existing run's folder (refused, naming
  both); into a new folder it continues as a new run that records its parent, as
  ``init_from=PATH`` does (a new run whose model starts from PATH's weights).
- A timm checkpoint (engine/official.py) gives the model (its ``arch``) and its ``args`` (label
  smoothing, image size, alpha) unless the command line sets them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, check_resume, config_hash, load_config
from ..errors import UserError
from ..rundir import (
    BEST,
    CONFIG,
    SUMMARY,
    holds_run,
    new_run_name,
    read_summary,
    refuse_to_replace,
    resume_candidates,
)
from .checkpoint import load_checkpoint, progress

__all__ = ["StartPlan", "plan_start", "read_checkpoint", "choose_checkpoint"]

log = logging.getLogger("powergrad")


@dataclass
class StartPlan:
    """What a run starts from and where its record goes, decided once."""

    cfg: Config
    run_path: Path
    resuming: bool = False  # the run goes on from a checkpoint, or in its own folder (auto)
    checkpoint_path: Path | None = None
    checkpoint: dict[str, Any] | None = None  # a resume's checkpoint, or init_from's
    init_from: bool = False
    note: str = ""  # why this checkpoint: logged when the run goes on
    complete: bool = False  # nothing left to train: say so and write nothing
    overwrite: bool = False  # --overwrite: the old record in run_path goes first

    @property
    def own_folder(self) -> bool:
        """Resuming a checkpoint inside the folder the record goes to (not another run's file)."""
        path = self.checkpoint_path
        return path is not None and self.run_path.resolve() == path.parent.resolve()

    @property
    def continues_record(self) -> bool:
        """The folder's record goes on (else it is a new record, the old one removed if any)."""
        return self.resuming and (self.checkpoint is None or self.own_folder)

    @property
    def official(self) -> bool:
        return bool(self.checkpoint and self.checkpoint.get("official"))

    @property
    def parent(self) -> dict[str, Any] | None:
        """The summary's ``parent``: the file a new run took its start from, and what it held.
        The path is absolute: one given relative to the shell's folder would name nothing once
        that folder is forgotten."""
        if self.checkpoint is None or self.checkpoint_path is None:
            return None
        if self.resuming and self.own_folder:
            return None
        saved = self.checkpoint.get("config") or {}
        record = {
            "checkpoint": str(self.checkpoint_path.absolute()),
            "epochs_done": int(self.checkpoint.get("epoch", 0)),
        }
        if not self.official:
            record["config_hash"] = config_hash(load_config(None, _without_resume(saved)))
        return record


def plan_start(
    config: Config | dict[str, Any] | str | Path | None,
    overrides: dict[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> StartPlan:
    """The start of a ``train`` command: recipe (or a Config), then what a checkpoint says, then
    the overrides; the checkpoint read once; UserError (nothing written) if it cannot start."""
    given = dict(overrides or {})
    recipe, keys = _as_recipe(config, given)
    resume, init_from = keys.get("resume"), keys.get("init_from")
    if resume and init_from:
        raise UserError(
            "resume= and init_from= do not go together: resume= continues a run, init_from= "
            "starts a new one from a checkpoint's weights; give one"
        )
    if resume == "auto" and out is None:
        raise UserError("resume=auto needs --out RUN_DIR (the run to continue)")
    path, ckpt, note = _source(resume, init_from, out)
    folder = out if resume == "auto" else resume
    cfg = (
        config
        if isinstance(config, Config) and not given
        else _config(recipe, keys, ckpt, from_init=not resume, folder=folder)
    )
    if resume and path is not None and out is None:
        out = path.parent
    plan = StartPlan(
        cfg,
        Path(out) if out else _default_out(cfg),
        resuming=bool(resume),
        checkpoint_path=path,
        checkpoint=ckpt,
        init_from=bool(ckpt is not None and not resume),
        note=note,
        overwrite=overwrite,
    )
    if plan.resuming and ckpt is not None:
        _check_resume(plan)
    elif plan.resuming:  # resume=auto on a folder with no checkpoint: start there
        _refuse_ended_record(plan.run_path)
    else:
        refuse_to_replace(plan.run_path, overwrite)
    return plan


def _as_recipe(
    config: Config | dict[str, Any] | str | Path | None, overrides: dict[str, Any]
) -> tuple[str | None, dict[str, Any]]:
    """(recipe, overrides) from what train() was given: a Config or a dict become overrides."""
    if isinstance(config, Config):
        if not overrides:
            return None, {"resume": config.resume, "init_from": config.init_from}
        raw = config.to_dict()
        raw["monitor"] = dict(raw["monitor"])
        return None, {**raw, **overrides}
    if isinstance(config, dict):
        return None, {**config, **overrides}
    return (str(config) if config is not None else None), overrides


def _source(
    resume: str | None, init_from: str | None, out: str | Path | None
) -> tuple[Path | None, dict[str, Any] | None, str]:
    """The checkpoint the run starts from (read once), or (None, None, "")."""
    if resume == "auto":
        assert out is not None
        return choose_checkpoint(out)
    if resume:
        path = Path(resume)
        if path.is_dir():
            found, ckpt, note = choose_checkpoint(path)
            if found is None:
                raise UserError(f"no loadable checkpoint in {path}")
            return found, ckpt, note
        return path, read_checkpoint(path), f"resume: {path}, named on the command line"
    if init_from:
        return Path(init_from), read_checkpoint(init_from), ""
    return None, None, ""


def _config(
    recipe: str | None,
    overrides: dict[str, Any],
    ckpt: dict[str, Any] | None,
    from_init: bool,
    folder: str | Path | None,
) -> Config:
    """- ``resume=`` without a recipe continues with the checkpoint's own config (a run killed
    before its first save: with the config saved in its folder);
    - a timm checkpoint gives its model and its args unless the overrides set them."""
    if ckpt is None:
        if recipe is None and overrides.get("resume") and folder is not None:
            saved = Path(folder) if Path(folder).is_dir() else Path(folder).parent
            if (saved / CONFIG).is_file():
                recipe = str(saved / CONFIG)
        return load_config(recipe, overrides)
    if ckpt.get("official"):
        official = {k: v for k, v in ckpt["config"].items() if k not in overrides}
        applied = ", ".join(f"{k}={v}" for k, v in official.items())
        log.info(
            "from the timm checkpoint's args: %s (set a key on the command line to override it)",
            applied,
        )
        return load_config(recipe, {**official, **overrides})
    if recipe is None and not from_init:
        return load_config(None, {**_without_resume(ckpt.get("config") or {}), **overrides})
    return load_config(recipe, overrides)


def _check_resume(plan: StartPlan) -> None:
    """Same recipe, a folder of its own, epochs left; ``plan.complete`` when none are left."""
    ckpt, path, cfg = plan.checkpoint or {}, plan.checkpoint_path, plan.cfg
    if not plan.official:  # a timm file has no recipe of ours to compare
        check_resume(ckpt["config"], cfg, path)
    if not plan.own_folder and holds_run(plan.run_path) and not plan.overwrite:
        assert path is not None
        raise UserError(
            f"{plan.run_path} holds another run's record; {path} is from the run in "
            f"{path.parent}: resume that run there (--out {path.parent}), or into a new --out "
            "(a new run that records it as its parent)"
        )
    epoch, step = progress(ckpt)
    if epoch > cfg.epochs or (epoch == cfg.epochs and step):
        raise UserError(
            f"{path} has {epoch} epochs done, more than epochs={cfg.epochs}; "
            f"to train a new run from its weights use init_from={path}"
        )
    if epoch < cfg.epochs:
        return
    if not plan.own_folder:
        plan.complete = True  # another run's finished checkpoint: nothing of it to copy here
        return
    try:
        summary = read_summary(plan.run_path)
    except UserError:
        summary = {}
    # A kill between the last save and the summary: the run goes on to complete its record.
    plan.complete = summary.get("status") == "finished" and summary.get("epochs_done") == epoch


def _refuse_ended_record(run_dir: Path) -> None:
    """A folder whose record says the run ended, with no checkpoint left to continue from (they
    were deleted to keep the record small): starting there would train over that record."""
    try:
        status = read_summary(run_dir).get("status")
    except UserError:  # no summary (a run killed before its first save): start there
        return
    if status in ("finished", "diverged"):
        raise UserError(
            f"{run_dir} holds a {status} run's record ({SUMMARY}) and no checkpoint to "
            "continue from: nothing to resume; train into a new --out, or delete the folder to "
            "run it again"
        )


def choose_checkpoint(run_dir: str | Path) -> tuple[Path | None, dict[str, Any] | None, str]:
    """The checkpoint of ``run_dir`` with the most progress recorded inside it, or (None, None, "");
    the third item says why it was taken and the others not (for the log, once the run goes on).

    Each candidate is read with its tensors mapped (load_checkpoint's mmap), so that choosing
    costs the small pickle of each, and the one taken is not read again. One that does not load
    is skipped with a warning; a folder whose checkpoints all fail is a UserError (starting over
    would throw the run away), as is one holding only the best checkpoint.
    """
    run_dir = Path(run_dir)
    loaded, problems = [], []
    for p in resume_candidates(run_dir):
        try:
            loaded.append((p, load_checkpoint(p, mmap=True)))
        except UserError as e:
            problems.append((p, str(e)))
    if not loaded:
        if problems:
            raise UserError(f"no loadable checkpoint in {run_dir}: {problems[0][1]}")
        if (run_dir / BEST).is_file():
            raise UserError(
                f"{run_dir} holds only {BEST}, which resume takes only when named: "
                f"resume={run_dir / BEST}"
            )
        return None, None, ""
    for _, problem in problems:  # (when none loads, the error says it once)
        log.warning("skipping %s", problem)
    taken, ckpt = max(loaded, key=lambda pc: progress(pc[1]))  # max keeps the first of equals
    others = [
        f"{p.name} ({_where(c)}: {'less progress' if progress(c) < progress(ckpt) else 'the same'})"
        for p, c in loaded
        if p != taken
    ]
    others += [f"{p.name} (does not load)" for p, _ in problems]
    if (run_dir / BEST).is_file():
        others.append(f"{BEST} (taken only when named: resume=RUN/{BEST})")
    note = f"resume: {taken}, the most progress recorded that loads ({_where(ckpt)})"
    note += f"; not taken: {', '.join(others)}" if others else ""
    if problems:  # after a file that does not load, the choice is a warning: the user should know
        log.warning("%s", note)
        note = ""
    return taken, ckpt, note


def _where(ckpt: dict[str, Any]) -> str:
    epoch, step = progress(ckpt)
    return f"epoch {epoch} done" + (f", step {step} of epoch {epoch + 1}" if step else "")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A powergrad checkpoint, or an official timm-style one (engine/official.py)."""
    try:
        return load_checkpoint(path)
    except UserError as not_ours:
        if "refused" not in str(not_ours) and "not a powergrad checkpoint" not in str(not_ours):
            raise  # truncated or garbage: the official reader would fail the same way
        if "plain pickle" in str(not_ours):
            raise
        from .official import read_official  # a rare path: its own module, read when needed

        try:
            state = read_official(path)  # refuses code as load_checkpoint does
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - garbage: the first message already says what is wrong
            raise not_ours from None
        if state is None:
            raise
        return state


def _without_resume(saved: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in saved.items() if k != "resume"}


def _default_out(cfg: Config) -> Path:
    return Path("runs") / new_run_name(cfg.model, cfg.dataset, cfg.alpha)
