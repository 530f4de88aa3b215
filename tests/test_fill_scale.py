"""The teacher signal at scale: fill scores each pair once under dataloader workers, fill's segments merge as they
are written (a bounded segment count, exact lookups, readers and other appenders unaffected, interrupted merges
harmless), and in-batch layouts with a cached store look up the stored pairs, not B² of them."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch

import kdir.stores.score_store as score_store
from kdir.data.collate import TrainCollator, own_candidate_codes
from kdir.data.datamodule import DistillDataModule
from kdir.data.dataset import IRDataset
from kdir.data.examples import QrelsExamples, RunNegatives, TripleExamples, positive_keys
from kdir.data.stream import ExampleStream
from kdir.models import DualEncoder
from kdir.stores import ScoreStore, pair_keys_from_ids
from kdir.stores.score_store import TieredAppender
from kdir.training.signal import TeacherSignal

META = {"teacher": {"name": "cross-encoder", "weights": "abc123"}, "data": {}}


class CountingTeacher(DualEncoder):
    """A bi-encoder teacher that counts the pairs it scores (each fill pair is one ``[1]`` row)."""

    scored = 0

    def forward(self, inputs):
        out = super().forward(inputs)
        type(self).scored += out.shape[0]
        return out


class CountingStore(ScoreStore):
    """A store that counts the keys it is asked to look up."""

    looked_up = 0

    def lookup(self, keys):
        type(self).looked_up += np.asarray(keys).size
        return super().lookup(keys)


@pytest.fixture
def one_thread():
    """Tiny teacher batches: one intra-op thread (spinning threads of a shared, busy CPU cost 100x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _segments(store: ScoreStore) -> int:
    return len(list((store.path / "segments").glob("*.keys.npy")))


def _bound(appends: int, fanout: int) -> int:
    """Segments a tiered appender may leave after ``appends`` appends: (fanout - 1) per level."""
    return (fanout - 1) * (1 + math.floor(math.log(appends, fanout) + 1e-9))


def _expected(truth: dict[int, float], keys: np.ndarray) -> np.ndarray:
    return np.array([truth.get(k, np.nan) for k in keys.tolist()], dtype=np.float32)


# ---------------------------------------------------------------- 1. fill: each pair scored once per run


def test_fill_with_two_workers_scores_each_pair_once_over_two_epochs(quickstart, tiny_student, tmp_path, one_thread):
    train = IRDataset.from_beir(quickstart["data"], "train")
    # fixed triples, about 3 a query: a (query, positive) pair comes back in other batches of the epoch
    lines = (quickstart["data"] / "teacher" / "margin_triples.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "triples.tsv").write_text("".join(lines[:600]))
    examples = TripleExamples(tmp_path / "triples.tsv", format="margin_scores")
    dm = DistillDataModule(train, examples, batch_size=24, num_workers=2, seed=3)
    CountingTeacher.scored = 0
    teacher = CountingTeacher(quickstart["model"], pooling="cls", query_max_length=8, doc_max_length=16)
    # segments of about two batches: the workers read ahead of them, and while they are written and merged
    signal = TeacherSignal("fill", tmp_path / "fill.store", model=teacher, flush_every=100).bind(train)
    dm.attach(tiny_student.preparer(), "pairwise", signal)
    loader = dm.train_dataloader()
    want: set[tuple[int, int]] = set()
    batches = 0
    for epoch in (0, 1):
        dm.set_epoch(epoch)
        plan = ExampleStream(dm.examples, 24, seed=3)  # the same epoch, read here without workers
        plan.set_epoch(epoch)
        for item in plan:
            docs = np.concatenate([item["positives"][:, None], item["negatives"]], axis=1)
            want.update(zip(np.repeat(item["queries"], docs.shape[1]).tolist(), docs.ravel().tolist()))
        for batch in loader:
            assert torch.isfinite(signal.scores(batch)).all()
            batches += 1
    signal.flush()
    assert batches == 2 * len(plan)
    # before: pairs found missing again by workers that never saw the new segments were scored again
    assert CountingTeacher.scored == len(want)
    qids = [train.queries.ids[q] for q, _ in want]
    pids = [train.corpus.ids[d] for _, d in want]
    store = ScoreStore.open(tmp_path / "fill.store")
    assert not np.isnan(store.lookup(pair_keys_from_ids(qids, pids))).any()
    assert len(store) == len(want)  # merged: no pair stored twice
    assert _segments(store) <= _bound(math.ceil(len(want) / 100), 4)


def _item(ds, pairs, negs):
    q = np.array([ds.queries.index[a] for a, _ in pairs])
    p = np.array([ds.corpus.index[b] for _, b in pairs])
    n = np.array([[ds.corpus.index[x] for x in row] for row in negs])
    return {"rows": torch.arange(len(q)), "queries": q, "positives": p, "negatives": n}


def test_fill_scores_batches_read_ahead_once_and_as_the_online_teacher(quickstart, tiny_student, tmp_path, one_thread):
    ds = IRDataset.from_beir(quickstart["data"], "train")
    q, c = ds.queries.ids, ds.corpus.ids
    CountingTeacher.scored = 0
    teacher = CountingTeacher(quickstart["model"], pooling="cls", query_max_length=16, doc_max_length=32)
    fill = TeacherSignal("fill", tmp_path / "s", model=teacher).bind(ds)
    collate = TrainCollator(ds, tiny_student.preparer(), "pairwise", fill)
    # q0 in two rows (the same pair twice in a batch); the second batch shares pairs with the first
    items = [
        _item(ds, [(q[0], c[0]), (q[0], c[1]), (q[1], c[2])], [[c[5], c[6]], [c[5], c[7]], [c[5], c[8]]]),
        _item(ds, [(q[0], c[0]), (q[2], c[3])], [[c[6], c[9]], [c[5], c[8]]]),
    ]
    first, second = collate(items[0]), collate(items[1])  # the second read ahead, before the first is scored
    assert len(first.teacher_fill.rows) == 9 and len(first.teacher_fill.keys) == 8
    a = fill.scores(first)
    assert CountingTeacher.scored == 8
    b = fill.scores(second)  # (q0, c0), (q0, c6) scored since the batch was collated: not again
    assert CountingTeacher.scored == 8 + 4
    online = TeacherSignal("online", model=teacher).bind(ds)
    expected = [online.scores(TrainCollator(ds, tiny_student.preparer(), "pairwise", online)(i)) for i in items]
    assert torch.allclose(a, expected[0], atol=1e-5) and torch.allclose(b, expected[1], atol=1e-5)
    assert a[0, 1] == a[1, 1]  # (q0, c5): one score for both rows
    fill.flush()
    assert len(ScoreStore.open(tmp_path / "s")) == 12


# ---------------------------------------------------------------- 2. fill's segments merge as they are written


@pytest.mark.parametrize("fanout", [2, 4])
def test_tiered_appends_keep_few_segments_and_exact_lookups(tmp_path, fanout):
    store = ScoreStore.create(tmp_path / "s", META)
    writer = TieredAppender(store, fanout=fanout)
    rng = np.random.default_rng(fanout)
    pool = rng.integers(0, 2**64, size=2000, dtype=np.uint64)  # overlapping appends: the newest must win
    truth: dict[int, float] = {}
    probes = np.concatenate([pool, rng.integers(0, 2**64, size=200, dtype=np.uint64)])
    for n in range(1, 41):
        keys = rng.choice(pool, size=60)
        values = rng.standard_normal(60).astype(np.float32)
        writer.append(keys, values)
        truth.update(zip(keys.tolist(), values.tolist()))
        assert _segments(store) <= _bound(n, fanout), n  # before: n segments
        if n % 7 == 0 or n == 40:
            np.testing.assert_array_equal(store.lookup(probes), _expected(truth, probes))
    reopened = ScoreStore.open(store.path)
    np.testing.assert_array_equal(reopened.lookup(probes), _expected(truth, probes))
    assert reopened.meta["count"] == len(reopened) >= len(truth)  # a pair counts once per segment holding it
    assert reopened.verify()["without_checksums"] == []


def test_merges_leave_other_appenders_segments_winning(tmp_path):
    store = ScoreStore.create(tmp_path / "s", META)
    mine, other = TieredAppender(store, fanout=2), ScoreStore.open(store.path)
    rng = np.random.default_rng(1)
    pool = rng.integers(0, 2**64, size=300, dtype=np.uint64)
    truth: dict[int, float] = {}
    theirs = []
    for step in range(24):
        keys = rng.choice(pool, size=40)
        values = rng.standard_normal(40).astype(np.float32)
        if step % 3 == 1:  # another writer appends between this one's segments, with the same keys
            theirs.append(other.append(keys, values).name)
        else:
            mine.append(keys, values)
        truth.update(zip(keys.tolist(), values.tolist()))
        store.refresh()
        np.testing.assert_array_equal(store.lookup(pool), _expected(truth, pool))
    names = {p.name for p in (store.path / "segments").glob("*.keys.npy")}
    assert set(theirs) <= names  # never merged by another writer
    assert len(names) - len(theirs) <= _bound(16, 2)


def test_a_segment_published_between_the_parts_during_a_merge_still_wins(tmp_path, monkeypatch):
    store = ScoreStore.create(tmp_path / "s", META)
    k = pair_keys_from_ids(["q"] * 3, ["a", "b", "c"])
    store.append(k[:2], [1.0, 2.0], name="m1")  # seg 1
    store.append(k[2:], [3.0], name="m3")  # seg 2
    other, merged = ScoreStore.open(store.path), ScoreStore._merged

    def with_an_intruder(self, parts, position):
        if not list((store.path / "segments").glob("*-m2.keys.npy")):  # an append numbered before m3 was published
            other._publish("m2", *score_store._sorted_unique(k[:1], [10.0]), number=2)
        return merged(self, parts, position)

    monkeypatch.setattr(ScoreStore, "_merged", with_an_intruder)
    assert store.merge([(1, "m1"), (2, "m3")]) == (2, "m3--")  # merged again with m2 known
    assert store.lookup(k).tolist() == [10.0, 2.0, 3.0]  # m2 is newer than m1: it wins over m1's 1.0
    assert [s["name"] for s in store.segments()] == ["seg-000002-m2", "seg-000002-m3--"]
    assert store.has_segment("m1") and store.has_segment("m3")


def test_a_reader_opened_before_merges_keeps_reading(tmp_path):
    store = ScoreStore.create(tmp_path / "s", META)
    writer = TieredAppender(store, fanout=2)
    rng = np.random.default_rng(2)
    truth: dict[int, float] = {}
    for _ in range(3):
        keys, values = rng.integers(0, 2**64, size=100, dtype=np.uint64), rng.standard_normal(100).astype(np.float32)
        writer.append(keys, values)
        truth.update(zip(keys.tolist(), values.tolist()))
    reader = ScoreStore.open(store.path)
    before = np.array(list(truth), dtype=np.uint64)
    opened = {s.tag for s in reader._segments}
    for _ in range(5):  # merges remove every segment the reader has mapped
        keys, values = rng.integers(0, 2**64, size=100, dtype=np.uint64), rng.standard_normal(100).astype(np.float32)
        writer.append(keys, values)
        truth.update(zip(keys.tolist(), values.tolist()))
    assert not opened & {s.tag for s in store.refresh()._segments}
    np.testing.assert_array_equal(reader.lookup(before), _expected(truth, before))  # unlinked files, still mapped
    assert reader.refresh_if_changed()
    everything = np.array(list(truth), dtype=np.uint64)
    np.testing.assert_array_equal(reader.lookup(everything), _expected(truth, everything))


@pytest.mark.parametrize("where", ["staging", "removing parts"])
def test_an_interrupted_merge_leaves_a_readable_store_with_every_pair(tmp_path, monkeypatch, where):
    store = ScoreStore.create(tmp_path / "s", META)
    writer = TieredAppender(store, fanout=4)
    rng = np.random.default_rng(3)
    pool = rng.integers(0, 2**64, size=400, dtype=np.uint64)
    truth: dict[int, float] = {}

    def append() -> None:
        keys, values = rng.choice(pool, size=80), rng.standard_normal(80).astype(np.float32)
        truth.update(zip(keys.tolist(), values.tolist()))  # published before the merge that follows it
        writer.append(keys, values)

    for _ in range(3):
        append()
    if where == "staging":
        stage = score_store._stage_npy

        def fail_on_keys(path, arr):
            if arr.dtype == np.uint64 and len(arr) > 80:
                raise KeyboardInterrupt  # as a kill while the merged keys (more than one append's) are written
            return stage(path, arr)

        monkeypatch.setattr(score_store, "_stage_npy", fail_on_keys)
    else:
        remove, calls = ScoreStore._remove, []

        def fail_on_second(self, number, tag):
            calls.append(tag)
            if len(calls) == 2:
                raise KeyboardInterrupt  # as a kill after the merged segment is published, one part removed
            remove(self, number, tag)

        monkeypatch.setattr(ScoreStore, "_remove", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        append()  # the 4th append merges
    monkeypatch.undo()
    probes = np.concatenate([pool, rng.integers(0, 2**64, size=100, dtype=np.uint64)])
    reopened = ScoreStore.open(store.path)
    np.testing.assert_array_equal(reopened.lookup(probes), _expected(truth, probes))
    assert not [p for p in (store.path / "segments").iterdir() if p.name.startswith(".")]  # no temporary files
    reopened.verify()
    for _ in range(5):  # the writer goes on (leaving the interrupted merge's segments alone)
        append()
    reopened.refresh()
    np.testing.assert_array_equal(reopened.lookup(probes), _expected(truth, probes))
    reopened.compact()
    np.testing.assert_array_equal(reopened.lookup(probes), _expected(truth, probes))
    assert len(reopened) == len(truth)


def test_refresh_if_changed_lists_the_folder_only_after_a_change(tmp_path, monkeypatch):
    store = ScoreStore.create(tmp_path / "s", META)
    reader = ScoreStore.open(store.path)
    old = os.stat(store.path / "segments").st_mtime - 60
    os.utime(store.path / "segments", (old, old))  # an old folder: its mtime can be trusted
    assert reader.refresh_if_changed()  # listed once (it was created just now)
    listed = []
    listdir = os.listdir
    monkeypatch.setattr(score_store.os, "listdir", lambda p: listed.append(p) or listdir(p))
    assert not any(reader.refresh_if_changed() for _ in range(50)) and not listed
    keys = pair_keys_from_ids(["q"], ["d"])
    store.append(keys, [1.5])
    assert reader.refresh_if_changed() and reader.lookup(keys).tolist() == [1.5]


# ---------------------------------------------------------------- 3. in-batch layouts cost the stored pairs


@pytest.fixture(scope="module")
def inbatch_setup(quickstart, tmp_path_factory):
    """The quickstart's train split and run-pool examples, and a store of random scores of 70% of the candidate
    pairs the examples can give each query (cross pairs of a batch among them)."""
    ds = IRDataset.from_beir(quickstart["data"], "train")
    examples = QrelsExamples(RunNegatives(str(quickstart["data"] / "runs" / "train.trec"), depth=30), n_negatives=3)
    built = examples.build(ds)
    n_docs = len(ds.corpus)
    codes = own_candidate_codes(built, positive_keys(ds), n_docs)
    rng = np.random.default_rng(0)
    codes = codes[rng.random(len(codes)) < 0.7]
    qids = [ds.queries.ids[i] for i in codes // n_docs]
    pids = [ds.corpus.ids[i] for i in codes % n_docs]
    scores = rng.standard_normal(len(qids)).astype(np.float32)
    path = tmp_path_factory.mktemp("inbatch") / "s.store"
    ScoreStore.create(path, META).append(pair_keys_from_ids(qids, pids), scores)
    truth = dict(zip(zip(qids, pids), scores.tolist()))
    return ds, examples, built, path, truth


def test_inbatch_index_gives_the_scores_of_looking_every_pair_up(inbatch_setup, tiny_student):
    ds, _, built, path, truth = inbatch_setup
    item = next(iter(ExampleStream(built, 48, seed=1)))
    full = TeacherSignal("cached", path, force=True).bind(ds)
    indexed = TeacherSignal("cached", path, force=True).bind(ds)
    indexed.store = CountingStore(path)
    TrainCollator(ds, tiny_student.preparer(), "inbatch", indexed, examples=built)  # builds the index
    assert indexed._index is not None
    CountingStore.looked_up = 0
    got = TrainCollator(ds, tiny_student.preparer(), "inbatch", indexed)(item)
    ref = TrainCollator(ds, tiny_student.preparer(), "inbatch", full)(item)  # every column looked up
    # independently: every (row query, column document) pair's stored score by its ids
    docs = np.unique(np.concatenate([item["positives"], item["negatives"].ravel()]))
    cand = got.inputs["candidates"].numpy()
    expected = np.array(
        [
            [truth.get((ds.queries.ids[q], ds.corpus.ids[docs[j]]), np.nan) for j in row]
            for q, row in zip(item["queries"], cand)
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(got.teacher_scores.numpy(), expected)
    np.testing.assert_array_equal(ref.teacher_scores.numpy(), expected)
    own = np.zeros(cand.shape, dtype=bool)
    b, n = len(item["queries"]), item["negatives"].shape[1]
    own[np.arange(b), np.arange(b)] = True
    own[np.repeat(np.arange(b), n), b + np.arange(b * n)] = True
    assert (~np.isnan(expected) & ~own).sum() > b  # cross pairs of the batch are stored and found
    assert CountingStore.looked_up <= b * (1 + n) + (~np.isnan(expected)).sum()  # before: b * b * (1 + n)
    assert torch.equal(got.false_negative, ref.false_negative) and torch.equal(got.positive, ref.positive)


def test_inbatch_index_takes_the_run_a_scored_store_records(inbatch_setup, quickstart, tiny_student, tmp_path):
    ds, examples, built, _, _ = inbatch_setup
    run = quickstart["data"] / "runs" / "train.trec"
    path = tmp_path / "scored.store"
    store = ScoreStore.create(path, {"teacher": {}, "data": {"dataset": ds.name, "source": str(run), "depth": 30}})
    shallow = QrelsExamples(RunNegatives(str(run), depth=3), n_negatives=2).build(ds)  # a shallower pool
    from kdir.stores.scoring import candidate_pairs

    pairs = candidate_pairs(ds, run_file=str(run), depth=30)
    qids, pids = [ds.queries.ids[i] for i in pairs[:, 0]], [ds.corpus.ids[i] for i in pairs[:, 1]]
    store.append(pair_keys_from_ids(qids, pids), np.arange(len(pairs), dtype=np.float32))
    item = next(iter(ExampleStream(shallow, 48, seed=2)))
    full = TeacherSignal("cached", path, force=True).bind(ds)
    indexed = TeacherSignal("cached", path, force=True).bind(ds)
    got = TrainCollator(ds, tiny_student.preparer(), "inbatch", indexed, examples=shallow)(item)
    ref = TrainCollator(ds, tiny_student.preparer(), "inbatch", full)(item)
    np.testing.assert_array_equal(got.teacher_scores.numpy(), ref.teacher_scores.numpy())
    # stored pairs of the batch beyond the shallow pool: found through the store's recorded run only
    n_docs = len(ds.corpus)
    docs = np.unique(np.concatenate([item["positives"], item["negatives"].ravel()]))
    rows, cols = np.nonzero(np.isfinite(ref.teacher_scores.numpy()))
    codes = item["queries"][rows] * n_docs + docs[ref.inputs["candidates"].numpy()[rows, cols]]
    assert (~np.isin(codes, own_candidate_codes(shallow, positive_keys(ds), n_docs))).sum() > 10


def test_inbatch_without_a_pool_looks_every_pair_up(inbatch_setup, tiny_student):
    ds, _, _, path, _ = inbatch_setup
    from kdir.data.examples import RandomNegatives

    rand = QrelsExamples(RandomNegatives(), n_negatives=2).build(ds)
    assert own_candidate_codes(rand, positive_keys(ds), len(ds.corpus)) is None  # any document: no index
    signal = TeacherSignal("cached", path, force=True).bind(ds)
    TrainCollator(ds, tiny_student.preparer(), "inbatch", signal, examples=rand)
    assert signal._index is None


def test_a_store_holding_other_pairs_is_looked_up_in_full(inbatch_setup, tiny_student, tmp_path):
    """Pairs beyond the candidates the index knows (here a cross pair of two training queries' documents, and pairs
    of other ids) could be cross pairs of a batch: the index is not used, and every stored pair is found."""
    ds, _, built, path, truth = inbatch_setup
    item = next(iter(ExampleStream(built, 48, seed=1)))
    other = tmp_path / "other.store"
    shutil.copytree(path, other)
    q0, d1 = ds.queries.ids[item["queries"][0]], ds.corpus.ids[item["positives"][1]]
    extra = {(q0, d1): 7.0} | {(f"other{i}", ds.corpus.ids[i]): float(i) for i in range(5)}
    ScoreStore.open(other).append(
        pair_keys_from_ids(*map(list, zip(*extra))), np.array(list(extra.values()), np.float32)
    )
    signal = TeacherSignal("cached", other, force=True).bind(ds)
    TrainCollator(ds, tiny_student.preparer(), "inbatch", signal, examples=built)
    assert signal._index is None
    got = TrainCollator(ds, tiny_student.preparer(), "inbatch", signal)(item)
    docs = np.unique(np.concatenate([item["positives"], item["negatives"].ravel()]))
    column = int(np.flatnonzero(docs[got.inputs["candidates"].numpy()[0]] == item["positives"][1])[0])
    assert got.teacher_scores[0, column] == 7.0
