"""What every ``unionfs`` command shares to read its arguments: one parser base, one
splitter of backslash-escaped option strings.

A malformed command line is a :class:`~unionfs.errors.UsageError` (exit code 2, one line),
never argparse's own exit.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from unionfs.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a malformed command line as one :class:`UsageError` line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def split_escaped(value: str, sep: str, unescape: bool) -> list[str]:
    r"""Split on ``sep``; a backslash escapes the next character (dropped if ``unescape``).

    Empty parts are dropped. This is the one reader of the fuse-overlayfs option syntax:
    ``-o`` strings split on ``,`` keeping ``\,`` for the option (:func:`split_options`),
    ``lowerdir=`` values on ``:`` with ``\:`` a literal colon (:func:`split_lowerdir`).
    """
    parts: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            current.append(nxt if unescape else ch + nxt)
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p]


def unescape(value: str) -> str:
    r"""Drop the backslash of each escape (``\,`` kept by :func:`split_options`)."""
    return "".join(split_escaped(value, "\0", unescape=True))


def split_lowerdir(value: str) -> list[str]:
    r"""Split a ``lowerdir=`` value on ``:``; ``\:`` is a literal colon (and ``\\`` a backslash).

    Empty parts are dropped: the kernel and fuse-overlayfs read ``::`` as a data-only separator.
    """
    return split_escaped(value, ":", unescape=True)


def split_options(value: str) -> list[str]:
    r"""Split a ``-o`` string on commas, keeping ``\,`` (and every escape) for the option."""
    return split_escaped(value, ",", unescape=False)
