"""Sweeps: a grid over recipe keys (x seeds) as an Optuna study; each trial an ordinary run dir.

    run_sweep("digits", {"alpha": ["1", "0.5", "0.25"]}, "sweeps/digits", seeds=2)

- The grid is an Optuna ``GridSampler`` search space (plus ``seed``). Its values are stored with
  their config field's type (``typed``): a number as a ``FloatDistribution`` or
  ``IntDistribution`` over the grid's range, so that Optuna's plots and optuna-dashboard treat
  alpha and lr as numbers; a bool or a text value as a ``CategoricalDistribution``. Run
  directories keep the values as written (``alpha=1,seed=0``). A storage written before values
  were typed (every grid value as text) still reads back, and continues: its keys keep their
  recorded distribution.
- Every grid point still to do is enqueued as a trial with fixed parameters
  (``Study.enqueue_trial``), and workers claim queued trials one at a time through the
  storage's WAITING -> RUNNING switch (``set_trial_state_values``), so two workers never run one
  point. On a database server that switch is one locked update (SELECT ... FOR UPDATE); SQLite
  has no row lock (SQLAlchemy drops FOR UPDATE there, and pysqlite reads outside the write's
  transaction), so two workers that start together could both read a trial WAITING and both
  switch it: a claim there holds a lock file beside the database (Optuna's own
  ``JournalFileOpenLock``, which names it after the database; gone when the claim is).
  GridSampler alone may hand one point to two concurrent workers (its documented caveat), and
  ``Study.ask`` makes a new trial when the queue is empty; hence this small loop over Optuna's
  public storage API, which is what ``ask`` does with a queued trial.
- A trial closed under its worker (failed by another worker's ``fail_stale_trials`` after a
  stall, or by hand) is left as it is: the worker stops training it (its last checkpoint stays)
  and claims the next; the point is enqueued again by the next run of the sweep.
- The study lives in ``sqlite:///OUT/study.db`` unless ``storage`` names a database URL (e.g.
  ``postgresql://...``, ``pip install 'powergrad[postgres]'``), which lets workers on several
  machines share one sweep (docs/distributed.md).
- Re-running the same command continues: points with a COMPLETE or PRUNED trial are done; a
  trial left RUNNING by a worker that died (its pid gone on this host, or no heartbeat for
  ``GRACE_S`` from another host) is failed and its point enqueued again; the new trial resumes
  its run directory from the last checkpoint (``resume=auto``) when this worker's ``--out``
  holds it.
- A trial that raises (a UserError, a DivergenceError, anything) is recorded FAIL with the
  error in its ``error`` user attribute; the other trials go on.
- ``prune=True``: Optuna's PercentilePruner stops a trial whose per-epoch accuracy (val when
  ``val_fraction > 0``, else test) is in the bottom quarter of earlier trials at that epoch.
- The summary is read back from the storage: the points this command's workers ran, and the
  others as the storage has them (done, or still running, by which worker).
- ``run_points`` (Python API) runs named points in the order given instead of a grid: for
  settings that are no grid, run directories named by the caller (studies/study.py). With
  ``done_statuses``, a point whose run directory's summary has one of them is added to the
  storage as done, not queued (records that outlive the storage); ``after_trial`` is called with
  each trained point's run directory.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import multiprocessing as mp
import os
import socket
import threading
import time
import traceback
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Config, _coerce, field_info, load_config
from .errors import DivergenceError, MissingExtraError, UserError, extra
from .progress import clock
from .rundir import SUMMARY, read_summary, refuse_run_dir

with extra("sweep"):
    import optuna
    import sqlalchemy
    from optuna.distributions import (
        BaseDistribution,
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.trial import FrozenTrial, TrialState, create_trial

    from .workflows import train

__all__ = ["run_sweep", "run_points", "parse_grid", "typed", "SweepResult", "run_name"]

log = logging.getLogger("powergrad")
# The heartbeat (RDBStorage(heartbeat_interval=...), fail_stale_trials) is marked experimental.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="optuna")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module=__name__)

STUDY_NAME = "powergrad-sweep"
HEARTBEAT_S = 30  # a worker records that its trial is alive this often
GRACE_S = 300  # a RUNNING trial with no heartbeat for this long is taken as dead (other hosts)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class SweepResult:
    """What a sweep did: one row per grid point (its latest trial), and the epoch budget.

    Each row says which worker ran the point (``host:pid``) and whether it was one of this
    command's (``here``); points other workers still run are ``RUNNING`` with their epochs so far.
    """

    out: Path
    storage: str  # the URL without its password
    trials: list[dict[str, Any]] = field(default_factory=list)
    epochs_run: int = 0  # epochs trained by the points' latest done trials (all workers)
    epochs_here: int = 0  # of which in trials this command's workers finished
    epochs_pruned: int = 0  # epochs that pruned trials did not need
    epochs_running: int = 0  # epochs done so far by trials other workers still run
    running_elsewhere: int = 0  # how many such trials
    epochs_full: int = 0  # points x epochs: what the grid costs without pruning

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ----------------------------------------------------------------------------- the grid


def parse_grid(args: list[str]) -> tuple[str | None, dict[str, list[str]], dict[str, str]]:
    """``[RECIPE] key=v1,v2 key=v`` -> (recipe, axes with several values, fixed overrides).

    List- and dict-valued keys (``decay_milestones=30,60,90``, ``model_kwargs={...}``) are never
    split: they are fixed.
    """
    list_keys = {
        k
        for k, tp in typing.get_type_hints(Config).items()
        if "list" in str(tp) or "dict" in str(tp)
    }
    recipe, axes, fixed = None, {}, {}
    for a in args:
        if "=" not in a:
            if recipe is not None:
                raise UserError(f"unexpected argument {a!r}: give one recipe, then key=v1,v2 axes")
            recipe = a
            continue
        key, value = (s.strip() for s in a.split("=", 1))
        whole = key in list_keys or key.split(".")[0] in list_keys or value[:1] in "[{"
        values = [value] if whole else [v.strip() for v in value.split(",")]
        if len(values) > 1:
            if len(set(values)) != len(values) or "" in values:
                raise UserError(f"{key}: repeated or empty values in {value!r}")
            axes[key] = values
        else:
            fixed[key] = value
    return recipe, axes, fixed


def _seed_values(
    axes: dict[str, list[str]], fixed: dict[str, str], base: Config, seeds: int
) -> list[int]:
    if "seed" in axes:
        if seeds > 1:
            raise UserError("give either --seeds N or seed=a,b,..., not both")
        return [int(s) for s in axes.pop("seed")]
    start = int(fixed.pop("seed", base.seed))
    return list(range(start, start + seeds))


def run_name(params: dict[str, Any]) -> str:
    """The run directory's name: the point's settings, seed last (``alpha=0.5,seed=1``)."""
    keys = sorted(k for k in params if k != "seed") + (["seed"] if "seed" in params else [])
    return ",".join(f"{k}={params[k]}" for k in keys).replace("/", "_")


def _key(params: dict[str, Any]) -> str:
    """A point's identity, whatever its values' spelling: ``alpha="1"`` (a storage of before the
    values were typed) is the point ``alpha=1.0``."""
    return json.dumps({k: typed(k, v) for k, v in params.items()}, sort_keys=True, default=str)


@functools.cache
def _scalar_types() -> dict[str, Any]:
    """Each recipe key of a scalar type (bool, int, float, str, optional or not), from the
    config's fields: the one home of a key's type."""
    scalar = (bool, int, float, str, type(None))
    return {
        i.name: i.type
        for i in field_info()
        if all(a in scalar for a in (typing.get_args(i.type) or (i.type,)))
    }


def typed(key: str, value: Any) -> Any:
    """A grid value with its config field's type: ``typed("alpha", "0.5") == 0.5``,
    ``typed("seed", "3") == 3``, ``typed("amp", "true") is True``. Values of other keys (lists,
    dicts, ``model_kwargs.<name>``) are returned as given."""
    tp = _scalar_types().get(key)
    return value if tp is None else _coerce(key, value, tp)


def _distribution(values: list[Any]) -> BaseDistribution:
    """How Optuna records a key whose grid holds ``values`` (typed): GridSampler's way of a grid
    over given numbers, a numeric distribution over their range (the grid picks the values; the
    distribution says they are numbers, on a log axis where positive and spanning 10x or more);
    booleans, text and a grid mixing null with numbers as categories."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numbers:
        return CategoricalDistribution(values)
    low, high = min(values), max(values)
    log = low > 0 and high >= 10 * low
    if all(isinstance(v, int) for v in values):
        return IntDistribution(low, high, log=log)
    return FloatDistribution(low, high, log=log)


def _distributions(study: optuna.Study, space: dict[str, list[Any]]) -> dict[str, BaseDistribution]:
    """Each key's distribution: the one this storage's trials already record for it (a sweep
    continued; text categoricals from before values were typed: Optuna refuses a second kind for
    one parameter of a study), else :func:`_distribution` of its values."""
    recorded: dict[str, BaseDistribution] = {}
    for t in study.get_trials(deepcopy=False):
        for k, d in t.distributions.items():
            recorded.setdefault(k, d)
    return {k: recorded.get(k) or _distribution(vs) for k, vs in space.items()}


def _as_recorded(point: dict[str, Any], dists: dict[str, BaseDistribution]) -> dict[str, Any]:
    """A point's values as its distributions hold them: the typed value, or a recorded
    category's spelling of it (``"1"`` for 1.0 in a storage of before the values were typed)."""

    def value(k: str, v: Any) -> Any:
        d = dists[k]
        if isinstance(d, CategoricalDistribution):
            return next((c for c in d.choices if typed(k, c) == v), v)
        return v

    return {k: value(k, v) for k, v in point.items()}


def _suggest(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    """The trial's (enqueued, fixed) value of ``key``, recorded under ``dist``."""
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(key, dist.low, dist.high, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, log=dist.log)
    assert isinstance(dist, CategoricalDistribution)
    return trial.suggest_categorical(key, dist.choices)


# ----------------------------------------------------------------------------- storage and study


@dataclass
class Queue:
    """The study, and the storage it lives in: Optuna's public storage API reaches a trial by
    its id (``get_trial_id_from_study_id_trial_number``), which the study does not expose."""

    study: optuna.Study
    storage: optuna.storages.RDBStorage
    study_id: int
    claim_lock: JournalFileOpenLock | None = None  # SQLite only

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)


def shown_url(url: str) -> str:
    """The storage URL as printed and saved: without its password."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def _driver_url(url: str) -> str:
    """``postgresql://`` means psycopg 3, the driver of the ``postgres`` extra, whatever
    SQLAlchemy's default for the bare scheme (psycopg2 before 2.1)."""
    return (
        "postgresql+psycopg://" + url[len("postgresql://") :]
        if url.startswith("postgresql://")
        else url
    )


def _storage(url: str) -> optuna.storages.RDBStorage:
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(
            _driver_url(url),
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            engine_kwargs=engine_kwargs,
        )
    except ImportError as e:  # SQLAlchemy has no driver for the URL's database
        missing = getattr(e.__cause__, "name", None) or "its database driver"
        if missing == "psycopg":  # what postgresql:// uses; the postgres extra brings it
            raise MissingExtraError(missing, "postgres") from None
        raise UserError(
            f"cannot open sweep storage {shown_url(url)}: no module named {missing!r} "
            "(the database driver the URL names)"
        ) from None
    except Exception as e:  # bad URL, unreachable server
        raise UserError(
            f"cannot open sweep storage {shown_url(url)}: {str(e).splitlines()[0][:200]}"
        ) from None


class _GridQueueSampler(optuna.samplers.GridSampler):
    """GridSampler for trials enqueued with fixed grid parameters: the workers stop when the
    queue is empty, so ``after_trial`` (which calls ``study.stop()`` by counting the grid ids of
    sampled trials, and fails on enqueued ones) is not needed."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def _open_queue(
    url: str, space: dict[str, list], pruner: optuna.pruners.BasePruner | None
) -> Queue:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(url)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=_GridQueueSampler(space, seed=0),
        pruner=pruner or optuna.pruners.NopPruner(),
    )
    return Queue(study, storage, storage.get_study_id_from_name(STUDY_NAME), _claim_lock(url))


def _claim_lock(url: str) -> JournalFileOpenLock | None:
    """The lock that makes a claim exclusive on an SQLite file (module docstring); None for a
    database server, whose FOR UPDATE does it."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return JournalFileOpenLock(str(parsed.database))


def _pruner(prune: bool, epochs: int) -> optuna.pruners.BasePruner | None:
    if not prune:
        return None
    # Bottom quarter at an epoch = clearly worse; judge after a quarter of the budget and 3 trials.
    return optuna.pruners.PercentilePruner(
        25.0, n_startup_trials=3, n_warmup_steps=max(1, epochs // 4)
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_gone(t: FrozenTrial) -> bool:
    """The trial's worker ran on this host and its process has ended."""
    return t.user_attrs.get("host") == socket.gethostname() and not _pid_alive(
        int(t.user_attrs.get("pid", -1))
    )


def _fail_dead_trials(q: Queue) -> None:
    """RUNNING trials whose worker is gone: FAIL them, so their points are enqueued again."""
    for t in q.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _worker_gone(t):
            q.storage.set_trial_user_attr(
                q.trial_id(t.number),
                "error",
                f"interrupted: worker pid {t.user_attrs.get('pid')} ended",
            )
            q.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    optuna.storages.fail_stale_trials(q.study)  # other hosts: no heartbeat for GRACE_S


def _point(t: FrozenTrial) -> str:
    return _key(t.params or t.system_attrs.get("fixed_params", {}))


def _enqueue_missing(study: optuna.Study, spec: dict[str, Any]) -> int:
    """Enqueue the points with no trial done, running or waiting, in order; return how many.
    A point whose run directory holds a record to keep (``done_statuses``) is added as a
    finished trial instead."""
    live = (*DONE, TrialState.RUNNING, TrialState.WAITING)
    have = {_point(t) for t in study.get_trials(deepcopy=False, states=live)}
    n = 0
    for name, p in spec["points"].items():
        if _key(p) in have:
            continue
        run_dir = Path(spec["out"]) / name
        record = _kept_record(run_dir, spec["done_statuses"])
        if record is not None:
            study.add_trial(_kept_trial(name, p, spec["distributions"], record, run_dir))
        else:
            study.enqueue_trial(p, user_attrs={"point": name})
            n += 1
    return n


def _kept_record(run_dir: Path, statuses: tuple[str, ...]) -> dict[str, Any] | None:
    """The run directory's summary if its status is one of ``statuses``: a record to keep."""
    try:
        summary = read_summary(run_dir) if statuses else {}
    except UserError:  # no summary yet (or a broken one): the point is not done
        return None
    return summary if summary.get("status") in statuses else None


def _kept_trial(
    name: str,
    point: dict[str, Any],
    dists: dict[str, BaseDistribution],
    summary: dict,
    run_dir: Path,
) -> FrozenTrial:
    """A trial that reports a kept record, nothing trained: a finished one COMPLETE with its
    value, another status (e.g. diverged) FAIL with that status as its error."""
    final, status = summary.get("final") or {}, summary.get("status")
    attrs = {"point": name, "run_dir": str(run_dir), "recorded": True}
    attrs["epochs_done"] = summary.get("epochs_done")
    value = None
    if status == "finished":
        attrs["metric"] = _metric(final)
        value = float(final[attrs["metric"]])
    else:
        attrs["error"] = f"{status}: its {SUMMARY} is kept, not run again"
    return create_trial(
        state=TrialState.COMPLETE if value is not None else TrialState.FAIL,
        value=value,
        params=point,
        distributions={k: dists[k] for k in point},
        user_attrs=attrs,
    )


def _claim(q: Queue) -> tuple[optuna.Trial, int] | None:
    """Take one WAITING trial for this worker: no other worker can take it too."""
    for _ in range(20):
        with _held(q.claim_lock):
            waiting = q.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not waiting:
                return None
            for t in waiting:
                try:
                    trial_id = q.trial_id(t.number)
                    if q.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                        return optuna.Trial(q.study, trial_id), trial_id
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker took it and finished it meanwhile
                except (optuna.exceptions.StorageInternalError, RuntimeError):
                    break  # SQLite busy: another worker is writing; look again
        time.sleep(0.2)
    return None


@contextmanager
def _held(lock: JournalFileOpenLock | None) -> Iterator[None]:
    if lock is None:
        yield
        return
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _heartbeat(storage: optuna.storages.RDBStorage, trial_id: int) -> Iterator[None]:
    """Records the trial as alive every HEARTBEAT_S seconds, in a thread, while it runs
    (``Study.optimize`` would; a queue of our own records it itself)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a missed beat is harmless; GRACE_S is 10 beats
                pass

    storage.record_heartbeat(trial_id)
    threading.Thread(target=beat, daemon=True).start()
    try:
        yield
    finally:
        stop.set()


# ----------------------------------------------------------------------------- one trial


def _sweep_progress(q: Queue, spec: dict[str, Any], name: str) -> str:
    """One line as a trial starts: which point, how many are done, and an ETA from the trials
    trained so far (their mean wall time, over the trials running in parallel)."""
    total = len(spec["points"])
    done = q.study.get_trials(deepcopy=False, states=DONE)
    took = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in done
        if t.datetime_complete is not None
        and t.datetime_start is not None
        and not t.user_attrs.get("recorded")
    ]
    running = max(1, len(q.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))))
    eta = f", eta {clock(sum(took) / len(took) * (total - len(done)) / running)}" if took else ""
    return f"sweep: {name} ({len(done)} of {total} points done{eta})"


def _run_trial(q: Queue, trial: optuna.Trial, trial_id: int, spec: dict[str, Any]) -> str:
    """Train one claimed trial's point into its run directory, then call ``after_trial``."""
    name = trial.user_attrs["point"]
    params = {k: _suggest(trial, k, spec["distributions"][k]) for k in spec["points"][name]}
    run_dir = Path(spec["out"]) / name
    for k, v in (("run_dir", str(run_dir)), ("host", socket.gethostname()), ("pid", os.getpid())):
        trial.set_user_attr(k, v)
    log.info(_sweep_progress(q, spec, name))
    outcome = _train_trial(q, trial, trial_id, spec, {**spec["fixed"], **params}, run_dir)
    if spec["after_trial"] is not None and run_dir.is_dir():
        spec["after_trial"](run_dir)
    return outcome


def _train_trial(
    q: Queue,
    trial: optuna.Trial,
    trial_id: int,
    spec: dict[str, Any],
    overrides: dict[str, Any],
    run_dir: Path,
) -> str:
    """Train the point into its run directory (resume=auto); the trial's state says how it ended."""

    def on_epoch(row: dict[str, Any]) -> bool:
        value = row["val_acc"] if row.get("val_acc") is not None else row["test_acc"]
        trial.report(float(value), int(row["epoch"]))
        return spec["prune"] and trial.should_prune()

    try:
        with _heartbeat(q.storage, trial_id):
            # resume=auto continues a trial a dead worker left; a new point starts plainly
            again = {"resume": "auto"} if run_dir.exists() else {}
            cfg = load_config(spec["recipe"], {**overrides, **again})
            result = train(cfg, out=run_dir, on_epoch=on_epoch)
    except optuna.exceptions.UpdateFinishedTrialError:
        raise  # closed under this worker: not this trial's failure to record (_worker)
    except Exception as e:  # UserError, DivergenceError or a bug: the others go on
        lines = [ln for ln in str(e).splitlines() if ln.strip()] or [""]
        trial.set_user_attr("error", f"{type(e).__name__}: {lines[0][:300]}")
        if not isinstance(e, (UserError, DivergenceError)):
            log.debug("trial %d:\n%s", trial.number, traceback.format_exc())
        q.study.tell(trial, state=TrialState.FAIL)
        log.warning("sweep: %s failed: %s", trial.user_attrs["point"], trial.user_attrs["error"])
        return "fail"
    trial.set_user_attr("epochs_done", len(result.history))
    if result.status == "stopped":
        q.study.tell(trial, state=TrialState.PRUNED)
        return "pruned"
    if result.status != "finished":  # pre-empted (SIGTERM): the next run of the sweep resumes it
        trial.set_user_attr("error", f"{result.status}: resume by re-running the sweep")
        q.study.tell(trial, state=TrialState.FAIL)
        return "preempted"
    return _tell_finished(q, trial, result.final)


def _tell_finished(q: Queue, trial: optuna.Trial, final: dict[str, Any]) -> str:
    metric = _metric(final)
    trial.set_user_attr("metric", metric)  # what the value measures: format_result's column
    q.study.tell(trial, float(final[metric]))
    return "complete"


def _metric(final: dict[str, Any]) -> str:
    """A trial's value: final validation accuracy where the run has a validation split."""
    return "val_acc" if final.get("val_acc") is not None else "test_acc"


def _worker(spec: dict[str, Any], threads: int | None = None) -> None:
    """One worker: claim queued trials and run them until the queue is empty."""
    if threads:
        torch.set_num_threads(threads)
    q = _open_queue(spec["storage"], spec["grid_space"], _pruner(spec["prune"], spec["epochs"]))
    while (claimed := _claim(q)) is not None:
        trial, trial_id = claimed
        if _is_duplicate(q, trial, trial_id):
            continue
        try:
            outcome = _run_trial(q, trial, trial_id, spec)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning(
                "sweep: trial %d (%s) was closed while this worker ran it (by another worker "
                "or by hand); left as it is: its run folder resumes when the sweep runs again",
                trial.number,
                q.storage.get_trial(trial_id).user_attrs.get("point"),
            )
            continue
        if outcome == "preempted":
            break


def _is_duplicate(q: Queue, trial: optuna.Trial, trial_id: int) -> bool:
    """Workers started at the same moment on two machines may both enqueue a point: the later
    trial of a point that is done or running gives way (FAIL, 'duplicate of trial N')."""
    key = _point(q.storage.get_trial(trial_id))
    for t in q.study.get_trials(deepcopy=False, states=(*DONE, TrialState.RUNNING)):
        if (
            _point(t) == key
            and t.number != trial.number
            and (t.state in DONE or t.number < trial.number)
        ):
            trial.set_user_attr("error", f"duplicate of trial {t.number}")
            q.study.tell(trial, state=TrialState.FAIL)
            return True
    return False


# ----------------------------------------------------------------------------- the sweep


def run_sweep(
    recipe: str | None,
    grid: dict[str, list[Any]],
    out: str | Path,
    *,
    seeds: int = 1,
    fixed: dict[str, Any] | None = None,
    workers: int = 1,
    storage: str | None = None,
    prune: bool = False,
) -> SweepResult:
    """Run (or continue) the grid ``grid`` x ``seeds`` of ``recipe`` under ``out``.

    ``grid`` maps recipe keys to their values, ``fixed`` holds overrides for every trial.
    ``workers`` local processes share the study (1: run in this process). Each point's run
    directory is ``out / run_name(point)``, with the values as written (``alpha=1,seed=0``);
    Optuna stores them typed (alpha 1.0).
    """
    if not grid and seeds < 1:
        raise UserError("a sweep needs at least one key=v1,v2 axis or --seeds N")
    if workers < 1 or seeds < 1:
        raise UserError("--workers and --seeds must be >= 1")
    axes = {k: [str(v) for v in vs] for k, vs in grid.items()}
    fixed = {k: str(v) for k, v in (fixed or {}).items()}
    seed_values = _seed_values(axes, fixed, load_config(recipe, fixed), seeds)
    space: dict[str, list[Any]] = {**{k: axes[k] for k in sorted(axes)}, "seed": seed_values}
    for k, vs in space.items():  # alpha=1,1.0 is one value twice, as the storage types them
        if len({_key({k: v}) for v in vs}) < len(vs):
            raise UserError(f"{k}: {','.join(map(str, vs))} names one value twice")
    points = [dict(zip(space, combo)) for combo in itertools.product(*space.values())]
    return run_points(
        recipe,
        {run_name(p): p for p in points},
        out,
        fixed=fixed,
        workers=workers,
        storage=storage,
        prune=prune,
    )


def run_points(
    recipe: str | None,
    points: dict[str, dict[str, Any]],
    out: str | Path,
    *,
    fixed: dict[str, Any] | None = None,
    workers: int = 1,
    storage: str | None = None,
    prune: bool = False,
    done_statuses: tuple[str, ...] = (),
    after_trial: Callable[[Path], None] | None = None,
) -> SweepResult:
    """Run (or continue) the named ``points`` of ``recipe`` as one sweep, in the order given.

    ``points`` maps each point's run directory name to its overrides (str, int, float or bool
    values, stored with their config field's type: :func:`typed`), applied over ``fixed``. A
    name is a path under ``out`` (it may hold subfolders; an absolute one puts the run there,
    ``out`` keeping study.db and sweep.json). A point whose run directory already holds a
    summary with one of ``done_statuses`` (such as ``("finished", "diverged")``) is
    reported from that record, not trained: for records kept longer than the storage. ``after_trial(run_dir)`` is called after each point trained (e.g.
    to delete its checkpoints); with ``workers > 1`` it must be picklable.
    """
    out = Path(out)
    if not points:
        raise UserError("a sweep needs at least one point")
    if workers < 1:
        raise UserError("--workers must be >= 1")
    fixed = dict(fixed or {})
    # every point must be a valid recipe before anything runs
    epochs = {name: load_config(recipe, {**fixed, **p}).epochs for name, p in points.items()}
    points = {name: {k: typed(k, v) for k, v in p.items()} for name, p in points.items()}
    if len({_key(p) for p in points.values()}) < len(points):
        raise UserError("two points of the sweep have the same overrides")
    budget = max(epochs.values())  # the pruner's: it judges after a quarter of it
    space = _space(points.values())
    refuse_run_dir(out, "a sweep")
    url = storage or f"sqlite:///{out.resolve() / 'study.db'}"
    if storage is None:
        _make_folder(out)  # holds the SQLite file
    q = _open_queue(url, space, _pruner(prune, budget))  # a bad URL or driver: nothing made
    _make_folder(out)
    dists = _distributions(q.study, space)
    spec = {
        "recipe": recipe,
        "fixed": fixed,
        "points": {name: _as_recorded(p, dists) for name, p in points.items()},
        "distributions": dists,
        "grid_space": space,
        "out": str(out),
        "storage": url,
        "prune": prune,
        "epochs": budget,
        "done_statuses": tuple(done_statuses),
        "after_trial": after_trial,
    }
    _check_same_sweep(q.study, recipe, space, fixed)
    _fail_dead_trials(q)
    _enqueue_missing(q.study, spec)
    todo = len(q.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    log.info(
        "sweep %s: %d points, %d to run, %d worker(s), storage %s, study %s",
        out,
        len(points),
        todo,
        workers,
        shown_url(url),
        STUDY_NAME,  # what optuna-dashboard and optuna.load_study ask for
    )
    mine = _run_workers(spec, workers)
    result = summarize(q.study, points, epochs, out, url, mine)
    (out / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


def _space(points: Iterable[dict[str, Any]]) -> dict[str, list[Any]]:
    """Each key's values over the points, in the order first met: Optuna's search space."""
    space: dict[str, list[Any]] = {}
    for p in points:
        for k, v in p.items():
            if v not in space.setdefault(k, []):
                space[k].append(v)
    return space


def _run_workers(spec: dict[str, Any], workers: int) -> set[tuple[str, int | None]]:
    """Run the queue in this process (one worker) or in ``workers`` processes; return them."""
    host = socket.gethostname()
    if workers == 1:
        _worker(spec)
        return {(host, os.getpid())}
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(spec, threads)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return {(host, proc.pid) for proc in procs}


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create sweep folder {out}: {e.strerror or e}") from None


def _check_same_sweep(study: optuna.Study, recipe: str | None, space: dict, fixed: dict) -> None:
    what = {"recipe": recipe, "space": space, "fixed": fixed}
    saved = study.user_attrs.get("sweep")
    if saved is None:
        study.set_user_attr("sweep", what)
    elif _same_terms(saved) != _same_terms(what):
        raise UserError(
            f"this sweep's storage holds another sweep ({saved['recipe']}, "
            f"{', '.join(f'{k}={v}' for k, v in saved['space'].items())}); choose another --out or --storage"
        )


def _same_terms(sweep: dict[str, Any]) -> str:
    """A sweep's recipe, space and fixed keys, its values typed (a storage of before the values
    were typed saved them as text)."""
    space = {k: [typed(k, v) for v in vs] for k, vs in sweep["space"].items()}
    return json.dumps({**sweep, "space": space}, sort_keys=True, default=str)


def summarize(
    study: optuna.Study,
    points: dict[str, dict[str, Any]],
    epochs: dict[str, int],
    out: Path,
    url: str,
    mine: set[tuple[str, int | None]] | None = None,
) -> SweepResult:
    """One row per point from its latest trial, as the storage has it: state, value, epochs
    done, worker (``host:pid``; ``here`` if in ``mine``), run dir, error. ``epochs``: each
    point's budget."""
    mine = mine or set()
    latest: dict[str, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        k = _point(t)
        if k not in latest or _rank(t) >= _rank(latest[k]):
            latest[k] = t
    result = SweepResult(out=out, storage=shown_url(url), epochs_full=sum(epochs.values()))
    for name, p in points.items():
        row = _row(latest.get(_key(p)), mine)
        row["point"] = name
        result.trials.append(row)
        done = int(row["epochs_done"] or 0)
        if row["state"] in ("COMPLETE", "PRUNED"):
            result.epochs_run += done
            result.epochs_here += done if row["here"] else 0
        if row["state"] == "PRUNED":
            result.epochs_pruned += epochs[name] - done
        if row["state"] == "RUNNING" and not row["here"]:
            result.running_elsewhere += 1
            result.epochs_running += done
    return result


def _row(t: FrozenTrial | None, mine: set[tuple[str, int | None]]) -> dict[str, Any]:
    if t is None:
        return {
            "state": "MISSING",
            "value": None,
            "trial": None,
            "epochs_done": None,
            "worker": None,
            "here": False,
            "run_dir": None,
            "metric": None,
            "error": None,
        }
    host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
    # A finished trial records its epochs; a running one has reported this many so far.
    done = t.user_attrs.get(
        "epochs_done", len(t.intermediate_values) if t.state == TrialState.RUNNING else None
    )
    error = t.user_attrs.get("error")
    if t.state == TrialState.RUNNING and _worker_gone(t):
        error = "its worker has ended: re-run the sweep to resume it"
    return {
        "state": t.state.name,
        "value": t.value,
        "trial": t.number,
        "epochs_done": done,
        "worker": f"{host}:{pid}" if host else None,
        "here": (host, pid) in mine,
        "run_dir": t.user_attrs.get("run_dir"),
        "metric": t.user_attrs.get("metric"),
        "error": error,
    }


def _rank(t: FrozenTrial) -> tuple[bool, int]:
    return (t.state in DONE, t.number)


def format_result(result: SweepResult) -> str:
    """A short text table of the points, who ran them, and where the grid's epochs went."""
    # The value is final validation accuracy where the recipe holds a validation split, else
    # test accuracy: the column says which (a mixed grid names each row's).
    metrics = {r.get("metric") for r in result.trials if r.get("metric")}
    label = metrics.pop() if len(metrics) == 1 else "value"
    lines = [f"{'point':<40} {'state':<9} {label:>8} {'epochs':>6}  {'worker':<20} error"]
    for r in result.trials:
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        worker = "here" if r["here"] else r["worker"] or "-"
        which = f"  ({r['metric']})" if label == "value" and r.get("metric") else ""
        lines.append(
            f"{r['point']:<40} {r['state']:<9} {value:>8} {r['epochs_done'] or '-':>6}  "
            f"{worker:<20} {r['error'] or ''}{which}"
        )
    not_run = result.epochs_full - result.epochs_run - result.epochs_pruned
    lines.append(
        f"epochs trained {result.epochs_run} of the full grid's {result.epochs_full}: "
        f"{result.epochs_here} in trials this command ran, {result.epochs_run - result.epochs_here} "
        f"by other or earlier workers; {result.epochs_pruned} saved by pruning; {not_run} not done"
    )
    if result.running_elsewhere:
        lines.append(
            f"still running on other workers: {result.running_elsewhere} trial(s), "
            f"{result.epochs_running} epochs so far; `powergrad report` when they end"
        )
    lines.append(f"storage {result.storage}")
    return "\n".join(lines)
