"""Errors that tell the user what is wrong with their input, and where.

Every command exits with status 2 and one line on a :class:`KdirError` (a bad file, option or path); any
other exception is a bug and is reported with its traceback. The subclasses that also derive from a
built-in exception (``ValueError``, ``FileNotFoundError``, ...) keep ``except`` clauses written for the
built-in working.
"""

from __future__ import annotations

from pathlib import Path


class KdirError(Exception):
    """Base class of every error kdir raises on bad input or configuration."""


class ConfigError(KdirError, ValueError):
    """A setting or an option has a value kdir cannot use (wrong type, out of range, unknown choice)."""


class MissingFileError(KdirError, FileNotFoundError):
    """A file or folder named by the configuration does not exist (or is not what it should be)."""


class OutputExistsError(KdirError, FileExistsError):
    """An output path is taken and may not be replaced."""


class UnknownNameError(KdirError, KeyError):
    """A name given in the configuration (a dataset id, ...) is not known."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


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


class NonFiniteError(KdirError):
    """A teacher score or the training loss is not a finite number: training stops before using it."""


class NonFiniteScoreError(NonFiniteError, ValueError):
    """A score given to a store is NaN, infinite or beyond float32's range (stores hold finite float32 scores)."""


class DamagedStoreError(KdirError):
    """A file of a store does not match what was recorded when it was written (truncated, or bytes changed)."""
