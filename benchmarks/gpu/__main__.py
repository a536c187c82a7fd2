"""python3 -m benchmarks.gpu {first,second}: one GPU run (see benchmarks/gpu/__init__.py)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .harness import ROOT, TIME_LIMIT_S, child_main, run_plan
from .plans import PLANS

DEFAULT_DATA = ROOT / ".data" / "cifar10-jpeg.tar.gz"  # made by `make gpu-data`


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.gpu", description=__doc__.splitlines()[0]
    )
    ap.add_argument("plan", nargs="?", choices=sorted(PLANS), help="which run")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    ap.add_argument(
        "--data",
        help="CIFAR-10 (JPEG): a folder with train/ and test/, a .tar or .tar.gz of one, or a folder "
        f"holding cifar10-jpeg.tar[.gz] (default: {DEFAULT_DATA.relative_to(ROOT)} if there, else "
        "$POWERGRAD_DATA; the dry run uses generated images unless given)",
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU: the runs' own test"
    )
    ap.add_argument(
        "--time-limit", type=float, default=TIME_LIMIT_S, help="seconds for the whole run"
    )
    ap.add_argument("--steps", help="comma-separated step names: only these (in the plan's order)")
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return args
    if args.plan is None:
        ap.error("say which run: first or second")
    if not args.out:
        ap.error("--out DIR is needed ($OUT is not set)")
    names = [fn.__name__ for fn in PLANS[args.plan]]
    if args.steps:
        bad = set(args.steps.split(",")) - set(names)
        if bad:
            ap.error(f"unknown step(s) {', '.join(sorted(bad))}; {args.plan}: {', '.join(names)}")
    if args.data is None and not args.dry_run:
        args.data = (
            str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else os.environ.get("POWERGRAD_DATA")
        )
    return args


def usage_error(message: str) -> SystemExit:
    print(f"python3 -m benchmarks.gpu: error: {message}", file=sys.stderr)
    return SystemExit(2)


def unpack(arg: str, work: Path) -> Path:
    """CIFAR-10 as an image folder: the folder itself, or the archive unpacked into work/."""
    path = Path(arg).expanduser()
    if path.is_dir() and (path / "train").is_dir():
        return path
    if path.is_dir():
        path = next(
            (p for p in (path / "cifar10-jpeg.tar.gz", path / "cifar10-jpeg.tar") if p.is_file()),
            path,
        )
    if not path.is_file():
        raise usage_error(
            f"--data {arg}: no train/ folder, archive, or cifar10-jpeg.tar[.gz] there"
        )
    dest = work / "cifar10"
    if not (dest / "train").is_dir() and not any(dest.glob("*/train")):
        with tarfile.open(path) as t:  # "r:*": plain or gzip
            t.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    found = (
        dest if (dest / "train").is_dir() else next((p.parent for p in dest.glob("*/train")), None)
    )
    if found is None:
        raise usage_error(f"--data {arg}: the archive holds no train/ folder")
    return found


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse(argv)
    if args.child:
        return child_main(
            args.child,
            Path(args.work),
            Path(args.data) if args.data else None,
            args.budget,
            args.dry_run,
        )
    plan = PLANS[args.plan]
    if args.steps:
        plan = [fn for fn in plan if fn.__name__ in args.steps.split(",")]
    command = "PYTHONPATH=src python3 -m benchmarks.gpu " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    scratch = (
        contextlib.nullcontext(args.work)
        if args.work
        else tempfile.TemporaryDirectory(prefix="pg-gpu-")
    )
    with scratch as work_dir:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        data = unpack(args.data, work) if args.data else None
        return run_plan(
            args.plan,
            plan,
            Path(args.out),
            work,
            data,
            args.dry_run,
            args.time_limit,
            started,
            command,
        )


if __name__ == "__main__":
    sys.exit(main())
