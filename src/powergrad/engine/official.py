"""The official checkpoints (seed 000's table): timm-style ``model_best.pth.tar`` files.

Such a file is a dict ``{epoch, arch, state_dict, optimizer, version, args, metric}`` with
``args`` an ``argparse.Namespace`` (timm's train.py saves its parsed arguments). It is read with
``torch.load(weights_only=True)`` and one extra allowed class, ``argparse.Namespace`` (plain
attribute storage, no code); anything else a pickle asks to build or call is refused before it
runs. :func:`read_official` turns the file into the shape of a powergrad checkpoint so that
``evaluate`` and ``resume=`` take it like their own.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

log = logging.getLogger("powergrad")

# The official repository's model names that differ from ours.
ARCH_NAMES = {"resnet18_wobn": "resnet18_nobn"}
ALLOWED_GLOBALS: list[Any] = [argparse.Namespace]


def _load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = (
            str(e).split("Unsupported global:")[-1].split(".")[0].strip()
            if "Unsupported global" in str(e)
            else ""
        )
        detail = f" ({what})" if what else ""
        raise UserError(
            f"{path}: refused: the file asks to build objects other than tensors, plain values and "
            f"argparse.Namespace{detail}; it could run code when loaded. Nothing was run."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read checkpoint ({first[:200]})") from None


def is_official(state: Any) -> bool:
    return isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and "arch" in state


def read_official(path: str | Path) -> dict[str, Any] | None:
    """A timm-style checkpoint as a powergrad checkpoint dict, or None if it is another format.

    The result has ``official: True``, ``model`` (the weights), ``optimizer`` (or None),
    ``epoch`` (epochs done: timm stores the 0-based index of the last finished epoch) and a
    ``config`` of what the file says: model (mapped to our name), data set, image size, alpha
    (``--modify-softmax``) and label smoothing. Refused files raise UserError.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    state = _load(path)
    if not is_official(state):
        return None
    args = state.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    arch = str(state["arch"])
    config: dict[str, Any] = {"model": ARCH_NAMES.get(arch, arch), "dataset": "imagefolder"}
    for ours, theirs in (
        ("img_size", "img_size"),
        ("num_classes", "num_classes"),
        ("alpha", "modify_softmax"),
        ("label_smoothing", "smoothing"),
    ):
        if args.get(theirs) is not None:
            config[ours] = args[theirs]
    epoch = int(state.get("epoch", -1)) + 1
    return {
        "official": True,
        "model": state["state_dict"],
        "optimizer": state.get("optimizer"),
        "epoch": epoch,
        "config": config,
        "metric": state.get("metric"),
        "arch": arch,
    }


def load_optimizer_where_it_fits(optimizer: torch.optim.Optimizer, saved: dict | None) -> bool:
    """Load the official optimizer's momentum buffers into ours where groups and shapes fit.

    timm puts the no-decay group first, powergrad the decay group: groups are matched by their
    parameter shapes, not their order. Our groups keep their own hyper-parameters (lr, decay).
    Returns False (and leaves the optimizer fresh) when they do not fit.
    """
    if not saved or "param_groups" not in saved:
        return False
    ours = optimizer.state_dict()
    saved_state = saved.get("state", {})

    def shapes(ids: list[int], st: dict[int, Any]) -> list[tuple[int, ...] | None]:
        return [
            tuple(st[i]["momentum_buffer"].shape)
            if i in st and st[i].get("momentum_buffer") is not None
            else None
            for i in ids
        ]

    own_shapes = [[tuple(p.shape) for p in g["params"]] for g in optimizer.param_groups]
    new_state: dict[int, Any] = {}
    used: set[int] = set()
    for og, own in zip(ours["param_groups"], own_shapes):
        match = None
        for j, sg in enumerate(saved["param_groups"]):
            got = shapes(sg["params"], saved_state)
            if (
                j not in used
                and len(got) == len(own)
                and all(s is None or s == o for s, o in zip(got, own))
            ):
                match = j
                break
        if match is None:
            log.warning(
                "official optimizer state does not fit this model's groups: momentum starts fresh"
            )
            return False
        used.add(match)
        for ours_id, theirs_id in zip(og["params"], saved["param_groups"][match]["params"]):
            if theirs_id in saved_state:
                new_state[ours_id] = saved_state[theirs_id]
    optimizer.load_state_dict({"state": new_state, "param_groups": ours["param_groups"]})
    return True
