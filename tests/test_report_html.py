"""`powergrad report DIR --format html`: one self-contained page, checked in a real headless
browser (Debian's chromium, driven over the DevTools protocol on a pipe): it loads with no
console error and no request outside the file, every image decodes, its table equals
`powergrad report`'s markdown cell for cell, and a screenshot of the first screen is taken.

The browser test is skipped where no chromium is installed, unless POWERGRAD_REQUIRE_BROWSER is
set (.ci/run installs chromium and sets it: in CI it runs, never skips).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from powergrad.cli import main
from powergrad.report.html import Table, markdown_cells, render_page, run_facts, verdict
from powergrad.report.tables import load_runs

ROOT = Path(__file__).resolve().parents[1]
REP = ROOT / "results" / "cifar10-resnet20-10k-warmup-lr0.2-rep"  # committed records, 10 runs
FIGURES = 7  # what `powergrad plot` draws for runs without filter-norm records


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    if os.environ.get("POWERGRAD_REQUIRE_BROWSER"):
        pytest.fail("no chromium on PATH, and POWERGRAD_REQUIRE_BROWSER is set (.ci/run)")
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")


class Browser:
    """Headless chromium driven over ``--remote-debugging-pipe``: DevTools protocol messages,
    JSON ended by a NUL byte, written to the browser's fd 3 and read from its fd 4. One page,
    attached in flat mode; every event is kept in ``events``."""

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        cmd_r, self._w = os.pipe()  # commands: we write, the browser reads them on its fd 3
        self._r, reply_w = os.pipe()  # replies and events: the browser writes them on its fd 4
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="powergrad-chromium-")
        args = [
            _chromium(),
            "--headless",
            "--no-sandbox",  # CI runs as root, where chromium's sandbox refuses to start
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={self.profile}",
            "--remote-debugging-pipe",
        ]

        def fds() -> None:  # in the child, before exec: the two pipe ends at fd 3 and fd 4
            a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, reply_w))  # above 4
            os.dup2(a, 3)
            os.dup2(b, 4)

        # close_fds=False keeps fds 3 and 4 (dup2 makes them inheritable); the parent's other
        # descriptors are not inheritable (PEP 446), so nothing else leaks into chromium.
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=fds,
            close_fds=False,
        )
        os.close(cmd_r)
        os.close(reply_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        reply = self._until(lambda m: m.get("id") == self._id, timeout)
        assert "error" not in reply, (method, reply["error"])
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        return self._until(lambda m: m.get("method") == method, timeout, keep=True)

    def _until(self, match, timeout: float, keep: bool = False) -> dict:
        seen = next((m for m in self.events if match(m)), None) if keep else None
        deadline = time.monotonic() + timeout
        while seen is None:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self._r], [], [], max(left, 0))
                assert ready, f"chromium did not answer within {timeout} s"
                chunk = os.read(self._r, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            m = json.loads(raw)
            if "method" in m:
                self.events.append(m)
            if match(m):
                seen = m
        return seen

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        # the first screen: a viewport of exactly the size asked (a headless window loses a strip)
        size = {"width": self.width, "height": self.height}
        self.send(
            "Emulation.setDeviceMetricsOverride", {**size, "deviceScaleFactor": 1, "mobile": False}
        )
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result["result"]["value"]

    def errors(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, and errors the browser logged
        (a refused or failed load, a blocked resource)."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "warning"):
                out.append(f"console.{p['type']}: {p['args']}")
            elif e["method"] == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails']}")
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log: {p['entry']['text']}")
        return out

    def requests(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent"
        ]

    def close(self) -> None:
        try:
            self.session = None
            self.send("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser():
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_committed_reports_page_opens_offline_and_equals_the_markdown(
    browser, tmp_path, capsys
):
    page = tmp_path / "report.html"
    assert main(["report", str(REP), "--format", "html", "--out", str(page)]) == 0
    assert capsys.readouterr().out.strip() == str(page)
    assert main(["report", str(REP)]) == 0
    markdown = capsys.readouterr().out
    header, rows = markdown_cells(markdown)
    assert main(["report", str(REP), "--out", str(tmp_path / "table.md")]) == 0  # md to a file
    assert (tmp_path / "table.md").read_text() == markdown and capsys.readouterr().out == ""

    browser.open(page.as_uri())
    assert browser.errors() == []
    assert all(u.startswith(("file:", "data:")) for u in browser.requests()), browser.requests()
    images = browser.evaluate(
        "Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert len(images) == FIGURES
    assert all(done and w > 0 and h > 0 for _, done, w, h in images), images

    # The results table, as the browser shows it: powergrad report's cells, then the verdicts.
    table = browser.evaluate(
        "Array.from(document.querySelector('table').rows, r => Array.from(r.cells, "
        "c => c.textContent))"
    )
    assert table[0] == [*header, "verdict"]
    assert [r[:-1] for r in table[1:]] == rows and len(rows) == 2
    assert [r[-1] for r in table[1:]] == [
        "baseline",
        "not detected here (effects of the paper's size not excluded)",  # +0.85 [-1.75, +3.45]
    ]
    facts = browser.evaluate(
        "Object.fromEntries(Array.from(document.querySelectorAll('dt'), "
        "d => [d.textContent, d.nextElementSibling.textContent]))"
    )
    assert facts["keys that vary"] == "alpha: 0.5, 1.0" and facts["seeds"] == "5, 6, 7, 8, 9"
    assert "lr 0.2, 1 warm-up epoch" in facts["recipe"] and "a2ac705a1d5f" in facts["code version"]
    assert facts["compute"].startswith("10 runs, ") and "summary.json files" in facts["dates"]
    assert "none: every run finished." in browser.evaluate("document.body.innerText")

    shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
    (tmp_path / "first-screen.png").write_bytes(shot)
    assert _png_size(shot) == (1280, 900)


def _run(folder: Path, alpha: float, seed: int, acc: float, status: str = "finished") -> None:
    """A run folder as the trainer leaves it (config.yaml, metrics.csv, summary.json)."""
    folder.mkdir(parents=True)
    config = {"model": "mlp", "dataset": "digits", "sched": "cosine", "epochs": 2, "alpha": alpha}
    config |= {"label_smoothing": 0.0, "seed": seed, "description": "digits <b>&amp; co</b>"}
    (folder / "config.yaml").write_text(json.dumps(config))
    rows = [
        {"epoch": e, "train_loss": 1 / e, "train_acc": acc, "test_loss": 1 / e, "test_acc": acc}
        for e in (1, 2)
    ]
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(str(r[k]) for k in header) for r in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    final = {**rows[-1], "logit_norm": 3.0}
    summary: dict[str, Any] = {"status": status, "final": final, "config": config}
    summary |= {"epochs_done": 2, "wall_s": 60.0, "env": {"device": "cpu", "cpu_threads": 2}}
    if status != "finished":
        summary |= {"final": {}, "epochs_done": 1}
        summary["diagnostics"] = [{"message": "non-finite loss <script>alert(1)</script>"}]
    (folder / "summary.json").write_text(json.dumps(summary))


def test_the_page_lists_unfinished_runs_and_escapes_every_text(tmp_path, capsys):
    for seed, (base, gain) in enumerate([(0.80, 0.02), (0.70, 0.03), (0.75, 0.025)]):
        _run(tmp_path / f"a1-s{seed}", 1.0, seed, base)
        _run(tmp_path / f"a0.5-s{seed}", 0.5, seed, base + gain)
    _run(tmp_path / "a0.25-s0", 0.25, 0, 0.5, status="diverged")
    (tmp_path / "a0.25-s1").mkdir()
    (tmp_path / "a0.25-s1" / "config.yaml").write_text("{}")  # started, no summary.json yet
    point = {"point": "a0.25-s2", "state": "FAIL", "run_dir": None, "error": "UserError: <x>"}
    (tmp_path / "sweep.json").write_text(json.dumps({"trials": [point]}))  # failed before a run
    assert main(["report", str(tmp_path), "--format", "html"]) == 0
    page = (tmp_path / "report.html").read_text()  # the default: in the one folder named
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")
    assert "<script" not in page and "<b>" not in page
    assert "non-finite loss &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "digits &lt;b&gt;&amp;amp; co&lt;/b&gt;" in page
    assert f">{tmp_path / 'a0.25-s0'}</td>" in page
    assert f">{tmp_path / 'a0.25-s1'}</td>" in page
    assert '<td class="text">no summary.json</td>' in page
    assert f">{tmp_path / 'a0.25-s2'}</td>" in page
    assert "UserError: &lt;x&gt;" in page
    assert page.count("data:image/png;base64,") == FIGURES
    assert '<td class="holds text">holds here</td>' in page  # +2.50 [+1.26, +3.74]


@pytest.mark.parametrize(
    "interval, words",
    [
        ((0.2, 1.5), "holds here"),
        ((-0.5, 1.5), "not detected here (effects of the paper's size not excluded)"),
        ((-0.5, 0.09), "contradicted here (interval excludes the paper's effect)"),
        ((-3.0, -1.0), "contradicted here (interval excludes the paper's effect)"),
        (None, "not testable here (no two seeds paired with alpha = 1)"),
    ],
)
def test_verdicts_follow_the_rules_of_docs_results(interval, words):
    lo, hi = interval or (None, None)
    mid = None if interval is None else (lo + hi) / 2
    row = {"alpha": 0.5, "d_test_paired": mid, "d_test_lo": lo, "d_test_hi": hi}
    assert verdict(row) == words
    assert verdict({**row, "alpha": 1.0}) == "baseline"


def test_any_markdown_table_joins_the_page():
    pick = "| key | picked on val |\n| --- | --- |\n| lr | 0.2 <b> |\n| alpha |  |"
    page = render_page("t", [Table("pick & co", pick, "a note", {"n": ["1", "2"]})], [], [], [])
    assert "<h3>pick &amp; co</h3>" in page and '<p class="note">a note</p>' in page
    assert "<th>key</th>\n<th>picked on val</th>\n<th>n</th>" in page
    assert '<td class="text">0.2 &lt;b&gt;</td><td>1</td>' in page
    assert '<td class="text">alpha</td><td></td><td>2</td>' in page


def test_the_fair_comparison_joins_the_page_cell_for_cell(tmp_path, capsys):
    """`report --pick lr --format html`: the pick's two Markdown tables, as `--format md` prints
    them, follow the results table, and their warnings (both picks at the grid's edge) with them."""
    w = ROOT / "results" / "cifar10-resnet20-10k-warmup"
    grid = [str(w.with_name(w.name + s)) for s in ("", "-lr0.05", "-lr0.2", "-lr0.2-a0.5")]
    args = ["report", *grid, "--pick", "lr", "--alphas", "1,0.5"]
    assert main(args) == 0
    md = capsys.readouterr().out
    out = tmp_path / "pick.html"
    assert main([*args, "--format", "html", "--out", str(out)]) == 0
    page = out.read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| 0.5 | 0.2 |")]
    assert len(lines) == 2  # alpha 0.5's pick, and its comparison with alpha 1's (E1)
    for line in lines:
        for cell in line.strip("|").split(" | "):
            assert f">{cell.strip()}</td>" in page.replace("&#x27;", "'"), cell
    assert "+0.87 [+0.09, +1.65]" in md and ">+0.87 [+0.09, +1.65]</td>" in page
    assert "lr 0.2 is the largest tried" in page


def test_what_was_run_names_a_sweeps_recipe_once_and_short_runs_in_seconds(tmp_path):
    for alpha in (1.0, 0.5):
        for seed in (0, 1):
            folder = tmp_path / f"a{alpha}-s{seed}"
            _run(folder, alpha, seed, 0.9)
            text = f"recipe digits changed by val_fraction=0.1 alpha={alpha:g} seed={seed}"
            for name in ("config.yaml", "summary.json"):
                data = json.loads((folder / name).read_text())
                config = data if name == "config.yaml" else data["config"]
                config["description"] = text + "; the recipe says: digits, small MLP"
                if name == "summary.json":
                    data["wall_s"] = 2.0
                (folder / name).write_text(json.dumps(data))
    runs, _ = load_runs([tmp_path])
    facts = dict(run_facts(runs, tmp_path))
    assert (
        facts["recipe"]
        == "recipe digits changed by val_fraction=0.1; the recipe says: digits, small MLP"
    )
    assert "4 runs, 8.0 s in all; 2.0 s a run" in facts["compute"]


def test_without_out_the_page_never_goes_into_a_run_folder_nor_a_guessed_one(tmp_path, capsys):
    for seed in range(2):
        _run(tmp_path / "sweep" / f"a1-s{seed}", 1.0, seed, 0.8)
    run = tmp_path / "sweep" / "a1-s0"
    for paths, why in [
        ([run], "is a run folder, and its files are that run's record"),
        ([tmp_path / "sweep", run], "several folders are named"),
    ]:
        before = sorted(p.name for p in run.iterdir())
        code, out, err = run_cli(["report", *paths, "--format", "html"], capsys)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
        assert why in err and "--out FILE" in err
        assert sorted(p.name for p in run.iterdir()) == before
