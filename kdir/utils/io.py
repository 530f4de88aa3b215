"""Atomic writes: a file is either absent, its old self, or complete; never half written.

Every writer stages its bytes in a temporary file next to the destination (:func:`temp_path`: a hidden,
per-process unique name in the same folder, so ``os.replace`` is a rename on one file system), flushes
and fsyncs it, and publishes it with ``os.replace``. On an error the temporary file is removed. Folders
that must appear complete (stores, the quickstart) are staged under a :func:`temp_path` name too and
renamed into place (:func:`build_folder` for folders built once).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from uuid import uuid4

if TYPE_CHECKING:
    import numpy as np

__all__ = ["atomic_write", "build_folder", "save_json", "save_npy", "save_text", "stage_file", "temp_path"]


def temp_path(path: str | Path) -> Path:
    """A unique temporary name next to ``path``: ``<folder>/.<name>.<pid>-<random>.tmp``."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}-{uuid4().hex[:8]}.tmp"


def stage_file(path: str | Path, write: Callable[[IO], Any], mode: str = "wb", encoding: str = "utf-8") -> Path:
    """Write a temporary file next to ``path`` with ``write(f)``, fsync it, and return its name (not published).

    For writers that choose the final name only once the data is safely on disk (``os.replace(tmp, final)``).
    On an error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """Open ``path`` for writing atomically: the file appears complete when the block ends without error.

    Args:
        path: the destination; its folder is created if needed.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        encoding: of text modes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def save_json(obj: Mapping | list, path: str | Path, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically; returns ``path``."""
    return save_text(json.dumps(obj, indent=indent) + "\n", path)


def save_npy(arr: np.ndarray, path: str | Path) -> Path:
    """Write ``arr`` in ``.npy`` format (no pickles) to ``path`` atomically; returns ``path``."""
    import numpy as np

    with atomic_write(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    return Path(path)


def build_folder(path: str | Path, build: Callable[[Path], Any]) -> Path:
    """Build the folder ``path`` once, atomically: ``build(tmp)`` fills a :func:`temp_path` sibling, which is then
    renamed to ``path``. If another process published ``path`` first, its folder is kept. The temporary folder
    never outlives the call (a failed build leaves nothing behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def texts_xxh64(texts: Iterable[str]) -> str:
    """xxh64 of texts in order, each UTF-8 and ``\\0``-terminated: a fingerprint of a corpus's ids or texts."""
    import xxhash

    digest = xxhash.xxh64()
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()
