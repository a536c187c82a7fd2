"""Model factory: timm names, torchvision names (``tv/NAME``) and a few small local models.

``create_model(cfg, num_classes, in_chans, img_size)`` is the one entry point: a model name is
the whole architecture (plus ``model_kwargs``); ``weights``/``pretrained`` give its start;
the head is sized to the data set; ``freeze`` picks what trains. A linear probe wraps the model
this builds (models/probe.py; the workflow is powergrad.probe). Everything it does is logged
on the ``powergrad`` logger.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Callable

import torch
from torch import nn

from ..errors import UserError, extra

with extra("train"):
    import timm
    import torchvision

from ..config import Config
from .convnet import convnet
from .linear import mlp, softmax_regression
from .probe import Probe
from .resnet9 import resnet9
from .resnet_cifar import resnet20, resnet20_nobn
from .weights import adapt_conv_weight, load_weights, read_state_dict

__all__ = [
    "MODELS",
    "create_model",
    "param_groups",
    "get_head",
    "list_models",
    "set_train_mode",
    "read_state_dict",
    "Probe",
]

log = logging.getLogger("powergrad")


def resnet18_nobn(num_classes: int, in_chans: int, img_size: int, **kwargs) -> nn.Module:
    """timm resnet18 with every BatchNorm an identity, as in the paper's dead-filter experiment.

    The convs keep bias=False, as the paper had it; only the fc layer has a bias.
    """
    model = timm.create_model("resnet18", num_classes=num_classes, in_chans=in_chans, **kwargs)
    _replace_batchnorm(model)
    return model


def _replace_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _replace_batchnorm(child)


# Local registry: builder(num_classes, in_chans, img_size, **model_kwargs) -> nn.Module.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet20_nobn": resnet20_nobn,
    "resnet18_nobn": resnet18_nobn,
    "resnet9": resnet9,
    "convnet": convnet,
    "softmax_regression": softmax_regression,
    "mlp": mlp,
}


def _tv_names() -> list[str]:
    # module= restricts to classification models (no detection / segmentation heads).
    return torchvision.models.list_models(module=torchvision.models)


def list_models() -> list[str]:
    """Local names, then ``tv/<name>`` torchvision classifiers, then a note on timm names."""
    return [
        *sorted(MODELS),
        *(f"tv/{n}" for n in _tv_names()),
        f"(any of timm's {len(timm.list_models())} names, e.g. resnet50: see timm.list_models())",
    ]


def _unknown(name: str) -> UserError:
    candidates = [*MODELS, *(f"tv/{n}" for n in _tv_names()), *timm.list_models()]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = (
        f"; did you mean {', '.join(map(repr, close))}?"
        if close
        else f"; use a timm name, tv/<torchvision name> or one of {', '.join(sorted(MODELS))}"
    )
    return UserError(f"unknown model {name!r}{hint}")


def _offline(name: str) -> UserError:
    return UserError(
        f"cannot download pretrained weights for {name} (offline?); pass weights=PATH with a local copy"
    )


# ---------------------------------------------------------------- the head


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is target)


def get_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier module's dotted name and the module itself.

    timm models say (``get_classifier``); local models name it ``fc`` or ``head``; otherwise the
    last nn.Linear in definition order (torchvision: ``classifier.6``, ``fc``, ``heads.head``...),
    or the last conv of ``classifier`` for all-conv heads (SqueezeNet).
    """
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Module):
            return _name_of(model, head), head
    for name in ("fc", "head"):
        if isinstance(getattr(model, name, None), nn.Linear):
            return name, getattr(model, name)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [
        (n, m)
        for n, m in model.named_modules()
        if n.startswith("classifier") and isinstance(m, nn.Conv2d)
    ]
    if convs:
        return convs[-1]
    raise UserError(f"cannot find the classifier layer of {type(model).__name__}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    name, head = get_head(model)
    new: nn.Module
    if isinstance(head, nn.Linear):
        old, new = (
            head.out_features,
            nn.Linear(head.in_features, num_classes, bias=head.bias is not None),
        )
    elif isinstance(head, nn.Conv2d):
        old = head.out_channels
        # torch types a conv's own sizes as tuple[int, ...], its constructor's as tuple[int, int]
        new = nn.Conv2d(
            head.in_channels,
            num_classes,
            head.kernel_size,  # type: ignore[arg-type]
            head.stride,  # type: ignore[arg-type]
            head.padding,  # type: ignore[arg-type]
            bias=head.bias is not None,
        )
    else:
        raise UserError(
            f"cannot resize the head {name} ({type(head).__name__}) to {num_classes} classes"
        )
    if old != num_classes:
        _set_module(model, name, new)
        log.info("replaced head %s: %d -> %d classes", name, old, num_classes)


def _first_conv(model: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


# ---------------------------------------------------------------- families


def _create_timm(
    name: str, pretrained: bool, num_classes: int, in_chans: int, img_size: int, kwargs: dict
) -> nn.Module:
    pcfg = timm.get_pretrained_cfg(name, allow_unregistered=False) if timm.is_model(name) else None
    # ViT-style models fix their input size at build time; CNNs take no img_size argument.
    if pcfg is not None and pcfg.fixed_input_size and "img_size" not in kwargs:
        kwargs = {**kwargs, "img_size": img_size}
    if pretrained and pcfg is not None and not (pcfg.hf_hub_id or pcfg.url or pcfg.file):
        raise UserError(f"timm publishes no pretrained weights for {name}; set pretrained=false")
    with _build_errors(name, pretrained, kwargs):
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    if pretrained:
        head_name, _ = get_head(model)
        pre_classes = pcfg.num_classes if pcfg is not None else None
        log.info("loaded timm pretrained weights for %s", name)
        if pre_classes and pre_classes != num_classes:
            log.info("replaced head %s: %d -> %d classes", head_name, pre_classes, num_classes)
        if in_chans != 3:
            log.info("timm adapted the first conv to %d input channels", in_chans)
    return model


@contextlib.contextmanager
def _build_errors(name: str, pretrained: bool, kwargs: dict):
    """Turn a failed download or bad model_kwargs into one-line user errors."""
    try:
        yield
    except OSError as e:  # URLError, ConnectionError and huggingface_hub's errors are all OSErrors
        if pretrained:
            raise _offline(name) from e
        raise
    except TypeError as e:
        if not kwargs:  # without user kwargs a TypeError is a bug, not a recipe mistake
            raise
        raise UserError(f"model_kwargs for {name}: {e}") from None


def _create_tv(
    name: str, pretrained: bool, num_classes: int, in_chans: int, kwargs: dict
) -> nn.Module:
    arch = name[3:]
    if arch not in _tv_names():
        raise _unknown(name)
    with _build_errors(name, pretrained, kwargs):
        if pretrained:
            # Published weights fix 1000 classes: build as published, then swap the head.
            model = torchvision.models.get_model(arch, weights="DEFAULT", **kwargs)
            log.info("loaded torchvision pretrained weights for %s", name)
            _replace_head(model, num_classes)
        else:
            model = torchvision.models.get_model(
                arch, weights=None, num_classes=num_classes, **kwargs
            )
    # GoogLeNet / Inception return a tuple with auxiliary logits in train mode; the loop wants
    # one tensor, and pretrained aux heads would keep 1000 classes.
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    if in_chans != 3:
        conv_name = _first_conv(model)
        if conv_name is None:
            raise UserError(
                f"model={name} has no Conv2d to take in_chans={in_chans} input channels"
            )
        old = model.get_submodule(conv_name)
        new = nn.Conv2d(
            in_chans,
            old.out_channels,
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            old.groups,
            old.bias is not None,
            old.padding_mode,
        )
        if pretrained:
            with torch.no_grad():
                new.weight.copy_(adapt_conv_weight(old.weight, in_chans))
                if old.bias is not None and new.bias is not None:
                    new.bias.copy_(old.bias)
        _set_module(model, conv_name, new)
        log.info(
            "replaced first conv %s: 3 -> %d input channels%s",
            conv_name,
            in_chans,
            " (pretrained weights averaged over RGB)" if pretrained else "",
        )
    return model


def _create_local(
    name: str, pretrained: bool, num_classes: int, in_chans: int, img_size: int, kwargs: dict
) -> nn.Module:
    if pretrained:
        raise UserError(
            f"no published pretrained weights for {name}; set pretrained=false or pass weights=PATH"
        )
    try:
        return MODELS[name](num_classes, in_chans, img_size, **kwargs)
    except (TypeError, ValueError) as e:
        if not kwargs:  # without user kwargs this is a bug, not a recipe mistake
            raise
        raise UserError(f"model_kwargs for {name}: {e}") from None


def _is_timm(name: str) -> bool:
    # "hf-hub:org/repo" and "local-dir:path" are timm's own sources; pass them through.
    return ":" in name or timm.is_model(name)


# ---------------------------------------------------------------- the factory


def create_model(cfg: Config, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """Build cfg.model for the data set; load cfg.weights / cfg.pretrained; size the head to
    num_classes; apply cfg.freeze. Logs each step on the 'powergrad' logger."""
    name, kwargs = cfg.model, dict(cfg.model_kwargs)
    pretrained = cfg.pretrained
    if cfg.weights and pretrained:
        log.info(
            "weights=%s given: loading it instead of downloading pretrained weights", cfg.weights
        )
        pretrained = False
    if name in MODELS:
        model = _create_local(name, pretrained, num_classes, in_chans, img_size, kwargs)
    elif name.startswith("tv/"):
        model = _create_tv(name, pretrained, num_classes, in_chans, kwargs)
    elif _is_timm(name):
        model = _create_timm(name, pretrained, num_classes, in_chans, img_size, kwargs)
    else:
        raise _unknown(name)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "built %s: %d classes, %d input channels, %s parameters",
        name,
        num_classes,
        in_chans,
        f"{n_params:,}",
    )
    head_name, head = get_head(model)
    if cfg.weights:
        load_weights(model, cfg.weights, head_name, _first_conv(model))
    if cfg.freeze == "backbone":
        if not (cfg.weights or cfg.pretrained):
            log.warning(
                "freeze=backbone with neither pretrained nor weights: the frozen backbone is random"
            )
        head_params = {id(p) for p in head.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head_params)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "froze backbone: %d of %d parameters train (head %s)", n_train, n_params, head_name
        )
    return model


def set_train_mode(model: nn.Module, cfg: Config) -> nn.Module:
    """model.train(), but with a frozen backbone its BatchNorms stay in eval mode.

    requires_grad=False stops BN's affine weights from learning, not its running statistics:
    those update in every train-mode forward pass. The loop calls this instead of model.train().
    """
    model.train()
    if cfg.freeze != "none":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters()
            ):
                m.eval()
    return model


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Optimiser groups: no weight decay on 1-D params (biases, norm weights), cfg.weight_decay on
    the rest; with cfg.head_lr the head gets that lr and the backbone cfg.lr. Frozen params are
    left out; empty groups are dropped. Each group carries a ``name`` for logging."""
    # The head is looked up only when it gets its own lr: a model without one that get_head can
    # find still trains (one lr), and head_lr on such a model is an error, not silently ignored.
    head_ids = (
        {id(p) for p in get_head(model)[1].parameters()} if cfg.head_lr is not None else set()
    )
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        part = "head" if (cfg.head_lr is not None and id(p) in head_ids) else "backbone"
        groups.setdefault((part, p.ndim > 1), []).append(p)
    out = []
    # Stable order for logs: backbone before head, decay before no-decay.
    for (part, decay), params in sorted(
        groups.items(), key=lambda kv: (kv[0][0] == "head", not kv[0][1])
    ):
        group: dict = {
            "name": f"{part if cfg.head_lr is not None else 'all'}/{'decay' if decay else 'no_decay'}",
            "params": params,
            "weight_decay": cfg.weight_decay if decay else 0.0,
        }
        if cfg.head_lr is not None:
            group["lr"] = cfg.head_lr if part == "head" else cfg.lr
        out.append(group)
    return out
