"""Does the working tree plus .data/ fit what a GPU machine is sent (64 MiB)? Exit 1 if not.

    python3 -m benchmarks.gpu.carry      (make gpu-data runs it)

The checkout is what git would copy: tracked files and untracked ones it does not ignore.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .harness import ROOT

CARRY_LIMIT = 64 * 2**20
DATA = ROOT / ".data"


def checkout_bytes(root: Path = ROOT) -> int:
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = (root / n.decode() for n in names if n)
    return sum(p.stat().st_size for p in paths if p.is_file())


def main() -> int:
    tree = checkout_bytes()
    data = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) if DATA.is_dir() else 0
    total = tree + data
    mib = 2**20
    print(
        f"checkout {tree / mib:.1f} MiB + .data {data / mib:.1f} MiB = {total / mib:.1f} MiB "
        f"(limit {CARRY_LIMIT / mib:.0f} MiB)"
    )
    if total >= CARRY_LIMIT:
        print("too big to send: make .data smaller, or the checkout", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
