"""How a run starts: fresh, resumed from a checkpoint, or new from another run's weights.

Nothing here writes. :func:`plan_start` decides, before any file is touched, which checkpoint a
run continues from and where its record goes, so that a start that fails leaves ``--out`` as it
was. The rules (docs/reliability.md, "Resume"):

- ``resume=auto`` (or ``resume=RUN_DIR``) takes, among ``last.pt``, ``preempt.pt`` and
  ``epoch{N}.pt``, the checkpoint that loads and records the most progress (epoch, then step
  inside it); file times play no part. ``best.pt`` is taken only when named by path. The log
  says which file was taken and why the others were not.
- Keys that change the result must equal the checkpoint's (TrainingState.from_checkpoint says
  which differ); ``epochs`` may be raised to extend a run; a run already complete says so and
  nothing is written.
- ``init_from=PATH`` is not a resume: a new run (its own config and folder) whose model starts
  from PATH's weights; summary.json names the parent.
- A timm checkpoint (engine/official.py) gives the model (its ``arch``) and its ``args`` (label
  smoothing, image size, alpha) unless the command line sets them: :func:`resolve_config`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, check_resume, config_hash, load_config
from ..errors import UserError
from ..rundir import holds_run, new_run_name, read_summary
from .checkpoint import RESUME_NAMES, load_checkpoint

__all__ = ["StartPlan", "plan_start", "read_checkpoint", "resolve_config", "choose_checkpoint"]

log = logging.getLogger("powergrad")


@dataclass
class StartPlan:
    """Where a run's record goes and what it starts from."""

    run_path: Path
    resuming: bool = False  # continuing a record (the folder may hold it already)
    checkpoint_path: Path | None = None
    checkpoint: dict[str, Any] | None = None  # a resume's checkpoint, or init_from's
    init_from: bool = False
    note: str = ""  # why this checkpoint: logged when the run goes on

    @property
    def own_folder(self) -> bool:
        """Resuming a checkpoint inside the folder the record goes to (not another run's file)."""
        path = self.checkpoint_path
        return path is not None and self.run_path.resolve() == path.parent.resolve()

    @property
    def official(self) -> bool:
        return bool(self.checkpoint and self.checkpoint.get("official"))


def plan_start(cfg: Config, out: str | Path | None) -> StartPlan:
    """Decide how this run starts; raise UserError (nothing written) if it cannot."""
    if cfg.resume:
        path, ckpt, note = _resume_checkpoint(cfg.resume, out)
        if path is not None and ckpt is not None:  # (found together, or neither)
            if not ckpt.get("official"):  # a timm file has no recipe of ours to compare
                check_resume(ckpt["config"], cfg, path)
            plan = StartPlan(Path(out) if out else path.parent, True, path, ckpt, note=note)
            check_progress(plan, cfg)  # epochs below what the checkpoint did: refused here
            return plan
        # resume=auto and the folder holds no checkpoint yet: start there (a run killed before
        # its first save, or a sweep's trial that never began)
    if cfg.resume == "auto":
        assert out is not None  # _resume_checkpoint refused resume=auto without --out
        _refuse_ended_record(Path(out))
        return _with_parent(cfg, StartPlan(Path(out), resuming=True))
    return _with_parent(cfg, StartPlan(Path(out) if out else _default_out(cfg)))


def _refuse_ended_record(run_dir: Path) -> None:
    """A folder whose record says the run ended, with no checkpoint left to continue from (they
    were deleted to keep the record small): starting there would train over that record."""
    try:
        status = read_summary(run_dir).get("status")
    except UserError:  # no summary.json (a run killed before its first save): start there
        return
    if status in ("finished", "diverged"):
        raise UserError(
            f"{run_dir} holds a {status} run's record (summary.json) and no checkpoint to "
            "continue from: nothing to resume; train into a new --out, or delete the folder to "
            "run it again"
        )


def _with_parent(cfg: Config, plan: StartPlan) -> StartPlan:
    if cfg.init_from:
        plan.checkpoint_path = Path(cfg.init_from)
        plan.checkpoint = read_checkpoint(cfg.init_from)
        plan.init_from = True
    return plan


def parent_record(plan: StartPlan) -> dict[str, Any]:
    """summary.json's ``parent`` of an init_from run: the file and what it held."""
    ckpt = plan.checkpoint or {}
    saved = ckpt.get("config") or {}
    record = {"checkpoint": str(plan.checkpoint_path), "epochs_done": int(ckpt.get("epoch", 0))}
    if not plan.official:
        record["config_hash"] = config_hash(load_config(None, _without_resume(saved)))
    return record


def _resume_checkpoint(resume: str, out: str | Path | None) -> tuple[Path | None, dict | None, str]:
    if resume == "auto":
        if out is None:
            raise UserError("resume=auto needs --out RUN_DIR (the run to continue)")
        return choose_checkpoint(out)
    path = Path(resume)
    if path.is_dir():
        found, ckpt, note = choose_checkpoint(path)
        if found is None:
            raise UserError(f"no loadable checkpoint in {path}")
        return found, ckpt, note
    return path, read_checkpoint(path), f"resume: {path}, named on the command line"


def choose_checkpoint(
    run_dir: str | Path, warn: bool = True
) -> tuple[Path | None, dict[str, Any] | None, str]:
    """The checkpoint of ``run_dir`` with the most progress recorded inside it, or (None, None, "");
    the third item says why it was taken and the others not (for the log, once the run goes on).

    Looks at last.pt, preempt.pt and epoch{N}.pt; ties go to that order. One that does not load
    is skipped with a warning; a folder whose checkpoints all fail is a UserError (starting over
    would throw the run away), as is one holding only best.pt.
    """
    run_dir = Path(run_dir)
    names = [n for n in RESUME_NAMES if n != "best.pt"]
    epochs = sorted(run_dir.glob("epoch*.pt"), key=lambda p: (len(p.name), p.name))
    candidates = [p for p in [*(run_dir / n for n in names), *epochs] if p.is_file()]
    loaded, problems = [], []
    for p in candidates:
        try:
            ckpt = load_checkpoint(p)
        except UserError as e:
            problems.append((p, str(e)))
            continue
        loaded.append((p, ckpt))
    if not loaded:
        if problems:
            raise UserError(f"no loadable checkpoint in {run_dir}: {problems[0][1]}")
        if (run_dir / "best.pt").is_file():
            raise UserError(
                f"{run_dir} holds only best.pt, which resume takes only when named: "
                f"resume={run_dir / 'best.pt'}"
            )
        return None, None, ""
    for _, problem in problems if warn else ():  # (when none loads, the error says it once)
        log.warning("skipping %s", problem)
    taken, ckpt = max(loaded, key=lambda pc: _progress(pc[1]))  # max keeps the first of equals
    others = [
        f"{p.name} ({_where(c)}: {'less progress' if _progress(c) < _progress(ckpt) else 'the same'})"
        for p, c in loaded
        if p != taken
    ]
    others += [f"{p.name} (does not load)" for p, _ in problems]
    if (run_dir / "best.pt").is_file():
        others.append("best.pt (taken only when named: resume=RUN/best.pt)")
    note = f"resume: {taken}, the most progress recorded that loads ({_where(ckpt)})"
    note += f"; not taken: {', '.join(others)}" if others else ""
    if (
        problems and warn
    ):  # after a file that does not load, the choice is a warning: the user should know
        log.warning("%s", note)
        note = ""
    return taken, ckpt, note


def _progress(ckpt: dict[str, Any]) -> tuple[int, int]:
    return int(ckpt.get("epoch", 0)), int(ckpt.get("step_in_epoch") or 0)


def _where(ckpt: dict[str, Any]) -> str:
    epoch, step = _progress(ckpt)
    return f"epoch {epoch} done" + (f", step {step} of epoch {epoch + 1}" if step else "")


def check_progress(plan: StartPlan, cfg: Config) -> str | None:
    """None if the resumed run has epochs left; "complete" if it has none and its record says
    so already (nothing to do, nothing to write); "record" if it has none but its record is
    not finished (a kill between the last save and summary.json): the record is completed."""
    if not plan.checkpoint or plan.init_from:
        return None
    epoch, step = _progress(plan.checkpoint)
    if epoch > cfg.epochs or (epoch == cfg.epochs and step):
        raise UserError(
            f"{plan.checkpoint_path} has {epoch} epochs done, more than epochs={cfg.epochs}; "
            f"to train a new run from its weights use init_from={plan.checkpoint_path}"
        )
    if epoch < cfg.epochs:
        return None
    try:
        summary = read_summary(plan.run_path)
    except UserError:
        summary = {}
    if summary.get("status") == "finished" and summary.get("epochs_done") == epoch:
        return "complete"
    if not plan.own_folder:
        return "complete"  # another run's finished checkpoint: nothing of it to copy here
    return "record"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
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


def resolve_config(
    recipe: str | None, overrides: dict[str, Any], out: str | Path | None = None
) -> Config:
    """The config a ``train`` command means: recipe, then what a checkpoint says, then overrides.

    - ``resume=`` without a recipe continues with the checkpoint's own config;
    - a timm checkpoint (``resume=`` or ``init_from=``) gives its model and its args (label
      smoothing, image size, alpha) unless the overrides set them.
    """
    resume = overrides.get("resume")
    source = resume if resume not in (None, "auto") else (out if resume == "auto" else None)
    source = source or overrides.get("init_from")
    ckpt = _peek(source) if source else None
    if ckpt is None:
        if recipe is None and resume is not None and source:  # a run killed before its first save
            folder = Path(source) if Path(source).is_dir() else Path(source).parent
            if (folder / "config.yaml").is_file():
                recipe = str(folder / "config.yaml")
        return load_config(recipe, overrides)
    if ckpt.get("official"):
        official = {k: v for k, v in ckpt["config"].items() if k not in overrides}
        applied = ", ".join(f"{k}={v}" for k, v in official.items())
        log.info(
            "from the timm checkpoint's args: %s (set a key on the command line to override it)",
            applied,
        )
        return load_config(recipe, {**official, **overrides})
    if recipe is None and source != overrides.get("init_from"):
        return load_config(None, {**_without_resume(ckpt.get("config") or {}), **overrides})
    return load_config(recipe, overrides)


def _peek(source: str | Path) -> dict[str, Any] | None:
    """The checkpoint a resume or init_from would read, without the log lines of choosing it."""
    path = Path(source)
    if path.is_dir():
        if not holds_run(path):
            return None
        try:
            return choose_checkpoint(path, warn=False)[1]  # plan_start chooses again, and warns
        except UserError:
            return None  # plan_start says what is wrong, with the recipe in place
    if not path.is_file():
        return None
    try:
        return read_checkpoint(path)
    except UserError:
        return None


def _without_resume(saved: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in saved.items() if k != "resume"}


def _default_out(cfg: Config) -> Path:
    return Path("runs") / new_run_name(cfg.model, cfg.dataset, cfg.alpha)
