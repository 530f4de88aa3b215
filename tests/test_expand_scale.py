"""The expansion stage at scale: document tokens streamed to an embedding store and read from it; the same
collective knowledge as the in-memory stage; the teacher's ranking through the token index (ColBERT v1 end-to-end
retrieval); a compressed token index for the centroid labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import counting_doc_encodes

from kdir.data.dataset import IRDataset
from kdir.errors import KdirError
from kdir.models import ColBERT
from kdir.retrieval.expansion import expand_queries
from kdir.retrieval.prf import StoreTokenPool, document_frequencies, encode_corpus, store_document_frequencies
from kdir.retrieval.stream_encode import encode_into_store
from kdir.stores import EmbeddingStore, ExpansionStore, id_hashes

SETTINGS = dict(depth=10, fb_docs=3, fb_clusters=8, fb_k=4, neighbours=5, batch_size=128, progress=False)


@pytest.fixture(scope="module")
def dev(quickstart):
    return IRDataset.from_beir(quickstart["data"], "dev")


def _colbert(quickstart, **kw) -> ColBERT:
    torch.manual_seed(0)
    return ColBERT(quickstart["model"], dim=16, query_max_length=8, doc_max_length=48, **kw).freeze()


def _ranking(path) -> dict[str, list[str]]:
    run: dict[str, list[str]] = {}
    for line in (path / "ranking.trec").read_text().splitlines():
        q, _, d, *_ = line.split()
        run.setdefault(q, []).append(d)
    return run


def _same_expansions(a: ExpansionStore, b: ExpansionStore, keys: np.ndarray, atol: float = 1e-5) -> None:
    va, wa = a.lookup(keys)
    vb, wb = b.lookup(keys)
    assert np.allclose(wa, wb, atol=1e-6) and np.allclose(va, vb, atol=atol)


@pytest.mark.parametrize("kind", ["cosine", "l2_zero"])
def test_store_backed_expansion_equals_the_in_memory_one(kind, dev, quickstart, tmp_path):
    kw = {"similarity": "l2", "masked_doc_tokens": "zero"} if kind == "l2_zero" else {}
    model = _colbert(quickstart, **kw)
    memory = expand_queries(model, dev, tmp_path / "memory", **SETTINGS)
    stored = expand_queries(model, dev, tmp_path / "stored", token_store=tmp_path / "tokens", **SETTINGS)
    tokens = EmbeddingStore.open(tmp_path / "tokens")
    assert tokens.multi_vector and len(tokens) == len(dev.corpus)
    assert len(memory) == len(stored) == len(dev.queries)
    _same_expansions(memory, stored, id_hashes(dev.queries.ids))
    a, b = _ranking(tmp_path / "memory"), _ranking(tmp_path / "stored")
    if kind == "cosine":
        assert a == b
    else:
        # masked positions score as zero vectors: in memory every document is padded to the corpus' longest, from
        # the store to doc_max_length, so a document as long as the corpus' longest without punctuation gains the
        # zero-vector floor from the store; the ranking may then differ at near ties below the feedback documents
        assert all(a[q][:3] == b[q][:3] for q in a)
        assert np.mean([a[q] == b[q] for q in a]) > 0.95
    assert stored.meta["token_store"] == str(tmp_path / "tokens") and memory.meta["token_store"] is None


def test_idf_from_the_store_equals_the_in_memory_count(dev, quickstart, tmp_path):
    model = _colbert(quickstart)
    corpus = encode_corpus(model, dev.corpus.texts, 128, progress=False)
    vocab = len(model.tokenizer)
    expected = document_frequencies(corpus.token_ids.numpy(), corpus.mask.numpy(), vocab)
    store = encode_into_store(model, dev.corpus.texts, dev.corpus.ids, tmp_path / "t", "doc", chunk_size=97)
    pool = StoreTokenPool(store)
    # by hand: in how many documents each stored token id occurs
    by_hand = np.zeros(vocab, dtype=np.int64)
    for d in range(len(dev.corpus)):
        by_hand[np.unique(pool.token_ids[np.arange(pool.offsets[d], pool.offsets[d + 1])])] += 1
    assert (store_document_frequencies(pool, vocab, chunk=50) == by_hand).all()
    assert (by_hand == expected).all()


def test_a_second_expansion_reuses_the_token_store(dev, quickstart, tmp_path):
    model = _colbert(quickstart)
    expand_queries(model, dev, tmp_path / "a", token_store=tmp_path / "tokens", **SETTINGS)
    test = IRDataset.from_beir(quickstart["data"], "test")
    with counting_doc_encodes(model) as encoded:
        expand_queries(model, test, tmp_path / "b", token_store=tmp_path / "tokens", **SETTINGS)
    assert sum(encoded) == 1  # the dimension probe: the corpus is read from the store


def test_token_index_ranking_finds_the_exhaustive_top_documents(dev, quickstart, tmp_path):
    model = _colbert(quickstart)
    exhaustive = expand_queries(model, dev, tmp_path / "x", token_store=tmp_path / "tokens", **SETTINGS)
    found = expand_queries(
        model, dev, tmp_path / "t", token_store=tmp_path / "tokens", candidates="token_index", faiss_depth=64,
        **SETTINGS,
    )  # fmt: skip
    a, b = _ranking(tmp_path / "x"), _ranking(tmp_path / "t")
    recall = np.mean([len(set(a[q][:3]) & set(b.get(q, [])[:3])) / 3 for q in a])
    assert recall > 0.9, recall
    # the same feedback gives the same expansions for the queries whose top 3 agree
    agree = [q for q in a if a[q][:3] == b.get(q, [])[:3]]
    assert len(agree) > 0.8 * len(a)
    _same_expansions(exhaustive, found, id_hashes(agree))
    with pytest.raises(KdirError, match="needs token_store"):
        expand_queries(model, dev, tmp_path / "n", candidates="token_index", **SETTINGS)


def test_a_compressed_token_index_labels_nearly_every_centroid_alike(dev, quickstart, tmp_path):
    model = _colbert(quickstart)
    exact = expand_queries(model, dev, tmp_path / "flat", token_store=tmp_path / "tokens", **SETTINGS)
    compressed = expand_queries(
        model, dev, tmp_path / "pq", token_store=tmp_path / "tokens", token_index="IVF32,PQ16", **SETTINGS
    )
    assert compressed.meta["token_index"] == "IVF32,PQ16"
    keys = id_hashes(dev.queries.ids)
    # PQ16 over 16-d tokens (8 bits per dimension): approximate neighbours, so a few labels change
    overlap = [
        len(set(a) & set(b)) / max(len(a), 1)
        for a, b in zip(exact.lookup_tokens(keys), compressed.lookup_tokens(keys))
    ]
    assert np.mean(overlap) > 0.8, np.mean(overlap)
