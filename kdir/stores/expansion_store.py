"""Per-query expansion embeddings ("collective knowledge", CollectiveKD: Kim, Kim & Hwang, NAACL 2022).

Each training query keeps ``k`` expansion vectors (k-means centroids of its feedback documents' ColBERT token
embeddings, not renormalised), their weights ``β·idf`` and the token each centroid stands for. Queries are keyed
by the xxh64 hash of their id (:func:`kdir.stores.keys.id_hashes`), so a store serves any dataset with those ids.

Layout (written to a temporary folder, :func:`kdir.utils.io.temp_path`, then renamed into place, so a store is
visible complete or not at all)::

    <store>/meta.json      format, key scheme, provenance (teacher, settings), n_queries, k, dim
    <store>/keys.npy       uint64 [Q] query-id hashes, sorted, unique
    <store>/vectors.npy    float32 [Q, k, dim] expansion vectors (row i belongs to keys[i])
    <store>/weights.npy    float32 [Q, k] weights (0 in padded slots)
    <store>/tokens.json    [[token, ...] * Q]: k token strings per query ("" in padded slots)

The arrays are memory-mapped on :meth:`ExpansionStore.open`; :meth:`ExpansionStore.lookup` gives queries that
are not stored zero vectors and zero weights (the paper: a query without feedback is plain self-KD).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from kdir.errors import DataFormatError, KdirError, MissingFileError, OutputExistsError
from kdir.utils.io import save_json, save_npy, temp_path

FORMAT = "kdir-expansion-store/1"
KEY_SCHEME = "xxh64-id/1"  # kdir.stores.keys.id_hashes
_META, _KEYS, _VECTORS, _WEIGHTS, _TOKENS = "meta.json", "keys.npy", "vectors.npy", "weights.npy", "tokens.json"
_MANAGED = ("format", "key", "n_queries", "k", "dim", "created", "kdir_version")


def _check_arrays(keys: np.ndarray, vectors: np.ndarray, weights: np.ndarray, tokens: Sequence[Sequence[str]]) -> None:
    """Raise :class:`KdirError` unless the arrays describe ``Q`` queries with ``k`` expansions each."""
    if keys.dtype != np.uint64 or keys.ndim != 1:
        raise KdirError(
            f"expansion keys must be a 1-d uint64 array (kdir.stores.id_hashes), got {keys.dtype} {keys.shape}"
        )
    n = len(keys)
    if vectors.ndim != 3 or vectors.shape[0] != n:
        raise KdirError(f"expansion vectors must be [Q={n}, k, dim], got {vectors.shape}")
    if weights.shape != vectors.shape[:2]:
        raise KdirError(f"expansion weights must be [Q, k] = {vectors.shape[:2]}, got {weights.shape}")
    if len(tokens) != n or any(len(t) != vectors.shape[1] for t in tokens):
        raise KdirError(f"expansion tokens must be {n} lists of k={vectors.shape[1]} strings")
    if not (np.isfinite(vectors).all() and np.isfinite(weights).all()):
        raise KdirError("expansion vectors and weights must be finite")
    if n and (np.diff(np.sort(keys)) == 0).any():
        raise KdirError("expansion keys must be unique (one entry per query id)")


def check_writable(path: str | Path, overwrite: bool) -> None:
    """Raise :class:`FileExistsError` unless a store may be written at ``path`` (absent, empty, or ``overwrite``)."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not (path / _META).is_file():
        raise OutputExistsError(f"{path}: exists and is not an expansion store")
    if not overwrite:
        raise OutputExistsError(f"{path}: an expansion store exists (pass overwrite=True to replace it)")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an existing store there is replaced only if ``overwrite``."""
    if path.is_dir() and not any(path.iterdir()):
        os.replace(tmp, path)  # an empty folder is simply taken
    elif path.exists():
        check_writable(path, overwrite)
        old = temp_path(path)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


class ExpansionStore:
    """A read-only, memory-mapped expansion store (see the module docstring); open one with :meth:`open`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / _META
        if not meta_file.is_file():
            raise MissingFileError(
                f"{self.path}: not a kdir expansion store (no {_META}); build one with `python -m kdir.expand`"
            )
        self.meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
        for field, expected in (("format", FORMAT), ("key", KEY_SCHEME)):
            if self.meta.get(field) != expected:
                raise DataFormatError(meta_file, None, f"{field} {expected!r}", got=repr(self.meta.get(field)))
        self.keys = self._load(_KEYS, np.uint64, 1)
        self.vectors = self._load(_VECTORS, np.float32, 3)
        self.weights = self._load(_WEIGHTS, np.float32, 2)
        n, k, dim = self.meta["n_queries"], self.meta["k"], self.meta["dim"]
        for name, arr, shape in (
            (_KEYS, self.keys, (n,)),
            (_VECTORS, self.vectors, (n, k, dim)),
            (_WEIGHTS, self.weights, (n, k)),
        ):
            if arr.shape != shape:
                raise DataFormatError(self.path / name, None, f"shape {shape} (from {_META})", got=str(arr.shape))
        if n > 1 and not (self.keys[1:] > self.keys[:-1]).all():
            raise DataFormatError(self.path / _KEYS, None, "sorted unique uint64 keys")
        self._tokens: list[list[str]] | None = None

    def _load(self, name: str, dtype: type, ndim: int) -> np.ndarray:
        arr = np.load(self.path / name, mmap_mode="r")
        if arr.dtype != dtype or arr.ndim != ndim:
            raise DataFormatError(
                self.path / name, None, f"a {ndim}-d {np.dtype(dtype)} array", got=f"{arr.dtype} {arr.shape}"
            )
        return arr.view(np.ndarray)

    # -- writing / opening -----------------------------------------------------------------------------

    @classmethod
    def write(
        cls,
        path: str | Path,
        keys: np.ndarray,
        vectors: np.ndarray,
        weights: np.ndarray,
        tokens: Sequence[Sequence[str]],
        meta: Mapping[str, Any],
        overwrite: bool = False,
    ) -> ExpansionStore:
        """Write a store atomically and open it.

        Args:
            keys: ``uint64 [Q]`` query-id hashes (any order; rows are sorted by key on disk).
            vectors / weights: ``[Q, k, dim]`` / ``[Q, k]`` (stored as float32).
            tokens: ``Q`` lists of ``k`` token strings.
            meta: provenance (``teacher``, ``fb_docs``, ``fb_clusters``, ``beta``, ``mode``, ...); the store adds
                ``format``, ``key``, ``n_queries``, ``k``, ``dim``, ``created``.
            overwrite: replace an existing store at ``path``.
        """
        path = Path(path)
        keys = np.asarray(keys)
        vectors, weights = np.asarray(vectors, dtype=np.float32), np.asarray(weights, dtype=np.float32)
        _check_arrays(keys, vectors, weights, tokens)
        if reserved := sorted(set(meta) & set(_MANAGED)):
            raise ValueError(f"meta fields {reserved} are managed by the expansion store")
        order = np.argsort(keys, kind="stable")
        from kdir import __version__

        full = {"format": FORMAT, "key": KEY_SCHEME, **json.loads(json.dumps(dict(meta)))}
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        full |= {"n_queries": len(keys), "k": vectors.shape[1], "dim": vectors.shape[2]}
        full |= {"created": created, "kdir_version": __version__}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        tmp.mkdir()
        try:
            save_npy(np.ascontiguousarray(keys[order]), tmp / _KEYS)
            save_npy(np.ascontiguousarray(vectors[order]), tmp / _VECTORS)
            save_npy(np.ascontiguousarray(weights[order]), tmp / _WEIGHTS)
            save_json([list(tokens[i]) for i in order], tmp / _TOKENS, indent=None)
            save_json(full, tmp / _META)  # last: marks it complete
            _publish(tmp, path, overwrite)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> ExpansionStore:
        """Open an existing store (memory-mapped); :class:`FileNotFoundError` if ``path`` is not one."""
        return cls(path)

    def __getstate__(self) -> dict[str, Any]:  # dataloader workers reopen the memory maps instead of copying them
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    # -- reading ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"ExpansionStore({str(self.path)!r}, queries={len(self)}, k={self.meta['k']}, dim={self.meta['dim']})"

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Row of each query-id hash in the store, ``-1`` where it is not stored."""
        wanted = np.asarray(keys)
        if wanted.dtype != np.uint64:
            raise TypeError(
                f"expansion lookups need uint64 query-id hashes (kdir.stores.id_hashes), got {wanted.dtype}"
            )
        if not len(self.keys):
            return np.full(wanted.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        return np.where(self.keys[pos] == wanted, pos, -1)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [B, k, dim], weights [B, k])`` float32 of ``keys [B]``; zeros for queries not stored."""
        rows = self.rows(keys).reshape(-1)
        hit = np.flatnonzero(rows >= 0)
        vectors = np.zeros((len(rows), self.k, self.dim), dtype=np.float32)
        weights = np.zeros((len(rows), self.k), dtype=np.float32)
        vectors[hit], weights[hit] = self.vectors[rows[hit]], self.weights[rows[hit]]
        return vectors, weights

    @property
    def tokens(self) -> list[list[str]]:
        """The ``k`` token strings of every stored query, in key order (read on first use)."""
        if self._tokens is None:
            file = self.path / _TOKENS
            tokens = json.loads(file.read_text(encoding="utf-8"))
            if len(tokens) != len(self) or any(len(t) != self.k for t in tokens):
                raise DataFormatError(file, None, f"{len(self)} lists of {self.k} token strings")
            self._tokens = tokens
        return self._tokens

    def lookup_tokens(self, keys: np.ndarray) -> list[list[str]]:
        """Token strings of ``keys [B]`` (an empty list for a query that is not stored)."""
        return [self.tokens[r] if r >= 0 else [] for r in self.rows(keys).reshape(-1).tolist()]
