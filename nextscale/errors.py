"""Errors a user causes and can fix, told apart from bugs.

A :class:`UserError` is a mistake in what the user gave: a config, a path, credentials, a file that is
not what its key says. Its message names the thing and the fix. ``nextscale`` prints it on one line
and exits with status 2, without a traceback unless ``--debug`` or ``NEXTSCALE_DEBUG=1`` asks for one;
every other exception is a bug and keeps its traceback. The errors of the packages (ConfigError,
InputError, ShardError, CheckpointMismatch...) derive from it.
"""

from __future__ import annotations

import os

DEBUG_ENV = "NEXTSCALE_DEBUG"


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it."""


class NotFound(UserError, FileNotFoundError):
    """A location the user named (a checkpoint, a reference, an input) does not exist."""


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` may not happen on a retry: storage or network trouble (a timeout, a refused or reset
    connection, a failed read), not a user's mistake nor a file that is missing or forbidden."""
    deterministic = (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    return isinstance(error, OSError) and not isinstance(error, deterministic)


def find_user_error(error: BaseException) -> UserError | None:
    """The UserError behind ``error``: itself, or one it was raised from (Ray wraps a worker's errors)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
