"""The recipe: one typed, validated config object. YAML in, YAML out, key=value overrides.

A recipe is a YAML mapping of the keys of :class:`Config` (``monitor.*`` for the nested
monitor thresholds). It may name ``base: OTHER`` (a built-in recipe name or a path) whose keys
it extends. Built-in recipes live in ``powergrad/recipes/`` as package data; ``name`` is their
path there without ``.yaml`` (``imagenet/resnet50-cosine-a0.3``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import UserError
from .tamper import check_alpha

__all__ = ["Config", "MonitorConfig", "load_config", "list_recipes", "config_hash"]


@dataclass
class MonitorConfig:
    """Thresholds of the training-pathology checks (see powergrad.monitor)."""

    stall_epochs: int = 3  # judge "stalled" after this many epochs
    stall_loss_change: float = 0.01  # relative train-loss change below which loss is "frozen"
    stall_acc_margin: float = 0.02  # accuracy within this of chance counts as "at chance"
    dead_filter_norm: float = 1e-3  # a conv filter whose weight norm falls below this is dead
    dead_filter_share: float = 0.05  # warn when more than this share of filters is dead
    overfit_patience: int = 3  # epochs the held-out loss must stay risen before "overfitting"
    overfit_rise: float = 0.2  # ... by more than this share above its lowest value
    filter_norms: bool = False  # record per-filter L2 norms of every conv layer each epoch
    filter_norms_every: int = 100  # steps between filter-norm records (0: at epoch ends only)
    logit_stats: bool = True  # record logit norm, mean, max and variance each epoch


@dataclass
class Config:
    """Every key of a recipe. ``batch_size`` is the global batch over all processes."""

    # what and on what
    description: str = ""
    model: str = "mlp"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = None
    freeze: str = "none"
    head_lr: float | None = None
    probe_layer: str | None = None
    # probe features: auto = average 4-D maps over space (3-D token maps over tokens), flatten the
    # raw input; avg; flatten (layer3 of ResNet-18 at 224 px flattened is 50,176 numbers an image)
    probe_pool: str = "auto"
    probe_standardize: bool = True  # features minus train mean, over train std (see docs/workflows.md)
    probe_cache: str | None = None  # a .pt file for probe features: read if it matches, else written
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    img_size: int | None = None
    augment: str = "auto"
    train_subset: int | None = None
    test_subset: int | None = None  # evaluate on this many test images (class-balanced, seeded)
    val_fraction: float = 0.0
    skip_bad_images: bool = False
    num_classes: int | None = None
    synthetic_size: int = 1024
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    sched: str = "cosine"
    warmup_epochs: int = 0
    warmup_lr: float = 1e-4
    decay_epochs: float = 30.0
    decay_milestones: list[int] | None = None
    decay_rate: float = 0.1
    min_lr: float = 0.0
    cooldown_epochs: int = 0
    # the tampering
    alpha: float = 1.0
    label_smoothing: float = 0.0
    clip: str = "none"
    clip_value: float = 1.0
    # machinery
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    accum_steps: int = 1
    workers: int = 2
    resume: str | None = None
    save_every: int = 1
    # also save last.pt every N optimiser steps inside an epoch (0 = only at epoch ends): bounds
    # what a kill loses on long epochs (ImageNet: 5,005 steps an epoch at batch 256)
    checkpoint_every_steps: int = 0
    keep_checkpoints: bool = False  # also keep epoch{N}.pt for every saved epoch
    sync_bn: bool = False
    nproc: int = 1
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adamw"),
    "sched": ("cosine", "step", "exp", "const"),
    "clip": ("none", "norm", "value", "agc"),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("none", "bf16", "fp16"),
    "freeze": ("none", "backbone"),
    "probe_pool": ("auto", "avg", "flatten"),
}

# Keys that must be > 0, and keys that must be >= 0.
POSITIVE = ("epochs", "batch_size", "lr", "accum_steps", "save_every", "nproc", "synthetic_size")
NON_NEGATIVE = (
    "momentum", "weight_decay", "warmup_epochs", "warmup_lr", "decay_rate", "min_lr",
    "cooldown_epochs", "clip_value", "workers", "seed", "checkpoint_every_steps",
)


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _base_type(tp: Any) -> Any:
    if _is_optional(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML value or a command-line string to the annotated type, or raise UserError."""
    is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))
    if is_null and _is_optional(tp):
        return None
    if value is None:
        raise UserError(f"{key}: a value is required")
    base = _base_type(tp)
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            (item,) = typing.get_args(base)
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.startswith("[") else value.split(",")
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_coerce(key, v, item) for v in value]
        if base is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError, yaml.YAMLError):
        pass
    else:
        raise AssertionError(f"unhandled type {tp} for {key}")
    name = getattr(base, "__name__", str(base))
    raise UserError(f"{key}: expected {name}, got {value!r}")


def _fields(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys() -> list[str]:
    keys = [k for k in _fields(Config) if k != "monitor"]
    keys += [f"monitor.{k}" for k in _fields(MonitorConfig)]
    return keys + ["model_kwargs.<name>"]


def _unknown(key: str) -> UserError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; see `powergrad train --help-keys`"
    return UserError(f"unknown key {key!r}{hint}")


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b=v`` into a nested dict of raw recipe values."""
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise _unknown(dotted)
    node[parts[-1]] = value


def _build(raw: dict[str, Any]) -> Config:
    hints = _fields(Config)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            raise _unknown(key)
        if key == "monitor":
            if not isinstance(value, dict):
                raise UserError(f"monitor: expected a mapping, got {value!r}")
            mhints = _fields(MonitorConfig)
            mkw = {}
            for mk, mv in value.items():
                if mk not in mhints:
                    raise _unknown(f"monitor.{mk}")
                mkw[mk] = _coerce(f"monitor.{mk}", mv, mhints[mk])
            kwargs[key] = MonitorConfig(**mkw)
        else:
            kwargs[key] = _coerce(key, value, hints[key])
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check values that have a type but not every value of it is allowed."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"{key}: must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    for key in POSITIVE:
        if not getattr(cfg, key) > 0:
            raise UserError(f"{key}: must be > 0, got {getattr(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if not getattr(cfg, key) >= 0:
            raise UserError(f"{key}: must be >= 0, got {getattr(cfg, key)!r}")
    try:
        check_alpha(cfg.alpha)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise UserError(f"label_smoothing: must be in [0, 1), got {cfg.label_smoothing!r}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"val_fraction: must be in [0, 1), got {cfg.val_fraction!r}")
    if cfg.warmup_epochs + cfg.cooldown_epochs > cfg.epochs and cfg.warmup_epochs > 0:
        raise UserError(
            f"warmup_epochs ({cfg.warmup_epochs}) + cooldown_epochs ({cfg.cooldown_epochs}) "
            f"exceed epochs ({cfg.epochs})"
        )
    if cfg.img_size is not None and cfg.img_size < 1:
        raise UserError(f"img_size: must be >= 1, got {cfg.img_size!r}")


# ---------------------------------------------------------------- recipes on disk


def _recipe_root() -> Path:
    return Path(str(resources.files("powergrad") / "recipes"))


def list_recipes() -> dict[str, str]:
    """Built-in recipe names and their one-line descriptions."""
    root = _recipe_root()
    out = {}
    for path in sorted(root.rglob("*.yaml")):
        name = path.relative_to(root).with_suffix("").as_posix()
        data = _read_yaml(path)
        out[name] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.constructor.ConstructorError as e:
        # safe_load builds plain values only: a tag such as !!python/object/apply is refused.
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path}: refused: {e.problem}{where}; a recipe holds plain values only") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of key: value")
    return data


def resolve_recipe_path(recipe: str) -> Path:
    """A YAML path, or a built-in recipe name."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"recipe file not found: {recipe}")
        return p
    builtin = _recipe_root() / f"{recipe}.yaml"
    if builtin.is_file():
        return builtin
    close = difflib.get_close_matches(recipe, list(list_recipes()), n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else "; `powergrad recipes` lists them"
    raise UserError(f"no recipe named {recipe!r}{hint}")


def _load_raw(recipe: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = resolve_recipe_path(recipe)
    if str(path) in seen:
        raise UserError(f"{path}: recipe bases form a cycle")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _load_raw(str(base), (*seen, str(path)))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(
    recipe: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Build a Config from a recipe (a YAML path or built-in name; None = ``digits``) and overrides.

    ``overrides`` is a list of ``key=value`` strings (dotted keys for nested values) or a dict.
    """
    raw = _load_raw(str(recipe) if recipe is not None else "digits")
    items = overrides.items() if isinstance(overrides, dict) else _parse_overrides(overrides or [])
    for key, value in items:
        if key.split(".")[0] not in _fields(Config):
            raise _unknown(key)
        _set(raw, key, value)
    return _build(raw)


def _parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    out = []
    for arg in args:
        if "=" not in arg:
            raise UserError(f"expected key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        out.append((key.strip(), value))
    return out


def config_hash(cfg: Config) -> str:
    """A short, stable hash of the settings that change the result (not where or how to resume)."""
    d = cfg.to_dict()
    for k in ("resume", "workers", "description", "nproc", "data_dir", "probe_cache"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
