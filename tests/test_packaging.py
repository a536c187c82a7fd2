"""What `pip install powergrad` gives: the loss with torch alone, one line naming the extra for
any other part, and a wheel and sdist that work outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import powergrad

ROOT = Path(__file__).resolve().parents[1]
# Every third-party module powergrad imports but torch (and what the extras bring with them).
OPTIONAL = (
    "numpy",
    "timm",
    "torchvision",
    "optuna",
    "tensorboard",
    "matplotlib",
    "sklearn",
    "scipy",
    "yaml",
    "PIL",
    "safetensors",
    "sqlalchemy",
    "psycopg",
    "psycopg2",
)

# Runs the rest of the command line's script with OPTIONAL unimportable, as on `pip install powergrad`.
HIDE = f"""
import sys

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Hide())
"""

LOSS = """
import torch
import powergrad
from powergrad import PowerGradLoss, power_grad_cross_entropy
from powergrad.reference import official_hook_cross_entropy

z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 5, (8,))
loss = PowerGradLoss(alpha=0.5)(z, y)
loss.backward()
q = torch.nn.functional.one_hot(y, 5).double()
assert torch.allclose(z.grad, (torch.softmax(0.5 * z.detach(), -1) - q) / 8)
assert torch.allclose(loss, torch.nn.functional.cross_entropy(z, y))
assert power_grad_cross_entropy(z, y, 1.0).shape == ()
assert official_hook_cross_entropy(z, y, 1.0).shape == ()

for use in (lambda: powergrad.train, lambda: powergrad.load_config("digits")):
    try:
        use()
    except powergrad.MissingExtraError as e:
        assert isinstance(e, ImportError) and "pip install 'powergrad[train]'" in str(e), e
    else:
        raise AssertionError("the trainer ran without the train extra")
for module, extra in (("powergrad.sweep", "sweep"), ("powergrad.report.figures", "plot"),
                      ("powergrad.engine", "train"), ("powergrad.demo", "train")):
    try:
        __import__(module)
    except ImportError as e:
        assert f"pip install 'powergrad[{extra}]'" in str(e), (module, e)
    else:
        raise AssertionError(module + " imported without its extra")
leaked = sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)
assert not leaked, leaked
print("ok")
"""


def _python(source: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # This powergrad, from whatever folder the child runs in (PYTHONPATH=src is relative).
    path = os.pathsep.join(
        [str(Path(powergrad.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, "-c", source, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
    )


def test_the_loss_imports_and_runs_with_every_optional_dependency_hidden():
    proc = _python(HIDE + f"OPTIONAL = {OPTIONAL!r}\n" + LOSS)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize(
    "args, extra",
    [
        (["train", "epochs=1"], "train"),
        (["recipes"], "train"),
        (["sweep", "digits", "alpha=1,0.5", "--out", "sw"], "sweep"),
        (["report", "runs"], "plot"),
        (["plot", "runs"], "plot"),
    ],
)
def test_a_command_whose_extra_is_missing_is_one_line_naming_it(args, extra, tmp_path):
    # numpy stays: without it torch itself warns on stderr ("Failed to initialize NumPy").
    hide = HIDE.replace(repr(OPTIONAL), repr(OPTIONAL[1:]))
    proc = _python(
        hide + "from powergrad.cli import main\nsys.exit(main(sys.argv[1:]))", *args, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        "powergrad: error: no module named"
    ), proc.stderr
    assert proc.stderr.rstrip().endswith(f"pip install 'powergrad[{extra}]'")
    assert not list(tmp_path.iterdir())  # nothing made


# What `pip install 'powergrad[plot]'` lacks: the trainer's extra and those above it.
TRAIN_ONLY = tuple(m for m in OPTIONAL if m not in ("numpy", "scipy", "matplotlib", "PIL"))


def _run_folders(root: Path) -> Path:
    """Two finished digits runs (alpha 1 and 0.5) from results/, one with filter norms."""
    import numpy as np

    runs = root / "runs"
    for name in ("a1-s0", "a0.5-s0"):
        shutil.copytree(ROOT / "results" / "digits" / name, runs / name)
    steps = np.arange(0, 50, 10)
    np.savez_compressed(
        runs / "a1-s0" / "filter_norms.npz",
        steps=steps,
        **{"conv/conv1": np.linspace(1, 0, 5 * 4).reshape(5, 4)},
        pooled=np.ones((5, 4)),
    )
    return runs


def _report_and_plot(python: list[str], cwd: Path, env: dict | None = None) -> None:
    """`powergrad report` and `powergrad plot` on :func:`_run_folders`, as ``python`` runs them."""
    runs = _run_folders(cwd)
    run = dict(capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    report = subprocess.run([*python, "report", str(runs)], **run)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = [ln.split(" | ")[3] for ln in report.stdout.splitlines() if ln.startswith("| mlp |")]
    assert rows == ["1", "0.5"], report.stdout
    plot = subprocess.run([*python, "plot", str(runs), "--out", str(cwd / "figs")], **run)
    assert plot.returncode == 0, plot.stderr[-3000:]
    made = {p.name for p in (cwd / "figs").iterdir()}
    assert {"accuracy_vs_alpha.png", "filter_norms-a1-s0.png", "pooled_features-a1-s0.png"} <= made


def test_report_and_plot_need_only_the_plot_extra(tmp_path):
    """With the trainer's packages (PyYAML, timm, torchvision, ...) unimportable, as after
    `pip install 'powergrad[plot]'`: both commands work, and neither imports the trainer."""
    hide = HIDE.replace(repr(OPTIONAL), repr(TRAIN_ONLY))
    source = hide + "from powergrad.cli import main\nsys.exit(main(sys.argv[1:]))"
    path = os.pathsep.join(
        [str(Path(powergrad.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    )
    _report_and_plot([sys.executable, "-c", source], tmp_path, {**os.environ, "PYTHONPATH": path})


def test_plot_without_its_extra_writes_nothing(tmp_path):
    """A missing plotting package stops `plot` before its first figure, not after ten."""
    runs = _run_folders(tmp_path)
    hide = HIDE.replace(repr(OPTIONAL), repr(("scipy",)))
    proc = _python(
        hide + "from powergrad.cli import main\nsys.exit(main(sys.argv[1:]))",
        "plot",
        str(runs),
        "--out",
        str(tmp_path / "figs"),
    )
    assert proc.returncode == 2 and proc.stderr.endswith("pip install 'powergrad[plot]'\n"), (
        proc.stderr
    )
    assert not (tmp_path / "figs").exists()


def test_a_postgresql_storage_without_its_driver_names_the_extra(tmp_path):
    hide_driver = HIDE.replace(repr(OPTIONAL), repr(("psycopg", "psycopg2")))
    proc = _python(
        hide_driver + "from powergrad.cli import main\nsys.exit(main(sys.argv[1:]))",
        "sweep",
        "digits",
        "alpha=1,0.5",
        "--out",
        "sw",
        "--storage",
        "postgresql://me:secret@127.0.0.1:1/db",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "powergrad: error: no module named 'psycopg' (sweeps on PostgreSQL need it): "
        "pip install 'powergrad[postgres]'\n"
    )
    assert not list(tmp_path.iterdir())


def _build(tmp_path: Path) -> Path:
    """The sdist and wheel of this checkout, in ``tmp_path/dist``. Built from a copy, so that
    nothing is written into the checkout; without isolation, so that nothing is downloaded (the
    venv's setuptools builds it)."""
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(tree)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    return dist


def _install(wheel: Path, site: Path) -> None:
    """The wheel alone into ``site`` (its dependencies come from elsewhere)."""
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site)]
        + [str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]


def _closure(requirements: list[str]) -> set[str]:
    """The installed distributions ``requirements`` need, theirs included (markers and extras as
    pip reads them); one not installed here is one this platform does without."""
    from importlib import metadata

    from packaging.requirements import Requirement

    todo, found = [(Requirement(r), "") for r in requirements], set()
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        key = f"{dist.metadata['Name']}[{','.join(sorted(req.extras))}]"
        if key in found:
            continue
        found.add(key)
        for r in dist.requires or []:
            todo += [(Requirement(r), e) for e in ("", *req.extras)]
    return {k.split("[")[0] for k in found}


@pytest.mark.packaging
def test_report_and_plot_from_a_plot_only_install(tmp_path):
    """`pip install 'powergrad[plot]'`, made without the network: a fresh venv that sees only the
    wheel and the distributions the [plot] extra pulls in (linked from this venv); PyYAML, timm,
    torchvision and the rest are absent for real, not hidden."""
    from importlib import metadata

    wheel = next(_build(tmp_path).glob("*.whl"))
    site, deps, env_dir = tmp_path / "site", tmp_path / "deps", tmp_path / "venv"
    _install(wheel, site)
    requires = metadata.Distribution.at(next(site.glob("powergrad-*.dist-info"))).requires or []
    plot = [r.split(";")[0] for r in requires if 'extra == "plot"' in r]
    core = [r for r in requires if "extra ==" not in r]
    deps.mkdir()
    for name in _closure(plot + core):
        for f in metadata.distribution(name).files or []:
            top = f.parts[0]
            target = deps / top
            if top not in ("..", "__pycache__") and not target.exists():
                target.symlink_to(Path(f.locate()).parents[len(f.parts) - 1] / top)
    venv = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(env_dir)], capture_output=True
    )
    assert venv.returncode == 0, venv.stderr
    python = [str(env_dir / "bin" / "python"), "-s"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(deps)])}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    absent = subprocess.run(
        [
            *python,
            "-c",
            "import importlib.util as u; print([u.find_spec(m) for m in "
            "('yaml', 'timm', 'torchvision', 'tensorboard', 'sklearn')])",
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )
    assert absent.stdout.strip() == str([None] * 5), absent.stdout + absent.stderr
    _report_and_plot([*python, "-m", "powergrad"], cwd, env)


@pytest.mark.packaging
def test_the_wheel_installed_outside_the_source_tree_runs_the_demo(tmp_path):
    dist = _build(tmp_path)
    run = dict(capture_output=True, text=True, timeout=600)
    wheel, sdist = next(dist.glob("*.whl")), next(dist.glob("*.tar.gz"))
    version = f"powergrad-{powergrad.__version__}"
    assert wheel.name == f"{version}-py3-none-any.whl"
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], **run
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    recipes = {
        p.relative_to(ROOT / "src").as_posix()
        for p in (ROOT / "src/powergrad/recipes").rglob("*.yaml")
    }
    assert len(recipes) > 10
    recipes.add("powergrad/csrc/tamper_cpu.cpp")  # the fused CPU loss kernel's source
    assert recipes <= set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as tar:
        assert {f"{version}/src/{r}" for r in recipes} <= set(tar.getnames())
    metadata = zipfile.ZipFile(wheel).read(f"{version}.dist-info/METADATA").decode()
    requires = [
        ln
        for ln in metadata.splitlines()
        if ln.startswith("Requires-Dist:") and "extra ==" not in ln
    ]
    assert requires == ["Requires-Dist: torch>=2.4"]  # the loss needs torch alone

    # Installed into a folder of its own, the venv's packages as its dependencies.
    site = tmp_path / "site"
    _install(wheel, site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # not src/: the wheel's copy, nothing else
    where = subprocess.run(
        [sys.executable, "-c", "import powergrad; print(powergrad.__file__)"],
        cwd=cwd,
        env=env,
        **run,
    )
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    demo = subprocess.run(
        [str(site / "bin" / "powergrad"), "demo", "--epochs", "2", "--out", "demo"],
        cwd=cwd,
        env=env,
        **run,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "== comparison" in demo.stdout and (cwd / "demo" / "compare.png").is_file()
    assert (cwd / "demo" / "alpha0.25" / "summary.json").is_file()
