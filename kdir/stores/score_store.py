"""A directory of teacher scores keyed by (query id, document id), computed once and memory-mapped.

Layout::

    <store>/meta.json                               provenance: format, key scheme, teacher, data, count, dates
    <store>/segments/seg-<n:06d>-<tag>.keys.npy     uint64 pair keys (kdir.stores.keys), sorted, unique
    <store>/segments/seg-<n:06d>-<tag>.values.npy   float32 scores aligned with the keys
    <store>/segments/seg-<n:06d>-<tag>.names.json   (compacted segments) names of the named segments merged in
    <store>/segments/seg-<n:06d>-<tag>.sums.json    byte size and xxh64 of the keys and values files

Every write goes to a temporary file in the same folder and is published with ``os.replace``; a segment's
checksums and values are published before its keys, and readers only use segments whose keys file exists, so a
segment is visible complete or not at all. ``<n>`` is one more than the highest number in the folder when the
segment is published, so a later append sorts (and wins on duplicate keys) after an earlier one. ``<tag>``
is a random ``_<hex>`` for :meth:`ScoreStore.append`, or the caller's name (``append(..., name=...)``,
:meth:`ScoreStore.append_segment`); it keeps appenders in different processes from ever writing the same file
(two concurrent appends may share ``<n>``: they are then ordered by tag). A merged segment (:meth:`ScoreStore.merge`)
is numbered and tagged as its newest part, with ``-`` appended to the tag.

Each segment file is hashed (xxh64) as it is written and read back before it is published. Opening a store
checks every segment file's size against its checksum record (for segments written before checksums existed,
against its ``.npy`` header); :meth:`ScoreStore.verify` re-hashes the files. A mismatch is a
:class:`~kdir.errors.DamagedStoreError` naming the file.

Appends from several processes may run concurrently with each other and with readers (which see new
segments after :meth:`ScoreStore.refresh`, or :meth:`ScoreStore.refresh_if_changed`: one ``stat`` call while
nothing changed); :meth:`ScoreStore.compact` needs the store to itself. Each open segment holds two memory maps
(and two file descriptors), and a lookup searches every segment, so a writer of many small appends goes
through a :class:`TieredAppender`, which merges its own segments as it goes (:meth:`ScoreStore.merge`: the
merged segment takes its newest part's place in the order and is published before the parts are removed; a
reader keeps reading the memory maps of removed files, as POSIX keeps unlinked files open).

An imported store (:meth:`ScoreStore.import_new`) is built in a temporary folder next to its path and renamed
into place when the import is complete, with ``meta["imported"]`` recording the source file (path, format, size,
modification time) and the pairs read: a store is a finished import, or absent. Scores must be finite float32
numbers (NaN means "not stored" in lookups); others are refused with a :class:`~kdir.errors.NonFiniteScoreError`.

A store holds pair keys, not ids: :meth:`ScoreStore.pairs_between` and :meth:`ScoreStore.iter_pairs` stream its
unique pairs in key order (newest segment wins) in bounded memory, and :meth:`ScoreStore.write_sorted` publishes
such a stream as one segment (``kdir.stores.tools``: export, merge).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Literal
from uuid import uuid4

import numpy as np
import xxhash

from kdir.data.formats import FLOAT32_MAX, read_jsonl_scores, read_margin_scores, read_pair_scores, text_lines
from kdir.errors import (
    ConfigError,
    DamagedStoreError,
    DataFormatError,
    MissingFileError,
    NonFiniteScoreError,
    OutputExistsError,
    UnknownIdError,
)
from kdir.stores.keys import KEY_SCHEME, pair_keys_from_ids
from kdir.utils.io import atomic_write, stage_file, temp_path

FORMAT = "kdir-score-store/1"
_META = "meta.json"
_SEGMENTS = "segments"
_RESERVED = ("format", "key", "count", "created", "updated", "kdir_version", "imported")
_KEYS_FILE = re.compile(r"^seg-(\d{6,})-([A-Za-z0-9_.-]+)\.keys\.npy$")
_ANY_FILE = re.compile(r"^seg-(\d{6,})-")
_PART_FILE = re.compile(r"^seg-(\d{6,})-([A-Za-z0-9_.-]+?)\.(keys\.npy|values\.npy|names\.json|sums\.json)$")
_PARTS = (("keys", np.uint64), ("values", np.float32))
_STALE_IMPORT_S = 600  # a temporary import folder of a dead process untouched this long is removed
IMPORT_FORMATS = ("pairs", "margin_scores", "jsonl", "trec", "keys")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BUCKET = 32  # mean keys per bucket of a segment's in-memory directory (~0.5 byte per pair)
_RACY_NS = 2_000_000_000  # a folder modified this recently may change again within its (coarse) mtime: look again


class _Segment:
    """One published segment: memory-mapped sorted keys and values, plus a directory built on first search.

    Keys are uniform 64-bit hashes, so their top bits split a segment into buckets of ~32 keys; the directory
    holds where each bucket starts. A search reads one directory entry and binary-searches a few keys in one
    place of the memory map, ~15x faster than ``np.searchsorted`` over the whole map for random keys.
    """

    def __init__(self, number: int, tag: str, keys: np.ndarray, values: np.ndarray):
        self.number, self.tag, self.keys, self.values = number, tag, keys, values
        self._directory: tuple[np.ndarray, np.uint64, int] | None = None

    def directory(self) -> tuple[np.ndarray, np.uint64, int]:
        """``(starts [2**bits + 1], 64 - bits, search steps)``, built in one sequential pass over the keys."""
        if self._directory is None:
            n = len(self.keys)
            bits = min(32, max(1, int(np.ceil(np.log2(max(n / _BUCKET, 2))))))
            shift = np.uint64(64 - bits)
            counts = np.zeros(2**bits, dtype=np.int64)
            for i in range(0, n, 1 << 22):
                counts += np.bincount((self.keys[i : i + (1 << 22)] >> shift).astype(np.intp), minlength=2**bits)
            starts = np.zeros(2**bits + 1, dtype=np.int64)
            np.cumsum(counts, out=starts[1:])
            self._directory = starts, shift, int(max(counts.max(), 1) - 1).bit_length()
        return self._directory

    def find(self, wanted: np.ndarray) -> np.ndarray:
        """Per wanted key, the index of the last key <= it within its bucket (so ``keys[i] == w`` iff stored)."""
        starts, shift, steps = self.directory()
        bucket = (wanted >> shift).astype(np.intp)
        base = starts[bucket]
        size = starts[bucket + 1] - base
        np.minimum(base, len(self.keys) - 1, out=base)  # an empty last bucket starts at n
        for _ in range(steps):  # branchless: base stays in [start, start + size)
            half = size >> 1
            mid = base + half
            np.copyto(base, mid, where=self.keys[mid] <= wanted)
            size -= half
        return base


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _HashingWriter:
    """A write-only file wrapper that hashes (xxh64) and counts the bytes written through it."""

    def __init__(self, f: Any):
        self.f, self.hash, self.size = f, xxhash.xxh64(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)


def _file_xxh64(path: str | Path) -> str:
    """xxh64 (hex) of a file's bytes, read in 8 MiB blocks."""
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def _damaged(file: str | Path, what: str, store: Path) -> DamagedStoreError:
    return DamagedStoreError(
        f"{file}: {what}; the score store {store} is damaged: delete it and rebuild it (rerun the "
        "`python -m kdir.score` or the import that wrote it)"
    )


def _stage_npy(path: Path, arr: np.ndarray) -> tuple[Path, dict[str, Any]]:
    """Write ``arr`` to a temporary file next to ``path`` (fsynced, read back, not yet published).

    Returns the temporary file and its checksum record ``{"bytes": ..., "xxh64": ...}`` (of the bytes written).
    """
    record: dict[str, Any] = {}

    def write(f: Any) -> None:
        w = _HashingWriter(f)
        np.save(w, arr, allow_pickle=False)
        record.update(bytes=w.size, xxh64=w.hash.hexdigest())

    tmp = stage_file(path, write)
    if os.path.getsize(tmp) != record["bytes"] or _file_xxh64(tmp) != record["xxh64"]:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(f"{tmp}: the bytes read back differ from those written (a failing disk?)")
    return tmp, record


def _stage_npy_copy(path: Path, raw: Path, dtype: np.dtype, n: int) -> tuple[Path, dict[str, Any]]:
    """A temporary ``.npy`` file next to ``path`` holding the ``n`` raw ``dtype`` items of the file ``raw`` (copied in
    blocks), fsynced and hashed from disk; returns it and its checksum record (as :func:`_stage_npy`)."""
    tmp = temp_path(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n,))
        step = 1 << 22
        with open(raw, "rb") as f:
            for i in range(0, n, step):
                out[i : i + step] = np.fromfile(f, dtype=dtype, count=min(step, n - i))
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        return tmp, {"bytes": os.path.getsize(tmp), "xxh64": _file_xxh64(tmp)}
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _noting_queries(rows: Iterable[tuple[str, str, float]], seen: set[str]) -> Iterator[tuple[str, str, float]]:
    """``rows`` unchanged, adding each row's query id to ``seen``."""
    for row in rows:
        seen.add(row[0])
        yield row


def key_ranges(n: int, chunk_size: int) -> list[tuple[int, int | None]]:
    """``ceil(n / chunk_size)`` (at least one) equal ranges ``[lo, hi)`` covering all 64-bit keys (the last one's
    ``hi`` is ``None``): with uniform pair keys each holds about ``chunk_size`` of ``n`` keys."""
    parts = max(1, -(-n // max(1, chunk_size)))
    bounds = [i * 2**64 // parts for i in range(parts)]
    return [(lo, hi) for lo, hi in zip(bounds, [*bounds[1:], None])]


def _npy_payload(file: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, bytes the file must have)`` from a ``.npy`` header; :class:`ValueError` if unreadable."""
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read[version](f)
        return dtype, shape, f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _finite_float32(values: Any) -> np.ndarray:
    """``values`` as float32, or :class:`~kdir.errors.NonFiniteScoreError` at the first one not finite in float32."""
    v = np.asarray(values)
    with np.errstate(over="ignore", invalid="ignore"):
        out = v.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.flatnonzero(bad.ravel())[0])
        raise NonFiniteScoreError(
            f"score {v.ravel()[i].item()!r} ({int(bad.sum())} of {bad.size} given) is NaN, infinite or beyond "
            "float32's range (|x| <= 3.4e38): a score store holds finite float32 scores only (NaN means "
            "'not in the store' in lookups)"
        )
    return out


def _as_keys(keys: Any) -> np.ndarray:
    arr = np.asarray(keys)
    if arr.dtype == np.uint64:
        return arr
    if arr.size == 0 or arr.dtype.kind == "u":
        return arr.astype(np.uint64)
    raise TypeError(f"pair keys must be uint64 (see kdir.stores.pair_keys), got {arr.dtype}")


def _sorted_unique(keys: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sort by key; of repeated keys the last one given wins."""
    k, v = _as_keys(keys), np.asarray(values)
    if k.shape != v.shape:
        raise ValueError(f"keys {k.shape} and values {v.shape} must have the same shape")
    k, v = k.ravel(), _finite_float32(v).ravel()
    order = np.argsort(k, kind="stable")
    k = k[order]
    last = np.ones(len(k), dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    return k[last], v[order[last]]


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk


def score_text(scores: np.ndarray) -> list[str]:
    """Shortest decimal text that reads back to the same float32."""
    return [str(s) for s in scores.astype(np.float32)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _remove_stale_imports(path: Path) -> None:
    """Remove the temporary folders of imports into ``path`` whose process died and that are untouched for a while."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-[0-9a-f]+\.tmp$")
    if not path.parent.is_dir():
        return
    for tmp in path.parent.iterdir():
        if not ((m := pattern.match(tmp.name)) and tmp.is_dir()) or _alive(int(m[1])):
            continue
        try:
            touched = max(p.stat().st_mtime for p in (tmp, tmp / _SEGMENTS) if p.exists())
        except OSError:
            continue
        if time.time() - touched >= _STALE_IMPORT_S:
            shutil.rmtree(tmp, ignore_errors=True)


def _publish_folder(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the finished folder ``tmp`` to ``path`` (swapping out what is there if ``replace``)."""
    aside = None
    if replace and path.exists():
        aside = temp_path(path)
        try:
            os.replace(path, aside)
        except FileNotFoundError:  # another process swapped it out first
            aside = None
    try:
        os.replace(tmp, path)
    except OSError:
        if aside is not None and not path.exists():
            os.replace(aside, path)  # put the old one back
            aside = None
        if not (path / _META).is_file():  # not a store published meanwhile by a concurrent import
            raise OutputExistsError(f"{path}: exists and is not a kdir score store") from None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def import_differences(record: Mapping[str, Any], source: str | Path, format: str | None = None) -> list[str]:
    """How the file ``source`` (read as ``format``) differs from a store's ``meta["imported"]`` record (``[]``: the
    same file)."""
    source = Path(source)
    st = source.stat()
    out = []
    if format is not None and format != record.get("format"):
        out.append(f"format {record.get('format')} -> {format}")
    if str(source.resolve()) != record.get("file"):
        out.append(f"file {record.get('file')} -> {source.resolve()}")
    if st.st_size != record.get("size"):
        out.append(f"size {record.get('size')} -> {st.st_size} bytes")
    if st.st_mtime_ns != record.get("mtime_ns"):
        out.append(f"modified {_ns_time(record.get('mtime_ns'))} -> {_ns_time(st.st_mtime_ns)}")
    return out


def _ns_time(ns: Any) -> str:
    if not isinstance(ns, int):
        return repr(ns)
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="seconds")


def sibling_store(path: str | Path, identity: Any) -> Path:
    """A store path next to ``path`` for other contents: ``<stem>-<8 hex of identity><suffix>`` (stable)."""
    path = Path(path)
    tag = xxhash.xxh64_hexdigest(json.dumps(identity, sort_keys=True, default=str).encode())[:8]
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


def score_rows(path: str | Path, format: str = "pairs") -> Iterator[tuple[str, str, float]]:
    """Stream ``(qid, pid, score)`` rows of a score file: ``pairs`` (``qid<TAB>pid<TAB>score``), ``margin_scores``
    (Hofstätter et al.'s ``pos_score neg_score qid pos_pid neg_pid``: two rows a line), ``jsonl`` (``qid``, ``pid``,
    ``score``) or ``trec`` (a run, ``qid Q0 pid rank score tag``). A malformed line is a
    :class:`~kdir.errors.DataFormatError` naming the file and the line."""
    if format == "pairs":
        yield from ((qid, pid, score) for _, qid, pid, score in read_pair_scores(path))
    elif format == "margin_scores":
        for _, ps, ns, qid, pos, neg in read_margin_scores(path):
            yield qid, pos, ps
            yield qid, neg, ns
    elif format == "jsonl":
        yield from ((qid, pid, score) for _, qid, pid, score in read_jsonl_scores(path))
    elif format == "trec":
        for lineno, line in text_lines(path):
            if not (fields := line.split()):
                continue
            if len(fields) != 6:
                raise DataFormatError(path, lineno, "'qid Q0 pid rank score tag'", got=line.strip())
            yield fields[0], fields[2], _file_score(path, lineno, fields[4])
    else:
        formats = ", ".join(f for f in IMPORT_FORMATS if f != "keys")
        raise ConfigError(f"unknown score format {format!r}: expected one of {formats}")


def read_key_scores(path: str | Path) -> Iterator[tuple[int, int, float]]:
    """Stream ``(line, pair key, score)`` of a ``keys`` file: ``<key as 16 hex digits><TAB><score>`` lines."""
    for lineno, line in text_lines(path):
        if not (fields := line.split()):
            continue
        if len(fields) != 2 or len(fields[0]) != 16:
            raise DataFormatError(path, lineno, "'<16 hex digit pair key><TAB><score>'", got=line.strip())
        try:
            key = int(fields[0], 16)
        except ValueError:
            raise DataFormatError(path, lineno, "a pair key of 16 hex digits", got=fields[0]) from None
        yield lineno, key, _file_score(path, lineno, fields[1])


def _file_score(path: str | Path, lineno: int, text: str) -> float:
    """A score read from a file: a number finite in float32, else a :class:`~kdir.errors.DataFormatError`."""
    try:
        x = float(text)
    except ValueError:
        raise DataFormatError(path, lineno, "score to be a number", got=text) from None
    if not abs(x) <= FLOAT32_MAX:
        raise DataFormatError(path, lineno, "score to be a finite float32 number (|x| <= 3.4e38)", got=text)
    return x


def teacher_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a store's recorded ``teacher`` and a model's provenance (``[]``: the same teacher).

    ``current`` is :meth:`kdir.models.base.Scorer.provenance`: class ``name``, scoring ``config`` and ``weights``
    hash. Settings are compared as ``current`` lists them (a model leaves out the settings that do not change
    its scores); one the store does not record counts as different.
    """
    now = json.loads(json.dumps(dict(current), default=str))
    out = []
    if recorded.get("name") != now.get("name"):
        out.append(f"class {recorded.get('name')} -> {now.get('name')}")
    if not isinstance(recorded.get("config"), Mapping):
        out.append("settings (not recorded) -> " + json.dumps(now.get("config"), sort_keys=True))
    else:
        old = recorded["config"]
        for key, value in (now.get("config") or {}).items():
            if key not in old:
                out.append(f"{key} (not recorded) -> {value!r}")
            elif old[key] != value:
                out.append(f"{key} {old[key]!r} -> {value!r}")
    if recorded.get("weights") != now.get("weights"):
        short = [str(w)[:12] if w else "(not recorded)" for w in (recorded.get("weights"), now.get("weights"))]
        out.append(f"weights {short[0]} -> {short[1]}")
    return out


class ScoreStore:
    """Teacher scores keyed by (query id, document id) pair keys, in append-only memory-mapped segments.

    Open one with :meth:`open` or :meth:`create`. Keys come from :func:`kdir.stores.pair_keys`; lookups
    return ``NaN`` for pairs that are not stored.

    Args:
        path: the store folder.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / _META
        if not meta_path.is_file():
            raise MissingFileError(f"{self.path}: not a kdir score store (no {_META})")
        meta = self.meta
        for field, expected in (("format", FORMAT), ("key", KEY_SCHEME)):
            if meta.get(field) != expected:
                raise DataFormatError(meta_path, None, f"{field} {expected!r}", got=repr(meta.get(field)))
        self._segments: list[_Segment] = []
        self._stamp: tuple[int, int, int] | None = None  # the segments folder as last listed (None: look again)
        self.refresh()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled by path (e.g. for spawned dataloader workers): the copy maps the segments itself."""
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self._segments, self._stamp = Path(state["path"]), [], None
        self.refresh()

    # -- opening ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> ScoreStore:
        """Open an existing store; :class:`FileNotFoundError` if ``path`` is not one."""
        return cls(path)

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any], exist_ok: bool = False) -> ScoreStore:
        """Create an empty store described by ``meta`` (JSON-able; ``teacher`` and ``data`` by convention).

        If a store already exists at ``path`` with the same values for ``meta``'s fields it is opened (so a
        resumed job can call ``create`` again); with different values it is an error unless ``exist_ok``,
        which opens it as it is.
        """
        path = Path(path)
        if reserved := sorted(set(meta) & set(_RESERVED)):
            raise ValueError(f"meta fields {reserved} are managed by the store")
        given = json.loads(json.dumps(meta))  # as it will read back (tuples become lists, ...)
        if (path / _META).is_file():
            store = cls(path)
            current = store.meta
            differ = {k: current.get(k) for k in given if current.get(k) != given[k]}
            if differ and not exist_ok:
                raise OutputExistsError(
                    f"{path}: a score store with different {', '.join(differ)} already exists "
                    f"(stored: {differ}); pass exist_ok=True to open it anyway"
                )
            return store
        if path.exists() and not (path.is_dir() and {p.name for p in path.iterdir()} <= {_SEGMENTS}):
            raise OutputExistsError(f"{path}: exists and is not a kdir score store")
        (path / _SEGMENTS).mkdir(parents=True, exist_ok=True)
        from kdir import __version__

        now = _now()
        full = {"format": FORMAT, "key": KEY_SCHEME, "teacher": {}, "data": {}}
        full |= given
        full |= {"count": 0, "created": now, "updated": now, "kdir_version": __version__}
        cls._write_meta(path, full)
        return cls(path)

    # -- metadata --------------------------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """The provenance record (read from ``meta.json`` on each access)."""
        return json.loads((self.path / _META).read_text(encoding="utf-8"))

    def update_meta(self, **fields: Any) -> dict[str, Any]:
        """Set provenance fields (e.g. ``teacher={...}``; not ``format`` or ``key``) and return the new record."""
        if fixed := sorted(set(fields) & {"format", "key"}):
            raise ValueError(f"meta fields {fixed} describe how the store is written and cannot be changed")
        meta = self.meta | json.loads(json.dumps(fields)) | {"updated": _now()}
        self._write_meta(self.path, meta)
        return meta

    @staticmethod
    def _write_meta(path: Path, meta: dict[str, Any]) -> None:
        with atomic_write(path / _META) as f:
            f.write(json.dumps(meta, indent=2) + "\n")

    def _update_count(self) -> None:
        self.refresh()
        self._write_meta(self.path, self.meta | {"count": len(self), "updated": _now()})

    # -- segments --------------------------------------------------------------------------------------

    @property
    def _dir(self) -> Path:
        return self.path / _SEGMENTS

    def _complete(self) -> list[tuple[int, str]]:
        """``(number, tag)`` of the published segments, oldest first."""
        found = []
        for name in os.listdir(self._dir):
            if m := _KEYS_FILE.match(name):
                found.append((int(m[1]), m[2]))
        return sorted(found)

    def _stem(self, number: int, tag: str) -> Path:
        return self._dir / f"seg-{number:06d}-{tag}"

    def _sums(self, number: int, tag: str) -> dict[str, Any] | None:
        """The checksum record of a segment (``None`` for segments written before checksums)."""
        file = Path(f"{self._stem(number, tag)}.sums.json")
        try:
            sums = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            sums = None
        if not (
            isinstance(sums, dict)
            and all(isinstance(sums.get(p), dict) and {"bytes", "xxh64"} <= set(sums[p]) for p, _ in _PARTS)
        ):
            raise _damaged(file, "unreadable checksum record", self.path)
        return sums

    def _load(self, number: int, tag: str) -> _Segment:
        """Memory-map a segment after checking each file's size (cheap: no data is read)."""
        stem = self._stem(number, tag)
        sums = self._sums(number, tag)
        arrays = []
        for part, dtype in _PARTS:
            file = Path(f"{stem}.{part}.npy")
            size = os.path.getsize(file)  # FileNotFoundError: removed by a compaction (refresh retries)
            if sums is not None and size != sums[part]["bytes"]:
                raise _damaged(file, f"{size} bytes, but {sums[part]['bytes']} were written", self.path)
            try:
                got_dtype, shape, need = _npy_payload(file)
            except ValueError as e:
                raise _damaged(file, f"unreadable .npy header ({e})", self.path) from None
            if size != need:
                raise _damaged(file, f"{size} bytes, but its header describes {need}", self.path)
            if got_dtype != dtype or len(shape) != 1:
                raise DataFormatError(file, None, f"a 1-d {np.dtype(dtype)} array", got=f"{got_dtype} {shape}")
            arrays.append(np.load(file, mmap_mode="r").view(np.ndarray))
        if len(arrays[0]) != len(arrays[1]):
            raise DataFormatError(stem, None, "as many values as keys", got=f"{len(arrays[1])} vs {len(arrays[0])}")
        return _Segment(number, tag, *arrays)

    def _folder_stamp(self) -> tuple[int, int, int] | None:
        """The segments folder's (inode, mtime, ctime); None if it changed too recently to trust its mtime."""
        st = os.stat(self._dir)
        if abs(time.time_ns() - st.st_mtime_ns) < _RACY_NS:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns

    def refresh(self) -> ScoreStore:
        """Pick up segments published (or removed by a compaction or a merge) since the last look."""
        cached = {(s.number, s.tag): s for s in self._segments}
        for _ in range(10):  # a compaction elsewhere may remove segments while we open them
            stamp = self._folder_stamp()  # before listing: a change during the listing is seen next time
            try:
                self._segments = [cached.get(nt) or self._load(*nt) for nt in self._complete()]
                self._stamp = stamp
                return self
            except FileNotFoundError:
                continue
        raise RuntimeError(f"{self.path}: segments keep disappearing while opening them (a compaction running?)")

    def refresh_if_changed(self) -> bool:
        """:meth:`refresh` if the segments folder changed since the last look; returns whether it looked.

        One ``stat`` of the folder otherwise: publishing, merging and removing segments all rename or unlink files
        in it, which sets its modification time. A folder modified in the last 2 s is listed again at the next call
        (file times are coarse: a second change within the same tick would not show).
        """
        if self._stamp is not None and self._stamp == self._folder_stamp():
            return False
        self.refresh()
        return True

    def _publish(
        self,
        tag: str,
        keys: np.ndarray,
        values: np.ndarray,
        names: list[str] | None = None,
        number: int | None = None,
    ) -> Path:
        """Write a segment of sorted unique keys under the next number (or ``number``); returns its keys file."""
        probe = self._stem(0, tag)
        staged = [_stage_npy(probe, values)]
        try:
            staged.append(_stage_npy(probe, keys))
            return self._publish_staged(tag, len(keys), staged[1], staged[0], names, number)
        finally:
            for tmp, _ in staged:
                Path(tmp).unlink(missing_ok=True)

    def _publish_staged(
        self,
        tag: str,
        n: int,
        keys: tuple[Path, dict[str, Any]],
        values: tuple[Path, dict[str, Any]],
        names: list[str] | None = None,
        number: int | None = None,
    ) -> Path:
        """Publish staged ``(file, checksum record)`` keys and values of ``n`` pairs as the next segment (or as
        segment ``number``)."""
        probe = self._stem(0, tag)
        tmp_names = tmp_sums = None
        try:
            if names:
                tmp_names = stage_file(probe, lambda f: f.write(json.dumps(names)), mode="w")
            sums = json.dumps({"pairs": n, "keys": keys[1], "values": values[1]})
            tmp_sums = stage_file(probe, lambda f: f.write(sums + "\n"), mode="w")
            if number is None:
                taken = [int(m[1]) for name in os.listdir(self._dir) if (m := _ANY_FILE.match(name))]
                number = max(taken, default=0) + 1
            stem = self._stem(number, tag)
            if tmp_names is not None:
                os.replace(tmp_names, f"{stem}.names.json")
            os.replace(tmp_sums, f"{stem}.sums.json")
            os.replace(values[0], f"{stem}.values.npy")
            os.replace(keys[0], f"{stem}.keys.npy")  # last: the segment is now visible
        finally:
            for tmp in (tmp_names, tmp_sums):
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)
        return Path(f"{stem}.keys.npy")

    def _remove(self, number: int, tag: str) -> None:
        stem = self._stem(number, tag)
        for part in ("keys.npy", "values.npy", "names.json", "sums.json"):  # keys first: invisible at once
            Path(f"{stem}.{part}").unlink(missing_ok=True)

    def append(self, keys: np.ndarray, values: np.ndarray, name: str | None = None) -> Path:
        """Store ``values[i]`` under ``keys[i]`` as one new segment (later appends win); returns its keys file.

        Repeated keys within the call keep their last value. Values that are not finite in float32 (NaN, ±inf,
        beyond ±3.4e38) are refused (:class:`~kdir.errors.NonFiniteScoreError`). ``name``: the segment's tag
        (unique to the writer, e.g. a hash of the keys; default a random one).
        """
        if name is not None and not _NAME.match(name):
            raise ValueError(f"segment name {name!r} must match {_NAME.pattern}")
        path = self._publish(name or f"_{uuid4().hex[:12]}", *_sorted_unique(keys, values))
        self._update_count()
        return path

    def append_segment(self, name: str, keys: np.ndarray, values: np.ndarray) -> bool:
        """:meth:`append` under a deterministic ``name`` (e.g. ``rank0-000012``); False if it is already stored.

        A resumed job can call this for every chunk and only the missing ones are written. A name must be
        written by a single process at a time.
        """
        if not _NAME.match(name):
            raise ValueError(f"segment name {name!r} must match {_NAME.pattern}")
        if self.has_segment(name):
            return False
        self._publish(name, *_sorted_unique(keys, values))
        self._update_count()
        return True

    def has_segment(self, name: str) -> bool:
        """Whether a segment named ``name`` was published (also if it was merged by :meth:`compact` since)."""
        for number, tag in self._complete():
            if tag == name:
                return True
            names = Path(f"{self._stem(number, tag)}.names.json")
            if names.is_file() and name in json.loads(names.read_text(encoding="utf-8")):
                return True
        return False

    def segments(self) -> list[dict[str, Any]]:
        """The published segments, oldest first: ``{"name", "pairs", "checksums"}`` (whether a checksum record
        was written with it; read from the file headers and records, no data)."""
        self.refresh()
        out = []
        for seg in self._segments:
            sums = Path(f"{self._stem(seg.number, seg.tag)}.sums.json").is_file()
            out.append({"name": self._stem(seg.number, seg.tag).name, "pairs": len(seg.keys), "checksums": sums})
        return out

    # -- reading ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Stored pairs summed over segments (a key stored in several segments counts once per segment)."""
        return sum(len(s.keys) for s in self._segments)

    def __repr__(self) -> str:
        return f"ScoreStore({str(self.path)!r}, segments={len(self._segments)}, pairs={len(self)})"

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """``float32`` scores of ``keys`` (any shape), ``NaN`` where a pair is not stored; the newest segment wins."""
        query = _as_keys(keys)
        flat = query.ravel()
        out = np.full(flat.shape, np.nan, dtype=np.float32)
        todo: np.ndarray | None = None  # positions still missing (None: all)
        for seg in reversed(self._segments):
            if len(seg.keys) == 0:
                continue
            wanted = flat if todo is None else flat[todo]
            pos = seg.find(wanted)
            hit = seg.keys[pos] == wanted
            where = np.flatnonzero(hit) if todo is None else todo[hit]
            out[where] = seg.values[pos[hit]]
            todo = np.flatnonzero(~hit) if todo is None else todo[~hit]
            if not len(todo):
                break
        return out.reshape(query.shape)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """``bool`` array: which ``keys`` are stored."""
        return ~np.isnan(self.lookup(keys))

    def pairs_between(self, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The stored pairs with ``lo <= key < hi`` (``hi=None``: up to the last key): sorted unique ``uint64`` keys
        and their ``float32`` scores, the newest segment winning (as :meth:`lookup`). Reads only that key range."""
        keys, values = [], []
        for seg in reversed(self._segments):  # newest first: the first occurrence of a key wins below
            a = int(np.searchsorted(seg.keys, np.uint64(lo), side="left"))
            b = len(seg.keys) if hi is None else int(np.searchsorted(seg.keys, np.uint64(hi), side="left"))
            if b > a:
                keys.append(np.array(seg.keys[a:b]))
                values.append(np.array(seg.values[a:b]))
        if len(keys) <= 1:
            return (keys[0], values[0]) if keys else (np.zeros(0, np.uint64), np.zeros(0, np.float32))
        k = np.concatenate(keys)
        order = np.argsort(k, kind="stable")
        k = k[order]
        first = np.ones(len(k), dtype=bool)
        first[1:] = k[1:] != k[:-1]
        return k[first], np.concatenate(values)[order[first]]

    def iter_pairs(self, chunk_size: int = 4_000_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored pair once (newest segment wins), in ascending key order, as ``(keys, values)`` chunks of
        about ``chunk_size`` pairs (pair keys are uniform hashes: each chunk is one key range)."""
        for lo, hi in key_ranges(len(self), chunk_size):
            keys, values = self.pairs_between(lo, hi)
            if len(keys):
                yield keys, values

    # -- maintenance -----------------------------------------------------------------------------------

    def write_sorted(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], name: str | None = None) -> Path | None:
        """Publish a stream of ``(keys, values)`` chunks, keys strictly ascending across the whole stream, as one
        segment; returns its keys file (``None`` when the stream is empty).

        The chunks are written to temporary files as they come (memory: one chunk), then copied into the
        segment's ``.npy`` files, which are hashed from disk for their checksum record and published as by
        :meth:`append`. A stream that is not strictly ascending raises :class:`ValueError`; a non-finite score
        :class:`~kdir.errors.NonFiniteScoreError`; nothing is published then.
        """
        if name is not None and not _NAME.match(name):
            raise ValueError(f"segment name {name!r} must match {_NAME.pattern}")
        tag = name or f"_{uuid4().hex[:12]}"
        probe = self._stem(0, tag)
        raw = {part: temp_path(probe) for part, _ in _PARTS}
        staged: list[tuple[Path, dict[str, Any]]] = []
        try:
            n, last = 0, None
            with open(raw["keys"], "wb") as fk, open(raw["values"], "wb") as fv:
                for keys, values in chunks:
                    keys, values = _as_keys(keys).ravel(), _finite_float32(values).ravel()
                    if keys.shape != values.shape:
                        raise ValueError(f"keys {keys.shape} and values {values.shape} must have the same shape")
                    if not len(keys):
                        continue
                    if (last is not None and keys[0] <= last) or (len(keys) > 1 and not (keys[1:] > keys[:-1]).all()):
                        raise ValueError("write_sorted needs strictly ascending keys across the whole stream")
                    fk.write(keys.tobytes())
                    fv.write(values.tobytes())
                    n, last = n + len(keys), keys[-1]
            if n == 0:
                return None
            for part, dtype in (("values", np.float32), ("keys", np.uint64)):
                staged.append(_stage_npy_copy(probe, raw[part], np.dtype(dtype), n))
            path = self._publish_staged(tag, n, staged[1], staged[0])
        finally:
            for tmp in [*raw.values(), *(t for t, _ in staged)]:
                Path(tmp).unlink(missing_ok=True)
        self._update_count()
        return path

    def compact(self) -> Path | None:
        """Merge all segments into one (newest wins); returns its keys file (None for an empty store).

        Needs the store to itself (no concurrent appends). Peak memory is about 40 bytes per stored pair
        (1.7 GB for 40M pairs, 0.5 GB of it the memory-mapped segments being merged).
        """
        self.refresh()
        old = [(s.number, s.tag) for s in self._segments]
        names = self._names(old)
        if len(old) <= 1:
            return Path(f"{self._stem(*old[0])}.keys.npy") if old else None
        newest_first = self._segments[::-1]
        keys = np.concatenate([s.keys for s in newest_first])
        order = np.argsort(keys, kind="stable")  # timsort: merges the sorted runs
        keys = keys[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        keys, order = keys[first], order[first]
        del first
        values = np.concatenate([s.values for s in newest_first])[order]
        del order
        self._segments = []  # let the old memory maps go
        path = self._publish(f"_{uuid4().hex[:12]}", keys, values, names=sorted(names))
        del keys, values
        for number, tag in old:
            self._remove(number, tag)
        present = {(m[1], m[2]) for name in os.listdir(self._dir) if (m := _KEYS_FILE.match(name))}
        for name in os.listdir(self._dir):  # files left by appenders that died before publishing keys
            if (m := _PART_FILE.match(name)) and (m[1], m[2]) not in present:
                (self._dir / name).unlink(missing_ok=True)
        self._update_count()
        return path

    def _names(self, segments: Iterable[tuple[int, str]]) -> set[str]:
        """The names (:meth:`has_segment`) that ``(number, tag)`` segments carry: named tags and merged-in names."""
        names = set()
        for number, tag in segments:
            if not tag.startswith("_"):
                names.add(tag)
            sidecar = Path(f"{self._stem(number, tag)}.names.json")
            if sidecar.is_file():
                names.update(json.loads(sidecar.read_text(encoding="utf-8")))
        return names

    def merge(self, parts: Iterable[tuple[int, str]]) -> tuple[int, str] | None:
        """Merge published segments ``(number, tag)`` into one; returns the merged segment's ``(number, tag)``.

        Lookups answer as before, with other appenders at work: the merged segment takes the place of its newest part
        in the order (the same number, the tag followed by ``-``: it sorts right after it), holds each of the
        parts' pairs with the value of the newest part that has it, and leaves out a pair that a segment ordered
        between that part and the newest one (another writer's) holds, so that segment still wins. It is published
        (atomically, as :meth:`append`) before the parts are removed: a failure before leaves the store as it was,
        one after leaves parts that the merged segment shadows (the same answers; :meth:`compact` drops them). A
        segment another appender publishes between the parts while they are merged (two appends may share a number)
        sends the merge back to its start (the merged tag then ends in ``--``, and so on).

        Returns ``None`` and changes nothing when fewer than two parts are given, a part is not published or the
        merged name is taken. Memory: about 30 bytes per pair of the parts.
        """
        parts = sorted(set(parts))
        if len(parts) < 2:
            return None
        for attempt in range(1, 11):  # a new name each time: a reader may still map an earlier attempt's files
            target = (parts[-1][0], parts[-1][1] + "-" * attempt)
            self.refresh()
            position = {(s.number, s.tag): i for i, s in enumerate(self._segments)}
            if any(p not in position for p in parts) or target in position:
                return None
            keys, values = self._merged(parts, position)
            self._publish(target[1], keys, values, names=sorted(self._names(parts)), number=target[0])
            del keys, values
            if not any(s not in position and parts[0] < s < target for s in self._complete()):
                break
            self._remove(*target)  # published meanwhile between the parts: merge again, leaving its pairs out
        else:
            raise RuntimeError(f"{self.path}: other appenders keep publishing segments between the merged ones")
        for number, tag in parts:
            self._remove(number, tag)
        self._update_count()
        return target

    def _merged(self, parts: list[tuple[int, str]], position: dict[tuple[int, str], int]) -> tuple[np.ndarray, ...]:
        """The sorted unique keys and values of :meth:`merge` ``parts`` (``position``: their places in the order)."""
        at = np.array([position[p] for p in parts])
        newest_first = [self._segments[i] for i in at[::-1]]
        keys = np.concatenate([s.keys for s in newest_first])
        order = np.argsort(keys, kind="stable")  # timsort: merges the sorted runs; ties keep the newest first
        keys = keys[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        keys, order = keys[first], order[first]
        source = np.repeat(at[::-1], [len(s.keys) for s in newest_first])[order]  # position of each pair's part
        values = np.concatenate([s.values for s in newest_first])[order]
        del order, first
        keep = np.ones(len(keys), dtype=bool)
        for i in sorted(set(range(at[0] + 1, at[-1])) - set(at.tolist())):  # another writer's segment between
            other = self._segments[i]
            if len(other.keys) and len(keys):
                shadowed = other.keys[other.find(keys)] == keys
                keep &= ~(shadowed & (source < i))
        if keep.all():
            return keys, values
        return keys[keep], values[keep]

    def verify(self) -> dict[str, Any]:
        """Re-hash every segment file against the checksums recorded when it was written.

        Returns ``{"segments": n, "verified": [names], "without_checksums": [names]}`` (segments written before
        checksums cannot be verified; their sizes are still checked on open). A mismatch raises
        :class:`~kdir.errors.DamagedStoreError` naming the file.
        """
        self.refresh()
        verified, unchecked = [], []
        for seg in self._segments:
            stem = self._stem(seg.number, seg.tag)
            sums = self._sums(seg.number, seg.tag)
            if sums is None:
                unchecked.append(stem.name)
                continue
            for part, _ in _PARTS:
                file = Path(f"{stem}.{part}.npy")
                if (got := _file_xxh64(file)) != sums[part]["xxh64"]:
                    raise _damaged(file, f"xxh64 {got}, but {sums[part]['xxh64']} was written", self.path)
            verified.append(stem.name)
        return {"segments": len(self._segments), "verified": verified, "without_checksums": unchecked}

    # -- import / export -------------------------------------------------------------------------------

    def _import_rows(
        self,
        rows: Iterable[tuple[str, str, float]] | Iterable[tuple[int, float]],
        chunk_size: int,
        source: str | Path | None = None,
        keyed: bool = False,
    ) -> int:
        """Append ``(qid, pid, score)`` rows (``keyed``: ``(pair key, score)`` rows), one segment per ``chunk_size``;
        all or nothing.

        A score that is not finite in float32 raises :class:`~kdir.errors.NonFiniteScoreError` naming its pair.
        """
        written, n = [], 0
        try:
            for chunk in _batched(rows, chunk_size):
                *ids, scores = zip(*chunk)
                with np.errstate(over="ignore", invalid="ignore"):
                    values = np.asarray(scores, dtype=np.float64).astype(np.float32)
                if not (finite := np.isfinite(values)).all():
                    i = int(np.flatnonzero(~finite)[0])
                    pair = f"key={ids[0][i]:016x}" if keyed else f"qid={ids[0][i]!r}, pid={ids[1][i]!r}"
                    raise NonFiniteScoreError(
                        f"{source or 'imported rows'}: the score {scores[i]!r} of ({pair}) "
                        "is NaN, infinite or beyond float32's range (|x| <= 3.4e38); fix or remove it, then import "
                        "again (nothing was imported)"
                    )
                keys = np.asarray(ids[0], dtype=np.uint64) if keyed else pair_keys_from_ids(ids[0], ids[1])
                written.append(self.append(keys, values))
                n += len(chunk)
        except BaseException:
            for keys_file in written:
                m = _KEYS_FILE.match(keys_file.name)
                self._remove(int(m[1]), m[2])
            self._update_count()
            raise
        return n

    def import_tsv(
        self, path: str | Path, format: Literal["pairs", "margin_scores"] = "pairs", chunk_size: int = 2_000_000
    ) -> int:
        """Import a teacher-score TSV; returns the number of pairs read.

        ``pairs``: ``qid<TAB>pid<TAB>score``. ``margin_scores``: Hofstätter et al.'s
        ``pos_score<TAB>neg_score<TAB>qid<TAB>pos_pid<TAB>neg_pid`` (both pairs of a line are stored). The file
        is streamed; a malformed line raises :class:`~kdir.errors.DataFormatError` and nothing is imported.
        """
        if format not in ("pairs", "margin_scores"):
            raise ConfigError(f"unknown score format {format!r}: expected 'pairs' or 'margin_scores'")
        return self.import_file(path, format, chunk_size)

    def import_jsonl(self, path: str | Path, chunk_size: int = 2_000_000) -> int:
        """Import ``{"qid": ..., "pid": ..., "score": ...}`` lines; returns the number of pairs read."""
        return self.import_file(path, "jsonl", chunk_size)

    def import_file(self, path: str | Path, format: str = "pairs", chunk_size: int = 2_000_000) -> int:
        """Import a score file of any :data:`IMPORT_FORMATS` (streamed, all or nothing); returns the pairs read.

        ``trec``: a TREC run ``qid Q0 pid rank score tag`` (its scores). ``keys``: ``<16 hex digits>\\t<score>``
        lines, the pair keys and scores written by ``export format=keys`` (a lossless copy of a store).
        """
        if format == "keys":
            return self._import_rows(((k, s) for _, k, s in read_key_scores(path)), chunk_size, path, keyed=True)
        return self._import_rows(score_rows(path, format), chunk_size, source=path)

    @classmethod
    def import_new(
        cls,
        path: str | Path,
        source: str | Path,
        format: str = "pairs",
        meta: dict[str, Any] | None = None,
        chunk_size: int = 2_000_000,
        replace: bool = False,
    ) -> ScoreStore:
        """Import the score file ``source`` into a new store at ``path``, atomically; returns the opened store.

        The store is built in a temporary folder next to ``path`` (:func:`kdir.utils.io.temp_path`) and renamed to
        ``path`` once every row is in, with ``meta["imported"]`` = ``{"file", "format", "size", "mtime_ns",
        "pairs", "queries", "finished"}`` (``queries``: distinct query ids read; ``None`` for ``keys`` files): an
        interrupted import leaves no store at ``path``, only its temporary folder (removed by a later import once
        its process is gone). ``format``: one of :data:`IMPORT_FORMATS` (see :meth:`import_file`). ``replace``:
        swap out the store now at ``path`` (an import that never finished); otherwise a store at ``path`` is an
        error, unless another process has just published the same finished import, which is then opened.
        """
        path, source = Path(path), Path(source)
        if format not in IMPORT_FORMATS:
            raise ConfigError(f"unknown score format {format!r}: expected one of {', '.join(IMPORT_FORMATS)}")
        if not source.is_file():
            raise MissingFileError(f"{source}: no such file")
        if not replace and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise OutputExistsError(f"{path}: exists; an import needs a new store path")
        _remove_stale_imports(path)
        before = source.stat()
        tmp = temp_path(path)
        try:
            given = {"teacher": {"name": f"imported:{source}"}, "data": {"imported_from": str(source)}}
            store = cls.create(tmp, given | (meta or {}))
            queries: set[str] | None = None
            if format == "keys":
                n = store.import_file(source, format, chunk_size)
            else:
                queries = set()
                n = store._import_rows(_noting_queries(score_rows(source, format), queries), chunk_size, source)
            after = source.stat()
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise OutputExistsError(f"{source} changed while it was imported; import it again once it is written")
            record = {
                "file": str(source.resolve()),
                "format": format,
                "size": before.st_size,
                "mtime_ns": before.st_mtime_ns,
                "pairs": n,
                "queries": None if queries is None else len(queries),
                "finished": _now(),
            }
            cls._write_meta(tmp, store.meta | {"imported": record, "count": len(store), "updated": _now()})
            del store
            _publish_folder(tmp, path, replace)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a publish; the unfinished folder otherwise
        published = cls(path)
        if published.meta.get("imported", {}).get("file") != record["file"] or import_differences(
            published.meta["imported"], source
        ):
            raise OutputExistsError(f"{path}: another process published another store there meanwhile")
        return published

    @classmethod
    def build_new(
        cls, path: str | Path, meta: dict[str, Any], fill: Callable[[ScoreStore], Any], replace: bool = False
    ) -> ScoreStore:
        """Create a store at ``path`` atomically: ``fill(store)`` writes it in a temporary folder next to ``path``,
        which is renamed into place when ``fill`` returns (``replace``: swapping out the store there); an error or
        a kill leaves no store at ``path``. Returns the published store."""
        path = Path(path)
        if not replace and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise OutputExistsError(f"{path}: exists; a new store needs a new path")
        _remove_stale_imports(path)
        tmp = temp_path(path)
        try:
            store = cls.create(tmp, meta)
            fill(store)
            del store
            _publish_folder(tmp, path, replace)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(path)

    def _scores(self, qids: tuple[str, ...], pids: tuple[str, ...], dest: str | Path) -> np.ndarray:
        scores = self.lookup(pair_keys_from_ids(qids, pids))
        if (missing := np.flatnonzero(np.isnan(scores))).size:
            i = missing[0]
            raise UnknownIdError(
                f"{self.path}: no score for (qid={qids[i]!r}, pid={pids[i]!r}) "
                f"({missing.size} missing in this chunk); {dest} not written"
            )
        return scores

    def export_jsonl(self, path: str | Path, pairs: Iterable[tuple[str, str]], chunk_size: int = 1_000_000) -> int:
        """Write ``{"qid", "pid", "score"}`` lines for ``pairs``; returns the number written.

        Raises :class:`~kdir.errors.UnknownIdError` naming the first pair that is not stored.
        """
        n = 0
        with atomic_write(path) as f:
            for chunk in _batched(pairs, chunk_size):
                qids, pids = zip(*chunk)
                scores = score_text(self._scores(qids, pids, path))
                f.writelines(
                    json.dumps({"qid": q, "pid": p, "score": float(s)}) + "\n" for q, p, s in zip(qids, pids, scores)
                )
                n += len(chunk)
        return n

    def export_margin_tsv(
        self, path: str | Path, triples: Iterable[tuple[str, str, str]], chunk_size: int = 1_000_000
    ) -> int:
        """Write Hofstätter et al.'s ``pos_score neg_score qid pos_pid neg_pid`` TSV for ``(qid, pos, neg)`` triples.

        Returns the number of lines; raises :class:`~kdir.errors.UnknownIdError` on a pair that is not stored.
        """
        n = 0
        with atomic_write(path) as f:
            for chunk in _batched(triples, chunk_size):
                qids, pos, neg = zip(*chunk)
                ps = score_text(self._scores(qids, pos, path))
                ns = score_text(self._scores(qids, neg, path))
                f.writelines(f"{a}\t{b}\t{q}\t{p}\t{d}\n" for a, b, q, p, d in zip(ps, ns, qids, pos, neg))
                n += len(chunk)
        return n


class TieredAppender:
    """Appends to a score store while keeping the segments it wrote few: a size-tiered merge of its own segments.

    Each :meth:`append` publishes a level-0 segment; whenever the ``fanout`` newest segments of this appender are of
    one level, they are merged (:meth:`ScoreStore.merge`) into one segment of the next level, as in the
    size-tiered compaction of log-structured merge trees (O'Neil et al., 1996, "The log-structured merge-tree";
    Cassandra's and RocksDB's universal compaction). After ``N`` appends at most
    ``(fanout - 1) * (1 + log_fanout N)`` of its segments remain (the digits of ``N`` in base ``fanout``), and each
    pair was rewritten about ``log_fanout N`` times. Only this appender's segments are merged: other appenders' and
    those written before it started stay as they are, and lookups answer as if nothing had been merged.

    Args:
        store: the store to append to.
        fanout: segments of one level merged into one of the next (at least 2).
    """

    def __init__(self, store: ScoreStore, fanout: int = 4):
        if fanout < 2:
            raise ValueError(f"fanout must be at least 2, got {fanout}")
        self.store, self.fanout = store, fanout
        self.segments: list[tuple[int, str, int]] = []  # (number, tag, level) of this appender's, oldest first

    def append(self, keys: np.ndarray, values: np.ndarray) -> Path:
        """:meth:`ScoreStore.append`, then merge this appender's newest segments while ``fanout`` share a level."""
        path = self.store.append(keys, values)
        m = _KEYS_FILE.match(path.name)
        self.segments.append((int(m[1]), m[2], 0))
        while len(self.segments) >= self.fanout and len({lv for *_, lv in self.segments[-self.fanout :]}) == 1:
            parts, level = self.segments[-self.fanout :], self.segments[-1][2]
            del self.segments[-self.fanout :]  # on an error they are left as they are, never merged again
            merged = self.store.merge([(n, t) for n, t, _ in parts])
            if merged is None:
                break
            self.segments.append((*merged, level + 1))
        return path
