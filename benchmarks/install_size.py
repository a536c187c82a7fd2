"""Installed size of `pip install powergrad` and of each extra, measured on this environment.

    python benchmarks/install_size.py

Reads the extras from pyproject.toml, follows each requirement through the installed packages'
own metadata (markers evaluated here) and sums the files each package's RECORD lists. So it
measures what is installed in this venv, with its torch build (CUDA or CPU), not a download.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _size(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        path = Path(dist.locate_file(f))
        if path.is_file():
            total += path.stat().st_size
    return total


def closure(requirements: list[str], extras: dict[str, list[str]]) -> dict[str, int]:
    """Installed distributions that ``requirements`` pull in, with their sizes in bytes."""
    seen: dict[str, int] = {}
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        if req.name == "powergrad":  # an extra built on another: powergrad[plot]
            todo += [(Requirement(r), "") for e in req.extras for r in extras[e]]
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        dist = metadata.distribution(req.name)
        if name not in seen:
            seen[name] = _size(dist)
            todo += [(Requirement(r), "") for r in dist.requires or []]
        todo += [(Requirement(r), e) for e in req.extras for r in dist.requires or []]
    return seen


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = closure(project["dependencies"], extras)
    mb = 1024**2
    print(f"{'install':<32} {'packages':>8} {'MiB':>8} {'MiB over the loss':>18}")
    print(
        f"{'pip install powergrad':<32} {len(core):>8} {sum(core.values()) / mb:>8.0f} {0:>18.0f}"
    )
    for name in ("plot", "train", "sweep", "postgres", "all"):
        dists = closure(project["dependencies"] + extras[name], extras)
        extra_mb = sum(v for k, v in dists.items() if k not in core) / mb
        print(
            f"{f'pip install powergrad[{name}]':<32} {len(dists):>8} {sum(dists.values()) / mb:>8.0f} {extra_mb:>18.0f}"
        )
    torch = closure(["torch"], extras)
    print(
        f"\n(torch and its own dependencies: {len(torch)} packages, {sum(torch.values()) / mb:.0f} MiB, "
        f"this venv's build {metadata.version('torch')})"
    )


if __name__ == "__main__":
    main()
