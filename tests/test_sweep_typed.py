"""A sweep's Optuna storage, read with Optuna's own API: grid values typed as their config
fields (numbers as FloatDistribution / IntDistribution, booleans and text as categories), and a
storage written the old way (every grid value as text) still read back and continued."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from powergrad.cli import main
from powergrad.sweep import STUDY_NAME, _distribution, typed

TINY = ["epochs=1", "train_subset=100"]


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")


def test_typed_follows_the_config_fields():
    assert typed("alpha", "0.5") == 0.5 and isinstance(typed("alpha", "1"), float)
    assert typed("seed", "3") == 3 and typed("epochs", "1e1") == 10
    assert typed("nesterov", "false") is False and typed("model", "mlp") == "mlp"
    assert typed("train_subset", "none") is None and typed("monitor.stall_epochs", "4") == 4
    assert typed("decay_milestones", "3,6") == "3,6"  # a list key: never an axis, kept as given


def test_a_sweep_stores_numbers_as_numbers(tmp_path, capsys):
    out = tmp_path / "sweep"
    grid = ["alpha=1,0.5", "nesterov=true,false", "model=mlp,softmax_regression", "seed=3"]
    assert main(["sweep", "digits", *grid, *TINY, "--out", str(out)]) == 0
    assert "alpha=0.5,model=mlp,nesterov=false,seed=3" in capsys.readouterr().out
    trials = _study(out).get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2 * 2 * 2
    dists = {k: {t.distributions[k] for t in trials} for k in trials[0].params}
    assert dists == {
        "alpha": {FloatDistribution(0.5, 1.0)},
        "nesterov": {CategoricalDistribution([True, False])},
        "model": {CategoricalDistribution(["mlp", "softmax_regression"])},
        "seed": {IntDistribution(3, 3)},
    }
    assert {t.params["alpha"] for t in trials} == {1.0, 0.5}
    assert {t.params["nesterov"] for t in trials} == {True, False}
    # Run folders keep the values as written; each trial trained the values it records.
    t = next(t for t in trials if t.params["alpha"] == 0.5 and not t.params["nesterov"])
    run = Path(t.user_attrs["run_dir"])
    assert run.name.startswith("alpha=0.5,model=") and run.name.endswith("nesterov=false,seed=3")
    config = (run / "config.yaml").read_text()
    assert "alpha: 0.5\n" in config and "nesterov: false\n" in config


def test_numbers_spanning_10x_or_more_are_on_a_log_axis():
    assert _distribution([0.1, 0.05, 1e-5]) == FloatDistribution(1e-5, 0.1, log=True)
    assert _distribution([0.0, 0.5, 1.0]) == FloatDistribution(0.0, 1.0)  # zero: no log axis
    assert _distribution([10, 100]) == IntDistribution(10, 100, log=True)
    assert _distribution([None, 0.1]) == CategoricalDistribution([None, 0.1])


def _old_storage(out: Path) -> None:
    """What the sweep wrote before its values were typed: ``digits alpha=1,0.5`` with the point
    alpha=1 done, every grid value a text category (the seed an int one)."""
    out.mkdir()
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}", direction="maximize"
    )
    space = {"alpha": ["1", "0.5"], "seed": [0]}
    fixed = {"epochs": "1", "train_subset": "100"}
    study.set_user_attr("sweep", {"recipe": "digits", "space": space, "fixed": fixed})
    study.add_trial(
        create_trial(
            value=0.75,
            params={"alpha": "1", "seed": 0},
            distributions={
                "alpha": CategoricalDistribution(("1", "0.5")),
                "seed": CategoricalDistribution((0,)),
            },
            user_attrs={"point": "alpha=1,seed=0", "metric": "test_acc", "epochs_done": 1},
        )
    )


def test_a_storage_of_text_values_reads_back_and_continues(tmp_path, capsys):
    out = tmp_path / "sweep"
    _old_storage(out)
    assert main(["sweep", "digits", "alpha=1,0.5", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not (out / "alpha=1,seed=0").exists()  # done in the old record: not run again
    assert (out / "alpha=0.5,seed=0" / "summary.json").is_file()
    rows = [ln for ln in printed.splitlines() if ln.startswith("alpha=")]
    assert len(rows) == 2 and all(" COMPLETE " in r for r in rows), printed
    assert "0.7500" in rows[0]
    # The new trial keeps the record's kind (Optuna refuses two for one parameter of a study).
    trials = _study(out).get_trials(states=(TrialState.COMPLETE,))
    assert [t.params for t in trials] == [{"alpha": "1", "seed": 0}, {"alpha": "0.5", "seed": 0}]
    assert {t.distributions["alpha"] for t in trials} == {CategoricalDistribution(("1", "0.5"))}
    # Run again: nothing left to do, and another grid is still refused.
    assert main(["sweep", "digits", "alpha=1,0.5", *TINY, "--out", str(out)]) == 0
    assert len(_study(out).trials) == 2
    capsys.readouterr()
    assert main(["sweep", "digits", "alpha=1,0.25", *TINY, "--out", str(out)]) == 2
    assert "another sweep" in capsys.readouterr().err


@pytest.mark.parametrize("grid", [["alpha=1,1.0"], ["seed=1,01"]])
def test_one_value_written_twice_is_refused(tmp_path, capsys, grid):
    assert main(["sweep", "digits", *grid, *TINY, "--out", str(tmp_path / "s")]) == 2
    assert "names one value twice" in capsys.readouterr().err
