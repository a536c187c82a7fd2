"""powergrad.models: every family builds, steps, resizes its head, loads weights safely; no network."""

from __future__ import annotations

import logging
import pickle
import socket
import urllib.error

import pytest
import timm
import timm.models._builder as timm_builder
import torch
import torch.nn.functional as F
import torchvision
import torchvision.models._api as tv_api
from safetensors.torch import save_file
from torch import nn

from powergrad.config import Config
from powergrad.errors import UserError
from powergrad.models import (
    MODELS,
    create_model,
    get_head,
    list_models,
    param_groups,
    set_train_mode,
)
from powergrad.monitor.filters import filter_norms
from powergrad.probe import create_probe  # the probe wraps the factory's model (powergrad.probe)


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails at once, and download caches point at an empty folder."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


def cfg(**kw) -> Config:
    return Config(**kw)


def one_step(
    model: nn.Module, num_classes: int, in_chans: int, img_size: int, recipe: Config | None = None
) -> None:
    """A forward, backward and SGD step; the logits have the right shape and the weights move."""
    set_train_mode(model, recipe or cfg())
    x = torch.randn(2, in_chans, img_size, img_size)
    y = torch.randint(0, num_classes, (2,))
    opt = torch.optim.SGD(param_groups(model, cfg(lr=0.01)), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    out = model(x)
    assert out.shape == (2, num_classes)
    loss = F.cross_entropy(out, y)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize(
    "name,num_classes,in_chans,img_size,kwargs",
    [
        ("softmax_regression", 10, 1, 8, {}),
        ("mlp", 10, 1, 8, {}),
        ("mlp", 10, 3, 32, {"hidden": 32}),
        ("convnet", 10, 1, 8, {}),
        ("convnet", 200, 3, 64, {}),
        ("convnet", 10, 3, 8, {"widths": [8, 8, 8, 8], "dropout": 0.5}),  # 4 pools on 8 px
        ("resnet20", 10, 3, 32, {}),
        ("resnet20", 10, 1, 8, {"shortcut": "B"}),
        ("resnet20", 200, 3, 64, {"depth": 8}),
        ("resnet20_nobn", 10, 3, 32, {}),
        ("resnet9", 10, 3, 32, {"widths": [8, 16, 16, 32]}),
        ("resnet18_nobn", 10, 3, 32, {}),
        ("resnet18", 10, 1, 8, {}),
        ("seresnet18", 10, 3, 32, {}),
        ("resnet50", 10, 3, 32, {}),
        ("tv/alexnet", 10, 3, 63, {}),
        ("tv/resnet18", 10, 1, 32, {}),
        ("tv/vgg11", 10, 3, 32, {}),
        ("tv/googlenet", 10, 3, 32, {"init_weights": False}),  # aux heads dropped: one tensor out
    ],
)
def test_builds_and_trains(name, num_classes, in_chans, img_size, kwargs):
    model = create_model(cfg(model=name, model_kwargs=kwargs), num_classes, in_chans, img_size)
    one_step(model, num_classes, in_chans, img_size)


def test_local_models_name_their_head_fc():
    for name in ("resnet20", "resnet20_nobn", "resnet9", "convnet", "softmax_regression", "mlp"):
        model = MODELS[name](7, 3, 16)
        head_name, head = get_head(model)
        assert head_name == "fc" and head.out_features == 7


def test_resnet20_is_the_paper_net():
    model = create_model(cfg(model="resnet20"), 10, 3, 32)
    assert sum(p.numel() for p in model.parameters()) == 269_722  # He et al. 2016: 0.27M (option A)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and {c.out_channels for c in convs} == {16, 32, 64}


def test_resnet9_flip_averages_logits_in_eval_only():
    model = create_model(
        cfg(model="resnet9", model_kwargs={"widths": [8, 8, 16, 16], "tta_flip": True}), 10, 3, 16
    )
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        both = model(x)
        assert torch.allclose(both, 0.5 * (model.logits(x) + model.logits(x.flip(-1))))
        assert not torch.allclose(both, model.logits(x))
    model.train()
    torch.manual_seed(0)
    out = model(x)
    torch.manual_seed(0)
    assert torch.equal(out, model.logits(x))  # training sees the image as it is


def test_nobn_models_have_no_batchnorm():
    for name in ("resnet18_nobn", "resnet20_nobn"):
        model = create_model(cfg(model=name), 10, 3, 32)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    timm_nobn = create_model(cfg(model="resnet18_nobn"), 10, 3, 32)
    # As in the paper: timm's convs keep bias=False when BN goes away.
    assert all(m.bias is None for m in timm_nobn.modules() if isinstance(m, nn.Conv2d))
    cifar_nobn = create_model(cfg(model="resnet20_nobn"), 10, 3, 32)
    assert all(m.bias is not None for m in cifar_nobn.modules() if isinstance(m, nn.Conv2d))


# ---------------------------------------------------------------- pretrained, via a fake hub


def _fake_tv_hub(monkeypatch, arch: str) -> dict[str, torch.Tensor]:
    """Serve a random 1000-class state dict as if it were torchvision's published weights."""
    sd = torchvision.models.get_model(arch, weights=None).state_dict()
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", lambda *a, **k: sd)
    return sd


@pytest.mark.parametrize(
    "arch,head", [("alexnet", "classifier.6"), ("vgg16", "classifier.6"), ("resnet18", "fc")]
)
def test_tv_pretrained_head_replaced(monkeypatch, caplog, arch, head):
    sd = _fake_tv_hub(monkeypatch, arch)
    with caplog.at_level(logging.INFO, logger="powergrad"):
        model = create_model(cfg(model=f"tv/{arch}", pretrained=True), 10, 3, 64)
    assert get_head(model)[0] == head
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    first = next(k for k in sd if k.endswith("weight"))
    assert torch.equal(model.state_dict()[first], sd[first])  # the backbone is the published one
    assert f"replaced head {head}: 1000 -> 10 classes" in caplog.text


def test_tv_pretrained_grey_input_sums_rgb_filters(monkeypatch):
    sd = _fake_tv_hub(monkeypatch, "resnet18")
    model = create_model(cfg(model="tv/resnet18", pretrained=True), 10, 1, 32)
    assert model.conv1.in_channels == 1
    torch.testing.assert_close(model.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))


@pytest.mark.parametrize("name", ["resnet18"])
def test_timm_pretrained_head_replaced(monkeypatch, caplog, name):
    sd = timm.create_model(name).state_dict()
    monkeypatch.setattr(timm_builder, "load_state_dict_from_hf", lambda *a, **k: sd)
    with caplog.at_level(logging.INFO, logger="powergrad"):
        model = create_model(cfg(model=name, pretrained=True), 10, 3, 32)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])
    assert "replaced head fc: 1000 -> 10 classes" in caplog.text


def test_timm_head_sized_for_seresnet18():
    model = create_model(cfg(model="seresnet18"), 37, 3, 32)
    name, head = get_head(model)
    assert name == "fc" and head.out_features == 37


@pytest.mark.parametrize("name", ["resnet18", "tv/alexnet"])
def test_pretrained_offline_is_one_line_user_error(monkeypatch, name):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    for attr in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(timm_builder, attr, offline)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        create_model(cfg(model=name, pretrained=True), 10, 3, 32)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (
        f"cannot download pretrained weights for {name} (offline?); "
        "pass weights=PATH with a local copy"
    )


@pytest.mark.parametrize("name", ["resnet20", "seresnet18"])
def test_pretrained_without_published_weights(name):
    with pytest.raises(UserError, match="pretrained"):
        create_model(cfg(model=name, pretrained=True), 10, 3, 32)


# ---------------------------------------------------------------- weights=PATH


def _same_backbone(a: nn.Module, b: nn.Module, skip: str = "fc.") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


@pytest.mark.parametrize("form", ["state_dict", "safetensors", "checkpoint", "ddp_checkpoint"])
def test_weights_file_forms(tmp_path, form):
    src = create_model(cfg(model="resnet20"), 10, 3, 32)
    sd = src.state_dict()
    if form == "state_dict":
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    elif form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif form == "checkpoint":
        path = tmp_path / "ckpt.pt"
        torch.save({"epoch": 3, "model_state_dict": sd, "optimizer": {"lr": 0.1}}, path)
    else:
        path = tmp_path / "ckpt.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    torch.manual_seed(1)
    dst = create_model(cfg(model="resnet20", weights=str(path)), 10, 3, 32)
    assert _same_backbone(src, dst, skip="<none>")


def test_weights_with_other_head_size_drop_the_head(tmp_path, caplog):
    src = create_model(cfg(model="resnet20"), 10, 3, 32)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="powergrad"):
        dst = create_model(cfg(model="resnet20", weights=str(path)), 100, 3, 32)
    assert dst.fc.out_features == 100
    assert _same_backbone(src, dst)
    assert "dropped head fc" in caplog.text and "10 -> 100" in caplog.text


def test_weights_adapt_first_conv_to_grey(tmp_path):
    src = create_model(cfg(model="resnet20"), 10, 3, 32)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    dst = create_model(cfg(model="resnet20", weights=str(path)), 10, 1, 32)
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight.sum(1, keepdim=True))


def test_mismatched_weights_are_a_user_error(tmp_path):
    path = tmp_path / "convnet.pt"
    torch.save(create_model(cfg(model="convnet"), 10, 3, 32).state_dict(), path)
    with pytest.raises(UserError) as e:  # another architecture: missing and unexpected keys
        create_model(cfg(model="resnet20", weights=str(path)), 10, 3, 32)
    assert str(path) in str(e.value) and "missing" in str(e.value) and "unexpected" in str(e.value)
    with pytest.raises(UserError, match="shape mismatch: features.0.weight"):  # other widths
        create_model(
            cfg(model="convnet", model_kwargs={"widths": [16, 64, 128]}, weights=str(path)),
            10,
            3,
            32,
        )


@pytest.mark.parametrize(
    "content,match",
    [(None, "file not found"), (b"hello, not weights", "cannot read"), ("no_sd", "no state dict")],
)
def test_unreadable_weights(tmp_path, content, match):
    path = tmp_path / "w.pt"
    if content == "no_sd":
        torch.save({"epoch": 3, "notes": "x"}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        create_model(cfg(model="mlp", weights=str(path)), 10, 1, 8)
    assert str(path) in str(e.value)


class Evil:
    """Unpickling this would create a file: weights_only must refuse it without running it."""

    target = ""

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_malicious_pickle_is_refused(tmp_path, how):
    evil = Evil()
    evil.target = str(tmp_path / "pwned")
    path = tmp_path / "w.pt"
    if how == "torch_save":
        torch.save({"model": {"fc.weight": torch.zeros(1)}, "extra": evil}, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))
    refusal = {  # a plain pickle is named as such (issue 22, row 6)
        "torch_save": "refused: not a plain weights file",
        "raw_pickle": "refused: a plain pickle .* nothing was run",
    }[how]
    with pytest.raises(UserError, match=refusal):
        create_model(cfg(model="mlp", weights=str(path)), 10, 1, 8)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name,suggestion",
    [
        ("resnet_18", "'resnet18'"),
        ("alexnet", "'tv/alexnet'"),
        ("tv/vgg61", "'tv/vgg16'"),
        ("resnet2O", "'resnet20'"),
    ],
)
def test_unknown_model_suggests(name, suggestion):
    with pytest.raises(UserError, match="unknown model") as e:
        create_model(cfg(model=name), 10, 3, 32)
    assert suggestion in str(e.value) and "\n" not in str(e.value)


def test_bad_model_kwargs_are_user_errors():
    with pytest.raises(UserError, match="model_kwargs for mlp"):
        create_model(cfg(model="mlp", model_kwargs={"width": 3}), 10, 1, 8)
    with pytest.raises(UserError, match="depth"):
        create_model(cfg(model="resnet20", model_kwargs={"depth": 21}), 10, 1, 8)


def test_list_models():
    names = list_models()
    assert {"resnet20", "convnet", "mlp", "softmax_regression", "resnet18_nobn"} <= set(names)
    assert "tv/alexnet" in names and "tv/vgg16" in names
    assert "timm" in names[-1]


# ---------------------------------------------------------------- freezing and optimiser groups


def test_freeze_backbone(caplog):
    with caplog.at_level(logging.WARNING, logger="powergrad"):
        model = create_model(cfg(model="resnet20", freeze="backbone"), 10, 3, 32)
    assert "backbone is random" in caplog.text
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    groups = param_groups(model, cfg(freeze="backbone"))
    assert sum(len(g["params"]) for g in groups) == 2
    # BN running statistics stay put in the frozen backbone; the head still learns.
    set_train_mode(model, cfg(freeze="backbone"))
    assert model.training and model.fc.training and not model.bn1.training
    mean = model.bn1.running_mean.clone()
    one_step(model, 10, 3, 32, cfg(freeze="backbone"))
    assert torch.equal(model.bn1.running_mean, mean)
    assert not model.bn1.training


def test_set_train_mode_without_freeze_trains_bn():
    model = create_model(cfg(model="resnet20"), 10, 3, 32).eval()
    set_train_mode(model, cfg())
    assert all(m.training for m in model.modules())


def test_param_groups_decay_and_head_lr():
    model = create_model(cfg(model="resnet20"), 10, 3, 32)
    n_params = len(list(model.parameters()))
    groups = param_groups(model, cfg(weight_decay=5e-4))
    assert [g["name"] for g in groups] == ["all/decay", "all/no_decay"]
    decay, no_decay = groups
    assert decay["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    assert all("lr" not in g for g in groups)

    groups = {g["name"]: g for g in param_groups(model, cfg(lr=0.1, head_lr=1.0))}
    assert set(groups) == {"backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"}
    assert groups["head/decay"]["params"] == [model.fc.weight] and groups["head/decay"]["lr"] == 1.0
    assert groups["head/no_decay"]["params"] == [model.fc.bias]
    assert groups["backbone/decay"]["lr"] == 0.1
    assert sum(len(g["params"]) for g in groups.values()) == n_params
    torch.optim.SGD(list(groups.values()), lr=0.1)  # the groups are valid optimiser input


@pytest.mark.parametrize(
    "layer,features", [("layer4", 512), ("layer2", 128), ("input", 3 * 32 * 32)]
)
def test_probe_layer(layer, features):
    model = create_probe(cfg(model="resnet18", probe_layer=layer), 10, 3, 32)
    name, head = get_head(model)
    assert name == "fc" and head.in_features == features and head.out_features == 10
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    set_train_mode(model, cfg(probe_layer=layer))
    assert not model.backbone.training
    one_step(model, 10, 3, 32, cfg(probe_layer=layer))


def test_probe_layer_unknown():
    with pytest.raises(UserError, match="did you mean 'layer2'"):
        create_probe(cfg(model="resnet18", probe_layer="layer_2"), 10, 3, 32)


def test_filter_norms():
    model = create_model(cfg(model="resnet20"), 10, 3, 32)
    norms = filter_norms(model)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(norms) == set(convs)
    for name, conv in convs.items():
        assert norms[name].shape == (conv.out_channels,) and not norms[name].requires_grad
    torch.testing.assert_close(norms["conv1"][0], model.conv1.weight[0].norm().detach())


def test_param_groups_of_a_model_without_a_findable_head():
    """Decay split as for any model; head_lr on it is an error, not silently ignored (the loop
    used to fall back to one group with decay on every parameter and no head_lr)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    groups = param_groups(model, cfg(weight_decay=5e-4))
    assert [g["name"] for g in groups] == ["all/decay", "all/no_decay"]
    with pytest.raises(UserError, match="cannot find the classifier layer"):
        param_groups(model, cfg(head_lr=1.0))
