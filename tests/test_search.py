"""FAISS knobs (nprobe, efSearch), index settings checked before any encoding, and saved indexes reused."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import run_command

from kdir.data.dataset import IRDataset
from kdir.errors import ConfigError
from kdir.models import DualEncoder
from kdir.retrieval.evaluators import RetrievalEvaluator
from kdir.retrieval.search import auto_nprobe, check_index, search


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3,000 documents and 100 queries around 40 centres (32-d), and the exact ranking (numpy brute force)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32)).astype("f4")
    docs = (centres[rng.integers(0, 40, 3000)] + 0.5 * rng.normal(size=(3000, 32))).astype("f4")
    queries = (centres[rng.integers(0, 40, 100)] + 0.5 * rng.normal(size=(100, 32))).astype("f4")
    return queries, docs, np.argsort(-(queries @ docs.T), axis=1, kind="stable")


def _recall(rows: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(r[r >= 0].tolist()) & set(e[:k].tolist())) / k for r, e in zip(rows, exact)]))


def _faiss_nprobe_1(queries, docs, k):
    """What faiss alone does with an IVF index (nprobe 1, its default), for comparison."""
    index = faiss.index_factory(docs.shape[1], "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(docs)
    index.add(docs)
    return index.search(queries, k)[1]


@pytest.mark.parametrize("k", [10, 100, 1000])
def test_ivf_default_nprobe_gives_k_hits_per_query_and_near_exact_recall(clustered, k):
    queries, docs, exact = clustered
    plain = _faiss_nprobe_1(queries, docs, k)
    if k >= 100:  # faiss's nprobe 1 leaves slots empty (measured: 9-94 hits of 100, 9-94 of 1000)
        assert (plain >= 0).sum(1).min() < k
    scores, rows = search(queries, docs, k, "IVF64,Flat")
    assert rows.shape == (100, k) and (rows >= 0).all()  # every query: k hits
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    recall = _recall(rows, exact, k)
    # recall vs exact, measured: 1.000 / 0.980 / 0.990 at k = 10 / 100 / 1000 (faiss's nprobe 1: 0.848 / 0.610 / 0.062)
    assert recall >= {10: 0.95, 100: 0.95, 1000: 0.98}[k], recall
    assert recall > _recall(plain, exact, k)


def test_explicit_nprobe_is_used_as_given_and_all_lists_is_exact(clustered, caplog):
    queries, docs, exact = clustered
    with caplog.at_level(logging.WARNING, logger="kdir.retrieval.search"):
        _, rows = search(queries, docs, 1000, "IVF64,Flat", nprobe=4)
    assert (rows < 0).any(axis=1).all()  # 4 of 64 lists hold fewer than 1000 documents
    assert "nprobe=4: 100 of 100 queries got fewer than 1000 hits" in caplog.text
    _, everything = search(queries, docs, 50, "IVF64,Flat", nprobe=64)  # every list: exhaustive
    assert _recall(everything, exact, 50) == 1.0
    assert auto_nprobe(64, 3000, 1000) == 43 and auto_nprobe(64, 3000, 10) == 8 and auto_nprobe(64, 100, 1000) == 64


def test_hnsw_ef_search_is_at_least_k_and_a_larger_one_recalls_more(clustered):
    queries, docs, exact = clustered
    _, small = search(queries, docs, 100, "HNSW16", ef_search=8)  # raised to k = 100: all slots filled
    _, large = search(queries, docs, 100, "HNSW16", ef_search=400)
    assert (small >= 0).all() and (large >= 0).all()
    assert _recall(large, exact, 100) > _recall(small, exact, 100) >= 0.8  # measured 0.944 vs 0.898


@pytest.mark.parametrize(
    ("factory", "kw", "message"),
    [
        ("IVF32,Flot", {}, r"index_factory='IVF32,Flot': faiss cannot build .* could not parse code description Flot"),
        ("PQ7", {}, r"index_factory='PQ7': faiss cannot build this index for 64-d .* multiple of the number of"),
        ("LSH", {}, r"index_factory='LSH': .*kdir searches by inner product"),
        ("IVF4096,Flat", {}, r"its 4096 IVF lists need at least 4096 documents to train, the corpus has 6"),
        ("Flat", {"nprobe": 8}, r"nprobe=8: index_factory='Flat' is not an IVF index"),
        ("IVF2,Flat", {"ef_search": 8}, r"ef_search=8: index_factory='IVF2,Flat' has no HNSW graph"),
    ],
)
def test_bad_index_settings_fail_before_any_encoding(factory, kw, message, beir_dir, quickstart):
    dataset = IRDataset.from_beir(beir_dir, "test")
    model = Counting(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32)
    with pytest.raises(ConfigError, match=message):
        RetrievalEvaluator(dataset, depth=5, index_factory=factory, **kw).evaluate(model, progress=False)
    assert model.calls == Counter()  # not one text encoded


def test_config_time_check_catches_a_typo_without_a_model(beir_dir):
    dataset = IRDataset.from_beir(beir_dir, "test")
    with pytest.raises(ConfigError, match=r"index_factory='HNSWx': faiss cannot build this index for inner-product"):
        RetrievalEvaluator(dataset, index_factory="HNSWx")
    with pytest.raises(ConfigError, match=r"nprobe=0: expected an integer >= 1, or null"):
        RetrievalEvaluator(dataset, index_factory="IVF2,Flat", nprobe=0)
    RetrievalEvaluator(dataset, index_factory="PQ7")  # depends on the dimension: checked once the model is known
    assert check_index("IVF2_HNSW8,Flat", 64, 6, ef_search=4)["hnsw_quantizer"]


def test_the_first_document_batch_of_training_evaluation_checks_the_index(beir_dir, quickstart):
    dataset = IRDataset.from_beir(beir_dir, "test")
    model = Counting(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32)
    evaluator = RetrievalEvaluator(dataset, index_factory="PQ7")
    tokens = model.formatter("doc")(["a document"])
    with pytest.raises(ConfigError, match="index_factory='PQ7'"):
        evaluator.encode_step(model, tokens, "doc")


class Counting(DualEncoder):
    """A real dual encoder that counts the texts it encodes, per side."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: Counter = Counter()

    def encode(self, tokens, side):
        self.calls[side] += len(tokens["input_ids"])
        return super().encode(tokens, side)


def test_saved_index_is_reused_without_encoding_then_rebuilt_for_another_model(tmp_path, beir_dir, quickstart, caplog):
    dataset = IRDataset.from_beir(beir_dir, "train")  # 2 queries, 6 documents
    path = tmp_path / "idx" / "corpus.faiss"
    args = dict(depth=6, index_factory="IVF2,Flat", index_path=path)
    model = Counting(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32)
    first_metrics, first_run = RetrievalEvaluator(dataset, **args).evaluate(model, progress=False)
    assert model.calls == Counter(query=2, doc=6) and path.is_file()
    record = json.loads(Path(f"{path}.json").read_text())
    assert record["factory"] == "IVF2,Flat" and record["model"]["weights"] == model.weights_hash()
    assert record["corpus"]["documents"] == 6 and record["index_bytes"] == path.stat().st_size

    model.calls.clear()
    metrics, run = RetrievalEvaluator(dataset, **args).evaluate(model, progress=False)  # a new evaluator, same files
    assert model.calls == Counter(query=2)  # the corpus was not encoded
    assert run == first_run and metrics == first_metrics
    assert all(len(docs) == 6 for docs in run.values())  # IVF at depth 6: every document of the corpus

    other = Counting(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)  # other weights, same settings
    with caplog.at_level(logging.WARNING, logger="kdir.retrieval.evaluators"):
        RetrievalEvaluator(dataset, **args).evaluate(other, progress=False)
    assert other.calls == Counter(query=2, doc=6)  # rebuilt
    old, new = model.weights_hash()[:12], other.weights_hash()[:12]
    assert f"index_path={path}: rebuilding it (model.weights {old} -> {new})" in caplog.text
    assert json.loads(Path(f"{path}.json").read_text())["model"]["weights"] == other.weights_hash()

    other_dir = tmp_path / "changed"
    shutil.copytree(beir_dir, other_dir)
    corpus = other_dir / "corpus.jsonl"
    corpus.write_text(corpus.read_text().replace("document number 1 ", "document number one "))
    changed = IRDataset.from_beir(other_dir, "train")  # same ids, one other text: another corpus
    model.calls.clear()
    RetrievalEvaluator(changed, **args).evaluate(model, progress=False)
    assert model.calls["doc"] == 6


def test_evaluate_command_reuses_its_index_and_stops_on_a_bad_factory_before_encoding(tmp_path, quickstart, capsys):
    index = tmp_path / "quickstart.faiss"
    common = ['eval.test.index_factory="IVF32,Flat"', f"eval.test.index_path={index}"]  # as the shell passes them
    assert run_command("kdir.evaluate", f"hydra.run.dir={tmp_path / 'a'}", *common) == 0
    first = (tmp_path / "a" / "run.trec").read_text().splitlines()
    per_query = Counter(line.split()[0] for line in first)
    assert len(per_query) == 200 and set(per_query.values()) == {1000}  # IVF32 at depth 1000: 1000 hits each
    capsys.readouterr()
    assert run_command("kdir.evaluate", f"hydra.run.dir={tmp_path / 'b'}", *common) == 0
    assert "the saved index matches: the corpus is not encoded" in capsys.readouterr().out
    assert (tmp_path / "b" / "run.trec").read_text().splitlines() == first

    assert run_command("kdir.evaluate", f"hydra.run.dir={tmp_path / 'c'}", "eval.test.index_factory=PQ7") == 2
    captured = capsys.readouterr()
    error = "kdir.evaluate: error: eval.test.index_factory='PQ7': faiss cannot build this index for 64-d"
    assert error in captured.err
    assert "encode query" not in captured.err and "encode doc" not in captured.err  # no progress bar: nothing encoded
    assert not (tmp_path / "c" / "run.trec").exists()


def test_maxsim_search_meets_the_zero_vector_floor_of_masked_document_tokens_by_hand():
    """ColBERT v1 (CollectiveKD colbert/modeling/colbert.py: D * mask): a masked document position is a zero vector,
    so with L2 each query token's max also sees -||q_i||^2 = -1 for unit vectors (cosine 0.5)."""
    import torch

    from kdir.retrieval.search import maxsim_search

    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two unit query tokens
    far = torch.tensor([-1.0, 0.0])  # -||q - d||^2: 0 - 4 = -4 for q_0, -2 for q_1
    d = torch.stack([torch.stack([far, torch.zeros(2)]), torch.stack([far, far])])  # doc 0: one masked position
    d_mask = torch.tensor([[True, False], [True, True]])
    q_mask = torch.ones(1, 2, dtype=torch.bool)
    excluded, _ = maxsim_search((q, q_mask), (d, d_mask), 2, "l2", masked_doc_tokens="exclude")
    zero, rows = maxsim_search((q, q_mask), (d, d_mask), 2, "l2", masked_doc_tokens="zero")
    assert sorted(excluded[0].tolist()) == [-6.0, -6.0]  # (-4) + (-2) for both documents
    assert rows[0].tolist() == [0, 1] and zero[0].tolist() == [-2.0, -6.0]  # doc 0: max(-4, -1) + max(-2, -1)
