"""The command line: parses, builds a config, calls the Python API. No work of its own.

    powergrad train [RECIPE] [key=value ...] [--out DIR] [--overwrite]
    powergrad config [RECIPE] [key=value ...] [--out DIR]
    powergrad eval --checkpoint PATH [key=value ...]
    powergrad recipes [NAME]
    powergrad demo [--out DIR]
    powergrad sweep RECIPE key=v1,v2 ... --out DIR [--seeds N] [--workers N] [--storage URL] [--prune]
    powergrad report PATH ... [--format md|csv|json|html] [--out FILE] [--pick KEY ...]
    powergrad plot PATH ... [--out DIR]
    powergrad cache [list|clear]
    powergrad kernel [where|build]

User errors print one line on stderr and exit 2; divergence exits 3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .cache import CACHE_ENV, cache_dir, clear_cache, list_cache
from .config import (
    BOUNDS,
    Config,
    _parse_overrides,
    describe_recipe,
    field_groups,
    field_info,
    list_recipes,
    load_config,
    warnings_for,
)
from .errors import ONCE_DIR_ENV, DivergenceError, PeerFailedError, UserError, print_once
from .preflight import check_paths
from .rundir import (
    BEST,
    LAST,
    hold_folder_or_none,
    new_run_name,
    refuse_to_replace,
    run_folder_of,
    teed_output,
)


class _Parser(argparse.ArgumentParser):
    # An epilog built only when help is shown: `train`'s listing of every key.
    lazy_epilog: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.lazy_epilog is not None:
            self.epilog = self.lazy_epilog()
        return super().format_help()

    def error(self, message: str) -> NoReturn:  # one line, exit 2, as every user error
        # main() prints "powergrad: error: "; name the sub-command only ("eval: ...").
        command = self.prog.removeprefix("powergrad").strip()
        raise UserError(f"{command}: {message}" if command else message)


def _unrecognised(extra: list[str], argv: list[str], command: str) -> UserError:
    """Options argparse does not know. ``--epochs 1`` (timm's habit) is a recipe key: say how
    to write it (``epochs=1``)."""
    keys = {i.name for i in field_info()}
    for tok in extra:
        name, eq, value = tok.lstrip("-").partition("=")
        key = name.replace("-", "_")
        if tok.startswith("--") and key in keys:
            if not eq and tok in argv:
                i = argv.index(tok)
                value = (
                    argv[i + 1]
                    if i + 1 < len(argv) and not argv[i + 1].startswith("-")
                    else "VALUE"
                )
            return UserError(
                f"{command}: unrecognised option {tok}: recipe keys are written key=value; "
                f"did you mean `{key}={value}`?"
            )
    return UserError(f"{command}: unrecognised arguments: {' '.join(extra)}")


def _split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    recipe = None
    overrides = []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif recipe is None:
            recipe = a
        else:
            raise UserError(f"unexpected argument {a!r}: give one recipe, then key=value overrides")
    return recipe, overrides


def _warn(cfg) -> None:
    """Settings allowed but rarely meant: one warning line each, from the first process only."""
    if os.environ.get("RANK", "0") == "0":
        for line in warnings_for(cfg):
            logging.getLogger("powergrad").warning("warning: %s", line)


def _keys(ns: argparse.Namespace) -> tuple[str | None, dict[str, str]]:
    recipe, overrides = _split_recipe(ns.args)
    return recipe, dict(_parse_overrides(overrides))  # refuses a key given twice


def _reads_checkpoint(keys: dict[str, str]) -> bool:
    """resume= and init_from= read a checkpoint (so torch) to know the config."""
    return bool(keys.get("resume") or keys.get("init_from"))


def _print_start(cfg, folder: Path | None) -> None:
    """Before the heavy imports: where the run goes, and what differs from the defaults."""
    if folder is not None:
        print(f"run folder: {folder}", flush=True)
    defaults, now = Config().to_dict(), cfg.to_dict()
    changed = [
        f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
        for k, v in now.items()
        if k not in ("monitor", "description") and v != defaults[k]
    ]
    changed += [
        f"monitor.{k}={v}" for k, v in now["monitor"].items() if v != defaults["monitor"][k]
    ]
    print(
        textwrap.fill(
            "settings (besides the defaults): " + (" ".join(changed) or "none"),
            width=100,
            subsequent_indent="  ",
        ),
        flush=True,
    )


def cmd_train(ns: argparse.Namespace) -> int:
    """Hold the run folder, plan the start once (engine/resume.py: plan_start), train."""
    recipe, keys = _keys(ns)
    cfg = None
    if not _reads_checkpoint(keys):  # the config, before the heavy imports
        cfg = load_config(recipe, keys)
        if ns.out is None:  # named now: the first thing printed, one name for all ranks
            ns.out = str(Path("runs") / new_run_name(cfg.model, cfg.dataset, cfg.alpha))
        if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return _relaunch_with_torchrun(cfg.nproc, ns)  # the processes it starts say the rest
    nproc = 0
    with hold_folder_or_none(run_folder_of(keys.get("resume"), ns.out)):
        if cfg is not None:
            # plan_start makes this same refusal after the heavy imports; made here too, a
            # refused start prints nothing on stdout (no "run folder:" for a run that never was)
            refuse_to_replace(ns.out, ns.overwrite)
            _announce(cfg, Path(ns.out))
        from .engine.resume import plan_start  # the heavy imports (torch, timm) start here

        plan = plan_start(cfg or recipe, {} if cfg else keys, ns.out, overwrite=ns.overwrite)
        if plan.cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
            nproc = plan.cfg.nproc  # relaunched below, once this process holds nothing
        else:
            if cfg is None:
                _announce(plan.cfg, plan.run_path)
            from .workflows import train  # the [train] extra, as plan_start above

            result = train(plan=plan)
            if result.run_dir is not None:
                print(f"run directory: {result.run_dir}")
            return 0
    return _relaunch_with_torchrun(nproc, ns)  # each process it starts plans its own start


def _announce(cfg, folder: Path) -> None:
    _RUN_FOLDER.append(folder)
    if os.environ.get("RANK", "0") == "0":
        _print_start(cfg, folder)
    _warn(cfg)


def cmd_config(ns: argparse.Namespace) -> int:
    """A dry run: the resolved config as YAML (a recipe to feed back), then what was checked."""
    recipe, keys = _keys(ns)
    if _reads_checkpoint(keys):
        from .engine.resume import plan_start  # torch and timm: the [train] extra

        cfg = plan_start(recipe, keys, ns.out).cfg
    else:
        cfg = load_config(recipe, keys)
    found = check_paths(cfg)
    _warn(cfg)
    print(cfg.to_yaml(), end="")
    for line in found:
        print(f"# checked: {line}")
    return 0


def _relaunch_with_torchrun(nproc: int, ns: argparse.Namespace) -> int:
    """``nproc=K``: the same command under torchrun on this machine (K processes)."""
    from .engine.distributed import launch_local  # torch.distributed: the [train] extra

    argv = ["train", *(a for a in ns.args if not a.startswith("nproc="))]
    argv += ["--out", ns.out] if ns.out else []
    argv += ["--overwrite"] if ns.overwrite else []
    return launch_local(nproc, argv)


def cmd_eval(ns: argparse.Namespace) -> int:
    from .workflows import evaluate  # torch, timm, the data and models: the [train] extra

    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON alone, for a pipe
        result = evaluate(ns.checkpoint, ns.args)
    print(json.dumps(result))
    return 0


def cmd_recipes(ns: argparse.Namespace) -> int:
    if ns.name:
        print("\n".join(describe_recipe(ns.name)))
        return 0
    recipes = list_recipes()
    width = max(map(len, recipes), default=0)
    for name, desc in recipes.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo  # the [train] extra: imported by the commands that need it only

    run_demo(out=ns.out, epochs=ns.epochs)
    return 0


def cmd_sweep(ns: argparse.Namespace) -> int:
    from .sweep import format_result, parse_grid, run_sweep  # the [sweep] extra: as run_demo

    recipe, axes, fixed = parse_grid(ns.args)
    result = run_sweep(
        recipe,
        axes,
        ns.out,
        seeds=ns.seeds,
        fixed=fixed,
        workers=ns.workers,
        storage=ns.storage,
        prune=ns.prune,
    )
    print(format_result(result))
    return 0


def _pick_results(ns: argparse.Namespace) -> list[Any]:
    from .report.pick import load_picks, parse_alphas, parse_seeds  # the [plot] extra

    return load_picks(
        ns.paths,
        ns.pick,
        ns.pick_on,
        parse_seeds(ns.pick_seeds) if ns.pick_seeds else None,
        parse_seeds(ns.test_seeds) if ns.test_seeds else None,
        parse_alphas(ns.alphas) if ns.alphas else None,
        warn=ns.format != "md",  # Markdown carries its warnings; csv, json and html log them
    )


def cmd_report(ns: argparse.Namespace) -> int:
    if not ns.pick and (ns.pick_seeds or ns.test_seeds or ns.alphas or ns.pick_on != "val_acc"):
        raise UserError(
            "report: --pick-on, --pick-seeds, --test-seeds and --alphas need --pick KEY"
        )
    if ns.format == "html":  # one file, figures and all: its path is what is printed
        from .report.html import pick_tables, write_html_report  # the [plot] extra: as run_demo

        tables = pick_tables(_pick_results(ns)) if ns.pick else []
        print(write_html_report(ns.paths, ns.out, tables))
        return 0
    if ns.pick:
        from .report.pick import format_pick  # the [plot] extra: as run_demo

        text = format_pick(_pick_results(ns), ns.format)
    else:
        from .report.tables import report  # the [plot] extra: as run_demo

        text = report(ns.paths, ns.format)
    if ns.out:
        Path(ns.out).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    from .report.figures import make_figures  # the [plot] extra: as run_demo

    for path in make_figures(ns.paths, ns.out):
        print(path)
    return 0


def cmd_cache(ns: argparse.Namespace) -> int:
    folder = cache_dir()
    if ns.action == "clear":
        n, freed = clear_cache(folder)
        print(f"removed {n} cached splits ({freed / 1024**2:.1f} MB) from {folder}")
        return 0
    entries = list_cache(folder)
    for e in entries:
        print(e.line())
    total = sum(e.bytes for e in entries) / 1024**2
    print(
        f"{folder}: {len(entries)} cached splits, {total:.1f} MB (move it with {CACHE_ENV}=DIR; "
        "empty it with `powergrad cache clear`)"
    )
    return 0


def cmd_kernel(ns: argparse.Namespace) -> int:
    from .kernels import (  # torch: kept out of every other command's start
        ENV_DIR,
        build_cpu_kernel,
        build_failure,
        is_built,
        library_path,
    )

    if ns.action == "where":
        library = library_path()
        state = "built" if is_built(library) else "not built yet"
        print(f"{library} ({state}; move it with {ENV_DIR}=DIR)")
        return 0
    try:
        library, compiled = build_cpu_kernel()
    except Exception as exc:  # no compiler, no ninja, a read-only folder: the user's to fix
        raise UserError(f"kernel build: the C++ op cannot be built: {build_failure(exc)}") from None
    print(f"{'built' if compiled else 'already built'}: {library}")
    return 0


def _type_name(tp) -> str:
    """int, float?, list[int]?: a key's type as a user writes it (? = may be null)."""
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else tp
    name = (
        getattr(base, "__name__", str(base))
        if not typing.get_args(base)
        else str(base).replace("typing.", "")
    )
    return f"{name}?" if optional else name


def keys_help() -> str:
    """Every recipe key by group, one line each: key=default, type, help (from the fields)."""
    lines = [
        "recipe keys (key=value after the recipe; monitor.NAME=value for the nested ones;",
        "? = may be null; `powergrad config RECIPE key=value ...` prints the resolved config):",
    ]
    for group, infos in field_groups().items():
        lines.append(f"\n{group}:")
        for i in infos:
            if i.name == "monitor":
                continue  # its keys follow as monitor.*
            default = (
                '""'
                if i.default == ""
                else "{}"
                if i.default == {}
                else (
                    "null"
                    if i.default is None
                    else str(i.default).lower()
                    if isinstance(i.default, bool)
                    else str(i.default)
                )
            )
            extra = (
                f" [{'|'.join(i.choices)}]"
                if i.choices
                else (f" ({BOUNDS[i.bound][0]})" if i.bound else "")
            )
            lines.append(f"  {i.name + '=' + default:<34} {_type_name(i.type):<10} {i.help}{extra}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="powergrad", description="Softmax Gradient Tampering: train, evaluate, sweep, report."
    )
    p.add_argument("--version", action="version", version=f"powergrad {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train a recipe (YAML file or built-in name) with key=value overrides",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.lazy_epilog = keys_help
    t.add_argument("args", nargs="*", metavar="RECIPE|key=value")
    t.add_argument("--out", help="run directory (default: a new folder under runs/)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.set_defaults(fn=cmd_train)

    cf = sub.add_parser(
        "config",
        help="print the resolved config as YAML and check its paths; trains nothing",
        epilog="The keys are listed by `powergrad train --help`.",
    )
    cf.add_argument("args", nargs="*", metavar="RECIPE|key=value")
    cf.add_argument("--out", help="the run directory (for resume=auto)")
    cf.set_defaults(fn=cmd_config)

    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on its test split; prints JSON",
        description="Evaluate a checkpoint on its recipe's test split. Prints one JSON line "
        "({loss, top1, top5, n}) on stdout; progress goes to stderr.",
    )
    e.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help=f"a checkpoint file, or a run folder (its {BEST}, else {LAST})",
    )
    e.add_argument(
        "args",
        nargs="*",
        metavar="key=value",
        help="overrides of the checkpoint's config (e.g. data_dir=..., batch_size=...)",
    )
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser(
        "recipes", help="list the built-in recipes, or show one (what it is and what it sets)"
    )
    r.add_argument("name", nargs="?", metavar="NAME", help="a built-in recipe name or a YAML file")
    r.set_defaults(fn=cmd_recipes)

    d = sub.add_parser("demo", help="digits: alpha 1 against alpha 0.25, tables and curves")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=None)
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser(
        "sweep",
        help="grid over recipe keys (key=v1,v2) x seeds as an Optuna study; one run dir per trial",
    )
    s.add_argument(
        "args",
        nargs="+",
        metavar="RECIPE|key=v1,v2",
        help="a recipe, then keys: key=v1,v2 is swept (every combination is a grid point), "
        "key=v is fixed",
    )
    s.add_argument("--out", required=True, help="sweep folder (run dirs, study.db, sweep.json)")
    s.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="seeds per grid point (recipe seed, +1, ...; default %(default)s)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local worker processes sharing the sweep (default %(default)s)",
    )
    s.add_argument(
        "--storage", help="Optuna storage URL shared by several machines (default sqlite in --out)"
    )
    s.add_argument(
        "--prune", action="store_true", help="stop trials in the bottom quarter at an epoch early"
    )
    s.set_defaults(fn=cmd_sweep)

    rp = sub.add_parser(
        "report", help="the paper's table (mean ± std over seeds, Δ from alpha=1) from run dirs"
    )
    rp.add_argument(
        "paths", nargs="+", metavar="PATH", help="run directories or folders holding them"
    )
    rp.add_argument(
        "--format",
        choices=("md", "csv", "json", "html"),
        default="md",
        help="md (default), csv, json, or html: one self-contained page (table, verdicts, what "
        "was run, unfinished runs, figures) that opens offline",
    )
    rp.add_argument(
        "--out",
        help="write to this file (--format html: default PATH/report.html for one folder of runs, "
        "never inside a run folder; else stdout)",
    )
    rp.add_argument(
        "--pick",
        action="append",
        metavar="KEY",
        help="the fair comparison: for each alpha pick KEY's value (repeat for several keys) "
        "on validation, then compare each alpha at its pick with alpha=1 at its pick on test",
    )
    rp.add_argument(
        "--pick-on",
        default="val_acc",
        metavar="METRIC",
        help="what the pick maximises: val_acc (default) or val_loss (minimised); never test",
    )
    rp.add_argument(
        "--pick-seeds",
        metavar="SEEDS",
        help="pick on these seeds only, e.g. 0-9 (default: the seeds every value tried shares)",
    )
    rp.add_argument(
        "--test-seeds",
        metavar="SEEDS",
        help="compare on these seeds only, e.g. 10-29 (default: every seed both picks hold)",
    )
    rp.add_argument(
        "--alphas",
        metavar="A,B",
        help="with --pick: only these alphas, 1 among them (the Holm family is the alphas compared)",
    )
    rp.set_defaults(fn=cmd_report)

    pl = sub.add_parser("plot", help="the paper's figures (PNG) from run dirs")
    pl.add_argument(
        "paths", nargs="+", metavar="PATH", help="run directories or folders holding them"
    )
    pl.add_argument("--out", help="folder for the PNGs (default: PATH/figures)")
    pl.set_defaults(fn=cmd_plot)

    c = sub.add_parser(
        "cache",
        help="list or clear the decoded-image cache ($POWERGRAD_CACHE, else ~/.cache/powergrad)",
    )
    c.add_argument("action", choices=("list", "clear"), nargs="?", default="list")
    c.set_defaults(fn=cmd_cache)

    k = sub.add_parser(
        "kernel",
        help="the loss's C++ op for the CPU: where it is built, or build it now (ahead of the "
        "first step, for images and clusters)",
    )
    k.add_argument(
        "action",
        choices=("where", "build"),
        nargs="?",
        default="where",
        help="where: its path and whether it is built (the default); build: compile it if needed",
    )
    k.set_defaults(fn=cmd_kernel)
    return p


class _StdStreamHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout / sys.stderr is at the time (tests swap them)."""

    def __init__(self, name: str) -> None:
        super().__init__(getattr(sys, name))
        self.stream_name = name

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self.stream_name)
        super().emit(record)


def _configure_logging() -> None:
    """Progress (INFO) goes to stdout with the epoch lines; warnings and errors to stderr, so a
    run that fails on the user's input prints exactly one line there."""
    logger = logging.getLogger("powergrad")
    if any(isinstance(h, _StdStreamHandler) for h in logger.handlers):
        return
    info, warn = _StdStreamHandler("stdout"), _StdStreamHandler("stderr")
    info.addFilter(lambda r: r.levelno < logging.WARNING)
    warn.setLevel(logging.WARNING)
    for h in (info, warn):
        h.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(h)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    with teed_output():  # what is printed also goes to the run folder's log, once open
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        ns, extra = build_parser().parse_known_args(argv)
        if extra:
            raise _unrecognised(extra, argv, ns.command)
        code = ns.fn(ns)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except UserError as e:
        if not (
            isinstance(e, PeerFailedError) and os.environ.get(ONCE_DIR_ENV)
        ):  # nproc=K: the launcher sees every exit
            print_once(f"powergrad: error: {_one_line(e)}")
        return 2
    except DivergenceError as e:
        print_once(f"powergrad: {_one_line(e)}")
        return 3
    except BrokenPipeError:
        # The reader went away (`powergrad recipes | head -1`): stop quietly, as a command killed
        # by SIGPIPE does; point stdout at /dev/null so that Python's flush at exit stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # a disk or path the user can fix, raised outside the checked places
        where = f"{e.filename}: " if e.filename else ""
        print(f"powergrad: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"powergrad: interrupted{_kept(_RUN_FOLDER)}", file=sys.stderr)
        return 130


_RUN_FOLDER: list[Path] = []  # the folder of the run this command trains into, once named


def _kept(folders: list[Path]) -> str:
    """What an interrupted run leaves: its checkpoint, and the command that continues it."""
    if not folders:
        return ""
    run = folders[-1]
    if not (run / LAST).is_file():
        return f"; {run} holds no checkpoint yet (the first is saved at the end of epoch 1)"
    return (
        f"; the last checkpoint is kept: {run / LAST} (continue with "
        f"`powergrad train resume=auto --out {run}`)"
    )


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
