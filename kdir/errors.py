"""Errors that tell the user what is wrong with their input, and where."""

from __future__ import annotations

from pathlib import Path


class KdirError(Exception):
    """Base class of every error kdir raises on bad input or configuration."""


class DataFormatError(KdirError):
    """A line of an input file does not have the expected format.

    The message names the file, the 1-based line number and what was expected, so the
    user can open the file at the right place.
    """

    def __init__(self, path: str | Path, line: int | None, expected: str, got: str | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        msg = f"{where}: expected {expected}"
        if got is not None:
            shown = got if len(got) <= 120 else got[:117] + "..."
            msg += f", got {shown!r}"
        super().__init__(msg)
        self.path, self.line = str(path), line


class UnknownIdError(KdirError):
    """An id referenced by one file (qrels, run, triples, scores) is missing from the store it points into."""


class EmptySplitError(KdirError):
    """A split, a file or a selection holds no usable rows."""
