"""Candidate layouts, false-negative masks, document de-duplication and the teacher signal in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdir.data.collate import TrainCollator, candidate_columns
from kdir.data.dataset import IRDataset
from kdir.errors import KdirError
from kdir.models import DualEncoder
from kdir.stores import ScoreStore, pair_keys_from_ids
from kdir.training.signal import TeacherSignal


def test_layout_columns_put_own_positive_first():
    assert candidate_columns(3, 2, "pairwise").tolist() == [[0, 3, 4], [1, 5, 6], [2, 7, 8]]
    inb = candidate_columns(3, 2, "inbatch")
    assert inb.shape == (3, 9) and [inb[i, i] for i in range(3)] == [0, 1, 2]


def _item(ds, pairs, negs):
    q = np.array([ds.queries.index[a] for a, _ in pairs])
    p = np.array([ds.corpus.index[b] for _, b in pairs])
    n = np.array([[ds.corpus.index[x] for x in row] for row in negs])
    return {"rows": torch.arange(len(q)), "queries": q, "positives": p, "negatives": n}


def _ids(ds, batch, row, col_list):
    """Document ids of a batch row's candidates (by decoding through the collated candidate indices)."""
    return [col_list[c] for c in batch.inputs["candidates"][row].tolist()]


@pytest.fixture
def scored(beir_dir, tmp_path):
    ds = IRDataset.from_beir(beir_dir, "train")
    f = tmp_path / "scores.tsv"
    f.write_text("q1\td1\t5.0\nq1\td4\t1.0\nq2\td2\t6.0\nq2\td3\t4.5\nq2\td4\t2.0\n")
    return ds, f


def test_pairwise_and_inbatch_batches(scored, tiny_student, tmp_path):
    ds, f = scored
    signal = TeacherSignal("cached", tmp_path / "store", import_file=f, force=True).bind(ds)
    # q2 has two positives (d2, d3): d3 as q2's negative is a false negative
    item = _item(ds, [("q1", "d1"), ("q2", "d2")], [["d4"], ["d3"]])
    pair = TrainCollator(ds, tiny_student.preparer(), "pairwise", signal)(item)
    assert pair.teacher_scores.tolist() == [[5.0, 1.0], [6.0, 4.5]]
    assert pair.false_negative.tolist() == [[False, False], [False, True]]
    assert pair.positive.tolist() == [0, 0]
    inb = TrainCollator(ds, tiny_student.preparer(), "inbatch", signal)(item)
    # batch document list: d1, d2, d4, d3 (positives first); q1 has no score for d2 / d3 (NaN)
    t = inb.teacher_scores
    assert t[0, 0] == 5.0 and torch.isnan(t[0, 1]) and t[0, 2] == 1.0 and t[1, 1] == 6.0 and t[1, 3] == 4.5
    assert inb.false_negative.tolist() == [[False, False, False, False], [False, False, False, True]]
    assert inb.positive.tolist() == [0, 1]


def test_each_document_is_tokenised_once_per_batch(beir_dir, tiny_student):
    ds = IRDataset.from_beir(beir_dir, "train")
    item = _item(ds, [("q1", "d1"), ("q2", "d2")], [["d4", "d5"], ["d4", "d1"]])
    batch = TrainCollator(ds, tiny_student.preparer(), "inbatch")(item)
    assert batch.inputs["doc"]["input_ids"].shape[0] == 4  # d1, d2, d4, d5 once each
    cands = batch.inputs["candidates"]
    assert cands.shape == (2, 6) and cands[0, 0] == cands[1, 5]  # d1: q1's positive and q2's 2nd negative


def test_cached_signal_missing_pair_is_an_error_unless_forced(scored, tiny_student, tmp_path):
    ds, f = scored
    signal = TeacherSignal("cached", tmp_path / "store", import_file=f).bind(ds)
    item = _item(ds, [("q1", "d1"), ("q2", "d2")], [["d4"], ["d5"]])  # (q2, d5) is not scored
    with pytest.raises(KdirError, match="1 of 4 candidate pairs of a batch are not in"):
        TrainCollator(ds, tiny_student.preparer(), "pairwise", signal)(item)


@pytest.fixture
def bi_teacher(quickstart):
    return DualEncoder(quickstart["model"], pooling="cls", query_max_length=16, doc_max_length=32)


def test_online_equals_cached_and_fill_computes_only_missing(quickstart, tiny_student, bi_teacher, tmp_path):
    ds = IRDataset.from_beir(quickstart["data"], "train")
    q, p = ds.queries.ids[:4], [next(iter(ds.qrels[x])) for x in ds.queries.ids[:4]]
    negs = [[ds.corpus.ids[i], ds.corpus.ids[i + 1]] for i in range(0, 8, 2)]
    item = _item(ds, list(zip(q, p)), negs)
    online = TeacherSignal("online", model=bi_teacher).bind(ds)
    batch = TrainCollator(ds, tiny_student.preparer(), "inbatch", online)(item)
    expected = online.scores(batch)  # [4, 12]
    # cache exactly the pairwise candidates; then fill must compute only the in-batch remainder
    store = ScoreStore.create(tmp_path / "fill", {"teacher": bi_teacher.provenance()})
    pair_ids = [(q[i], d) for i in range(4) for d in [p[i], *negs[i]]]
    pair_scores = expected.numpy()[np.arange(4)[:, None], candidate_columns(4, 2, "pairwise")].reshape(-1)
    store.append(pair_keys_from_ids([a for a, _ in pair_ids], [b for _, b in pair_ids]), pair_scores)
    cached = TeacherSignal("cached", tmp_path / "fill", model=bi_teacher, force=True).bind(ds)
    got = cached.scores(TrainCollator(ds, tiny_student.preparer(), "pairwise", cached)(item))
    assert torch.allclose(got, torch.from_numpy(pair_scores.reshape(4, 3)), atol=1e-6)  # cached == online
    fill = TeacherSignal("fill", tmp_path / "fill", model=bi_teacher, flush_every=1).bind(ds)
    fb = TrainCollator(ds, tiny_student.preparer(), "inbatch", fill)(item)
    assert len(fb.teacher_fill.rows) == 4 * 12 - 12  # only the 36 uncached pairs go to the teacher
    assert torch.allclose(fill.scores(fb), expected, atol=1e-5)
    refill = TeacherSignal("fill", tmp_path / "fill", model=bi_teacher).bind(ds)
    assert TrainCollator(ds, tiny_student.preparer(), "inbatch", refill)(item).teacher_fill is None  # persisted


def test_store_of_another_teacher_is_refused(quickstart, bi_teacher, tmp_path):
    ds = IRDataset.from_beir(quickstart["data"], "train")
    ScoreStore.create(tmp_path / "s", {"teacher": {"name": "ColBERT", "weights": "abc"}})
    with pytest.raises(KdirError, match="scored by teacher ColBERT"):
        TeacherSignal("cached", tmp_path / "s", model=bi_teacher).bind(ds)
    TeacherSignal("cached", tmp_path / "s", model=bi_teacher, force=True).bind(ds)  # explicitly forced


def test_signal_config_errors():
    with pytest.raises(ValueError, match="needs a score store"):
        TeacherSignal("cached")
    with pytest.raises(ValueError, match="needs a teacher model"):
        TeacherSignal("online")


def test_force_positive_max_hand_computed():
    from kdir.training.signal import force_positive_max

    t = torch.tensor([[1.0, 5.0, 2.0], [7.0, 3.0, 9.0], [4.0, 8.0, 0.0]])
    out = force_positive_max(t, torch.tensor([0, 1, -1]))  # row 2: a generated query, no positive
    assert out.tolist() == [[5.0, 5.0, 2.0], [7.0, 9.0, 9.0], [4.0, 8.0, 0.0]]
    assert t[0, 0] == 1.0  # the input is not modified


def test_generated_queries_are_extra_rows_without_labels(quickstart, tiny_student):
    from kdir.data.generated import GeneratedQueries

    ds = IRDataset.from_beir(quickstart["data"], "train", name="quickstart")
    gen = GeneratedQueries(ids=["g1", "g2", "g3"], texts=["alpha", "beta", "gamma"], sources=[None] * 3)
    collate = TrainCollator(ds, tiny_student.preparer(), "inbatch", generated=gen, generated_per_batch=2, seed=0)
    pairs = [(qid, pids[0]) for qid, pids in list(ds.positives().items())[:3]]
    negs = [[ds.corpus.ids[i]] for i in range(3)]
    batch = collate(_item(ds, pairs, negs))
    assert batch.positive.tolist() == [0, 1, 2, -1, -1]
    assert batch.generated.tolist() == [False, False, False, True, True]
    assert not batch.false_negative[3:].any()
    cand = batch.inputs["candidates"]
    assert cand.shape == (5, 6) and torch.equal(cand[3], cand[0]) and torch.equal(cand[4], cand[0])
    assert batch.inputs["query"]["input_ids"].shape[0] == 5
    with pytest.raises(ValueError, match="inbatch"):
        TrainCollator(ds, tiny_student.preparer(), "pairwise", generated=gen, generated_per_batch=2)
