"""Config keys are described once, on the field: help, group, choices, whether they change the result."""

from __future__ import annotations

import dataclasses

import pytest

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
