"""The two ways a run ends badly that are not bugs: the user's input, or divergence; and how
their one line reaches stderr."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

ONCE_DIR_ENV = "POWERGRAD_ONCE_DIR"  # set by nproc=K (engine.distributed.launch_local)


class UserError(Exception):
    """Something the user can fix: a recipe, key, value, data set, checkpoint or path.

    The CLI prints ``str(error)`` as one line on stderr and exits with code 2.
    """

    exit_code = 2


class DivergenceError(Exception):
    """Training produced a non-finite loss. The CLI exits with code 3."""

    exit_code = 3


class PeerFailedError(UserError):
    """Another process of a distributed run stopped under a collective; its own message says why.

    Under ``nproc=K`` the launcher knows every worker's exit, so this echo is not printed.
    """


class MissingExtraError(UserError, ImportError):
    """A part of powergrad whose optional dependencies are not installed.

    An ``ImportError`` for code that guards imports, and a :class:`UserError` for the CLI (one
    line, exit 2). The message names the ``pip install`` command that brings the part.
    """

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"no module named {module!r} ({EXTRAS[extra]}): pip install 'powergrad[{extra}]'"
        )
        self.module, self.extra = module, extra


# The extras of pyproject.toml, each a superset of the ones below it: postgres > sweep > train > plot.
EXTRAS = {
    "plot": "reports and figures need it",
    "train": "the trainer needs it",
    "sweep": "sweeps need it",
    "postgres": "sweeps on PostgreSQL need it",
}


@contextmanager
def extra(name: str) -> Iterator[None]:
    """Imports inside this block come with ``pip install 'powergrad[NAME]'``; a missing one
    raises :class:`MissingExtraError` naming that command.

    Blocks nest from the outside in (the sweep imports the trainer): the outermost names the
    extra, as each extra includes the ones it builds on.
    """
    try:
        yield
    except MissingExtraError as e:
        raise MissingExtraError(e.module, name) from e
    except ModuleNotFoundError as e:
        if not e.name or e.name.split(".")[0] == "powergrad":
            raise  # our own module missing is a broken install, not a missing extra
        raise MissingExtraError(e.name.split(".")[0], name) from e


def print_once(line: str) -> None:
    """Print ``line`` to stderr, once per ``nproc=K`` run however many workers fail with it.

    Workers started by ``launch_local`` share a folder; the first to create a file named after
    the line prints it (O_EXCL makes that atomic). Different lines all print. Elsewhere (one
    process, plain torchrun) every process prints its own.
    """
    folder = os.environ.get(ONCE_DIR_ENV)
    if folder:
        name = hashlib.sha1(line.encode()).hexdigest()[:16]
        try:
            os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        except OSError:
            pass  # the folder is gone: print rather than lose the line
    print(line, file=sys.stderr)
