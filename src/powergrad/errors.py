"""The two ways a run ends badly that are not bugs: the user's input, or divergence."""

from __future__ import annotations


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
