"""Reading a local weights file (``weights=PATH``) into a model, safely.

Accepted: a raw state dict (``.pt``/``.pth``), a ``.safetensors`` file, or a checkpoint dict that
holds the state dict under ``model``, ``state_dict`` or ``model_state_dict``. Pickles are read with
``weights_only=True`` only: a file that needs code to unpickle is refused, never executed.
"""

from __future__ import annotations

import logging
import pickle
import pickletools
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError, extra

log = logging.getLogger("powergrad")

CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict")
# DDP wraps the model as .module, torch.compile as ._orig_mod: neither belongs in the key.
PREFIXES = ("module.", "_orig_mod.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# torch.save's older format starts with this pickled magic number (its newer one is a zip file).
_TORCH_LEGACY = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# Opcodes by which a pickle asks to import or call something (the way a pickle runs code).
_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def plain_pickle_problem(path: str | Path) -> str | None:
    """What is wrong with a file written by pickle.dump rather than torch.save, or None if it is
    not one. torch would fail on it with a warning and a misleading message; its opcodes are
    read here, never run, to say whether it asks to run code."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_TORCH_LEGACY))
            if not head.startswith(b"\x80") or head.startswith(_TORCH_LEGACY):
                return None  # torch's formats, or bytes that are no pickle: torch.load says which
            f.seek(0)
            ops = {op.name for op, _, _ in pickletools.genops(f)}
    except OSError:
        return None  # torch.load names the problem
    except Exception:  # noqa: BLE001 - a pickle cut short: pickletools raises ValueError and co.
        return "not a loadable file (a truncated pickle)"
    if ops & _CODE_OPS:
        return (
            "refused: a plain pickle (not torch.save's format) that asks to import or call "
            "code; nothing was run"
        )
    return "not loadable: a plain pickle, not torch.save's format"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, prefixes stripped; UserError naming the file if not."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights={path}: file not found")
    if p.suffix == ".safetensors":
        with extra("train"):  # for .safetensors files only
            from safetensors.torch import load_file

        try:
            obj: object = load_file(str(p), device="cpu")
        except Exception as e:
            raise UserError(
                f"weights={path}: not a readable safetensors file ({_first_line(e)})"
            ) from None
    else:
        problem = plain_pickle_problem(p)
        if problem:
            raise UserError(f"weights={path}: {problem}")
        try:
            with warnings.catch_warnings():  # torch's advice to load unsafely is not ours to give
                warnings.simplefilter("ignore")
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only" in str(e).lower():
                raise UserError(
                    f"weights={path}: refused: not a plain weights file (it holds pickled objects "
                    "or code); re-save just the state dict from a trusted source"
                ) from None
            raise UserError(f"weights={path}: cannot read ({_first_line(e)})") from None
        except Exception as e:  # truncated zip, text file, ...: torch raises many types
            raise UserError(
                f"weights={path}: cannot read as a PyTorch weights file ({type(e).__name__}: {_first_line(e)})"
            ) from None
    if isinstance(obj, dict):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        what = (
            f"a dict with keys {', '.join(map(str, list(obj)[:5]))}"
            if isinstance(obj, dict)
            else type(obj).__name__
        )
        raise UserError(
            f"weights={path}: no state dict found (got {what}; expected name -> tensor, "
            f"or a checkpoint with one under {', '.join(CHECKPOINT_KEYS)})"
        )
    out = {}
    for k, v in obj.items():
        for prefix in PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def adapt_conv_weight(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-conv weight for a new number of input channels: average over the old input channels,
    rescaled so a grey image repeated over the channels gives the same activation (timm does
    the same): a frozen or fine-tuned BN after it then sees the scale it was trained on."""
    return w.mean(1, keepdim=True).repeat(1, in_chans, 1, 1) * (w.shape[1] / in_chans)


def load_weights(
    model: nn.Module, path: str | Path, head_name: str, first_conv: str | None
) -> None:
    """Load ``path`` into ``model``. A head whose shape does not fit is dropped (it keeps its fresh
    init); a first conv with another channel count is adapted; anything else that does not
    fit is a UserError naming the first keys that are wrong."""
    sd = read_state_dict(path)
    own = model.state_dict()
    head_prefix = head_name + "."
    dropped: dict[str, torch.Size] = {}
    mismatched = []
    for k in list(sd):
        if k not in own or sd[k].shape == own[k].shape:
            continue
        if k.startswith(head_prefix):
            dropped[k] = sd.pop(k).shape
        elif (
            first_conv
            and k == first_conv + ".weight"
            and sd[k].shape[0] == own[k].shape[0]
            and sd[k].shape[2:] == own[k].shape[2:]
        ):
            log.info(
                "weights: adapted %s from %d to %d input channels",
                k,
                sd[k].shape[1],
                own[k].shape[1],
            )
            sd[k] = adapt_conv_weight(sd[k], own[k].shape[1])
        else:
            mismatched.append(f"{k} (file {list(sd[k].shape)} vs model {list(own[k].shape)})")
    unexpected = [k for k in sd if k not in own]
    # Old checkpoints lack BN's num_batches_tracked; it only matters for momentum=None BN.
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    missing_head = [k for k in missing if k.startswith(head_prefix)]
    missing = [k for k in missing if not k.startswith(head_prefix)]
    problems = []
    for label, keys in (
        ("shape mismatch", mismatched),
        ("missing", missing),
        ("unexpected", unexpected),
    ):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise UserError(f"weights={path} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(sd, strict=False)
    log.info("loaded weights from %s (%d tensors)", path, len(sd))
    if dropped:
        old = dropped.get(head_prefix + "weight", next(iter(dropped.values())))[0]
        new = own[head_prefix + "weight"].shape[0] if head_prefix + "weight" in own else "?"
        log.info(
            "weights: dropped head %s from the file (%s -> %s classes); head re-initialised",
            head_name,
            old,
            new,
        )
    if missing_head:
        log.info("weights: file has no head %s; head initialised fresh", head_name)
