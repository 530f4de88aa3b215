"""A folder of fp16 embeddings keyed by id hash: a corpus encoded to disk, or a frozen teacher's embeddings cached.

Layout::

    <store>/meta.json                             format, key scheme, dim, dtype, single/multi-vector, the encoder's
                                                  provenance, the side, the data (dataset, id count, id-list hash),
                                                  the layout (shards, chunk size); ``finished`` once complete
    <store>/shard-<r:05d>-of-<W:05d>/keys.npy     uint64 id hashes (:func:`kdir.stores.keys.id_hashes`), row order
    <store>/shard-.../vectors.fp16                raw little-endian fp16 ``[vectors, dim]``, appended chunk by chunk
    <store>/shard-.../lengths.int32               (multi-vector) vectors per document, row order
    <store>/shard-.../token_ids.int32             (multi-vector) the token id of each vector
    <store>/shard-.../progress.json               the finished chunks (rows, vectors, xxh64 of each file's bytes)
    <store>/shard-.../sorted_keys.npy, sorted_rows.npy   (finished shards) the keys sorted, and their rows

Rows are cut into chunks of ``chunk_size`` ids numbered over the whole id list, and shard ``r`` of ``W`` holds the
contiguous run of chunks ``[r K / W, (r + 1) K / W)`` (``K`` chunks in all). Contiguous shards keep the store's row
order the order of the ids (shard 0's rows, then shard 1's, ...) with no permutation to store, and since a chunk's
rows do not depend on ``W``, any number of processes writes the same chunks, so (on the same hardware and thread
count) the same bits.

A writer (:meth:`EmbeddingStore.writer`) appends one chunk's bytes to each file, fsyncs them, and then replaces
``progress.json`` atomically (:mod:`kdir.utils.io`): the record never names bytes that are not on disk. A writer
reopened after a kill truncates every file to what the record names (a chunk cut short is dropped) and goes on from
the next chunk. A shard is written by one process at a time (an advisory ``flock``); different shards by as many
processes as there are shards.

Readers memory-map the files (:meth:`EmbeddingStore.lookup`: random rows by key, through each shard's sorted keys
and ``np.searchsorted``) or read them a chunk at a time (:meth:`EmbeddingStore.chunks`, for building an index), so
memory stays bounded by one chunk whatever the corpus size. Opening checks every file's size against the progress
record (a short or missing file is a :class:`~kdir.errors.DamagedStoreError` naming it); :meth:`EmbeddingStore.verify`
re-hashes the chunks.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xxhash

from kdir.errors import (
    ConfigError,
    DamagedStoreError,
    DataFormatError,
    KdirError,
    MissingFileError,
    NonFiniteError,
    OutputExistsError,
    UnknownIdError,
)
from kdir.stores.keys import KEY_SCHEME
from kdir.stores.score_store import _npy_payload, sibling_store, teacher_differences
from kdir.utils.io import save_json, save_npy, stage_file

__all__ = ["EmbeddingStore", "IncompleteStoreError", "ShardWriter", "embedding_meta", "shard_layout"]

FORMAT = "kdir-embedding-store/1"
DTYPE = "float16"
Side = Literal["query", "doc"]
SIDES = ("query", "doc")
DEFAULT_CHUNK_SIZE = 65536
_META = "meta.json"
_PROGRESS = "progress.json"
_KEYS, _SORTED_KEYS, _SORTED_ROWS = "keys.npy", "sorted_keys.npy", "sorted_rows.npy"
_VECTORS, _LENGTHS, _TOKEN_IDS = "vectors.fp16", "lengths.int32", "token_ids.int32"
_LOCK = ".lock"
_REQUIRED = ("dim", "multi_vector", "side", "encoder", "data")
_MANAGED = ("format", "key", "dtype", "created", "finished", "vectors", "kdir_version")


class IncompleteStoreError(KdirError):
    """An embedding store whose encoding has not finished (a killed or running job): rerun it to finish."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def ids_digest(keys: np.ndarray) -> str:
    """xxh64 (hex) of an id list, over its uint64 id hashes in order (little-endian bytes)."""
    return xxhash.xxh64_hexdigest(np.ascontiguousarray(keys, dtype="<u8").tobytes())


def embedding_meta(
    encoder: Mapping[str, Any],
    side: Side,
    dim: int,
    multi_vector: bool,
    keys: np.ndarray,
    dataset: str = "",
    shards: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, Any]:
    """The ``meta`` of :meth:`EmbeddingStore.create` for the ids whose hashes are ``keys`` (in row order).

    ``encoder`` is :meth:`kdir.models.base.Scorer.provenance` (class, scoring settings, weights hash).
    """
    keys = np.asarray(keys, dtype=np.uint64)
    return {
        "dim": int(dim),
        "multi_vector": bool(multi_vector),
        "side": side,
        "encoder": dict(encoder),
        "data": {"dataset": dataset, "count": len(keys), "ids_xxh64": ids_digest(keys)},
        "shards": int(shards),
        "chunk_size": int(chunk_size),
    }


def shard_layout(count: int, chunk_size: int, shards: int, rank: int) -> tuple[int, int, list[tuple[int, int]]]:
    """``(first row, end row, [(chunk start, chunk end), ...])`` of shard ``rank`` of ``shards`` (global rows)."""
    n_chunks = -(-count // chunk_size)
    c0, c1 = rank * n_chunks // shards, (rank + 1) * n_chunks // shards
    chunks = [(c * chunk_size, min((c + 1) * chunk_size, count)) for c in range(c0, c1)]
    start = chunks[0][0] if chunks else min(c0 * chunk_size, count)
    return start, (chunks[-1][1] if chunks else start), chunks


def shard_name(rank: int, shards: int) -> str:
    return f"shard-{rank:05d}-of-{shards:05d}"


def _damaged(file: str | Path, what: str, store: Path) -> DamagedStoreError:
    return DamagedStoreError(
        f"{file}: {what}; the embedding store {store} is damaged: delete it (or the shard's folder) and rerun the "
        "encoding that wrote it"
    )


def _read_json(file: Path, store: Path) -> dict[str, Any]:
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _damaged(file, "unreadable JSON", store) from None
    if not isinstance(record, dict):
        raise _damaged(file, "not a JSON object", store)
    return record


def _npy_memmap(file: Path, dtype: Any, store: Path, rows: int | None = None) -> np.ndarray:
    """A 1-d ``.npy`` file memory-mapped, after checking its header and size (``rows``: the expected length)."""
    if not file.is_file():
        raise _damaged(file, "missing", store)
    try:
        got, shape, need = _npy_payload(file)
    except ValueError as e:
        raise _damaged(file, f"unreadable .npy header ({e})", store) from None
    if got != np.dtype(dtype) or len(shape) != 1:
        raise _damaged(file, f"a {got} array of shape {shape}, expected 1-d {np.dtype(dtype)}", store)
    if (size := file.stat().st_size) != need:
        raise _damaged(file, f"{size} bytes, but its header describes {need}", store)
    if rows is not None and shape[0] != rows:
        raise _damaged(file, f"{shape[0]} entries, but the shard has {rows} rows", store)
    if shape[0] == 0:
        return np.zeros(0, dtype=dtype)
    return np.load(file, mmap_mode="r").view(np.ndarray)


def _raw_memmap(file: Path, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not int(np.prod(shape)):
        return np.zeros(shape, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=shape).view(np.ndarray)


def _read_raw(file: Path, dtype: Any, start: int, count: int, width: int = 1) -> np.ndarray:
    """``count`` rows of ``width`` items from ``start`` of a raw file, read into a fresh array (no mapping)."""
    dtype = np.dtype(dtype)
    out = np.fromfile(file, dtype=dtype, count=count * width, offset=start * width * dtype.itemsize)
    if len(out) != count * width:
        raise DamagedStoreError(f"{file}: short read at row {start} ({len(out)} of {count * width} items)")
    return out.reshape(count, width) if width > 1 else out


def _parts(meta: Mapping[str, Any]) -> list[tuple[str, np.dtype, int, str]]:
    """``(file, dtype, items per row, counted by)`` of a shard's appended files (``rows`` or ``vectors``)."""
    parts = [(_VECTORS, np.dtype("<f2"), int(meta["dim"]), "vectors")]
    if meta["multi_vector"]:
        parts += [(_LENGTHS, np.dtype("<i4"), 1, "rows"), (_TOKEN_IDS, np.dtype("<i4"), 1, "vectors")]
    return parts


def _describe(encoder: Mapping[str, Any]) -> str:
    weights = str(encoder.get("weights") or "(no weights hash)")[:12]
    return f"{encoder.get('name', '(unnamed)')} {weights}"


@dataclass
class _Shard:
    """One shard as a reader sees it: its visible rows (finished chunks) and memory maps."""

    rank: int
    dir: Path
    start: int  # first global row
    rows: int
    n_vectors: int
    vector_start: int  # first global vector row
    finished: bool
    keys: np.ndarray  # uint64 [rows]
    vectors: np.ndarray  # fp16 [n_vectors, dim]
    lengths: np.ndarray | None  # int32 [rows]
    token_ids: np.ndarray | None  # int32 [n_vectors]
    _sorted: tuple[np.ndarray, np.ndarray] | None = None
    _offsets: np.ndarray | None = None

    def sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sorted keys, their local rows)``: the shard's files once finished, else sorted in memory."""
        if self._sorted is None:
            order = np.argsort(self.keys, kind="stable")
            self._sorted = np.asarray(self.keys[order]), order.astype(np.int64)
        return self._sorted

    def offsets(self) -> np.ndarray:
        """int64 ``[rows + 1]``: where each document's vectors start in the shard (multi-vector)."""
        if self._offsets is None:
            self._offsets = np.zeros(self.rows + 1, dtype=np.int64)
            np.cumsum(self.lengths, out=self._offsets[1:])
        return self._offsets


class EmbeddingStore:
    """fp16 embeddings of one side of a corpus (or of queries), keyed by id hash, in one folder of shards.

    Open one with :meth:`open` (a finished store; ``allow_incomplete=True`` shows the finished chunks of an
    unfinished one) or :meth:`create`; write it with :meth:`writer` (or :func:`kdir.retrieval.stream_encode.
    encode_into_store`). Single-vector stores hold one ``[dim]`` vector per id; multi-vector stores (ColBERT) hold
    each document's token vectors, flattened, with per-document lengths and token ids.

    Args:
        path: the store folder.
        allow_incomplete: open an unfinished store as far as it is written, instead of refusing it.
    """

    def __init__(self, path: str | Path, allow_incomplete: bool = False):
        self.path = Path(path)
        meta_path = self.path / _META
        if not meta_path.is_file():
            raise MissingFileError(f"{self.path}: not a kdir embedding store (no {_META})")
        self.meta = _read_json(meta_path, self.path)
        for field, expected in (("format", FORMAT), ("key", KEY_SCHEME), ("dtype", DTYPE)):
            if self.meta.get(field) != expected:
                raise DataFormatError(meta_path, None, f"{field} {expected!r}", got=repr(self.meta.get(field)))
        self.allow_incomplete = allow_incomplete
        self._shards = self._load_shards()
        if not allow_incomplete and not self.complete:
            todo = "; ".join(
                f"shard {s.rank}: {s.rows} of {self._layout(s.rank)[1] - self._layout(s.rank)[0]} rows"
                for s in self._shards
                if not s.finished
            )
            raise IncompleteStoreError(
                f"{self.path}: the encoding into this embedding store has not finished ({todo}); rerun the same "
                "encoding to finish it (it resumes at the last finished chunk)"
            )

    def __getstate__(self) -> dict[str, Any]:  # dataloader workers map the files again instead of copying them
        return {"path": str(self.path), "allow_incomplete": self.allow_incomplete}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["allow_incomplete"])

    # -- opening and creating ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, allow_incomplete: bool = False) -> EmbeddingStore:
        """Open a store; :class:`IncompleteStoreError` if its encoding has not finished unless allowed."""
        return cls(path, allow_incomplete)

    @classmethod
    def create(cls, path: str | Path, meta: Mapping[str, Any]) -> EmbeddingStore:
        """Create a store described by ``meta`` (:func:`embedding_meta`), or reopen the one there (to resume it).

        An existing store must match: another encoder (:func:`~kdir.stores.teacher_differences`), side, dimension
        or id list is refused with a sibling path to write to instead; an unfinished store started with another
        number of shards or chunk size is refused too (its chunks would not line up), a finished one is reused as it
        is. Safe to call from every rank at once.
        """
        path = Path(path)
        if missing := [k for k in _REQUIRED if k not in meta]:
            raise ValueError(f"embedding store meta lacks {missing}")
        if managed := sorted(set(meta) & set(_MANAGED)):
            raise ValueError(f"meta fields {managed} are managed by the store")
        given = json.loads(json.dumps(dict(meta), default=str))
        given.setdefault("shards", 1)
        given.setdefault("chunk_size", DEFAULT_CHUNK_SIZE)
        if given["side"] not in SIDES:
            raise ConfigError(f"side must be 'query' or 'doc', got {given['side']!r}")
        for field in ("dim", "shards", "chunk_size"):
            if not isinstance(given[field], int) or given[field] < 1:
                raise ConfigError(f"{field} must be an integer >= 1, got {given[field]!r}")
        if not (path / _META).is_file():
            if path.exists() and not path.is_dir():
                raise OutputExistsError(f"{path}: exists and is not a kdir embedding store")
            if path.is_dir() and any(p.name != _META for p in path.iterdir() if not p.name.startswith(".")):
                raise OutputExistsError(f"{path}: a folder that is not a kdir embedding store (no {_META})")
            from kdir import __version__

            full = {"format": FORMAT, "key": KEY_SCHEME, "dtype": DTYPE} | given
            full |= {"created": _now(), "finished": None, "kdir_version": __version__}
            tmp = stage_file(path / _META, lambda f: f.write((json.dumps(full, indent=2) + "\n").encode()))
            try:
                os.link(tmp, path / _META)  # publish unless another rank did first: then that one is compared
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        store = cls(path, allow_incomplete=True)
        store._check_same(given)
        return store

    def _check_same(self, given: Mapping[str, Any]) -> None:
        meta, path = self.meta, self.path
        self.check_provenance(given["encoder"], given["side"])
        differ = [
            f"{k} {meta.get(k)!r} -> {given[k]!r}"
            for k in ("dim", "multi_vector")
            if meta.get(k) != given[k]  # the same encoder gives the same shapes: only a hand-made meta differs
        ]
        old, new = meta.get("data", {}), given["data"]
        differ += [  # the ids are the data's identity; its name is a label (the splits of one corpus share a store)
            f"data.{k} {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted({*old, *new} - {"dataset"})
            if old.get(k) != new.get(k)
        ]
        if differ:
            raise OutputExistsError(
                f"{path} holds embeddings of other data ({'; '.join(differ)}): encode into a new store, e.g. "
                f"{sibling_store(path, [given['encoder'], given['side'], given['data']])}"
            )
        layout = [f"{k} {meta.get(k)} -> {given[k]}" for k in ("shards", "chunk_size") if meta.get(k) != given[k]]
        if layout and not self.complete:  # a finished store is read as it is, whatever wrote it
            raise ConfigError(
                f"{path} was started with {meta.get('shards')} processes and chunk_size={meta.get('chunk_size')} "
                f"({'; '.join(layout)}): resume it with the same ones, or delete it to start over"
            )

    def check_provenance(self, provenance: Mapping[str, Any], side: Side | None = None) -> None:
        """Refuse (:class:`~kdir.errors.ConfigError`) a store written by another encoder, or for the other side.

        ``provenance``: :meth:`kdir.models.base.Scorer.provenance` of the model whose embeddings are wanted.
        """
        recorded = self.meta.get("encoder", {})
        differs = teacher_differences(recorded, provenance)
        if side is not None and side != self.meta.get("side"):
            differs.insert(0, f"side {self.meta.get('side')} -> {side}")
        if differs:
            raise ConfigError(
                f"{self.path} holds {self.meta.get('side')} embeddings of {_describe(recorded)}, not of "
                f"{_describe(provenance)}{f' ({side} side)' if side else ''} ({'; '.join(differs)}): encode into a "
                f"new store, e.g. {sibling_store(self.path, [dict(provenance), side or self.meta.get('side')])}"
            )

    # -- the layout -------------------------------------------------------------------------------------

    def _layout(self, rank: int) -> tuple[int, int, list[tuple[int, int]]]:
        m = self.meta
        return shard_layout(int(m["data"]["count"]), int(m["chunk_size"]), int(m["shards"]), rank)

    def shard_dir(self, rank: int) -> Path:
        return self.path / shard_name(rank, int(self.meta["shards"]))

    def _progress(self, rank: int) -> dict[str, Any] | None:
        file = self.shard_dir(rank) / _PROGRESS
        if not file.is_file():
            return None
        record = _read_json(file, self.path)
        chunks = record.get("chunks")
        if not isinstance(chunks, list) or not all(
            isinstance(c, dict) and {"rows", "vectors", "xxh64"} <= set(c) for c in chunks
        ):
            raise _damaged(file, "not a progress record", self.path)
        return record

    def _load_shards(self) -> list[_Shard]:
        meta, dim = self.meta, int(self.meta["dim"])
        shards, row, vector_row = [], 0, 0
        for rank in range(int(meta["shards"])):
            start, stop, chunks = self._layout(rank)
            folder = self.shard_dir(rank)
            record = self._progress(rank) or {"chunks": [], "finished": False}
            rows = sum(c["rows"] for c in record["chunks"])
            n_vectors = sum(c["vectors"] for c in record["chunks"])
            finished = bool(record.get("finished"))
            if rows > stop - start or len(record["chunks"]) > len(chunks) or (finished and rows != stop - start):
                what = f"{rows} rows recorded, but the shard has {stop - start}"
                raise _damaged(folder / _PROGRESS, what, self.path)
            if not meta["multi_vector"] and n_vectors != rows:
                raise _damaged(folder / _PROGRESS, f"{n_vectors} vectors for {rows} rows", self.path)
            arrays: dict[str, np.ndarray] = {}
            for name, dtype, width, counted in _parts(meta):
                file, n = folder / name, (n_vectors if counted == "vectors" else rows)
                need = n * width * dtype.itemsize
                size = file.stat().st_size if file.is_file() else None
                if size is None and (need or finished):
                    raise _damaged(file, "missing", self.path)
                if size is not None and (size < need or (finished and size != need)):
                    raise _damaged(file, f"{size} bytes, but the progress record lists {need}", self.path)
                arrays[name] = _raw_memmap(file, dtype, (n, width) if width > 1 else (n,))
            if rows or finished:
                keys = _npy_memmap(folder / _KEYS, np.uint64, self.path, rows=stop - start)[:rows]
            else:
                keys = np.zeros(0, dtype=np.uint64)
            shard = _Shard(
                rank,
                folder,
                row,
                rows,
                n_vectors,
                vector_row,
                finished,
                keys,
                arrays[_VECTORS].reshape(n_vectors, dim),
                arrays.get(_LENGTHS),
                arrays.get(_TOKEN_IDS),
            )
            if finished:
                shard._sorted = (
                    _npy_memmap(folder / _SORTED_KEYS, np.uint64, self.path, rows=rows),
                    _npy_memmap(folder / _SORTED_ROWS, np.int64, self.path, rows=rows),
                )
            if meta["multi_vector"] and rows and int(shard.lengths.sum()) != n_vectors:
                what = f"lengths sum to {int(shard.lengths.sum())}, not {n_vectors}"
                raise _damaged(folder / _LENGTHS, what, self.path)
            shards.append(shard)
            row, vector_row = row + rows, vector_row + n_vectors
        return shards

    def writer(self, rank: int, keys: np.ndarray) -> ShardWriter:
        """The writer of shard ``rank``; ``keys``: the uint64 id hashes of its rows (see :func:`shard_layout`)."""
        return ShardWriter(self, rank, keys)

    def finalize(self) -> bool:
        """Record the store as finished (``meta["finished"]``, ``meta["vectors"]``) if every shard is; returns
        whether it is. Any process may call it, any number of times."""
        self._shards = self._load_shards()
        if not self.complete:
            return False
        if not self.meta.get("finished"):
            self.meta |= {"finished": _now(), "vectors": self.n_vectors}
            save_json(self.meta, self.path / _META)
        return True

    # -- reading ----------------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Whether every shard has finished."""
        return all(s.finished for s in self._shards)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def multi_vector(self) -> bool:
        return bool(self.meta["multi_vector"])

    @property
    def side(self) -> str:
        return str(self.meta["side"])

    @property
    def n_vectors(self) -> int:
        """Stored vectors: one per id, or (multi-vector) the token vectors of all documents."""
        return sum(s.n_vectors for s in self._shards)

    def __len__(self) -> int:
        """Ids stored (finished chunks only, in an incomplete store)."""
        return sum(s.rows for s in self._shards)

    def __repr__(self) -> str:
        kind = "multi-vector" if self.multi_vector else "single-vector"
        return f"EmbeddingStore({str(self.path)!r}, {len(self)} {self.side} ids, {kind}, dim {self.dim})"

    def keys(self) -> np.ndarray:
        """uint64 ``[len(self)]``: every id hash in row order (a copy: 8 bytes per id)."""
        return np.concatenate([np.asarray(s.keys) for s in self._shards])

    def lengths(self) -> np.ndarray:
        """int32 ``[len(self)]``: vectors per document (multi-vector stores; ones for single-vector ones)."""
        if not self.multi_vector:
            return np.ones(len(self), dtype=np.int32)
        return np.concatenate([np.asarray(s.lengths) for s in self._shards])

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """int64 row of each key (``-1`` where not stored): a binary search in each shard's sorted keys."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.full(keys.shape, -1, dtype=np.int64)
        for shard in self._shards:
            if not shard.rows:
                continue
            sorted_keys, sorted_rows = shard.sorted()
            pos = np.minimum(np.searchsorted(sorted_keys, keys), shard.rows - 1)
            hit = sorted_keys[pos] == keys
            out[hit] = shard.start + sorted_rows[pos[hit]]
        return out

    def _found(self, keys: np.ndarray) -> np.ndarray:
        rows = self.rows(keys)
        if (missing := rows < 0).any():
            first = int(np.asarray(keys, dtype=np.uint64).reshape(-1)[missing.reshape(-1)][0])
            of = f" of {dataset}" if (dataset := self.meta["data"].get("dataset")) else ""
            raise UnknownIdError(
                f"{self.path}: {int(missing.sum())} of {missing.size} keys are not in the store (e.g. key "
                f"{first:016x}); it holds {len(self)} {self.side} ids{of}"
            )
        return rows

    def _by_shard(self, rows: np.ndarray) -> Iterator[tuple[_Shard, np.ndarray, np.ndarray]]:
        """``(shard, positions in rows, local rows)`` for each shard holding some of the global ``rows``."""
        starts = np.array([s.start for s in self._shards], dtype=np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        for i, shard in enumerate(self._shards):
            if shard.rows and (sel := np.flatnonzero(which == i)).size:
                yield shard, sel, rows[sel] - shard.start

    def lookup(
        self, keys: np.ndarray, pad_to: int | None = None, token_ids: bool = False
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """The stored vectors of ``keys`` (uint64 id hashes, any order): vectorised, no per-key Python.

        Single-vector stores: fp16 ``[N, dim]``. Multi-vector stores: ``(vectors fp16 [N, L, dim], mask bool [N, L])``
        padded with zeros to the longest document asked for (or ``pad_to``), plus ``token_ids int64 [N, L]`` with
        ``token_ids=True``. An unknown key is an :class:`~kdir.errors.UnknownIdError`.
        """
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        rows = self._found(keys)
        if not self.multi_vector:
            out = np.empty((len(keys), self.dim), dtype=np.float16)
            for shard, sel, local in self._by_shard(rows):
                out[sel] = shard.vectors[local]
            return out
        lengths, starts = np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=np.int64)
        for shard, sel, local in self._by_shard(rows):
            lengths[sel], starts[sel] = shard.lengths[local], shard.offsets()[local] + shard.vector_start
        width = int(lengths.max(initial=0)) if pad_to is None else int(pad_to)
        if width < lengths.max(initial=0):
            raise ValueError(f"pad_to={pad_to} is shorter than the longest document asked for ({lengths.max()})")
        mask = np.arange(width)[None, :] < lengths[:, None]  # [N, L]
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # 0.. per doc
        flat = np.repeat(starts, lengths) + within
        vectors = np.zeros((len(keys), width, self.dim), dtype=np.float16)
        vectors[mask] = self._vector_rows(flat)
        if not token_ids:
            return vectors, mask
        ids = np.zeros((len(keys), width), dtype=np.int64)
        ids[mask] = self._vector_rows(flat, token_ids=True)
        return vectors, mask, ids

    def keys_at(self, rows: np.ndarray) -> np.ndarray:
        """uint64 id hashes of the store rows ``rows`` (any order)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty(len(rows), dtype=np.uint64)
        for shard, sel, local in self._by_shard(rows):
            out[sel] = shard.keys[local]
        return out

    def vector_rows(self, rows: np.ndarray, token_ids: bool = False) -> np.ndarray:
        """Stored vectors (fp16 ``[n, dim]``) or, with ``token_ids``, their int32 token ids, by global vector row
        (multi-vector stores: the row of a token vector in store order, ``[0, n_vectors)``)."""
        return self._vector_rows(np.asarray(rows, dtype=np.int64).reshape(-1), token_ids)

    def _vector_rows(self, rows: np.ndarray, token_ids: bool = False) -> np.ndarray:
        """Global vector rows gathered from the shards' memory maps (fp16 ``[n, dim]``, or int32 token ids)."""
        vstarts = np.array([s.vector_start for s in self._shards], dtype=np.int64)
        which = np.searchsorted(vstarts, rows, side="right") - 1
        shape = (len(rows),) if token_ids else (len(rows), self.dim)
        out = np.empty(shape, dtype=np.int32 if token_ids else np.float16)
        for i, shard in enumerate(self._shards):
            if shard.n_vectors and (sel := np.flatnonzero(which == i)).size:
                source = shard.token_ids if token_ids else shard.vectors
                out[sel] = source[rows[sel] - shard.vector_start]
        return out

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` distinct stored vectors drawn uniformly (fp32 ``[n, dim]``, store order), e.g. to train an index."""
        n = min(int(n), self.n_vectors)
        rows = np.sort(np.random.default_rng(seed).choice(self.n_vectors, size=n, replace=False))
        return self._vector_rows(rows).astype(np.float32)

    def chunks(self, chunk_size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(keys uint64 [n], vectors fp16 [n, dim])`` over the whole store in row order, read ``chunk_size`` ids at
        a time (default: the store's) into fresh arrays, so memory stays bounded by one chunk.

        Multi-vector stores give each token vector with its document's key (a document's vectors are consecutive).
        """
        size = int(chunk_size or self.meta["chunk_size"])
        for shard in self._shards:
            offsets = shard.offsets() if self.multi_vector else None
            for lo in range(0, shard.rows, size):
                hi = min(lo + size, shard.rows)
                keys = np.array(shard.keys[lo:hi])
                if offsets is None:
                    yield keys, _read_raw(shard.dir / _VECTORS, "<f2", lo, hi - lo, self.dim)
                else:
                    v0, v1 = int(offsets[lo]), int(offsets[hi])
                    vectors = _read_raw(shard.dir / _VECTORS, "<f2", v0, v1 - v0, self.dim)
                    lengths = np.asarray(shard.lengths[lo:hi], dtype=np.int64)
                    yield np.repeat(keys, lengths), vectors.reshape(-1, self.dim)

    def verify(self) -> dict[str, Any]:
        """Re-hash every finished chunk against the progress record; a :class:`~kdir.errors.DamagedStoreError` names
        the first file whose bytes changed. Returns ``{"chunks": checked, "bytes": read}``."""
        checked = read = 0
        for shard in self._shards:
            record = self._progress(shard.rank) or {"chunks": []}
            offsets = dict.fromkeys([name for name, *_ in _parts(self.meta)], 0)
            for number, chunk in enumerate(record["chunks"]):
                for name, dtype, width, counted in _parts(self.meta):
                    size = chunk[counted] * width * dtype.itemsize
                    with open(shard.dir / name, "rb") as f:
                        f.seek(offsets[name])
                        data = f.read(size)
                    if len(data) != size or xxhash.xxh64_hexdigest(data) != chunk["xxh64"].get(name):
                        raise _damaged(shard.dir / name, f"the bytes of chunk {number} changed", self.path)
                    offsets[name] += size
                    read += size
                checked += 1
        return {"chunks": checked, "bytes": read}


class ShardWriter:
    """Appends the chunks of one shard, in order, resuming after the last chunk its progress record names.

    Call :meth:`write` with each pending chunk's vectors (:attr:`pending`: their global row ranges), then
    :meth:`finish`. Holds the shard's lock until :meth:`finish` or :meth:`close`.
    """

    def __init__(self, store: EmbeddingStore, rank: int, keys: np.ndarray):
        meta = store.meta
        if not 0 <= rank < int(meta["shards"]):
            raise ConfigError(f"rank {rank} is not one of the store's {meta['shards']} shards")
        self.store, self.rank, self.meta = store, rank, meta
        self.start, self.stop, self.chunks = store._layout(rank)
        self.keys = np.asarray(keys, dtype=np.uint64)
        if len(self.keys) != self.stop - self.start:
            raise ValueError(f"shard {rank} has {self.stop - self.start} rows, got {len(self.keys)} keys")
        self.dir = store.shard_dir(rank)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / _LOCK, "a+")  # noqa: SIM115 (held until finish/close)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise KdirError(f"{self.dir}: another process is writing this shard (its lock is held)") from None
        self.record = store._progress(rank) or {"chunks": [], "finished": False}
        if (self.dir / _KEYS).is_file():
            if not np.array_equal(_npy_memmap(self.dir / _KEYS, np.uint64, store.path), self.keys):
                raise _damaged(self.dir / _KEYS, "other ids than the store's meta.json describes", store.path)
        else:
            save_npy(self.keys, self.dir / _KEYS)
        self._sizes = {}
        for name, dtype, width, counted in _parts(meta):
            need = sum(c[counted] for c in self.record["chunks"]) * width * dtype.itemsize
            file = self.dir / name
            size = file.stat().st_size if file.is_file() else 0
            if size < need:
                raise _damaged(file, f"{size} bytes, but the progress record lists {need}", store.path)
            with open(file, "ab") as f:
                f.truncate(need)  # drop a chunk a killed job left half written
            self._sizes[name] = need
        if not (self.dir / _PROGRESS).is_file():
            save_json(self.record, self.dir / _PROGRESS)

    @property
    def done(self) -> int:
        """Chunks finished."""
        return len(self.record["chunks"])

    @property
    def pending(self) -> list[tuple[int, int]]:
        """``(first row, end row)`` (global) of each chunk still to write, in order."""
        return self.chunks[self.done :]

    def write(
        self, vectors: np.ndarray, lengths: np.ndarray | None = None, token_ids: np.ndarray | None = None
    ) -> None:
        """Append the next chunk: fp16 ``[rows, dim]`` vectors in row order, or (multi-vector) the documents' token
        vectors flattened ``[sum(lengths), dim]`` with ``lengths [rows]`` and their ``token_ids``; then fsync and
        record it."""
        if not self.pending:
            raise ValueError(f"shard {self.rank} has no chunk left to write")
        lo, hi = self.pending[0]
        vectors = np.ascontiguousarray(vectors, dtype="<f2").reshape(-1, self.store.dim)
        if not np.isfinite(vectors).all():
            raise NonFiniteError(
                f"{self.dir}: rows {lo}..{hi - 1} have embeddings that are not finite in fp16 (|x| > 65504 or NaN)"
            )
        data = {_VECTORS: vectors}
        if self.meta["multi_vector"]:
            if lengths is None or token_ids is None:
                raise ValueError("a multi-vector store needs lengths and token_ids with each chunk")
            data[_LENGTHS] = np.ascontiguousarray(lengths, dtype="<i4")
            data[_TOKEN_IDS] = np.ascontiguousarray(token_ids, dtype="<i4")
            if len(data[_LENGTHS]) != hi - lo or int(data[_LENGTHS].sum()) != len(vectors) != len(data[_TOKEN_IDS]):
                raise ValueError(f"chunk of {hi - lo} documents: got {len(lengths)} lengths, {len(vectors)} vectors")
        elif len(vectors) != hi - lo:
            raise ValueError(f"the chunk of rows {lo}..{hi - 1} needs {hi - lo} vectors, got {len(vectors)}")
        sums = {}
        for name, arr in data.items():
            raw = arr.tobytes()
            with open(self.dir / name, "r+b" if (self.dir / name).exists() else "wb") as f:
                f.seek(self._sizes[name])
                f.write(raw)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            self._sizes[name] += len(raw)
            sums[name] = xxhash.xxh64_hexdigest(raw)
        self.record["chunks"].append({"rows": hi - lo, "vectors": len(vectors), "xxh64": sums})
        save_json(self.record, self.dir / _PROGRESS)  # after the bytes are on disk: the record never runs ahead

    def finish(self) -> None:
        """Publish the sorted keys (for lookups) and mark the shard finished; releases the lock."""
        if self.pending:
            raise ValueError(f"shard {self.rank}: {len(self.pending)} chunks are still to write")
        if not self.record.get("finished"):
            order = np.argsort(self.keys, kind="stable")
            sorted_keys = self.keys[order]
            if len(sorted_keys) > 1 and (dup := sorted_keys[1:] == sorted_keys[:-1]).any():
                raise UnknownIdError(f"{self.dir}: duplicate id hashes ({int(dup.sum())}): ids must be unique")
            save_npy(sorted_keys, self.dir / _SORTED_KEYS)
            save_npy(order.astype(np.int64), self.dir / _SORTED_ROWS)
            self.record["finished"] = True
            save_json(self.record, self.dir / _PROGRESS)
        self.close()

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
