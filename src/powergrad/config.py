"""The recipe: one typed, validated config object. YAML in, YAML out, key=value overrides.

A recipe is a YAML mapping of the keys of :class:`Config` (``monitor.*`` for the nested
monitor thresholds). It may name ``base: OTHER`` (a built-in recipe name or a path) whose keys
it extends. Built-in recipes live in ``powergrad/recipes/`` as package data; ``name`` is their
path there without ``.yaml`` (``imagenet/resnet50-cosine-a0.3``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

from .errors import UserError, extra
from .rundir import BEST, LAST, SUMMARY, epoch_file

if typing.TYPE_CHECKING:
    import yaml

__all__ = [
    "Config",
    "MonitorConfig",
    "FieldInfo",
    "GROUPS",
    "load_config",
    "list_recipes",
    "config_hash",
    "field_info",
    "field_groups",
    "result_keys",
    "machinery_keys",
    "probe_feature_keys",
    "resume_differences",
    "check_resume",
    "shared_description",
]


GROUPS = ("model", "data", "optimisation", "tampering", "checkpoints", "machinery")

# The bounds a number may have (a field's ``bound``): how ``--help`` and the error say it, and
# the test. Every int and float key has one (tests/test_config_keys.py checks that).
BOUNDS: dict[str, tuple[str, typing.Callable[[float], bool]]] = {
    ">0": ("> 0", lambda v: v > 0),
    ">=0": (">= 0", lambda v: v >= 0),
    ">=2": (">= 2", lambda v: v >= 2),
    "[0, 1)": ("in [0, 1)", lambda v: 0 <= v < 1),
    "[0, 1]": ("in [0, 1]", lambda v: 0 <= v <= 1),
}


def _key(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    group: str,
    affects_result: bool = True,
    choices: tuple[str, ...] | None = None,
    bound: str | None = None,
    probe_feature: bool = False,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A Config field that describes itself: the one home of a key's facts.

    ``help`` is the one-line description (``powergrad train --help``), ``group`` one of
    :data:`GROUPS`, ``affects_result`` whether a different value can change what is learned (it
    decides ``config_hash``, the report's setting and what a resume must keep equal), ``choices``
    the allowed values, ``bound`` one of :data:`BOUNDS` (for a list, each item's; None passes),
    ``probe_feature`` whether the key decides a linear probe's cached features.
    """
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {GROUPS}")
    if bound is not None and bound not in BOUNDS:
        raise ValueError(f"bound {bound!r} is not one of {list(BOUNDS)}")
    meta = {
        "help": help,
        "group": group,
        "affects_result": affects_result,
        "choices": choices,
        "bound": bound,
        "probe_feature": probe_feature,
    }
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class MonitorConfig:
    """Thresholds of the training-pathology checks (see powergrad.monitor). They change what is
    reported, never what is learned."""

    stall_epochs: int = _key(
        3,
        help="judge 'stalled' after this many epochs",
        group="machinery",
        affects_result=False,
        bound=">0",
    )
    stall_loss_change: float = _key(
        0.01,
        help="relative train-loss change below which loss is 'frozen'",
        group="machinery",
        affects_result=False,
        bound=">=0",
    )
    stall_acc_margin: float = _key(
        0.02,
        help="accuracy within this of chance counts as 'at chance'",
        group="machinery",
        affects_result=False,
        bound=">=0",
    )
    dead_filter_norm: float = _key(
        1e-3,
        help="a conv filter whose weight norm falls below this is dead",
        group="machinery",
        affects_result=False,
        bound=">=0",
    )
    dead_filter_share: float = _key(
        0.05,
        help="warn when more than this share of filters is dead",
        group="machinery",
        affects_result=False,
        bound="[0, 1]",
    )
    overfit_patience: int = _key(
        3,
        help="epochs the held-out loss must stay risen before 'overfitting'",
        group="machinery",
        affects_result=False,
        bound=">0",
    )
    overfit_rise: float = _key(
        0.2,
        help="how far above its lowest (a share) the held-out loss must stay",
        group="machinery",
        affects_result=False,
        bound=">=0",
    )
    filter_norms: bool = _key(
        False,
        help="record per-filter L2 norms of every conv layer",
        group="machinery",
        affects_result=False,
    )
    filter_norms_every: int = _key(
        100,
        help="steps between filter-norm records (0: at epoch ends only)",
        group="machinery",
        affects_result=False,
        bound=">=0",
    )
    logit_stats: bool = _key(
        True,
        help="record logit norm, mean, max and variance each epoch",
        group="machinery",
        affects_result=False,
    )


@dataclass
class Config:
    """Every key of a recipe. ``batch_size`` is the global batch over all processes."""

    description: str = _key(
        "", help="one line saying what the recipe is for", group="machinery", affects_result=False
    )
    # what and on what
    model: str = _key(
        "mlp",
        help="model name: a local one (mlp, convnet, resnet20, ...), tv/NAME or a timm name",
        group="model",
        probe_feature=True,
    )
    model_kwargs: dict = _key(
        factory=dict,
        help="extra keyword arguments for the model's constructor",
        group="model",
        probe_feature=True,
    )
    pretrained: bool = _key(
        False,
        help="start from the model's published pretrained weights",
        group="model",
        probe_feature=True,
    )
    weights: str | None = _key(
        None,
        help="start from the weights in this file (a state dict or checkpoint)",
        group="model",
        probe_feature=True,
    )
    freeze: str = _key(
        "none",
        help="what does not train: none, or backbone (only the head trains)",
        group="model",
        choices=("none", "backbone"),
    )
    head_lr: float | None = _key(
        None, help="learning rate of the head (default: lr)", group="optimisation", bound=">0"
    )
    probe_layer: str | None = _key(
        None,
        help="train a linear probe on the frozen features of this layer (or input)",
        group="model",
        probe_feature=True,
    )
    # auto = average 4-D maps over space (3-D token maps over tokens), flatten the raw input;
    # flatten keeps every number (layer3 of ResNet-18 at 224 px is 50,176 numbers an image)
    probe_pool: str = _key(
        "auto",
        help="probe features: auto, avg (over space), or flatten",
        group="model",
        choices=("auto", "avg", "flatten"),
        probe_feature=True,
    )
    probe_standardize: bool = _key(
        True, help="probe features minus train mean, over train std", group="model"
    )
    probe_cache: str | None = _key(
        None,
        help="a .pt file for probe features: read if it matches, else written",
        group="machinery",
        affects_result=False,
    )
    dataset: str = _key(
        "digits",
        help="data set: digits, synthetic, cifar10, cifar100, mnist, imagefolder, ...",
        group="data",
        probe_feature=True,
    )
    # The features depend on where the images are read from, the result (by the report's
    # grouping) does not: a run moved to another disk is the same run.
    data_dir: str | None = _key(
        None,
        help="where the data set lives",
        group="data",
        affects_result=False,
        probe_feature=True,
    )
    download: bool = _key(
        False, help="download the data set if it is missing", group="data", affects_result=False
    )
    img_size: int | None = _key(
        None,
        help="image side in pixels (default: the data set's)",
        group="data",
        bound=">0",
        probe_feature=True,
    )
    augment: str = _key(
        "auto", help="training augmentation (auto: the data set's usual one; none)", group="data"
    )
    train_subset: int | None = _key(
        None,
        help="train on N images (class-balanced, seeded)",
        group="data",
        bound=">0",
        probe_feature=True,
    )
    test_subset: int | None = _key(
        None,
        help="evaluate on N test images (class-balanced, seeded)",
        group="data",
        bound=">0",
        probe_feature=True,
    )
    val_fraction: float = _key(
        0.0,
        help=f"share of the training set held out for validation (and {BEST})",
        group="data",
        bound="[0, 1)",
        probe_feature=True,
    )
    skip_bad_images: bool = _key(
        False, help=f"skip images that fail to decode (counted in {SUMMARY})", group="data"
    )
    num_classes: int | None = _key(
        None,
        help="classes of dataset=synthetic; elsewhere read from the data "
        "(a different value is an error)",
        group="data",
        bound=">=2",
        probe_feature=True,
    )
    synthetic_size: int = _key(
        1024, help="images in dataset=synthetic", group="data", bound=">0", probe_feature=True
    )
    # optimisation
    epochs: int = _key(
        10,
        help="epochs to train (raise it on resume to extend a run)",
        group="optimisation",
        bound=">0",
    )
    batch_size: int = _key(
        128, help="global batch size over all processes", group="optimisation", bound=">0"
    )
    lr: float = _key(0.1, help="peak learning rate", group="optimisation", bound=">0")
    optimizer: str = _key("sgd", help="optimiser", group="optimisation", choices=("sgd", "adamw"))
    momentum: float = _key(
        0.9, help="SGD momentum (AdamW: beta1)", group="optimisation", bound="[0, 1)"
    )
    nesterov: bool = _key(True, help="Nesterov momentum (SGD)", group="optimisation")
    weight_decay: float = _key(
        5e-4,
        help="weight decay (not on biases and norm weights)",
        group="optimisation",
        bound=">=0",
    )
    sched: str = _key(
        "cosine",
        help="learning-rate schedule",
        group="optimisation",
        choices=("cosine", "step", "exp", "const"),
    )
    warmup_epochs: int = _key(
        0, help="linear warm-up epochs from warmup_lr", group="optimisation", bound=">=0"
    )
    warmup_lr: float = _key(
        1e-4, help="learning rate at the start of the warm-up", group="optimisation", bound=">=0"
    )
    decay_epochs: float = _key(
        30.0, help="step/exp schedules: epochs between decays", group="optimisation", bound=">0"
    )
    decay_milestones: list[int] | None = _key(
        None,
        help="step schedule: epochs at which lr is multiplied by decay_rate",
        group="optimisation",
        bound=">0",
    )
    decay_rate: float = _key(
        0.1, help="step/exp schedules: the factor of each decay", group="optimisation", bound=">0"
    )
    min_lr: float = _key(
        0.0, help="lowest learning rate of the schedule", group="optimisation", bound=">=0"
    )
    cooldown_epochs: int = _key(
        0, help="epochs at min_lr after the schedule", group="optimisation", bound=">=0"
    )
    accum_steps: int = _key(
        1,
        help="micro-batches per optimiser step (same global batch)",
        group="optimisation",
        bound=">0",
    )
    # the tampering
    alpha: float = _key(
        1.0,
        help="PowerGrad exponent on the softmax in the gradient (1 = cross-entropy)",
        group="tampering",
        bound=">=0",
    )
    label_smoothing: float = _key(0.0, help="label smoothing", group="tampering", bound="[0, 1)")
    clip: str = _key(
        "none",
        help="gradient clipping",
        group="optimisation",
        choices=("none", "norm", "value", "agc"),
    )
    clip_value: float = _key(
        1.0, help="threshold of the gradient clipping", group="optimisation", bound=">0"
    )
    # checkpoints
    resume: str | None = _key(
        None,
        help="continue a run: auto (the run in --out), a run folder or a checkpoint",
        group="checkpoints",
        affects_result=False,
    )
    init_from: str | None = _key(
        None,
        help="start a NEW run from another run's checkpoint (weights only; "
        f"the parent is recorded in {SUMMARY})",
        group="checkpoints",
    )
    save_every: int = _key(
        1,
        help=f"save {LAST} every N epochs ({BEST}: after every epoch that is the best so far)",
        group="checkpoints",
        affects_result=False,
        bound=">0",
    )
    # Bounds what a kill loses on long epochs (ImageNet: 5,005 steps an epoch at batch 256).
    checkpoint_every_steps: int = _key(
        0,
        help=f"also save {LAST} every N optimiser steps inside an epoch (0: only at epoch ends)",
        group="checkpoints",
        affects_result=False,
        bound=">=0",
    )
    keep_checkpoints: bool = _key(
        False,
        help=f"also keep {epoch_file('N')} for every saved epoch",
        group="checkpoints",
        affects_result=False,
    )
    # machinery
    seed: int = _key(
        0,
        help="seed of the data order, split and initial weights",
        group="machinery",
        bound=">=0",
        probe_feature=True,
    )
    device: str = _key(
        "auto",
        help="where to train",
        group="machinery",
        affects_result=False,
        choices=("auto", "cpu", "cuda"),
    )
    amp: str = _key(
        "none", help="mixed precision", group="machinery", choices=("none", "bf16", "fp16")
    )
    channels_last: bool = _key(
        False,
        help="channels-last memory format (faster convolutions on GPUs)",
        group="machinery",
        affects_result=False,
    )
    compile: bool = _key(
        False, help="torch.compile the model", group="machinery", affects_result=False
    )
    workers: int = _key(
        2,
        help="data-loading worker processes",
        group="machinery",
        affects_result=False,
        bound=">=0",
    )
    sync_bn: bool = _key(
        False, help="synchronise BatchNorm statistics across processes", group="machinery"
    )
    nproc: int = _key(
        1,
        help="processes on this machine (torchrun); the batch stays global",
        group="machinery",
        affects_result=False,
        bound=">0",
    )
    monitor: MonitorConfig = _key(
        factory=MonitorConfig,
        help="thresholds of the training-pathology checks (monitor.KEY)",
        group="machinery",
        affects_result=False,
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        with extra("train"):  # PyYAML comes with the trainer; report and plot read keys without it
            import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class FieldInfo:
    """What one recipe key is: read from its field's metadata (see :func:`_key`)."""

    name: str  # dotted for nested keys: monitor.stall_epochs
    type: Any
    default: Any
    help: str
    group: str
    affects_result: bool
    choices: tuple[str, ...] | None
    bound: str | None
    probe_feature: bool


def _infos(cls: type, prefix: str = "") -> list[FieldInfo]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out.append(
            FieldInfo(
                prefix + f.name,
                hints[f.name],
                default,
                m["help"],
                m["group"],
                m["affects_result"],
                m["choices"],
                m["bound"],
                m["probe_feature"],
            )
        )
    return out


def field_info(nested: bool = True) -> list[FieldInfo]:
    """Every recipe key in declaration order, with its help, group, choices and whether it changes
    the result; ``nested`` adds the ``monitor.*`` keys after ``monitor``."""
    out = []
    for info in _infos(Config):
        out.append(info)
        if nested and info.name == "monitor":
            out += _infos(MonitorConfig, "monitor.")
    return out


def field_groups() -> dict[str, list[FieldInfo]]:
    """:func:`field_info` by group, in :data:`GROUPS` order (for ``powergrad train --help``)."""
    groups: dict[str, list[FieldInfo]] = {g: [] for g in GROUPS}
    for info in field_info():
        groups[info.group].append(info)
    return groups


def result_keys() -> tuple[str, ...]:
    """Top-level keys whose value can change what is learned: a resume must keep them equal,
    ``config_hash`` covers exactly these, the report groups runs by them (the seed aside)."""
    return tuple(i.name for i in field_info(nested=False) if i.affects_result)


def machinery_keys() -> tuple[str, ...]:
    """Top-level keys that do not change what is learned (where, how fast, how often to save)."""
    return tuple(i.name for i in field_info(nested=False) if not i.affects_result)


def resume_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: checkpoint A, this command B`` for each key that changes the result and differs
    between a checkpoint's config and the config a resume asks for. ``epochs`` may differ (a
    larger value extends the run; resume.py checks the rest). A key the checkpoint predates
    counts as its default."""
    defaults = {i.name: i.default for i in field_info(nested=False)}
    out = []
    for k in result_keys():
        if k == "epochs":
            continue
        a, b = saved.get(k, defaults[k]), now.get(k, defaults[k])
        if a != b:
            out.append(f"{k}: checkpoint {a!r}, this command {b!r}")
    return out


def check_resume(saved: dict[str, Any], cfg: Config, path: Any) -> None:
    """Refuse to resume a checkpoint trained with other settings that change the result, naming
    each differing key with both values (one record never mixes two recipes)."""
    differences = resume_differences(saved, cfg.to_dict())
    if differences:
        raise UserError(
            f"{path}: resume keeps the settings that change the result; this command differs in "
            f"{'; '.join(differences)}. To train from these weights with other settings, start a "
            f"new run: init_from={path}"
        )


def probe_feature_keys() -> tuple[str, ...]:
    """Keys that decide a linear probe's features (a probe_cache made with others is recomputed)."""
    return tuple(i.name for i in field_info(nested=False) if i.probe_feature)


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
            return (
                int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
            )
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
                value = _flow(value) if value.startswith("[") else value.split(",")
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_coerce(key, v, item) for v in value]
        if base is dict:
            if isinstance(value, str):
                value = _flow(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unhandled type {tp} for {key}")
    name = getattr(base, "__name__", str(base))
    raise UserError(f"{key}: expected {name}, got {value!r}")


def _flow(text: str) -> Any:
    """A YAML value given on the command line (``[30, 60]``, ``{depth: 3}``); ValueError if none."""
    with extra("train"):  # PyYAML comes with the trainer; report and plot read keys without it
        import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(text) from None


def _fields(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys() -> list[str]:
    return [i.name for i in field_info() if i.name != "monitor"] + ["model_kwargs.<name>"]


def _unknown(key: str) -> UserError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = (
        f"; did you mean {close[0]!r}?" if close else "; `powergrad train --help` lists every key"
    )
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
    cfg = _construct(raw)
    validate(cfg)
    return cfg


def _construct(raw: dict[str, Any]) -> Config:
    """The Config of raw recipe values, each coerced to its type; not yet validated."""
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
    return Config(**kwargs)


def validate(cfg: Config) -> None:
    """Check values that have a type but not every value of it is allowed: each key's choices and
    bound from its field (:func:`field_info`), then what holds between keys."""
    for info in field_info():
        if info.name == "monitor":
            continue  # its keys follow as monitor.*
        value: Any = cfg
        for part in info.name.split("."):
            value = getattr(value, part)
        for v in value if isinstance(value, list) else [value]:
            _check_value(info, v)
    if cfg.warmup_epochs + cfg.cooldown_epochs > cfg.epochs and cfg.warmup_epochs > 0:
        raise UserError(
            f"warmup_epochs ({cfg.warmup_epochs}) + cooldown_epochs ({cfg.cooldown_epochs}) "
            f"exceed epochs ({cfg.epochs})"
        )


def _check_value(info: FieldInfo, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{info.name}: must be a finite number, got {value!r}")
    if info.choices and value not in info.choices:
        raise UserError(f"{info.name}: must be one of {', '.join(info.choices)}; got {value!r}")
    if info.bound and value is not None:
        said, holds = BOUNDS[info.bound]
        if not holds(value):
            raise UserError(f"{info.name}: must be {said}, got {value!r}")


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
        out[name] = (
            str(data.get("description", "")).strip().splitlines()[0]
            if data.get("description")
            else ""
        )
    return out


def _check_keys(node: yaml.Node | None, path: Path) -> None:
    """Refuse the keys that safe_load would take silently or crash on: a key given twice in one
    mapping (PyYAML keeps the last, so `lr: 0.1` ... `lr: 0.4` would train at 0.4 without a word)
    and a key that is not a plain name (`? [a, b]`)."""
    import yaml  # called by _read_yaml only, which imported it under the [train] extra

    todo, done = [node], set()
    while todo:  # a walk, not a recursion: an alias may point back to a node above it
        node = todo.pop()
        if id(node) in done:
            continue
        done.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo += node.value
        if not isinstance(node, yaml.MappingNode):
            continue
        seen: dict[str, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if not isinstance(key, yaml.ScalarNode):
                raise UserError(
                    f"{path}: line {line}: a key must be a plain name, not a list or mapping"
                )
            if key.value in seen:
                raise UserError(
                    f"{path}: key {key.value!r} is given twice (lines {seen[key.value]} and {line})"
                )
            seen[key.value] = line
            todo.append(value)


def _read_yaml(path: Path) -> dict[str, Any]:
    with extra("train"):  # PyYAML comes with the trainer; report and plot read keys without it
        import yaml

    try:
        text = path.read_bytes().decode("utf-8")
        _check_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)  # nodes only: no objects
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "a recipe is a YAML text file"
        ) from None
    except yaml.reader.ReaderError as e:  # a control character: binary content
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise UserError(
            f"{path}: not a text file (character 0x{code:02x} at offset {e.position}); "
            "a recipe is a YAML text file"
        ) from None
    except yaml.constructor.ConstructorError as e:
        # safe_load builds plain values only: a tag such as !!python/object/apply is refused.
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(
            f"{path}: refused: {e.problem}{where}; a recipe holds plain values only"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if data is None:
        raise UserError(
            f"{path}: the recipe is empty; give at least one key (base: digits to start from one)"
        )
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


def describe_recipe(recipe: str) -> list[str]:
    """What a recipe is and sets, as lines: its description, file, base, and each key it sets
    (through its bases) with the built-in default it replaces."""
    path = resolve_recipe_path(recipe)
    own = _read_yaml(path)
    raw = _load_raw(recipe)
    defaults = {i.name: i.default for i in field_info()}
    lines = [
        f"{recipe}: {str(raw.get('description', '')).strip() or '(no description)'}",
        f"file: {path}",
    ]
    if own.get("base"):
        lines.append(f"base: {own['base']}")
    lines.append("sets:")
    for key, value in raw.items():
        if key == "description":
            continue
        for name, v in (
            value.items() if isinstance(value, dict) and key == "monitor" else [(None, value)]
        ):
            full = f"{key}.{name}" if name else key
            default = defaults.get(full)
            same = v == default or (name is None and key == "model_kwargs" and not v)
            lines.append(
                f"  {full}: {json.dumps(v)}"
                + ("" if same else f"  (default {json.dumps(default)})")
            )
    return lines


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
    Overrides that change the result also change ``description`` (see :func:`_described`),
    unless they set it.
    """
    name = str(recipe) if recipe is not None else "digits"
    raw = _load_raw(name)
    as_recipe = _construct(copy.deepcopy(raw))
    items = overrides.items() if isinstance(overrides, dict) else _parse_overrides(overrides or [])
    for key, value in items:
        if key.split(".")[0] not in _fields(Config):
            raise _unknown(key)
        _set(raw, key, value)
    cfg = _construct(raw)
    if "description" not in dict(items):  # a description given with the overrides stands
        cfg.description = _described(name, as_recipe, cfg)
    validate(cfg)
    return cfg


def _described(recipe: str, as_recipe: Config, cfg: Config) -> str:
    """The recipe's description, or, where overrides changed what is learned, the recipe and the
    changes first and the recipe's own words marked as its: the saved config of ``digits
    model=resnet20 dataset=imagefolder`` must not say "scikit-learn digits, small MLP"."""
    before, after = as_recipe.to_dict(), cfg.to_dict()
    changed = [f"{k}={_shown(after[k])}" for k in result_keys() if before[k] != after[k]]
    if not changed:
        return cfg.description
    own = f"; the recipe says: {as_recipe.description}" if as_recipe.description else ""
    return f"recipe {recipe} changed by {' '.join(changed)}{own}"


def shared_description(described: str, varying: typing.Iterable[str]) -> str:
    """A run's description less the changes to ``varying`` keys: what the runs of a sweep share,
    once ("recipe digits changed by val_fraction=0.1; ..." for every alpha, lr and seed)."""
    m = re.fullmatch(r"recipe (\S+) changed by (.*?)(; the recipe says: .*)?", described, re.S)
    if not m:
        return described
    skip = set(varying)
    changes = re.split(r" (?=[A-Za-z_][\w.]*=)", m[2])  # a value may hold spaces (a dict)
    kept = [c for c in changes if c.split("=")[0] not in skip]
    changed = f" changed by {' '.join(kept)}" if kept else ""
    return f"recipe {m[1]}{changed}{m[3] or ''}"


def _shown(value: Any) -> str:
    """A value as it would be typed after the recipe (``lr=0.1``, ``decay_milestones=[30,60]``)."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    out: dict[str, str] = {}
    for arg in args:
        if "=" not in arg:
            raise UserError(f"expected key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        key = key.strip()
        if key in out:  # the last would win silently: say which one was meant
            raise UserError(
                f"{key} is given twice ({key}={out[key]} and {key}={value}); give it once"
            )
        out[key] = value
    return list(out.items())


def warnings_for(cfg: Config) -> list[str]:
    """Settings that are allowed but rarely meant: one line each, for the start of a run."""
    out = []
    if cfg.alpha == 0:
        out.append(
            "alpha=0: the gradient is 1/C - q for every example, whatever the model predicts "
            "(the paper's range is 0 < alpha <= 1)"
        )
    elif cfg.alpha > 1:
        out.append(
            f"alpha={cfg.alpha:g} > 1 sharpens the softmax in the gradient: outside the paper's "
            "range (0 < alpha <= 1), untested by it"
        )
    return out


def config_hash(cfg: Config) -> str:
    """A short, stable hash of the settings that change the result (:func:`result_keys`)."""
    d = cfg.to_dict()
    return hashlib.sha256(
        json.dumps({k: d[k] for k in result_keys()}, sort_keys=True).encode()
    ).hexdigest()[:12]
