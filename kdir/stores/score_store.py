"""A directory of teacher scores keyed by (query id, document id), computed once and memory-mapped.

Layout::

    <store>/meta.json                               provenance: format, key scheme, teacher, data, count, dates
    <store>/segments/seg-<n:06d>-<tag>.keys.npy     uint64 pair keys (kdir.stores.keys), sorted, unique
    <store>/segments/seg-<n:06d>-<tag>.values.npy   float32 scores aligned with the keys
    <store>/segments/seg-<n:06d>-<tag>.names.json   (compacted segments) names of the named segments merged in

Every write goes to a temporary file in the same folder and is published with ``os.replace``; a segment's
values are published before its keys, and readers only use segments whose keys file exists, so a segment
is visible complete or not at all. ``<n>`` is one more than the highest number in the folder when the
segment is published, so a later append sorts (and wins on duplicate keys) after an earlier one. ``<tag>``
is a random ``_<hex>`` for :meth:`ScoreStore.append` or the caller's name for :meth:`ScoreStore.append_segment`;
it keeps appenders in different processes from ever writing the same file (two concurrent appends may share
``<n>``: they are then ordered by tag).

Appends from several processes may run concurrently with each other and with readers (which see new
segments after :meth:`ScoreStore.refresh`); :meth:`ScoreStore.compact` needs the store to itself. Each open
segment holds two memory maps (and two file descriptors), so compact after a bulk of small appends.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Literal
from uuid import uuid4

import numpy as np

from kdir.data.formats import read_margin_scores, read_pair_scores
from kdir.errors import ConfigError, DataFormatError, MissingFileError, OutputExistsError, UnknownIdError
from kdir.stores.keys import KEY_SCHEME, pair_keys_from_ids
from kdir.utils.io import atomic_write, stage_file

FORMAT = "kdir-score-store/1"
_META = "meta.json"
_SEGMENTS = "segments"
_RESERVED = ("format", "key", "count", "created", "updated", "kdir_version")
_KEYS_FILE = re.compile(r"^seg-(\d{6,})-([A-Za-z0-9_.-]+)\.keys\.npy$")
_ANY_FILE = re.compile(r"^seg-(\d{6,})-")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BUCKET = 32  # mean keys per bucket of a segment's in-memory directory (~0.5 byte per pair)


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


def _stage_npy(path: Path, arr: np.ndarray) -> Path:
    """Write ``arr`` to a temporary file next to ``path`` (fsynced, not yet published); returns its name."""
    return stage_file(path, lambda f: np.save(f, arr, allow_pickle=False))


def _as_keys(keys: Any) -> np.ndarray:
    arr = np.asarray(keys)
    if arr.dtype == np.uint64:
        return arr
    if arr.size == 0 or arr.dtype.kind == "u":
        return arr.astype(np.uint64)
    raise TypeError(f"pair keys must be uint64 (see kdir.stores.pair_keys), got {arr.dtype}")


def _sorted_unique(keys: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sort by key; of repeated keys the last one given wins."""
    k, v = _as_keys(keys), np.asarray(values, dtype=np.float32)
    if k.shape != v.shape:
        raise ValueError(f"keys {k.shape} and values {v.shape} must have the same shape")
    k, v = k.ravel(), v.ravel()
    if np.isnan(v).any():
        raise ValueError("NaN scores cannot be stored: NaN means 'not in the store' in lookups")
    order = np.argsort(k, kind="stable")
    k = k[order]
    last = np.ones(len(k), dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    return k[last], v[order[last]]


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk


def _score_text(scores: np.ndarray) -> list[str]:
    """Shortest decimal text that reads back to the same float32."""
    return [str(s) for s in scores.astype(np.float32)]


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

    def _load(self, number: int, tag: str) -> _Segment:
        stem = self._stem(number, tag)
        arrays = []
        for part, dtype in (("keys", np.uint64), ("values", np.float32)):
            file = Path(f"{stem}.{part}.npy")
            arr = np.load(file, mmap_mode="r")
            if arr.dtype != dtype or arr.ndim != 1:
                raise DataFormatError(file, None, f"a 1-d {np.dtype(dtype)} array", got=f"{arr.dtype} {arr.shape}")
            arrays.append(arr.view(np.ndarray))
        if len(arrays[0]) != len(arrays[1]):
            raise DataFormatError(stem, None, "as many values as keys", got=f"{len(arrays[1])} vs {len(arrays[0])}")
        return _Segment(number, tag, *arrays)

    def refresh(self) -> ScoreStore:
        """Pick up segments published (or removed by a compaction) since the last look."""
        cached = {(s.number, s.tag): s for s in self._segments}
        for _ in range(10):  # a compaction elsewhere may remove segments while we open them
            try:
                self._segments = [cached.get(nt) or self._load(*nt) for nt in self._complete()]
                return self
            except FileNotFoundError:
                continue
        raise RuntimeError(f"{self.path}: segments keep disappearing while opening them (a compaction running?)")

    def _publish(self, tag: str, keys: np.ndarray, values: np.ndarray, names: list[str] | None = None) -> Path:
        """Write a segment of sorted unique keys under the next number; returns its keys file."""
        probe = self._stem(0, tag)
        tmp_values = _stage_npy(probe, values)
        tmp_keys = tmp_names = None
        try:
            tmp_keys = _stage_npy(probe, keys)
            if names:
                tmp_names = stage_file(probe, lambda f: f.write(json.dumps(names)), mode="w")
            taken = [int(m[1]) for name in os.listdir(self._dir) if (m := _ANY_FILE.match(name))]
            stem = self._stem(max(taken, default=0) + 1, tag)
            if tmp_names is not None:
                os.replace(tmp_names, f"{stem}.names.json")
            os.replace(tmp_values, f"{stem}.values.npy")
            os.replace(tmp_keys, f"{stem}.keys.npy")  # last: the segment is now visible
        finally:
            for tmp in (tmp_values, tmp_keys, tmp_names):
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)
        return Path(f"{stem}.keys.npy")

    def _remove(self, number: int, tag: str) -> None:
        stem = self._stem(number, tag)
        for part in ("keys.npy", "values.npy", "names.json"):  # keys first: invisible at once
            Path(f"{stem}.{part}").unlink(missing_ok=True)

    def append(self, keys: np.ndarray, values: np.ndarray) -> Path:
        """Store ``values[i]`` under ``keys[i]`` as one new segment (later appends win); returns its keys file.

        Repeated keys within the call keep their last value. NaN values are refused.
        """
        path = self._publish(f"_{uuid4().hex[:12]}", *_sorted_unique(keys, values))
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

    # -- maintenance -----------------------------------------------------------------------------------

    def compact(self) -> Path | None:
        """Merge all segments into one (newest wins); returns its keys file (None for an empty store).

        Needs the store to itself (no concurrent appends). Peak memory is about 40 bytes per stored pair
        (1.7 GB for 40M pairs, 0.5 GB of it the memory-mapped segments being merged).
        """
        self.refresh()
        old = [(s.number, s.tag) for s in self._segments]
        names = set()
        for number, tag in old:
            if not tag.startswith("_"):
                names.add(tag)
            sidecar = Path(f"{self._stem(number, tag)}.names.json")
            if sidecar.is_file():
                names.update(json.loads(sidecar.read_text(encoding="utf-8")))
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
        present = {int(m[1]) for name in os.listdir(self._dir) if (m := _KEYS_FILE.match(name))}
        for name in os.listdir(self._dir):  # values left by appenders that died before publishing keys
            if name.endswith(".values.npy") and (m := _ANY_FILE.match(name)) and int(m[1]) not in present:
                (self._dir / name).unlink(missing_ok=True)
        self._update_count()
        return path

    # -- import / export -------------------------------------------------------------------------------

    def _import_rows(self, rows: Iterable[tuple[str, str, float]], chunk_size: int) -> int:
        """Append ``(qid, pid, score)`` rows, one segment per ``chunk_size``; all or nothing."""
        written, n = [], 0
        try:
            for chunk in _batched(rows, chunk_size):
                qids, pids, scores = zip(*chunk)
                written.append(self.append(pair_keys_from_ids(qids, pids), np.asarray(scores, dtype=np.float32)))
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
        if format == "pairs":
            rows = ((qid, pid, score) for _, qid, pid, score in read_pair_scores(path))
        elif format == "margin_scores":
            rows = (
                row
                for _, ps, ns, qid, pos, neg in read_margin_scores(path)
                for row in ((qid, pos, ps), (qid, neg, ns))
            )
        else:
            raise ConfigError(f"unknown score format {format!r}: expected 'pairs' or 'margin_scores'")
        return self._import_rows(rows, chunk_size)

    def import_jsonl(self, path: str | Path, chunk_size: int = 2_000_000) -> int:
        """Import ``{"qid": ..., "pid": ..., "score": ...}`` lines; returns the number of pairs read."""

        def rows() -> Iterator[tuple[str, str, float]]:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        yield str(obj["qid"]), str(obj["pid"]), float(obj["score"])
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        expected = 'a JSON object with "qid", "pid" and a numeric "score"'
                        raise DataFormatError(path, lineno, expected, got=line.strip()) from None

        if not Path(path).is_file():
            raise MissingFileError(f"{path}: no such file")
        return self._import_rows(rows(), chunk_size)

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
                scores = _score_text(self._scores(qids, pids, path))
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
                ps = _score_text(self._scores(qids, pos, path))
                ns = _score_text(self._scores(qids, neg, path))
                f.writelines(f"{a}\t{b}\t{q}\t{p}\t{d}\n" for a, b, q, p, d in zip(ps, ns, qids, pos, neg))
                n += len(chunk)
        return n
