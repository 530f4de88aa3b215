"""What ``python -m kdir.store`` does to score stores: describe, verify, import, export and merge them.

A store holds hashed pair keys, not ids (:mod:`kdir.stores.keys`), so the ids of an export come from a pair
file: a run, qrels, a score file, or the file the store was imported from. ``format=keys`` exports (and
imports) the keys themselves (``<16 hex digits><TAB><score>``), a lossless copy of any store. Every reader and
writer streams: memory is one chunk of pairs (plus one query's pairs for TREC runs), whatever the store's size.
Outputs appear complete or not at all (:func:`kdir.utils.io.atomic_write`, :meth:`ScoreStore.build_new`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from kdir.data.formats import text_lines
from kdir.errors import ConfigError, DataFormatError, KdirError, MissingFileError, OutputExistsError, UnknownIdError
from kdir.stores.keys import pair_keys_from_ids
from kdir.stores.score_store import (
    IMPORT_FORMATS,
    ScoreStore,
    import_differences,
    key_ranges,
    score_rows,
    score_text,
)
from kdir.utils.io import atomic_write

EXPORT_FORMATS = ("pairs", "jsonl", "trec", "keys")
CONFLICT_RULES = ("error", "first", "last")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def disk_size(path: str | Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _human(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    power = min(4, int(np.log10(n) // 3))
    return f"{n / 1000**power:.1f} {('KB', 'MB', 'GB', 'TB')[power - 1]}"


def origin(meta: dict[str, Any]) -> str:
    """How a store was written: ``merged``, ``imported``, ``scored`` (``kdir.score``) or ``appended`` (``signal=fill``
    or library appends)."""
    if meta.get("merged"):
        return "merged"
    if meta.get("imported") is not None or str(meta.get("teacher", {}).get("name", "")).startswith("imported:"):
        return "imported"
    if meta.get("scoring") or meta.get("data", {}).get("source"):
        return "scored"
    return "appended"


def teacher_text(teacher: dict[str, Any]) -> str:
    """One line for a teacher record: its name, weights hash (12 digits) and scoring settings."""
    text = str(teacher.get("name") or "(no teacher recorded)")
    if teacher.get("weights"):
        text += f", weights {str(teacher['weights'])[:12]}"
    if teacher.get("config"):
        text += ", " + json.dumps(teacher["config"], sort_keys=True)
    return text


def teacher_record_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two stores' teacher records (``[]``: the same teacher): class, each scoring setting,
    weights, any other field; as ``what <a> vs <b>``."""
    out = []
    if a.get("name") != b.get("name"):
        out.append(f"class {a.get('name')} vs {b.get('name')}")
    ca, cb = a.get("config") or {}, b.get("config") or {}
    out += [f"{k} {ca.get(k)!r} vs {cb.get(k)!r}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    if a.get("weights") != b.get("weights"):
        out.append(f"weights {str(a.get('weights'))[:12]} vs {str(b.get('weights'))[:12]}")
    rest = sorted((set(a) | set(b)) - {"name", "config", "weights"})
    out += [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in rest if a.get(k) != b.get(k)]
    return out


# ---------------------------------------------------------------- info, verify


def store_info(path: str | Path) -> dict[str, Any]:
    """What a store is, read from its meta and file headers (cheap: no scores are read).

    Returns ``path``, ``meta``, ``origin``, ``entries`` (stored pairs summed over segments), ``segments`` (see
    :meth:`ScoreStore.segments`), ``with_checksums``, ``without_checksums``, ``queries`` (recorded or ``None``)
    and ``bytes`` on disk. Opening checks every segment file's size (a truncated file is an error naming it).
    """
    store = ScoreStore.open(path)
    meta, segments = store.meta, store.segments()
    recorded = meta.get("imported") or {}
    return {
        "path": str(store.path),
        "meta": meta,
        "origin": origin(meta),
        "entries": len(store),
        "segments": segments,
        "with_checksums": sum(s["checksums"] for s in segments),
        "without_checksums": sum(not s["checksums"] for s in segments),
        "queries": recorded.get("queries", meta.get("data", {}).get("queries")),
        "queries_of": "the imported file" if "queries" in recorded else "the last scoring job",
        "bytes": disk_size(store.path),
    }


def info_lines(info: dict[str, Any]) -> list[str]:
    """:func:`store_info` as lines for a terminal."""
    meta, path = info["meta"], info["path"]
    lines = [
        f"store      {path}",
        f"format     {meta.get('format')}, keys {meta.get('key')}, written by kdir {meta.get('kdir_version')}",
        f"teacher    {teacher_text(meta.get('teacher', {}))}",
        f"origin     {info['origin']}",
    ]
    if record := meta.get("imported"):
        lines.append(
            f"imported   {record.get('file')} ({record.get('format')}, {record.get('size')} bytes), "
            f"{record.get('pairs')} pairs read, finished {record.get('finished')}"
        )
    if merged := meta.get("merged"):
        lines.append(
            f"merged     {', '.join(merged.get('inputs', []))} (on_conflict={merged.get('on_conflict')}, "
            f"{merged.get('conflicts')} conflicting pairs), finished {merged.get('finished')}"
        )
    if scoring := meta.get("scoring"):
        state = f"finished {scoring['finished']}" if scoring.get("finished") else "NOT finished"
        lines.append(f"scoring    last job started {scoring.get('started')}, {state}")
    if data := meta.get("data"):
        lines.append(f"data       {json.dumps(data, sort_keys=True)}")
    queries = f"{info['queries']} (in {info['queries_of']})" if info["queries"] is not None else "not recorded"
    n = len(info["segments"])
    lines += [
        f"pairs      {info['entries']} in {n} segment{'s' * (n != 1)} (meta count {meta.get('count')})"
        + (" (a pair in several segments counts once per segment: verify counts unique pairs)" if n > 1 else ""),
        f"queries    {queries}",
        f"size       {_human(info['bytes'])} on disk",
        f"checksums  {info['with_checksums']} of {n} segments have checksum records"
        + (f" ({info['without_checksums']} written before checksums)" if info["without_checksums"] else "")
        + f"; re-hash them with: python -m kdir.store verify store={path}",
        f"dates      created {meta.get('created')}, updated {meta.get('updated')}",
    ]
    return lines


def verify_store(
    path: str | Path, pairs: str | Path | None = None, pairs_format: str = "auto", chunk_size: int = 4_000_000
) -> dict[str, Any]:
    """Check a store's checksums and its completeness; returns a report (``problems`` empty: complete).

    Checksums: :meth:`ScoreStore.verify` (a damaged file raises :class:`~kdir.errors.DamagedStoreError` naming
    it). Completeness: an import finished (``meta["imported"]`` recorded), the last ``kdir.score`` job finished,
    and with ``pairs`` (a pair file, see :func:`read_pairs`) every pair of it stored. ``notes`` say what is worth
    knowing but loses nothing (a stale meta count, leftovers of writers that died, a changed import source).
    Also counts the unique pairs (``unique``), reading every key once.
    """
    store = ScoreStore.open(path)
    report = store.verify()
    meta = store.meta
    problems: list[str] = []
    notes: list[str] = []
    report["unique"] = sum(len(k) for k, _ in store.iter_pairs(chunk_size))
    report["entries"] = len(store)
    if meta.get("count") != len(store):
        notes.append(f"meta.json counts {meta.get('count')} pairs, the segments hold {len(store)}")
    if origin(meta) == "imported":
        if (record := meta.get("imported")) is None:
            problems.append("an import that never finished (no import record): import the file again")
        elif Path(str(record.get("file"))).is_file() and (differs := import_differences(record, record["file"])):
            notes.append(f"the imported file changed since ({'; '.join(differs)})")
    scoring = meta.get("scoring")
    if scoring and not scoring.get("finished"):
        problems.append(
            f"the last `python -m kdir.score` job (started {scoring.get('started')}, pairs of "
            f"{scoring.get('data', {}).get('source')}) did not finish: rerun it"
        )
    parts = (".keys.npy", ".values.npy", ".names.json", ".sums.json")
    names = [p.name for p in (store.path / "segments").iterdir() if p.name.startswith("seg-")]
    published = {n.removesuffix(".keys.npy") for n in names if n.endswith(".keys.npy")}
    leftovers = [n for n in names for s in parts[1:] if n.endswith(s) and n.removesuffix(s) not in published]
    if leftovers:
        notes.append(f"{len(leftovers)} files of segments never published (a writer died; compaction removes them)")
    if pairs is not None:
        n = missing = 0
        example = None
        for block in _batched_pairs(read_pairs(pairs, pairs_format), chunk_size):
            lines, qids, pids = zip(*block)
            found = store.contains(pair_keys_from_ids(qids, pids))
            n += len(found)
            missing += int((~found).sum())
            if example is None and not found.all():
                i = int(np.flatnonzero(~found)[0])
                example = f"{pairs}:{lines[i]}: qid={qids[i]!r}, pid={pids[i]!r}"
        report |= {"requested": n, "missing": missing}
        if missing:
            problems.append(f"{missing} of the {n} pairs of {pairs} are not stored (first: {example})")
    return report | {"problems": problems, "notes": notes}


def verify_lines(report: dict[str, Any]) -> list[str]:
    """:func:`verify_store`'s report as lines for a terminal."""
    lines = [
        f"checksums  {len(report['verified'])} of {report['segments']} segments re-hashed: all match"
        + (f"; {len(report['without_checksums'])} written before checksums" if report["without_checksums"] else ""),
        f"pairs      {report['unique']} unique ({report['entries']} entries)",
    ]
    if "requested" in report:
        lines.append(f"requested  {report['requested'] - report['missing']} of {report['requested']} pairs stored")
    lines += [f"note       {n}" for n in report["notes"]]
    lines.append("complete   " + ("yes" if not report["problems"] else "NO: " + "; ".join(report["problems"])))
    return lines


# ---------------------------------------------------------------- pair files


def read_pairs(path: str | Path, layout: str = "auto") -> Iterator[tuple[int, str, str]]:
    """Stream ``(line, qid, pid)`` of the pairs a file names, by its number of columns (``layout="auto"``):

    2 ``qid pid``; 3 ``qid pid <any>`` (BEIR qrels with or without header, ``qid pid score``); 4 ``qid 0 pid rel``
    (TREC qrels); 5 ``pos_score neg_score qid pos_pid neg_pid`` (Hofstätter et al.: both pairs); 6 ``qid Q0 pid rank
    score tag`` (TREC run). A ``.jsonl`` file: ``{"qid", "pid", ...}`` objects. ``layout="triples"``: MS MARCO id
    triples ``qid pos_pid neg_pid`` (both pairs).
    """
    if layout not in ("auto", "triples"):
        raise ConfigError(f"pairs_format={layout!r}: expected auto or triples")
    if layout == "auto" and str(path).endswith(".jsonl"):
        for lineno, line in text_lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                yield lineno, str(obj["qid"]), str(obj["pid"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataFormatError(path, lineno, 'a JSON object with "qid" and "pid"', got=line.strip()) from None
        return
    expected = "qid pid, qid pid x, qid 0 pid rel, a Hofstätter triple or a TREC run line"
    if layout == "triples":
        expected = "'qid<TAB>pos_pid<TAB>neg_pid'"
    for lineno, line in text_lines(path):
        fields = line.split()
        if not fields:
            continue
        n = len(fields)
        if layout == "triples":
            if n != 3:
                raise DataFormatError(path, lineno, expected, got=line.strip())
            yield lineno, fields[0], fields[1]
            yield lineno, fields[0], fields[2]
        elif n == 2:
            yield lineno, fields[0], fields[1]
        elif n == 3:
            if lineno == 1 and fields[2].lower() in ("score", "rel", "relevance", "label"):
                continue  # BEIR header
            yield lineno, fields[0], fields[1]
        elif n in (4, 6):
            yield lineno, fields[0], fields[2]
        elif n == 5:
            yield lineno, fields[2], fields[3]
            yield lineno, fields[2], fields[4]
        else:
            raise DataFormatError(path, lineno, expected, got=line.strip())


def read_ids(path: str | Path) -> set[str]:
    """Query ids of a file: the first field of each line, or the ``_id`` (``qid``, ``id``) of ``.jsonl`` objects."""
    ids: set[str] = set()
    jsonl = str(path).endswith(".jsonl")
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        if not jsonl:
            ids.add(line.split()[0])
            continue
        try:
            obj = json.loads(line)
            ids.add(str(next(obj[k] for k in ("_id", "qid", "id") if k in obj)))
        except (json.JSONDecodeError, StopIteration, TypeError):
            raise DataFormatError(path, lineno, 'a JSON object with "_id"', got=line.strip()) from None
    return ids


def _batched_pairs(rows: Iterable[tuple[int, str, str]], n: int) -> Iterator[list[tuple[int, str, str]]]:
    chunk: list[tuple[int, str, str]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _query_blocks(rows: Iterable[tuple[int, str, str]]) -> Iterator[tuple[int, str, list[str]]]:
    """``(first line, qid, unique pids in order)`` of each run of consecutive rows of one query."""
    qid, first, pids = None, 0, {}
    for lineno, q, p in rows:
        if q != qid:
            if qid is not None:
                yield first, qid, list(pids)
            qid, first, pids = q, lineno, {}
        pids[p] = None
    if qid is not None:
        yield first, qid, list(pids)


def pair_source(store: ScoreStore, pairs: str | Path | None, layout: str = "auto") -> tuple[Iterator, str]:
    """The ``(line, qid, pid)`` rows to export and where they come from: ``pairs``, or the file the store was
    imported from (when it is still the same file); otherwise a :class:`~kdir.errors.ConfigError`."""
    if pairs is not None:
        return read_pairs(pairs, layout), str(pairs)
    record = store.meta.get("imported") or {}
    file, fmt = record.get("file"), record.get("format")
    if file and fmt != "keys" and Path(file).is_file() and not import_differences(record, file):
        rows = ((0, q, p) for q, p, _ in score_rows(file, fmt))
        return rows, f"{file} (the imported file)"
    why = (
        f"its imported file {file} is gone or changed"
        if file
        else "it records no pair file (a store holds hashed pair keys, not ids)"
    )
    raise ConfigError(
        f"{store.path}: cannot tell which (qid, pid) pairs to write, {why}: give pairs=<a run, qrels or score file> "
        f"(and queries=<ids file> to keep some queries), or export the keys: format=keys"
    )


# ---------------------------------------------------------------- import, export, merge


def import_scores(
    store: str | Path,
    file: str | Path,
    format: str = "pairs",
    teacher_name: str | None = None,
    replace: bool = False,
    chunk_size: int = 2_000_000,
) -> ScoreStore:
    """Import a score file into a new store folder, atomically (:meth:`ScoreStore.import_new`).

    ``teacher_name`` labels the teacher that produced the file (recorded as ``imported:<name>``; default the
    file's path): stores imported with the same label can be merged. An occupied ``store`` is refused unless
    ``replace`` and it is a score store (a folder that is not one is never replaced).
    """
    path = Path(store)
    if format not in IMPORT_FORMATS:
        raise ConfigError(f"format={format!r}: expected one of {', '.join(IMPORT_FORMATS)}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not (path / "meta.json").is_file():
            raise OutputExistsError(f"{path}: exists and is not a kdir score store: choose another store=<new folder>")
        if not replace:
            raise OutputExistsError(
                f"{path}: a score store is already there: import into a new folder (store=<new folder>), or set "
                "replace=true to replace it"
            )
    meta = {"teacher": {"name": f"imported:{teacher_name}"}} if teacher_name else None
    return ScoreStore.import_new(path, file, format, meta=meta, chunk_size=chunk_size, replace=replace)


def export_scores(
    store: str | Path,
    out: str | Path,
    format: str = "pairs",
    pairs: str | Path | None = None,
    pairs_format: str = "auto",
    queries: str | Path | None = None,
    missing: str = "skip",
    tag: str = "kdir",
    chunk_size: int = 1_000_000,
) -> dict[str, Any]:
    """Write a store's scores to ``out`` (atomically, streamed); returns ``{"written", "requested", "missing"}``.

    Formats: ``pairs`` (``qid<TAB>pid<TAB>score``), ``jsonl``, ``trec`` (a run: ``qid Q0 pid rank score tag``,
    ranked by score within each query) or ``keys`` (``<16 hex digits><TAB><score>``: every stored pair, in key
    order, when no ``pairs`` / ``queries`` are given). The pairs are those of ``pairs`` (a run, qrels or score file,
    :func:`read_pairs`) or of the file the store was imported from, in that file's order, each pair once per run
    of lines of one query; ``queries`` (an id file) keeps only those queries. A pair the store lacks is skipped
    and counted (``missing="skip"``) or an :class:`~kdir.errors.UnknownIdError` (``missing="error"``). Scores are
    written as the shortest text that reads back to the same float32.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format={format!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if missing not in ("skip", "error"):
        raise ConfigError(f"missing={missing!r}: expected skip or error")
    st = ScoreStore.open(store)
    out = Path(out)
    if out.resolve().is_relative_to(st.path.resolve()):
        raise ConfigError(f"out={out}: is inside the store {st.path}; write the export elsewhere")
    if format == "keys" and pairs is None and queries is None:
        n = 0
        with atomic_write(out) as f:
            for keys, values in st.iter_pairs(4 * chunk_size):
                f.writelines(f"{k:016x}\t{s}\n" for k, s in zip(keys.tolist(), score_text(values)))
                n += len(keys)
        return {"written": n, "requested": n, "missing": 0, "source": "every stored pair"}
    rows, source = pair_source(st, pairs, pairs_format)
    keep = read_ids(queries) if queries is not None else None
    if keep is not None:
        rows = (r for r in rows if r[1] in keep)
    written = requested = absent = 0
    seen: set[str] = set()
    with atomic_write(out) as f:
        for batch in _batched_blocks(_query_blocks(rows), chunk_size):
            qids = [q for _, q, pids in batch for _ in pids]
            pids = [p for _, _, ps in batch for p in ps]
            scores = st.lookup(pair_keys_from_ids(qids, pids))
            found = ~np.isnan(scores)
            requested += len(scores)
            if not found.all():
                absent += int((~found).sum())
                if missing == "error":
                    i = int(np.flatnonzero(~found)[0])
                    raise UnknownIdError(
                        f"{st.path}: no score for (qid={qids[i]!r}, pid={pids[i]!r}) of {source} ({absent} missing so "
                        f"far); {out} not written. Set missing=skip to export the pairs the store holds"
                    )
            at = 0
            for line, qid, ps in batch:
                s, ok = scores[at : at + len(ps)], found[at : at + len(ps)]
                at += len(ps)
                ids = [p for p, o in zip(ps, ok) if o]
                s = s[ok]
                if format == "trec":
                    if qid in seen:
                        where = f"{source}:{line}" if line else source
                        raise DataFormatError(
                            where,
                            None,
                            f"the lines of query {qid!r} together to rank them (sort by query id: sort -s -k1,1)",
                        )
                    seen.add(qid)
                    order = np.argsort(-s, kind="stable")
                    ids, s = [ids[j] for j in order], s[order]
                f.writelines(_lines(format, qid, ids, score_text(s), tag))
                written += len(ids)
    return {"written": written, "requested": requested, "missing": absent, "source": source}


def _lines(format: str, qid: str, pids: list[str], scores: list[str], tag: str) -> Iterator[str]:
    """One query's output lines (``trec``: ``pids`` best first)."""
    if format == "trec":
        yield from (f"{qid} Q0 {p} {r} {t} {tag}\n" for r, (p, t) in enumerate(zip(pids, scores), 1))
    elif format == "jsonl":
        yield from (json.dumps({"qid": qid, "pid": p, "score": float(t)}) + "\n" for p, t in zip(pids, scores))
    elif format == "keys":
        keys = pair_keys_from_ids([qid] * len(pids), pids).tolist()
        yield from (f"{k:016x}\t{t}\n" for k, t in zip(keys, scores))
    else:
        yield from (f"{qid}\t{p}\t{t}\n" for p, t in zip(pids, scores))


Block = tuple[int, str, list[str]]


def _batched_blocks(blocks: Iterable[Block], n: int) -> Iterator[list[Block]]:
    """Query blocks grouped until they hold at least ``n`` pairs."""
    batch, size = [], 0
    for block in blocks:
        batch.append(block)
        size += len(block[2])
        if size >= n:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def merge_stores(
    inputs: Sequence[str | Path],
    out: str | Path,
    on_conflict: str = "error",
    replace: bool = False,
    chunk_size: int = 4_000_000,
) -> ScoreStore:
    """Merge stores of one teacher into a new store at ``out`` (one segment, built aside and published complete).

    Every input must record the same teacher (class, scoring settings, weights; or the same import label):
    another teacher is a :class:`~kdir.errors.KdirError` naming both stores and what differs. A pair stored with
    different scores in several inputs is an error (``on_conflict="error"``) or takes the score of the first
    (``"first"``) or last (``"last"``) input listed that holds it; equal scores are not a conflict. Streamed by key
    range: memory is about ``chunk_size`` pairs per input.
    """
    if on_conflict not in CONFLICT_RULES:
        raise ConfigError(f"on_conflict={on_conflict!r}: expected one of {', '.join(CONFLICT_RULES)}")
    if not inputs:
        raise ConfigError("inputs=[]: give the stores to merge, e.g. inputs=[a.store,b.store]")
    out = Path(out)
    for p in inputs:
        if not Path(p).is_dir():
            raise MissingFileError(f"{p}: no such score store (inputs=...)")
        if Path(p).resolve() == out.resolve():
            raise ConfigError(f"store={out} is also an input: merge into a new folder")
    stores = [ScoreStore.open(p) for p in inputs]
    first = stores[0].meta.get("teacher", {})
    for other in stores[1:]:
        theirs = other.meta.get("teacher", {})
        if differs := teacher_record_differences(first, theirs):
            raise KdirError(
                f"cannot merge {stores[0].path} (teacher {teacher_text(first)}) with {other.path} (teacher "
                f"{teacher_text(theirs)}): {'; '.join(differs)}; merge only stores of one teacher"
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / "meta.json").is_file():
            raise OutputExistsError(f"{out}: exists and is not a kdir score store: choose another store=<new folder>")
        if not replace:
            raise OutputExistsError(
                f"{out}: a score store is already there: merge into a new folder (store=<new folder>), or set "
                "replace=true to replace it"
            )
    counts = {"conflicts": 0, "overlaps": 0}
    meta = {
        "teacher": first,
        "data": {"merged_from": [{"store": str(s.path), "pairs": len(s), "data": s.meta.get("data")} for s in stores]},
        "merged": {"inputs": [str(s.path) for s in stores], "on_conflict": on_conflict},
    }

    def fill(target: ScoreStore) -> None:
        target.write_sorted(_merged(stores, on_conflict, chunk_size, counts), name="merged")
        target.update_meta(merged=meta["merged"] | counts | {"finished": _now()})

    merged = ScoreStore.build_new(out, meta, fill, replace=replace)
    return merged


def _merged(
    stores: list[ScoreStore], rule: str, chunk_size: int, counts: dict[str, int]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The union of the stores' pairs in key order, overlaps resolved by ``rule`` (``error``: raised at the end,
    with the number of conflicting pairs, before anything is published)."""
    example = None
    for lo, hi in key_ranges(max(len(s) for s in stores), chunk_size):
        parts = [s.pairs_between(lo, hi) for s in stores]
        keys = np.concatenate([k for k, _ in parts])
        if not len(keys):
            continue
        values = np.concatenate([v for _, v in parts])
        source = np.concatenate([np.full(len(k), i, dtype=np.int32) for i, (k, _) in enumerate(parts)])
        order = np.argsort(keys, kind="stable")  # equal keys keep the inputs' order
        keys, values, source = keys[order], values[order], source[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        last = np.ones(len(keys), dtype=bool)
        last[:-1] = first[1:]
        group = np.cumsum(first) - 1
        differs = values != values[first][group]
        bad = np.unique(group[differs])
        counts["overlaps"] += int(len(keys) - first.sum())
        counts["conflicts"] += len(bad)
        if len(bad) and example is None:
            i = int(np.flatnonzero(differs)[0])
            j = int(np.flatnonzero(first)[group[i]])
            example = (int(keys[i]), stores[source[j]].path, values[j], stores[source[i]].path, values[i])
        if rule == "error":
            if example is None:
                yield keys[first], values[first]
            continue
        keep = first if rule == "first" else last
        yield keys[keep], values[keep]
    if rule == "error" and example is not None:
        key, a, va, b, vb = example
        raise KdirError(
            f"{a} and {b} hold different scores for {counts['conflicts']} pairs (e.g. pair key {key:016x}: "
            f"{va} vs {vb}); nothing was merged. Set on_conflict=first to keep the score of the first store listed "
            "that holds a pair, or on_conflict=last for the last"
        )


__all__ = [
    "CONFLICT_RULES",
    "EXPORT_FORMATS",
    "disk_size",
    "export_scores",
    "import_scores",
    "info_lines",
    "merge_stores",
    "origin",
    "pair_source",
    "read_ids",
    "read_pairs",
    "store_info",
    "teacher_record_differences",
    "teacher_text",
    "verify_lines",
    "verify_store",
]
