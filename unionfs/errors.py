"""Errors that end a command with a one-line message and a documented exit code.

Exit codes used by every `unionfs` subcommand:

* 0 -- success
* 1 -- the operation failed (bad layer, busy mountpoint, network error, ...)
* 2 -- the command line could not be parsed
"""


class UnionfsError(Exception):
    """A failure the user can act on; printed as one line, never with a traceback."""

    exit_code = 1


class UsageError(UnionfsError):
    """The command line is malformed."""

    exit_code = 2
