"""Candidate layouts, false-negative masks, document de-duplication and teacher lookups in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdir.data.collate import TrainCollator, candidate_columns, candidate_docs
from kdir.data.dataset import IRDataset
from kdir.teachers import ScoreTable


def test_inbatch_layout_puts_own_positive_at_column_i():
    pos, neg = np.array([10, 11, 12]), np.array([[20, 21], [22, 23], [24, 25]])
    docs = candidate_docs(pos, neg, "inbatch")
    assert docs.shape == (3, 9)
    assert [docs[i, i] for i in range(3)] == [10, 11, 12]
    assert docs[0].tolist() == [10, 11, 12, 20, 21, 22, 23, 24, 25]
    assert candidate_docs(pos, neg, "pairwise").tolist() == [[10, 20, 21], [11, 22, 23], [12, 24, 25]]
    assert candidate_columns(3, 2, "pairwise").tolist() == [[0, 3, 4], [1, 5, 6], [2, 7, 8]]


def _item(ds, pairs, negs):
    q = np.array([ds.queries.index[a] for a, _ in pairs])
    p = np.array([ds.corpus.index[b] for _, b in pairs])
    n = np.array([[ds.corpus.index[x] for x in row] for row in negs])
    return {"rows": torch.arange(len(q)), "queries": q, "positives": p, "negatives": n}


def test_collator_dedups_docs_marks_false_negatives_and_reads_teacher(beir_dir, tiny_student, tmp_path):
    ds = IRDataset.from_beir(beir_dir, "train")
    scores = tmp_path / "scores.tsv"
    scores.write_text("q1\td1\t5.0\nq1\td4\t1.0\nq2\td2\t6.0\nq2\td3\t4.5\nq2\td4\t2.0\n")
    teacher = ScoreTable(scores).bind(ds)
    # q2 has two positives (d2, d3): d3 as q2's negative column is a false negative
    item = _item(ds, [("q1", "d1"), ("q2", "d2")], [["d4"], ["d3"]])
    pair = TrainCollator(ds, tiny_student.query_formatter, tiny_student.doc_formatter, "pairwise", teacher)(item)
    assert pair["teacher"].tolist() == [[5.0, 1.0], [6.0, 4.5]]
    assert pair["false_negative"].tolist() == [[False, False], [False, True]]
    assert pair["positive"].tolist() == [0, 0]
    inb = TrainCollator(ds, tiny_student.query_formatter, tiny_student.doc_formatter, "inbatch", teacher)(item)
    # batch list: d1, d2, d4, d3 -> q1 has no score for d2/d3 (NaN), q2 none for d1
    t = inb["teacher"]
    assert t[0, 0] == 5.0 and torch.isnan(t[0, 1]) and t[0, 2] == 1.0 and t[1, 1] == 6.0 and t[1, 3] == 4.5
    assert inb["false_negative"].tolist() == [[False, False, False, False], [False, False, False, True]]
    assert inb["positive"].tolist() == [0, 1]


def test_each_document_is_tokenised_once_per_batch(beir_dir, tiny_student):
    ds = IRDataset.from_beir(beir_dir, "train")
    item = _item(ds, [("q1", "d1"), ("q2", "d2")], [["d4", "d5"], ["d4", "d1"]])
    batch = TrainCollator(ds, tiny_student.query_formatter, tiny_student.doc_formatter, "inbatch")(item)
    assert batch["doc"]["input_ids"].shape[0] == 4  # d1, d2, d4, d5 once each
    assert batch["doc_index"].shape == (6,)
    texts = [ds.corpus.texts[c] for c in np.unique([0, 1, 3, 4])]
    again = tiny_student.doc_formatter(texts)["input_ids"]
    assert torch.equal(batch["doc"]["input_ids"][batch["doc_index"][4]], again[batch["doc_index"][4]])


def test_score_table_margin_format_and_unknown_ids(beir_dir, tmp_path):
    from kdir.errors import UnknownIdError

    ds = IRDataset.from_beir(beir_dir, "train")
    f = tmp_path / "t2.tsv"
    f.write_text("9.0\t1.5\tq1\td1\td4\n")
    t = ScoreTable(f, format="margin_scores").bind(ds)
    q1, d1, d4, d5 = ds.queries.index["q1"], *(ds.corpus.index[d] for d in ("d1", "d4", "d5"))
    out = t.lookup(np.array([q1]), np.array([[d1, d4, d5]]))
    assert out[0, :2].tolist() == [9.0, 1.5] and np.isnan(out[0, 2])
    f.write_text("9.0\t1.5\tq1\td1\td77\n")
    with pytest.raises(UnknownIdError, match=r"t2.tsv:1: document 'd77'"):
        ScoreTable(f, format="margin_scores").bind(ds)
    assert len(ScoreTable(f, format="margin_scores", ignore_unknown=True).bind(ds)) == 1
