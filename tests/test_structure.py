"""The package's structure: no import cycle, no module importing one above it, and a run
folder's file names spelt in one module only (rundir)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import powergrad
from powergrad import rundir

SRC = Path(powergrad.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The powergrad modules ``path`` imports, at its top or inside functions alike."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("powergrad")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").startswith("powergrad"):
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import workflows` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    """Every import counts, the lazy ones inside functions too (an import cycle deferred into a
    function is still two modules that need each other)."""
    graph = _graph()
    assert "powergrad.engine.loop" in graph and graph["powergrad.workflows"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _below(graph: dict[str, set[str]], package: str) -> set[str]:
    """Every powergrad module that the modules of ``package`` import, directly."""
    return {n for m, ns in graph.items() if m == package or m.startswith(package + ".") for n in ns}


def test_no_module_imports_one_above_it():
    """The engine knows nothing of the workflows above it; report (the [plot] extra) reads run
    folders without the trainer: no engine, models, data or workflows (timm, torchvision)."""
    graph = _graph()
    above_engine = {"powergrad.workflows", "powergrad.probe", "powergrad.sweep", "powergrad.cli"}
    assert not _below(graph, "powergrad.engine") & above_engine
    trainer = ("powergrad.engine", "powergrad.models", "powergrad.data", "powergrad.workflows")
    assert not {m for m in _below(graph, "powergrad.report") if m.startswith(trainer)}


def _with_line(tree: ast.AST, node: ast.stmt) -> int | None:
    """The line of the ``with extra(...)`` block that holds ``node``, if one does."""
    for w in ast.walk(tree):
        if isinstance(w, ast.With) and any(node is s for s in ast.walk(w)) and w is not node:
            return w.lineno
    return None


def test_an_import_inside_a_function_says_why():
    """Imports go at the top, except where an optional extra (or a cost) needs them deferred:
    such an import says why, on its line or on its ``with extra(...)`` line."""
    silent = []
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                with_line = _with_line(fn, node)
                said = "#" in lines[node.lineno - 1] or (
                    with_line is not None and "#" in lines[with_line - 1]
                )
                if not said:
                    silent.append(f"{name}:{node.lineno}")
    assert silent == []


# A run folder's file names, as written out: rundir.py names them (CONFIG, SUMMARY, LAST,
# epoch_file, ...) and every other module goes through its constants, in code, messages and
# docstrings alike. Whole names only: the report's figures (loss_curves.png) and timm's
# checkpoints (model_best.pth.tar) are not run files.
_RUN_FILE_NAME = re.compile(
    r"\b(?:config\.yaml|metrics\.csv|summary\.json|last\.pt|best\.pt|train\.log|curves\.png"
    r"|filter_norms\.npz|epoch[0-9N]\.pt)\b|\bepoch\{|\.lock\b"
)


def test_a_run_file_is_named_in_rundir_only():
    """One home for each run file's name: renaming one is a change to rundir.py alone."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        if name == "rundir.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _RUN_FILE_NAME.search(line):
                found.append(f"{name}:{n}: {line.strip()}")
    assert found == [], "run file names outside rundir.py:\n" + "\n".join(found)


def test_the_run_file_search_finds_each_name():
    """The search above would see each name rundir gives, so its silence means something."""
    names = [rundir.CONFIG, rundir.METRICS, rundir.SUMMARY, rundir.LAST, rundir.BEST]
    names += [rundir.TRAIN_LOG, rundir.CURVES, rundir.FILTER_NORMS, rundir.LOCK]
    names += [rundir.epoch_file(3), rundir.epoch_file("N"), "epoch{N}.pt"]
    assert [n for n in names if not _RUN_FILE_NAME.search(f"see RUN/{n} here")] == []
    assert not _RUN_FILE_NAME.search("loss_curves.png, model_best.pth.tar")
