"""Rewrite the round-2 results blocks of docs/results.md (sections 2c-2e) from the records in results/.

    .venv/bin/python studies/round2_tables.py     # after each finished round-2 run, before committing it

Every table in the block is the output of the command printed above it (`powergrad report`,
`studies/analyze.py`), so the doc never holds a hand-typed figure and tests/test_results_doc.py
stays green once the records and the doc are committed together. The prose under the block
("2c reading") is written by hand and must be re-read after each update.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
PY = sys.executable
A, W = "results/cifar10-resnet20-10k", "results/cifar10-resnet20-10k-warmup"
LR = [f"{A}-lr0.05", f"{W}-lr0.05", f"{W}-lr0.2"]


def run(args: list[str]) -> str:
    return subprocess.run(
        [PY, *args], env=ENV, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.rstrip()


# the pre-registered family (docs/results.md section 2c): A1, A2, B1, B2, B3
fam = [
    f"{W}@0.5,{W}@1",
    f"{W}@0.25,{W}@1",
    f"{LR[0]}@1,{A}@1",
    f"{LR[1]}@1,{W}@1",
    f"{LR[2]}@1,{W}@1",
]
family = run(["studies/analyze.py", "--compare", *fam])
train = run(["studies/analyze.py", "--compare", *fam[:2], "--metric", "train_acc"])
gap = run(["studies/analyze.py", "--compare", *fam[:2], "--metric", "gap"])
report = run(["-m", "powergrad", "report", W])
ana = run(["studies/analyze.py", W]).split("\n", 2)[2]  # drop the "### folder" heading
existing_lr = [p for p in LR if (ROOT / p).is_dir()]
lr_report = run(["-m", "powergrad", "report", *existing_lr]) if existing_lr else ""
# secondary (descriptive): the learning rate alpha = 1 with warm-up would pick on val
lr_val = (
    run(["studies/analyze.py", "--compare", *fam[3:], "--metric", "val_acc"]) if existing_lr else ""
)
compute = run(["studies/analyze.py", "--compute", A, W, *existing_lr])

block = f"""<!-- round-2 results: generated from results/ by the commands shown; regenerate as runs finish -->

### 2c results: the warmed-up cell (a)

`powergrad report {W}`

{report}

`.venv/bin/python studies/analyze.py {W}`

{ana}

### 2c results: the pre-registered family (A1, A2, B1-B3), test accuracy

`.venv/bin/python studies/analyze.py --compare {" ".join(fam)}`

{family}

Secondary (descriptive), A1 and A2 on train accuracy and on the gap:
`.venv/bin/python studies/analyze.py --compare {" ".join(fam[:2])} --metric train_acc` and `--metric gap`

{train}

{gap}
"""
if lr_report:
    block += f"""
### 2c results: the learning-rate control (b)

`powergrad report {" ".join(existing_lr)}`

{lr_report}

Secondary (descriptive): the learning rate alpha = 1 with warm-up would pick on val (0.05 and 0.2
against 0.1, paired over seeds):
`.venv/bin/python studies/analyze.py --compare {" ".join(fam[3:])} --metric val_acc`

{lr_val}
"""
block += f"""
### 2c compute so far

`.venv/bin/python studies/analyze.py --compute {" ".join([A, W, *existing_lr])}`

{compute}

<!-- end of round-2 results -->"""

# Section 2d, the budget axis (pre-registered): D1-D4 and what the budget does to alpha = 1
E5, E20 = f"{W}-e5", f"{W}-e20"
budget = ""
if (ROOT / E5).is_dir() or (ROOT / E20).is_dir():
    d_fam = [f"{E5}@0.5,{E5}@1", f"{E20}@0.5,{E20}@1", f"{E5}@0.5,{W}@1", f"{W}@0.5,{E20}@1"]
    d_ref = [f"{E5}@1,{W}@1", f"{E20}@1,{W}@1"]
    reports = "\n\n".join(
        f"`powergrad report {p}`\n\n{run(['-m', 'powergrad', 'report', p])}"
        for p in (E5, E20)
        if (ROOT / p).is_dir()
    )
    budget = f"""<!-- budget-axis results: generated from results/ by studies/round2_tables.py -->

### 2d results

{reports}

The pre-registered family (D1-D4), test accuracy:
`.venv/bin/python studies/analyze.py --compare {" ".join(d_fam)}`

{run(["studies/analyze.py", "--compare", *d_fam])}

Descriptive: alpha = 1 at 5 and at 20 epochs against alpha = 1 at 10:
`.venv/bin/python studies/analyze.py --compare {" ".join(d_ref)}`

{run(["studies/analyze.py", "--compare", *d_ref])}

`.venv/bin/python studies/analyze.py --compute {E5} {E20}`

{run(["studies/analyze.py", "--compute", *[p for p in (E5, E20) if (ROOT / p).is_dir()]])}

<!-- end of budget-axis results -->"""


# Section 2e (pre-registered): alpha 0.5 at the learning rate alpha = 1 picks on val (0.2)
T2 = f"{W}-lr0.2-a0.5"
follow_up = ""
if (ROOT / T2).is_dir():
    e1 = [f"{T2}@0.5,{LR[2]}@1"]
    same_alpha = [f"{T2}@0.5,{W}@0.5"]
    follow_up = f"""<!-- lr follow-up results: generated from results/ by studies/round2_tables.py -->

### 2e results

`powergrad report {T2}`

{run(["-m", "powergrad", "report", T2])}

E1, test accuracy:
`.venv/bin/python studies/analyze.py --compare {e1[0]}`

{run(["studies/analyze.py", "--compare", *e1])}

Descriptive: E1 on train and on val accuracy (`--metric train_acc`, `--metric val_acc`), and
alpha 0.5 at lr 0.2 against alpha 0.5 at lr 0.1 (2c's A1 arm), test accuracy:

{run(["studies/analyze.py", "--compare", *e1, "--metric", "train_acc"])}

{run(["studies/analyze.py", "--compare", *e1, "--metric", "val_acc"])}

`.venv/bin/python studies/analyze.py --compare {same_alpha[0]}`

{run(["studies/analyze.py", "--compare", *same_alpha])}

`.venv/bin/python studies/analyze.py --compute {T2}`

{run(["studies/analyze.py", "--compute", T2])}

<!-- end of lr follow-up results -->"""


# Section 2f (pre-registered): E1 replicated on seeds 5-9 (R1), and seeds 0-9 pooled
REP = f"{W}-lr0.2-rep"
replication = ""
if (ROOT / REP).is_dir():
    from analyze import by_alpha_seed, final, fmt_ci

    from powergrad.report.stats import paired

    r1 = [f"{REP}@0.5,{REP}@1"]

    def test_by_seed(folder: str, alpha: float) -> dict[int, float]:
        runs = by_alpha_seed(str(ROOT / folder)).get(alpha, {})
        return {s: final(r, "test_acc") for s, r in runs.items()}

    # alpha 0.5 minus alpha 1, test points: seeds 0-4 are 2e's (against 2c's alpha 1 at lr 0.2),
    # seeds 5-9 are 2f's
    d = paired(
        {**test_by_seed(T2, 0.5), **test_by_seed(REP, 0.5)},
        {**test_by_seed(LR[2], 1.0), **test_by_seed(REP, 1.0)},
    )
    pooled = (
        f"{fmt_ci(d.mean, d.lo, d.hi)} over {len(d.seeds)} seed pairs"
        if d and len(d.seeds) > 1
        else "not run yet"
    )
    replication = f"""<!-- replication results: generated from results/ by studies/round2_tables.py -->

### 2f results

`powergrad report {REP}`

{run(["-m", "powergrad", "report", REP])}

R1, test accuracy:
`.venv/bin/python studies/analyze.py --compare {r1[0]}`

{run(["studies/analyze.py", "--compare", *r1])}

Descriptive: seeds 0-9 pooled (E1's pairs and R1's), alpha 0.5 minus alpha 1, test accuracy,
points, 95% t-interval (`studies/round2_tables.py`): {pooled}.

`.venv/bin/python studies/analyze.py --compute {REP}`

{run(["studies/analyze.py", "--compute", REP])}

<!-- end of replication results -->"""


def replace_block(s: str, start: str, end: str, block: str, before: str) -> str:
    """Put block between its markers, or before the heading ``before`` the first time."""
    if start in s:
        a, b = s.index(start), s.index(end) + len(end)
        return s[:a] + block + s[b:]
    return s.replace(before, block + "\n\n" + before)


doc = ROOT / "docs" / "results.md"
s = doc.read_text()
section3 = "## 3. CIFAR-10 (JPEG), ResNet-20 without batch norm"
s = replace_block(s, "<!-- round-2 results:", "<!-- end of round-2 results -->", block, section3)
if budget:
    end_b = "<!-- end of budget-axis results -->"
    s = replace_block(s, "<!-- budget-axis results:", end_b, budget, section3)
if follow_up:
    end_f = "<!-- end of lr follow-up results -->"
    s = replace_block(s, "<!-- lr follow-up results:", end_f, follow_up, section3)
if replication:
    end_r = "<!-- end of replication results -->"
    s = replace_block(s, "<!-- replication results:", end_r, replication, section3)
doc.write_text(s)
