"""Config keys are described once, on the field: help, group, choices, whether they change the result."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from powergrad.cli import main
from powergrad.config import (
    GROUPS,
    Config,
    MonitorConfig,
    config_hash,
    field_groups,
    field_info,
    load_config,
    machinery_keys,
    probe_feature_keys,
    result_keys,
)
from powergrad.errors import UserError
from powergrad.report.tables import MACHINERY, Run


def test_every_key_describes_itself():
    infos = field_info()
    names = [i.name for i in infos]
    assert len(names) == len(dataclasses.fields(Config)) + len(dataclasses.fields(MonitorConfig))
    for info in infos:
        assert info.help and "\n" not in info.help, info.name
        assert info.group in GROUPS, info.name
        assert isinstance(info.affects_result, bool)
    assert sum(len(v) for v in field_groups().values()) == len(infos)
    assert field_groups()["tampering"][0].name == "alpha"


def test_result_and_machinery_keys_split_the_config():
    top = {f.name for f in dataclasses.fields(Config)}
    assert set(result_keys()) | set(machinery_keys()) == top
    assert not set(result_keys()) & set(machinery_keys())
    assert {"alpha", "lr", "epochs", "seed", "model", "dataset"} <= set(result_keys())
    assert {"workers", "resume", "nproc", "device", "save_every", "monitor"} <= set(
        machinery_keys()
    )
    assert MACHINERY == {*machinery_keys(), "seed"}  # the report's setting reads the same list
    assert "seed" in probe_feature_keys() and "alpha" not in probe_feature_keys()


def test_config_hash_covers_exactly_the_result_keys():
    base = load_config("digits")
    for k, v in {
        "workers": 7,
        "device": "cpu",
        "save_every": 3,
        "resume": "auto",
        "nproc": 2,
    }.items():
        assert config_hash(dataclasses.replace(base, **{k: v})) == config_hash(base), k
    for k, v in {"alpha": 0.5, "lr": 0.01, "seed": 1, "epochs": 3}.items():
        assert config_hash(dataclasses.replace(base, **{k: v})) != config_hash(base), k


def test_report_groups_runs_by_result_keys_only():
    a = load_config("digits").to_dict()
    b = {**a, "workers": 5, "data_dir": "/elsewhere", "seed": 3}
    c = {**a, "alpha": 0.5}
    runs = [Run(path=None, summary={"config": cfg}) for cfg in (a, b, c)]
    assert runs[0].setting == runs[1].setting != runs[2].setting


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optimizer=lamb", "optimizer: must be one of sgd, adamw"),
        ("epochs=0", "epochs: must be > 0"),
        ("workers=-1", "workers: must be >= 0"),
    ],
)
def test_validation_reads_choices_and_bounds_from_the_fields(override, needle):
    with pytest.raises(UserError, match=needle):
        load_config("digits", [override])


def _outside(info) -> str:
    """A value just outside the key's bound, as typed on the command line."""
    below = {">0": "0", ">=0": "-1", ">=2": "1", "[0, 1)": "1", "[0, 1]": "1.5"}[info.bound]
    return f"[{below}]" if "list" in str(info.type) else below


NUMBERS = [
    i
    for i in field_info()
    if any(t in (int, float) for t in (i.type, *typing.get_args(i.type)))
    or "list[int]" in str(i.type)
]


def test_every_numeric_key_has_a_bound():
    assert {"head_lr", "lr", "decay_epochs", "monitor.stall_epochs"} <= {i.name for i in NUMBERS}
    assert [i.name for i in NUMBERS if i.bound is None] == []


@pytest.mark.parametrize("info", NUMBERS, ids=[i.name for i in NUMBERS])
def test_a_value_outside_a_keys_bound_is_refused(info):
    with pytest.raises(UserError, match=f"^{info.name}: must be "):
        load_config("digits", [f"{info.name}={_outside(info)}"])


def test_head_lr_below_zero_is_one_line_exit_2(capsys):
    assert main(["config", "digits", "head_lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err == "powergrad: error: head_lr: must be > 0, got -1.0\n"
    assert load_config("digits", ["head_lr=0.01"]).head_lr == 0.01  # and null stays allowed
    assert load_config("digits").head_lr is None


def test_overrides_that_change_the_result_say_so_in_the_description(capsys):
    """config.yaml of `digits model=convnet ...` must not describe the digits MLP as its own."""
    recipe = load_config("digits").description
    assert recipe.startswith("scikit-learn digits")
    assert main(["config", "digits", "model=convnet", "dataset=synthetic", "workers=1"]) == 0
    said = yaml.safe_load(capsys.readouterr().out)["description"]
    assert (
        said
        == f"recipe digits changed by model=convnet dataset=synthetic; the recipe says: {recipe}"
    )
    # keys that do not change the result leave it; a description given with them stands
    assert load_config("digits", ["workers=1", "device=cpu"]).description == recipe
    assert load_config("digits", ["model=convnet", "description=mine"]).description == "mine"
    # a run's resolved config fed back (what eval and resume do) keeps its description
    saved = load_config("digits", ["model=convnet"]).to_dict()
    assert load_config(None, saved).description == saved["description"]


def test_no_committed_record_describes_the_digits_mlp_unless_it_is_one():
    """The records made before overrides restated the description carry a marked correction."""
    records = sorted(Path(__file__).resolve().parents[1].glob("results/*/*/config.yaml"))
    assert len(records) > 100
    for path in records:
        cfg = yaml.safe_load(path.read_text())
        if cfg["description"].startswith("scikit-learn digits"):
            assert (cfg["model"], cfg["dataset"]) == ("mlp", "digits"), path
