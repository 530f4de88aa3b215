"""The teacher score store: stable keys, segments, compaction, import / export, concurrent (tiered) appenders."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import numpy as np
import pytest
import xxhash

from kdir.errors import DataFormatError, UnknownIdError
from kdir.stores import ScoreStore, id_hashes, pair_keys
from kdir.stores.keys import pair_keys_from_ids
from kdir.stores.score_store import TieredAppender

META = {"teacher": {"name": "cross-encoder", "weights": "abc123"}, "data": {"dataset": "msmarco-passage/train"}}


def _splitmix_pair(q: str, d: str) -> int:
    """Independent pure-Python reference of the pair key scheme."""
    m = 2**64 - 1
    x = ((xxhash.xxh64_intdigest(q.encode()) * 0x9E3779B97F4A7C15) & m) ^ xxhash.xxh64_intdigest(d.encode())
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


@pytest.fixture
def store(tmp_path) -> ScoreStore:
    return ScoreStore.create(tmp_path / "store", META)


def _random_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 2**64, size=n, dtype=np.uint64), rng.standard_normal(n).astype(np.float32)


def test_keys_are_stable_uint64_and_broadcast():
    h = id_hashes(["1185869", "ü-dóc", ""])
    assert h.dtype == np.uint64
    assert h.tolist() == [15244188334817794702, 7459563420876466163, xxhash.xxh64_intdigest(b"")]
    assert pair_keys_from_ids(["1185869"], ["8841822"]).tolist() == [1713139416415309872]  # pinned: never change
    qids, pids = ["q1", "q2", "q3"], [f"d{i}" for i in range(5)]
    keys = pair_keys(id_hashes(qids)[:, None], id_hashes(pids)[None, :])  # [3, 1] x [1, 5]
    assert keys.shape == (3, 5) and keys.dtype == np.uint64
    assert keys.tolist() == [[_splitmix_pair(q, d) for d in pids] for q in qids]
    assert len(np.unique(keys)) == 15
    with pytest.raises(TypeError, match="uint64"):
        pair_keys(np.arange(3), id_hashes(pids[:3]))


def test_lookup_exact_values_and_nan_for_missing(store):
    keys = pair_keys_from_ids(["q1", "q1", "q2"], ["d1", "d2", "d1"])
    store.append(keys, np.array([1.5, -2.25, 3.0e-7], dtype=np.float32))
    absent = pair_keys_from_ids(["q2", "q9"], ["d2", "d1"])
    grid = np.stack([keys[:2], absent])  # [2, 2]
    got = store.lookup(grid)
    assert got.dtype == np.float32 and got.shape == (2, 2)
    np.testing.assert_array_equal(got[0], np.array([1.5, -2.25], dtype=np.float32))
    assert np.isnan(got[1]).all()
    assert store.lookup(keys[2:])[0] == np.float32(3.0e-7)
    assert store.contains(grid).tolist() == [[True, True], [False, False]]
    assert len(store) == 3 and store.meta["count"] == 3
    assert store.lookup(np.zeros((0, 4), dtype=np.uint64)).shape == (0, 4)
    with pytest.raises(ValueError, match="NaN"):
        store.append(keys[:1], np.array([np.nan]))


def test_newest_segment_wins_and_last_value_within_a_call(store):
    k = pair_keys_from_ids(["q", "q"], ["a", "b"])
    store.append(k, np.array([1.0, 2.0]))
    store.append(k[:1], np.array([10.0]))
    np.testing.assert_array_equal(store.lookup(k), [10.0, 2.0])
    store.append(np.array([k[1], k[1]]), np.array([5.0, 6.0]))
    np.testing.assert_array_equal(store.lookup(k), [10.0, 6.0])
    reopened = ScoreStore.open(store.path)
    np.testing.assert_array_equal(reopened.lookup(k), [10.0, 6.0])


def test_compact_preserves_every_value(store):
    rng = np.random.default_rng(0)
    truth: dict[int, float] = {}
    pool = rng.integers(0, 2**64, size=3000, dtype=np.uint64)  # overlapping keys across segments
    for _ in range(6):
        keys = rng.choice(pool, size=800)
        values = rng.standard_normal(800).astype(np.float32)
        store.append(keys, values)
        truth.update(zip(keys.tolist(), values.tolist()))
    queries = np.concatenate([pool, rng.integers(0, 2**64, size=500, dtype=np.uint64)])
    before = store.lookup(queries)
    store.compact()
    assert len(store) == len(truth) and store.meta["count"] == len(truth)
    assert len(list((store.path / "segments").glob("*.keys.npy"))) == 1
    after = ScoreStore.open(store.path).lookup(queries)
    expected = np.array([truth.get(k, np.nan) for k in queries.tolist()], dtype=np.float32)
    np.testing.assert_array_equal(before, expected)
    np.testing.assert_array_equal(after, expected)


@pytest.mark.parametrize("n", [1, 2, 33, 5000])
def test_lookup_matches_a_dict_for_skewed_and_extreme_keys(store, n):
    rng = np.random.default_rng(n)
    extreme = np.array([0, 1, 2**63, 2**64 - 2, 2**64 - 1], dtype=np.uint64)
    clustered = np.arange(1000, 1000 + n, dtype=np.uint64)  # all in the first bucket
    keys = np.concatenate([extreme, clustered, rng.integers(0, 2**64, size=n, dtype=np.uint64)])[: max(n, 3)]
    values = rng.standard_normal(len(keys)).astype(np.float32)
    store.append(keys, values)
    truth = dict(zip(keys.tolist(), values.tolist()))
    probes = np.concatenate([extreme, clustered - 1, clustered + 1, keys, keys + 1, keys - 1])
    expected = np.array([truth.get(k, np.nan) for k in probes.tolist()], dtype=np.float32)
    np.testing.assert_array_equal(store.lookup(probes), expected)


def test_append_segment_is_idempotent_even_after_compaction(store):
    k1, k2 = pair_keys_from_ids(["q"], ["a"]), pair_keys_from_ids(["q"], ["b"])
    assert not store.has_segment("rank0-000012")
    assert store.append_segment("rank0-000012", k1, [1.0]) is True
    assert store.append_segment("rank0-000012", k1, [99.0]) is False  # resumed job: left untouched
    assert store.append_segment("rank1-000013", k2, [2.0]) is True
    assert store.lookup(np.concatenate([k1, k2])).tolist() == [1.0, 2.0]
    store.compact()
    assert store.has_segment("rank0-000012") and store.has_segment("rank1-000013")
    assert store.append_segment("rank0-000012", k1, [99.0]) is False
    with pytest.raises(ValueError, match="segment name"):
        store.append_segment("../evil", k1, [1.0])


def test_segment_without_keys_file_is_ignored(store):
    k = pair_keys_from_ids(["q", "q"], ["a", "b"])
    store.append(k[:1], [1.0])
    # an appender that died after publishing values but before keys
    np.save(store.path / "segments" / "seg-000007-_dead.values.npy", np.array([5.0], dtype=np.float32))
    reopened = ScoreStore.open(store.path)
    assert len(reopened) == 1 and np.isnan(reopened.lookup(k[1:])).all()
    path = reopened.append(k[1:], [2.0])
    assert path.name.startswith("seg-000008-")  # numbers keep increasing past the dead one
    reopened.compact()
    assert not list((store.path / "segments").glob("*_dead*"))
    assert reopened.lookup(k).tolist() == [1.0, 2.0]


def test_tsv_imports_round_trip_through_exports(tmp_path, store):
    margin = "12.5\t-3.25\tq1\td1\td2\n0.1\t7.0\tq2\td3\td1\n"
    (tmp_path / "margin.tsv").write_text(margin)
    assert store.import_tsv(tmp_path / "margin.tsv", format="margin_scores") == 4
    store.export_margin_tsv(tmp_path / "out.tsv", [("q1", "d1", "d2"), ("q2", "d3", "d1")])
    assert (tmp_path / "out.tsv").read_text() == margin

    pairs = "q1\td1\t1.25\nq3\td9\t-0.5\n"
    (tmp_path / "pairs.tsv").write_text(pairs)
    other = ScoreStore.create(tmp_path / "other", META)
    assert other.import_tsv(tmp_path / "pairs.tsv", format="pairs", chunk_size=1) == 2
    other.export_jsonl(tmp_path / "pairs.jsonl", [("q1", "d1"), ("q3", "d9")])
    lines = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert lines == [{"qid": "q1", "pid": "d1", "score": 1.25}, {"qid": "q3", "pid": "d9", "score": -0.5}]
    third = ScoreStore.create(tmp_path / "third", META)
    assert third.import_jsonl(tmp_path / "pairs.jsonl") == 2
    assert third.lookup(pair_keys_from_ids(["q1", "q3"], ["d1", "d9"])).tolist() == [1.25, -0.5]

    with pytest.raises(UnknownIdError, match=r"qid='q2', pid='d1'"):
        other.export_jsonl(tmp_path / "missing.jsonl", [("q1", "d1"), ("q2", "d1")])
    assert not (tmp_path / "missing.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_malformed_tsv_line_reports_file_and_line_and_imports_nothing(tmp_path, store):
    (tmp_path / "scores.tsv").write_text("q1\td1\t1.0\nq1\td2\t2.0\nq1\td3\n")
    with pytest.raises(DataFormatError, match=r"scores.tsv:3: expected 'qid<TAB>pid<TAB>score'"):
        store.import_tsv(tmp_path / "scores.tsv", chunk_size=1)
    assert len(store) == 0 and store.meta["count"] == 0
    (tmp_path / "margin.tsv").write_text("1.0\tx\tq1\td1\td2\n")
    with pytest.raises(DataFormatError, match=r"margin.tsv:1: expected neg_score to be a number"):
        store.import_tsv(tmp_path / "margin.tsv", format="margin_scores")
    (tmp_path / "bad.jsonl").write_text('{"qid": "q1", "pid": "d1", "score": 1}\n{"qid": "q1"}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: expected a JSON object"):
        store.import_jsonl(tmp_path / "bad.jsonl")


def test_meta_round_trip_and_create_guards(tmp_path, store):
    meta = ScoreStore.open(store.path).meta
    assert meta["format"] == "kdir-score-store/1" and meta["key"] == "xxh64-pair/1"
    assert meta["teacher"] == META["teacher"] and meta["data"] == META["data"]
    assert {"count", "created", "updated", "kdir_version"} <= set(meta)
    store.update_meta(finished="yes", data={"dataset": "msmarco-passage/train", "depth": 100})
    assert ScoreStore.open(store.path).meta["finished"] == "yes"
    assert ScoreStore.create(store.path, {"teacher": META["teacher"]}).meta["finished"] == "yes"  # same: opened
    with pytest.raises(FileExistsError, match="different teacher"):
        ScoreStore.create(store.path, {"teacher": {"name": "other"}})
    forced = ScoreStore.create(store.path, {"teacher": {"name": "other"}}, exist_ok=True)
    assert forced.meta["teacher"] == META["teacher"]  # opened as it is
    with pytest.raises(ValueError, match="format"):
        store.update_meta(format="x")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        ScoreStore.open(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a kdir score store"):
        ScoreStore.create(tmp_path / "junk", META)


def _append_many(path: str, seed: int, n_segments: int, size: int, start) -> None:
    store = ScoreStore.open(path)
    rng = np.random.default_rng(seed)
    start.wait(timeout=60)
    for _ in range(n_segments):
        store.append(*_random_pairs(rng, size))


def test_concurrent_appenders_in_two_processes_keep_every_pair(store):
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(str(store.path), seed, 15, 200, start)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    store.refresh()
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        for _ in range(15):
            keys, values = _random_pairs(rng, 200)
            np.testing.assert_array_equal(store.lookup(keys), values)
    names = sorted(p.name for p in (store.path / "segments").glob("*.keys.npy"))
    assert len(names) == 30 and len(store) == 6000


def test_iter_pairs_streams_each_pair_once_and_write_sorted_publishes_one_segment(tmp_path, store):
    rng = np.random.default_rng(5)
    pool = rng.integers(0, 2**64, size=3000, dtype=np.uint64)
    truth: dict[int, float] = {}
    for _ in range(4):  # overlapping segments: the newest wins
        keys = rng.choice(pool, size=900, replace=False)
        values = rng.standard_normal(900).astype(np.float32)
        store.append(keys, values)
        truth.update(zip(keys.tolist(), values.tolist()))
    chunks = list(store.iter_pairs(chunk_size=200))
    assert len(chunks) >= 10  # one key range each
    keys = np.concatenate([k for k, _ in chunks])
    values = np.concatenate([v for _, v in chunks])
    assert (keys[1:] > keys[:-1]).all() and keys.tolist() == sorted(truth)
    np.testing.assert_array_equal(values, np.array([truth[k] for k in keys.tolist()], dtype=np.float32))
    lo, hi = int(keys[100]), int(keys[200])
    between = store.pairs_between(lo, hi)[0]
    assert between.tolist() == keys[100:200].tolist()

    copy = ScoreStore.create(tmp_path / "copy", META)
    assert copy.write_sorted(iter(chunks), name="streamed").name == "seg-000001-streamed.keys.npy"
    assert len(copy) == len(truth) and copy.meta["count"] == len(truth)
    np.testing.assert_array_equal(copy.lookup(pool), store.lookup(pool))
    assert copy.verify()["verified"] == ["seg-000001-streamed"]
    assert copy.write_sorted(iter([])) is None
    with pytest.raises(ValueError, match="strictly ascending"):
        copy.write_sorted([(keys[:3], values[:3]), (keys[2:4], values[2:4])])
    with pytest.raises(ValueError, match="NaN"):
        copy.write_sorted([(keys[:2], np.array([1.0, np.inf]))])
    assert [p.name for p in (copy.path / "segments").iterdir() if not p.name.startswith("seg-000001-")] == []


def _tiered_writer(path: str, seed: int, n: int, start) -> None:
    writer = TieredAppender(ScoreStore.open(path), fanout=2)
    rng = np.random.default_rng(seed)
    start.wait(timeout=60)
    for _ in range(n):
        writer.append(*_random_pairs(rng, 150))


def test_two_tiered_writers_in_two_processes_keep_every_pair_while_a_reader_reads(store):
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_tiered_writer, args=(str(store.path), seed, 12, start)) for seed in (1, 2)]
    for p in procs:
        p.start()
    start.wait(timeout=60)
    reader = ScoreStore.open(store.path)
    probe = np.arange(2048, dtype=np.uint64)
    while any(p.is_alive() for p in procs):  # reads while the writers' segments are merged and removed
        reader.refresh_if_changed()
        assert np.isnan(reader.lookup(probe)).all()
        time.sleep(0.005)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    reader.refresh()
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        for _ in range(12):
            keys, values = _random_pairs(rng, 150)
            np.testing.assert_array_equal(reader.lookup(keys), values)
    # 12 appends each: 12 = 0b1100, so 2 segments per writer; before: 24 segments
    assert len(reader) == 2 * 12 * 150 and len(reader.segments()) == 4


def test_a_pickled_store_travels_by_path_and_maps_its_segments_again(store):
    import pickle

    keys, values = _random_pairs(np.random.default_rng(4), 100_000)
    store.append(keys, values)
    blob = pickle.dumps(store)
    assert len(blob) < 1000  # the path, not 1.2 MB of scores (what a spawned dataloader worker receives)
    copy = pickle.loads(blob)
    np.testing.assert_array_equal(copy.lookup(keys), values)
    store.append(keys[:1], [7.0])
    assert copy.refresh_if_changed() and copy.lookup(keys[:1]).tolist() == [7.0]
