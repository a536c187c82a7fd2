"""Data-parallel set-up through torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

One process per device; NCCL on GPUs, gloo on CPUs. Without torchrun's variables everything
here is a no-op and training runs in one process. ``launch_local`` is ``nproc=K``: torchrun's
own agent, run in this process, with pre-emption signals passed on to the workers.
See docs/distributed.md.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from ..errors import ONCE_DIR_ENV, PeerFailedError, UserError

__all__ = [
    "DistInfo",
    "init_distributed",
    "all_reduce_sum",
    "all_reduce_max",
    "cleanup",
    "check_same_everywhere",
    "raise_if_peer_failed",
    "launch_local",
    "PREEMPTION_SIGNALS",
]

# How clusters warn a job: SIGTERM (pre-emption, time limit) and SIGUSR1 (SLURM --signal=USR1@T).
PREEMPTION_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s
)

BACKEND_ENV = "POWERGRAD_DIST_BACKEND"  # the process group's backend, if not the device's usual

# Words with which gloo reports that another process went away mid-collective.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(want: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local GPU if there is one, else the CPU."""
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA GPU is visible; use device=cpu or auto")
        # More processes than GPUs (POWERGRAD_DIST_BACKEND=gloo: DDP tested on one GPU) share them.
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        # NCCL refuses two processes on one GPU; gloo takes them (POWERGRAD_DIST_BACKEND=gloo).
        backend = os.environ.get(BACKEND_ENV) or ("nccl" if dev.type == "cuda" else "gloo")
        # A collective waits at most this long for a missing rank (PyTorch's default is 10-30
        # minutes). torchrun usually ends the group sooner: it stops every worker as soon as one
        # exits non-zero. A whole ImageNet eval pass sits between two collectives, so not seconds.
        timeout = datetime.timedelta(seconds=int(os.environ.get("POWERGRAD_DIST_TIMEOUT", "300")))
        dist.init_process_group(
            backend, timeout=timeout, device_id=dev if backend == "nccl" else None
        )
    if world > 1 and rank != 0:  # one copy of the progress lines: rank 0's; warnings from all
        logging.getLogger("powergrad").setLevel(logging.WARNING)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all processes (in place); a no-op in one process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Maximum of a tensor over all processes (in place); a no-op in one process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def check_same_everywhere(values: dict[str, int], info: DistInfo) -> None:
    """Raise a UserError on every rank unless all ranks hold the same ``values``.

    Where to resume and how many steps an epoch has must agree, or the processes fall out of
    step (one waits in a collective the others never reach). They differ when the run directory
    or the data is not the same on every node.
    """
    if not info.enabled:
        return
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=info.device)
    low, high = t.clone(), t.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = [
        f"{k} from {lo:g} to {hi:g}"
        for k, lo, hi in zip(values, low.tolist(), high.tolist())
        if lo != hi
    ]
    if differ:
        raise UserError(
            f"the {info.world_size} processes disagree ({'; '.join(differ)}): every node must see the "
            "same data and the same run directory (a shared file system) to start or resume together"
        )


def raise_if_peer_failed(error: BaseException, info: DistInfo) -> None:
    """Turn "another process died under this collective" into one line (a UserError).

    The process that failed prints its own message; the others would otherwise each add a
    traceback from inside gloo that hides it.
    """
    if not info.enabled:
        return
    text = str(error)
    if isinstance(error, dist.DistError) or any(w in text for w in _PEER_GONE):
        first = text.strip().splitlines()[0][:160] if text.strip() else type(error).__name__
        raise PeerFailedError(
            f"rank {info.rank}: another process stopped during a collective; its own message says "
            f"why ({first})"
        ) from None


# ----------------------------------------------------------------------------- nproc=K


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run ``python -m powergrad ARGV`` as ``nproc`` processes on this machine; the exit code.

    This process is torchrun's agent (``torch.distributed.run``, ``--standalone``). SIGTERM and
    SIGUSR1 are handed to the workers, which stop at the next step, save and exit 0, so the run
    exits 0 too (torchrun's own handling would exit 1 after any signal). A failed worker makes
    torchrun stop the others. A user error (exit 2) or a divergence (exit 3) is the failing
    worker's one line, printed once however many workers hit it, and its exit code; any other
    failure adds one line naming every failed rank.
    """
    # torchrun keeps SIGINT (Ctrl-C), SIGHUP and SIGQUIT: it passes them on and stops the workers.
    args = parse_args(
        [
            "--standalone",
            f"--nproc_per_node={nproc}",
            "--signals_to_handle=SIGINT,SIGHUP,SIGQUIT",
            "-m",
            "powergrad",
            *argv,
        ]
    )
    # The workers share the cores (torchrun would set 1 thread and warn about it).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # torchrun's agent logs each stop and failure; the summary below says it in one line.
    elastic_log = logging.getLogger("torch.distributed.elastic")
    elastic_level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)
    previous = {s: signal.signal(s, _pass_to_children) for s in PREEMPTION_SIGNALS}
    once = tempfile.TemporaryDirectory(prefix="powergrad-once-")
    os.environ[ONCE_DIR_ENV] = once.name
    try:
        run(args)
    except ChildFailedError as e:
        codes = {r: f.exitcode for r, f in sorted(e.failures.items())}
        stopped_by_peer = -int(signal.SIGTERM)  # torchrun stops the others after a failure
        if any(c in (2, 3) for c in codes.values()) and all(
            c in (2, 3, stopped_by_peer) for c in codes.values()
        ):
            return max(codes.values())  # the worker's own line is above, once
        # Which rank torchrun saw first is a race (the one that failed, or a peer that lost it),
        # so name them all; each one's own message is above.
        how = [
            f"rank {r} "
            + (f"killed by {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}")
            for r, f in sorted(e.failures.items())
        ]
        print(
            f"powergrad: error: {len(how)} of {nproc} processes failed ({', '.join(how)}); torchrun "
            "stopped the run (each process's own message is above)",
            file=sys.stderr,
        )
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code
    except SignalException as e:
        print(f"powergrad: stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        os.environ.pop(ONCE_DIR_ENV, None)
        once.cleanup()
        elastic_log.setLevel(elastic_level)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def _pass_to_children(signum: int, frame) -> None:
    for pid in _child_pids():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _child_pids() -> list[int]:
    """This process's children, from /proc (torchrun's workers; Linux, where clusters run)."""
    me, kids = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (command) state ppid ...": the command may hold spaces and parentheses.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me:
            kids.append(int(stat.parent.name))
    return kids
