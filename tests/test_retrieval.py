"""FAISS search against brute force, and ir-measures on a hand-made run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdir.data.formats import read_trec_run
from kdir.retrieval.metrics import evaluate_run, parse_measures, write_trec_run
from kdir.retrieval.search import search


def test_flat_topk_equals_brute_force():
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(20, 16)).astype("f4"), rng.normal(size=(500, 16)).astype("f4")
    scores, rows = search(q, d, k=10)
    brute = q @ d.T
    expected = np.argsort(-brute, axis=1)[:, :10]
    assert np.array_equal(rows, expected)
    assert np.allclose(scores, np.take_along_axis(brute, expected, axis=1), atol=1e-4)


def test_index_factory_option_builds_an_approximate_index():
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(5, 8)).astype("f4"), rng.normal(size=(300, 8)).astype("f4")
    _, rows = search(q, d, k=5, factory="HNSW16")
    exact = np.argsort(-(q @ d.T), axis=1)[:, :5]
    assert rows.shape == (5, 5) and (rows[:, 0] == exact[:, 0]).mean() >= 0.8


def test_k_larger_than_corpus_is_capped():
    scores, rows = search(np.ones((1, 4), "f4"), np.eye(4, dtype="f4"), k=100)
    assert rows.shape == (1, 4)


def test_ir_measures_on_a_hand_made_run():
    qrels = {"q1": {"a": 1, "b": 0}, "q2": {"c": 2, "d": 1}}
    run = {"q1": {"b": 3.0, "a": 2.0, "x": 1.0}, "q2": {"d": 5.0, "y": 4.0, "c": 3.0}}
    m = evaluate_run(run, qrels, ["nDCG@10", "RR@10", "R@2", "P@1"])
    ndcg_q1 = (1 / math.log2(3)) / 1.0  # relevant 'a' at rank 2
    ndcg_q2 = (1 + 2 / math.log2(4)) / (2 + 1 / math.log2(3))  # trec_eval gains = rel: d=1 at r1, c=2 at r3
    assert m["nDCG@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2, abs=1e-4)
    assert m["RR@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["R@2"] == pytest.approx((1 + 0.5) / 2)
    assert m["P@1"] == pytest.approx(0.5)
    graded = evaluate_run(run, qrels, ["RR(rel=2)@10"])
    assert graded["RR(rel=2)@10"] == pytest.approx((0 + 1 / 3) / 2)


def test_unknown_measure_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ir-measures measure 'nDGC@10'"):
        parse_measures(["nDGC@10"])


def test_trec_run_round_trip(tmp_path):
    run = {"q1": {"a": 0.5, "b": 2.0}}
    path = write_trec_run(run, tmp_path / "x.trec")
    assert path.read_text().splitlines() == ["q1 Q0 b 1 2.000000 kdir", "q1 Q0 a 2 0.500000 kdir"]
    assert read_trec_run(path) == run
