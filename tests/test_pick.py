"""`powergrad report DIR --pick KEY`: each alpha at its val-picked setting against alpha = 1 at its
own, on test, paired by seed; the verdict words of docs/results.md.

The committed study records (results/, sections 2c-2f and 2h of docs/results.md) must give the audited
numbers; small synthetic run folders check the refusals and the warnings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from powergrad.errors import UserError
from powergrad.report.pick import parse_seeds, pick_results
from powergrad.report.stats import (
    CONTRADICTED,
    HOLDS,
    NOT_DETECTED,
    NOT_TESTABLE,
    Paired,
    holm,
    paired,
    verdict,
)
from powergrad.report.tables import load_runs

ROOT = Path(__file__).resolve().parents[1]
W = ROOT / "results" / "cifar10-resnet20-10k-warmup"
# alpha = 1 at lr 0.05, 0.1 and 0.2 (2c), alpha 0.5 and 0.25 at lr 0.1 (2c), alpha 0.5 at lr 0.2 (2e)
LR_GRID = [
    W,
    W.with_name(W.name + "-lr0.05"),
    W.with_name(W.name + "-lr0.2"),
    W.with_name(W.name + "-lr0.2-a0.5"),
]
REP = W.with_name(W.name + "-lr0.2-rep")  # 2f: both arms at lr 0.2, seeds 5-9


def row(md: str, *cells: str) -> str:
    """The Markdown table line whose first cells are ``cells``."""
    start = "| " + " | ".join(cells) + " |"
    found = [line for line in md.splitlines() if line.startswith(start)]
    assert len(found) == 1, (start, md)
    return found[0]


# ---- the committed records: the audited numbers of docs/results.md --------------------------


def test_the_val_picked_lr_comparison_gives_e1_and_the_lr_controls(capsys):
    code, out, _ = run_cli(["report", *LR_GRID, "--pick", "lr"], capsys)
    assert code == 0
    # alpha = 1 picks lr 0.2 on val among 0.05, 0.1, 0.2; alpha 0.5 picks 0.2 among 0.1, 0.2
    assert row(out, "1", "0.2", "yes")
    assert row(out, "0.5", "0.2", "yes")
    # 2c's val table: lr 0.2 against 0.1, +1.14 [+0.59, +1.69]; B3 on test: +1.39 [+0.67, +2.11]
    assert "| +1.14 [+0.59, +1.69] | +1.39 [+0.67, +2.11] |" in row(out, "1", "0.1", "")
    # 2e: alpha 0.5 at lr 0.2 against itself at 0.1, test: +1.82 [+0.20, +3.44]
    assert row(out, "0.5", "0.1", "").endswith("| +1.82 [+0.20, +3.44] |")
    # E1: +0.87 [+0.09, +1.65], p 0.036, seeds 0-4 paired; Holm over alphas 0.5 and 0.25
    e1 = row(out, "0.5", "0.2", "5 (0, 1, 2, 3, 4)")
    assert "| +0.87 [+0.09, +1.65] | 0.036 | 0.036 | holds here |" in e1
    assert "Holm p (family of 2)" in out
    assert "lr 0.2 is the largest tried (0.05, 0.1, 0.2): the best may lie beyond" in out
    assert "alpha 0.25: lr 0.1 is the only value tried" in out
    assert row(out, "0.25", "0.1", "only value")  # taken as is: the table does not say picked


def test_2h_stage_one_picks_lr_0_4_for_both_arms_as_docs_results_says(capsys):
    """Section 2h's stage 1 (bf16, seeds 0-9): both arms pick lr 0.4, the top of the grid."""
    pick = W.with_name(W.name + "-bf16-pick")
    code, out, _ = run_cli(["report", pick, "--pick", "lr", "--pick-seeds", "0-9"], capsys)
    assert code == 0
    assert "| 69.91 ± 1.84 | 69.60 ± 1.53 | - | - |" in row(out, "1", "0.4", "yes")
    assert "| 71.05 ± 1.87 | 70.66 ± 1.23 | - | - |" in row(out, "0.5", "0.4", "yes")
    assert "| +0.25 [-0.72, +1.22] | +0.29 [-0.57, +1.16] |" in row(out, "1", "0.2", "")
    assert "| +0.52 [-0.53, +1.57] | +0.54 [-0.13, +1.21] |" in row(out, "0.5", "0.2", "")
    assert "alpha 0.5: lr 0.4 is the largest tried (0.2, 0.4): the best may lie beyond" in out


def test_2h_final_picks_are_lr_0_4_inside_the_extended_grid(capsys):
    """With the lr 0.8 runs (the plan's extension rule), both picks stay 0.4: no edge warning."""
    pick = W.with_name(W.name + "-bf16-pick")
    folders = [
        pick,
        pick.with_name(pick.name + "-a1-lr0.8"),
        pick.with_name(pick.name + "-a0.5-lr0.8"),
    ]
    code, out, err = run_cli(["report", *folders, "--pick", "lr", "--pick-seeds", "0-9"], capsys)
    assert code == 0
    assert "| +0.67 [-0.66, +2.00] | +0.46 [-0.78, +1.70] |" in row(out, "1", "0.8", "")
    assert "| 70.77 ± 1.70 | 70.54 ± 0.99 | +0.28 [-0.75, +1.31] |" in row(out, "0.5", "0.8", "")
    assert row(out, "1", "0.4", "yes") and row(out, "0.5", "0.4", "yes")
    assert "may lie beyond" not in out + err


def test_2h_p1_the_confirmatory_test_on_seeds_10_to_33(capsys):
    """P1 as pre-registered: picks on seeds 0-9, the test on fresh seeds 10-33, one comparison."""
    folders = sorted(ROOT.joinpath("results").glob(W.name + "-bf16-*"))
    assert len(folders) == 5  # the pick, two lr 0.8 extensions, the two confirmatory arms
    argv = ["report", *folders, "--pick", "lr", "--pick-seeds", "0-9", "--test-seeds", "10-33"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    seeds = ", ".join(str(seed) for seed in range(10, 34))
    p1 = row(out, "0.5", "0.4", f"24 ({seeds})")
    assert p1.endswith("| +0.87 [-0.01, +1.76] | 0.052 | 0.052 | " + NOT_DETECTED + " |")


def test_e1_alone_as_pre_registered_a_family_of_one(capsys):
    code, out, _ = run_cli(["report", *LR_GRID, "--pick", "lr", "--alphas", "1,0.5"], capsys)
    assert code == 0 and "| 0.25 |" not in out and "Holm p (family of 1)" in out
    e1 = row(out, "0.5", "0.2", "5 (0, 1, 2, 3, 4)")
    assert e1.endswith("| +0.87 [+0.09, +1.65] | 0.036 | 0.036 | holds here |")


def test_seeds_0_to_9_pooled_and_the_replication_r1():
    runs, _ = load_runs([*LR_GRID, REP])
    (pooled,) = pick_results(runs, ("lr",))
    assert pooled.arm(1.0).pick.values == (0.2,) and pooled.arm(0.5).pick.values == (0.2,)
    # the pick compares the values on the seeds they all share (0-4), not lr 0.2's ten
    assert pooled.arm(0.5).pick_seeds == (0, 1, 2, 3, 4)
    d = next(c for c in pooled.comparisons if c.alpha == 0.5).diff
    assert d.seeds == tuple(range(10))
    assert f"{d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}]" == "+0.86 [-0.18, +1.90]"
    (r1,) = pick_results(runs, ("lr",), test_seeds=parse_seeds("5-9"))
    d = next(c for c in r1.comparisons if c.alpha == 0.5)
    assert d.diff.seeds == (5, 6, 7, 8, 9)
    assert f"{d.diff.mean:+.2f} [{d.diff.lo:+.2f}, {d.diff.hi:+.2f}]" == "+0.85 [-1.75, +3.45]"
    assert f"{d.diff.p:.2g}" == "0.41"
    assert d.verdict == NOT_DETECTED


def test_csv_has_one_row_per_alpha_and_the_warnings_go_to_stderr(capsys):
    code, out, err = run_cli(["report", REP, "--pick", "lr", "--format", "csv"], capsys)
    assert code == 0
    lines = out.splitlines()
    head = lines[0].split(",")
    assert head[:3] == ["setting", "alpha", "lr"] and "verdict" in head and len(lines) == 3
    r1 = dict(zip(head, lines[2].split(",")))
    assert (r1["alpha"], r1["seed_pairs"], r1["pairs"]) == ("0.5", "5 6 7 8 9", "5")
    assert f"{float(r1['d_test']):.2f}" == "0.85" and f"{float(r1['p']):.2g}" == "0.41"
    assert "lr 0.2 is the only value tried" in err


# ---- refusals: a pick never sees test ---------------------------------------------------------


def fake_run(root: Path, alpha: float, seed: int, val: float | None, test: float, **config) -> Path:
    """A finished run folder as `report` reads it: summary.json with its config and final row."""
    path = root / f"a{alpha}-s{seed}-{'-'.join(f'{k}{v}' for k, v in config.items())}"
    path.mkdir(parents=True)
    final = {"train_acc": 0.9, "test_acc": test, "train_loss": 0.3, "gap": 0.9 - test}
    if val is not None:
        final["val_acc"] = val
    cfg = {"model": "mlp", "dataset": "digits", "epochs": 3, "alpha": alpha, "seed": seed, **config}
    summary = {"status": "finished", "final": final, "config": cfg}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def noise(seed: int, x: float) -> float:
    """Seed-to-seed spread that differs between settings, as real runs' does."""
    return 0.01 * seed + 0.001 * ((seed + 1) * round(1e4 * x) % 7)


def grid(root: Path, best_lr: float, lrs=(0.1, 0.2, 0.4), seeds=range(3), val: bool = True) -> Path:
    """alpha 1 and 0.5 at each lr; val peaks at ``best_lr`` for both, test peaks elsewhere."""
    for alpha in (1.0, 0.5):
        for lr in lrs:
            for s in seeds:
                v = 0.8 - abs(lr - best_lr) + noise(s, lr) + (0.01 if alpha == 0.5 else 0.0)
                t = 0.7 + lr / 10 + noise(s, 3 * lr + alpha)
                fake_run(root, alpha, s, v if val else None, t, lr=lr)
    return root


def test_records_without_a_validation_split_are_refused(tmp_path, capsys):
    grid(tmp_path, 0.2, val=False)
    code, out, err = run_cli(["report", tmp_path, "--pick", "lr"], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "no val_acc" in err and "never on test" in err and "Traceback" not in err


@pytest.mark.parametrize("metric", ["test_acc", "test_loss", "train_acc"])
def test_a_pick_on_test_or_train_is_refused(tmp_path, capsys, metric):
    grid(tmp_path, 0.2)
    code, out, err = run_cli(["report", tmp_path, "--pick", "lr", "--pick-on", metric], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "validation only" in err


def test_the_pick_follows_validation_not_test(tmp_path):
    runs, _ = load_runs([grid(tmp_path, 0.2)])  # test rises with lr: 0.4 would win on test
    (r,) = pick_results(runs, ("lr",))
    assert r.arm(1.0).pick.values == (0.2,) and r.arm(0.5).pick.values == (0.2,)
    assert not any("largest" in w or "smallest" in w for w in r.warnings)
    # on val_loss lower is better: a loss that grows with lr picks the smallest lr
    for run in runs:
        run.summary["final"]["val_loss"] = run.config["lr"] + noise(
            run.config["seed"], 2 * run.config["lr"]
        )
    (loss,) = pick_results(runs, ("lr",), pick_on="val_loss")
    assert loss.arm(1.0).pick.values == (0.1,)
    assert any("alpha 1: lr 0.1 is the smallest tried" in w for w in loss.warnings)


@pytest.mark.parametrize(
    ("best", "edge"), [(0.4, "lr 0.4 is the largest tried"), (0.1, "lr 0.1 is the smallest tried")]
)
def test_a_pick_at_the_edge_of_the_values_tried_warns(tmp_path, capsys, best, edge):
    grid(tmp_path, best)
    code, out, err = run_cli(["report", tmp_path, "--pick", "lr"], capsys)
    assert code == 0
    assert f"- warning: alpha 1: {edge} (0.1, 0.2, 0.4): the best may lie beyond" in out
    code, out, err = run_cli(["report", tmp_path, "--pick", "lr", "--format", "csv"], capsys)
    assert f"alpha 0.5: {edge} (0.1, 0.2, 0.4): the best may lie beyond" in err


def test_several_keys_pick_a_combination_and_warn_per_key(tmp_path):
    for alpha in (1.0, 0.5):
        for lr in (0.1, 0.2):
            for wd in (0.0, 5e-4, 1e-3):
                for s in range(3):
                    # val best at lr 0.2 (the largest) with weight_decay 5e-4 (inside)
                    v = 0.7 + lr / 10 - abs(wd - 5e-4) * 10 + noise(s, lr + wd)
                    fake_run(tmp_path, alpha, s, v, 0.7 + 0.01 * s, lr=lr, weight_decay=wd)
    runs, _ = load_runs([tmp_path])
    (r,) = pick_results(runs, ("lr", "weight_decay"))
    assert r.arm(1.0).pick.values == (0.2, 5e-4)
    assert len(r.arm(1.0).candidates) == 6
    assert any("alpha 1: lr 0.2 is the largest tried (0.1, 0.2)" in w for w in r.warnings)
    assert not any("weight_decay" in w for w in r.warnings)


def test_a_tie_on_validation_is_said_and_the_table_marks_it(tmp_path, capsys):
    """val_acc is a count over a small split, so two values can tie: the tool says so, the table
    says 'tie', and no edge warning comes from which tied value happened to be taken."""
    for alpha in (1.0, 0.5):
        for lr in (0.05, 0.1, 0.2):
            for s in range(3):
                v = 0.9 if lr in (0.05, 0.1) else 0.8  # 0.05 and 0.1 tie, seed by seed
                fake_run(tmp_path, alpha, s, v + 0.01 * s, 0.7 + noise(s, lr + alpha), lr=lr)
    code, out, _ = run_cli(["report", tmp_path, "--pick", "lr"], capsys)
    assert code == 0
    assert (
        "- warning: alpha 1: lr 0.05 and lr 0.1 tie on mean val_acc (91.00): lr 0.05 taken, the "
        "first in the table; the data do not choose between them" in out
    )
    assert row(out, "1", "0.05", "yes") and row(out, "1", "0.1", "tie")
    assert "| +0.00 (every pair alike) |" in row(out, "1", "0.1", "tie")  # no zero-width CI
    assert "-0.00" not in out and "smallest tried" not in out  # 0.05 is an edge, 0.1 is not


def test_a_key_at_one_value_while_another_varies_is_refused(tmp_path, capsys):
    grid(tmp_path, 0.2)
    code, out, err = run_cli(["report", tmp_path, "--pick", "epochs"], capsys)
    assert (
        code == 2
        and out == ""
        and err.strip().splitlines()
        == [
            "powergrad: error: report --pick epochs: every run has epochs=3, so there is nothing to "
            "pick; settings that vary here: lr"
        ]
    )


def test_test_seeds_that_no_run_has_are_refused_naming_those_it_has(tmp_path, capsys):
    grid(tmp_path, 0.2)
    code, out, err = run_cli(["report", tmp_path, "--pick", "lr", "--test-seeds", "10-11"], capsys)
    assert code == 2 and out == ""
    assert "no run has seed 10, 11; the runs have seeds 0, 1, 2" in err


def test_a_mistyped_key_gets_the_nearest_recorded_one(tmp_path, capsys):
    grid(tmp_path, 0.2)
    code, _, err = run_cli(["report", tmp_path, "--pick", "Lrr"], capsys)
    assert code == 2 and err.strip().endswith("did you mean lr?")


def test_settings_that_differ_in_another_key_are_compared_apart(tmp_path):
    for epochs in (3, 6):
        for alpha in (1.0, 0.5):
            for lr in (0.1, 0.2):
                for s in range(3):
                    root = tmp_path / f"e{epochs}"
                    path = fake_run(root, alpha, s, 0.8 + lr, 0.7 + 0.01 * s, lr=lr)
                    summary = json.loads((path / "summary.json").read_text())
                    summary["config"]["epochs"] = epochs
                    (path / "summary.json").write_text(json.dumps(summary))
    runs, _ = load_runs([tmp_path])
    results = pick_results(runs, ("lr",))
    assert sorted(r.setting for r in results) == ["epochs=3", "epochs=6"]
    for run in runs:  # a float key sets the groups apart: written as the tables write it
        run.config["weight_decay"] = 0.0 if run.config["epochs"] == 3 else 5e-4
        del run.config["epochs"]
    results = pick_results(runs, ("lr",))
    assert sorted(r.setting for r in results) == ["weight_decay=0", "weight_decay=0.0005"]
    with pytest.raises(UserError, match="every run has lr=0.1, so there is nothing to pick"):
        pick_results([r for r in runs if r.config["lr"] == 0.1], ("lr",))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pick", "alpha"], "alpha is what is compared"),
        (["--pick", "seed"], "seed is what the comparison pairs by"),
        (["--pick", "momentum"], "no run records momentum"),
        (["--pick", "lr", "--test-seeds", "a-b"], "expected numbers and ranges"),
        (["--pick-seeds", "0-2"], "need --pick KEY"),
        (["--pick", "lr", "--alphas", "0.5"], "alpha 1 is the reference"),
        (["--pick", "lr", "--alphas", "1,0.3"], "no finished runs of alpha 0.3"),
        (["--pick", "lr", "--alphas", "1,x"], "expected numbers"),
    ],
)
def test_bad_requests_are_one_line_errors(tmp_path, capsys, args, message):
    grid(tmp_path, 0.2)
    code, out, err = run_cli(["report", tmp_path, *args], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert message in err


def test_pick_seeds_and_test_seeds_split_the_seeds(tmp_path):
    grid(tmp_path, 0.2, seeds=range(4))
    fake_run(tmp_path, 1.0, 3, 0.99, 0.5, lr=0.8)  # best on val, but only on seed 3
    runs, _ = load_runs([tmp_path])
    (r,) = pick_results(runs, ("lr",), pick_seeds=(0, 1), test_seeds=(2, 3))
    assert r.arm(1.0).pick_seeds == (0, 1) and r.arm(1.0).pick.values == (0.2,)
    assert "alpha 1: lr 0.8 has no run on the --pick-seeds: left out of the pick" in r.warnings
    (c,) = r.comparisons
    assert c.diff.seeds == (2, 3)
    (r,) = pick_results(runs, ("lr",))  # by default the pick uses the seeds every value shares
    assert r.arm(1.0).pick_seeds == (3,) and r.arm(1.0).pick.values == (0.8,)
    assert any("seeds 0, 1, 2 were not used for the pick" in w for w in r.warnings)


def test_values_on_no_common_seed_and_duplicate_runs_are_refused(tmp_path):
    fake_run(tmp_path / "a", 1.0, 0, 0.8, 0.7, lr=0.1)
    fake_run(tmp_path / "a", 1.0, 1, 0.8, 0.7, lr=0.2)
    runs, _ = load_runs([tmp_path / "a"])
    with pytest.raises(UserError, match="share no seed"):
        pick_results(runs, ("lr",))
    fake_run(tmp_path / "b", 1.0, 0, 0.8, 0.7, lr=0.1)
    fake_run(tmp_path / "c", 1.0, 0, 0.8, 0.7, lr=0.1)
    runs, _ = load_runs([tmp_path / "b", tmp_path / "c"])
    with pytest.raises(UserError, match="two runs of one setting and seed 0"):
        pick_results(runs, ("lr",))


def test_tampered_alphas_without_an_alpha_1_arm_are_refused(tmp_path):
    for s in range(2):
        fake_run(tmp_path, 0.5, s, 0.8, 0.7, lr=0.1)
    runs, _ = load_runs([tmp_path])
    with pytest.raises(UserError, match="no alpha = 1 runs"):
        pick_results(runs, ("lr",))


# ---- the statistics and the verdict rules ------------------------------------------------------


def test_paired_pairs_by_seed_and_says_which():
    d = paired({0: 2.0, 1: 3.0, 2: 4.0, 7: 9.0}, {0: 1.0, 1: 1.0, 2: 1.0, 5: 0.0})
    assert d.seeds == (0, 1, 2) and d.mean == 2.0
    assert (d.lo, d.hi) == pytest.approx(
        (2.0 - 4.302653 / math.sqrt(3), 2.0 + 4.302653 / math.sqrt(3))
    )
    assert paired({0: 1.0}, {1: 1.0}) is None


def test_verdict_words_follow_docs_results_rules():
    def d(lo: float, hi: float) -> Paired:
        return Paired((0, 1, 2), (lo + hi) / 2, lo, hi, 0.01)

    assert verdict(d(0.09, 1.65)) == HOLDS
    assert verdict(d(0.09, 1.65), holm_p=0.07) == NOT_DETECTED  # a Holm family needs Holm p < 0.05
    assert verdict(d(-0.18, 1.90)) == NOT_DETECTED
    assert verdict(d(-0.42, 0.04)) == CONTRADICTED  # below the paper's smallest gain, +0.1
    assert verdict(d(-5.56, -2.34)) == CONTRADICTED
    assert verdict(None) == NOT_TESTABLE
    assert verdict(Paired((0,), 1.0, math.nan, math.nan, math.nan)) == NOT_TESTABLE


def test_holm_is_the_one_the_study_scripts_use():
    adjusted = holm([0.01, 0.04, 0.03, float("nan"), 0.5])
    assert adjusted[:3] == pytest.approx([0.05, 0.12, 0.12]) and adjusted[4] == 1.0


def test_pairs_that_all_differ_alike_are_not_testable_and_say_why(tmp_path):
    # 360 test images: two seeds can both lose exactly 2 images; a t-test has no spread to use
    for s in range(2):
        fake_run(tmp_path, 1.0, s, 0.9, 0.9 + 0.01 * s, lr=0.1)
        fake_run(tmp_path, 0.5, s, 0.9, 0.9 + 0.01 * s - 2 / 360, lr=0.1)
    runs, _ = load_runs([tmp_path])
    (r,) = pick_results(runs, ("lr",))
    (c,) = r.comparisons
    assert math.isnan(c.diff.p) and c.verdict == NOT_TESTABLE
    assert any("all 2 seed pairs differ by the same -0.56 points" in w for w in r.warnings)


def test_json_is_strict_json_with_the_same_numbers(tmp_path, capsys):
    for s in range(2):
        fake_run(tmp_path, 1.0, s, 0.9, 0.9 + 0.01 * s, lr=0.1)
        fake_run(tmp_path, 0.5, s, 0.9, 0.9 + 0.01 * s - 2 / 360, lr=0.1)
    code, out, err = run_cli(["report", tmp_path, "--pick", "lr", "--format", "json"], capsys)

    def refuse(name):
        raise AssertionError(f"{name} in JSON")

    (r,) = json.loads(out, parse_constant=refuse)
    assert r["comparisons"][0]["diff"]["seeds"] == [0, 1]
    assert r["comparisons"][0]["diff"]["p"] is None and r["comparisons"][0]["holm_p"] is None
    assert "no spread to test against" in err
