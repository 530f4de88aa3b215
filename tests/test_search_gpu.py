"""Exact search in torch (the GPU search without faiss-gpu) against FAISS Flat, where each search runs, and the
MaxSim search loop against its previous form. Run on CPU tensors; the CUDA case runs where torch sees a GPU."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
import torch

from kdir.errors import ConfigError
from kdir.retrieval.search import (
    TorchFlatIndex,
    build_index,
    exact_search,
    index_knobs,
    load_index,
    maxsim_search,
    resolve_backend,
    save_index,
    search,
    search_index,
    to_gpu,
)

FILLER = -np.finfo(np.float32).max  # faiss's score of an empty slot


@pytest.fixture(scope="module")
def tied() -> tuple[np.ndarray, np.ndarray]:
    """1,000 documents and 37 queries (16-d) on a coarse grid, with repeated documents: many exact score ties."""
    rng = np.random.default_rng(0)
    docs = rng.integers(-2, 3, size=(1000, 16)).astype("f4")
    docs[500:700] = docs[:200]  # each of the first 200 documents twice
    return rng.integers(-2, 3, size=(37, 16)).astype("f4"), docs


def _faiss_flat(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(docs)
    return index.search(queries, k)


def _assert_exact_top_k(scores, rows, queries, docs, ref_scores, atol=1e-5):
    """The scores are FAISS's, position by position, and each row is a distinct document that has its score (so
    the two differ at most in the order of exactly tied documents, as faiss contrib's check_ref_knn_with_draws)."""
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=atol)
    exact = queries.astype("f8") @ docs.astype("f8").T
    for q in range(len(queries)):
        hit = rows[q][rows[q] >= 0]
        assert len(set(hit.tolist())) == len(hit)
        np.testing.assert_allclose(exact[q, hit], scores[q, : len(hit)], rtol=0, atol=atol)


@pytest.mark.parametrize("k", [5, 300, 1000])
def test_torch_flat_index_gives_faiss_flat_top_k_with_ties_across_chunks(tied, k):
    queries, docs = tied
    ref = _faiss_flat(queries, docs, k)
    index = TorchFlatIndex(16, chunk_size=128, query_batch=10)  # k above the chunk size, queries in ragged blocks
    index.add(docs)
    scores, rows = index.search(queries, k)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (37, k)
    _assert_exact_top_k(scores, rows, queries, docs, ref[0])
    assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_pieces_added_one_by_one_equal_one_add_and_k_beyond_the_index_pads_as_faiss(tied):
    queries, docs = tied
    whole = TorchFlatIndex(16, chunk_size=100)
    whole.add(docs)
    pieces = TorchFlatIndex(16, chunk_size=100)
    for s in range(0, len(docs), 37):  # pieces that straddle chunk borders
        pieces.add(docs[s : s + 37])
    assert pieces.ntotal == whole.ntotal == 1000
    np.testing.assert_array_equal(pieces.reconstruct_n(), docs)
    np.testing.assert_array_equal(pieces.search(queries, 50)[0], whole.search(queries, 50)[0])
    small = TorchFlatIndex(16)
    small.add(docs[:3])
    ref_scores, ref_rows = _faiss_flat(queries, docs[:3], 5)
    scores, rows = small.search(queries, 5)
    assert (rows[:, 3:] == -1).all() and (ref_rows[:, 3:] == -1).all()
    np.testing.assert_array_equal(scores[:, 3:], np.full((37, 2), FILLER, "f4"))
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_half_precision_storage_stays_within_its_rounding_of_faiss():
    rng = np.random.default_rng(1)
    docs, queries = rng.normal(size=(2000, 32)).astype("f4"), rng.normal(size=(20, 32)).astype("f4")
    ref_scores, ref_rows = _faiss_flat(queries, docs, 100)
    for dtype in (torch.float16, torch.bfloat16):
        index = TorchFlatIndex(32, dtype=dtype, chunk_size=512)
        index.add(docs)
        scores, rows = index.search(queries, 100)
        tol = 0.05 if dtype == torch.bfloat16 else 0.01  # |q| |d| ~ 32 times the storage's relative rounding
        np.testing.assert_allclose(scores, ref_scores, atol=tol)
        overlap = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(rows, ref_rows)])
        assert overlap > 0.9, (dtype, overlap)


def test_a_search_inside_a_bf16_autocast_region_still_scores_in_fp32():
    rng = np.random.default_rng(2)
    docs, queries = rng.normal(size=(500, 16)).astype("f4"), rng.normal(size=(9, 16)).astype("f4")
    index = TorchFlatIndex(16, chunk_size=128)
    index.add(docs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.from_numpy(queries) @ torch.from_numpy(docs).T).dtype == torch.bfloat16  # what it would do
        inside = index.search(queries, 50)
    _assert_exact_top_k(*inside, queries, docs, _faiss_flat(queries, docs, 50)[0])


def test_exact_search_on_tensors_equals_faiss(tied):
    queries, docs = tied
    ref = _faiss_flat(queries, docs, 200)
    scores, rows = exact_search(torch.from_numpy(queries), torch.from_numpy(docs), 200, batch_size=8, doc_chunk=150)
    _assert_exact_top_k(scores, rows, queries, docs, ref[0])
    assert exact_search(torch.from_numpy(queries), torch.from_numpy(docs[:7]), 50)[0].shape == (37, 7)  # k capped


def test_backend_torch_through_build_index_search_and_a_saved_index(tied, tmp_path):
    queries, docs = tied
    index = build_index(docs, "Flat", backend="torch")
    assert isinstance(index, TorchFlatIndex) and index.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    knobs = index_knobs(index)
    assert knobs == {"nlist": None, "hnsw": False, "hnsw_quantizer": False}
    ref = _faiss_flat(queries, docs, 100)
    _assert_exact_top_k(*search_index(index, queries, 100, knobs), queries, docs, ref[0])
    _assert_exact_top_k(*search(queries, docs, 100, backend="torch"), queries, docs, ref[0])
    path = save_index(index, tmp_path / "flat.index", {"factory": "Flat"})  # written as a faiss IndexFlatIP
    loaded, differs = load_index(path, {"factory": "Flat"})
    assert not differs and isinstance(loaded, faiss.Index)
    _assert_exact_top_k(*loaded.search(queries, 100), queries, docs, ref[0])
    back = to_gpu(loaded, "Flat", None, backend="torch")  # a saved index placed for the torch search again
    assert isinstance(back, TorchFlatIndex) and back.ntotal == 1000
    np.testing.assert_array_equal(back.reconstruct_n(), docs)


def test_where_each_search_runs_and_the_settings_it_refuses():
    gpu = torch.cuda.is_available()
    faiss_gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    auto = "faiss-gpu" if faiss_gpu else "torch-cuda" if gpu else "faiss-cpu"
    assert resolve_backend("Flat") == auto
    assert resolve_backend("IVF64,Flat") == ("faiss-gpu" if faiss_gpu else "faiss-cpu")  # approximate: faiss only
    assert resolve_backend("Flat", use_gpu=False) == "faiss-cpu"
    assert resolve_backend("Flat", backend="torch", use_gpu=False) == "torch-cpu"
    assert resolve_backend("Flat", backend="faiss") == ("faiss-gpu" if faiss_gpu else "faiss-cpu")
    with pytest.raises(ConfigError, match="search_backend='annoy': expected auto, faiss or torch"):
        resolve_backend("Flat", backend="annoy")
    with pytest.raises(ConfigError, match=r"search_backend=torch searches exactly.*'HNSW32'"):
        resolve_backend("HNSW32", backend="torch")
    with pytest.raises(ConfigError, match="inner product"):
        resolve_backend("Flat", backend="torch", inner_product=False)
    if not (gpu or faiss_gpu):
        with pytest.raises(ConfigError, match="use_gpu=true but faiss sees no GPU"):
            resolve_backend("Flat", use_gpu=True)
        with pytest.raises(ConfigError, match="use_gpu=true but torch sees no CUDA"):
            resolve_backend("Flat", backend="torch", use_gpu=True)


def test_an_l2_index_is_never_turned_into_the_inner_product_search():
    index = faiss.index_factory(8, "Flat", faiss.METRIC_L2)
    assert not isinstance(to_gpu(index, "Flat", None), TorchFlatIndex)
    with pytest.raises(ConfigError, match="inner product; this index is L2"):
        to_gpu(index, "Flat", None, backend="torch")


@pytest.mark.skipif(not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0, reason="needs faiss-gpu")
def test_hnsw_stays_on_the_cpu_with_a_log_line_under_faiss_gpu(caplog):
    docs = np.random.default_rng(0).normal(size=(500, 16)).astype("f4")
    with caplog.at_level(logging.INFO, logger="kdir.retrieval.search"):
        index = build_index(docs, "HNSW32")
    assert "no GPU form" in caplog.text and isinstance(index, faiss.IndexHNSW)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_search_on_cuda_equals_faiss_flat(tied):
    queries, docs = tied
    index = TorchFlatIndex(16, device="cuda", chunk_size=128)
    index.add(docs)
    _assert_exact_top_k(*index.search(queries, 300), queries, docs, _faiss_flat(queries, docs, 300)[0])


# ------------------------------------------------------------------ MaxSim


@torch.no_grad()
def _maxsim_search_before(queries, docs, k, similarity="cosine", batch_size=64, doc_chunk=1024, device=None,
                          masked_doc_tokens="exclude"):  # fmt: skip
    """``maxsim_search`` as it was: each fp16 document chunk converted to fp32 once per (query block, chunk)."""
    from kdir.models.colbert import maxsim

    (q, q_mask), (d, d_mask) = queries, docs
    device = device or d.device
    d, d_mask = d.to(device), d_mask.to(device)
    k = min(k, len(d))
    top_scores, top_rows = [], []
    for s in range(0, len(q), batch_size):
        qb, mb = q[s : s + batch_size].to(device).float(), q_mask[s : s + batch_size].to(device)
        scores = torch.cat(
            [
                maxsim(
                    qb,
                    mb,
                    d[c : c + doc_chunk].float(),
                    d_mask[c : c + doc_chunk],
                    similarity,
                    masked_doc_tokens=masked_doc_tokens,
                )  # fmt: skip
                for c in range(0, len(d), doc_chunk)
            ],
            dim=1,
        )
        top = scores.topk(k, dim=1)
        top_scores.append(top.values.cpu())
        top_rows.append(top.indices.cpu())
    return torch.cat(top_scores).numpy(), torch.cat(top_rows).numpy()


def _tokens(n: int, length: int, dim: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, length, dim, generator=g), dim=-1).to(dtype)
    mask = torch.rand(n, length, generator=g) > 0.3
    mask[:, 0] = True
    return emb, mask


def _assert_same_ranking(new: tuple[np.ndarray, np.ndarray], old: tuple[np.ndarray, np.ndarray]) -> None:
    """Equal scores bit for bit, and equal rows except in the order of exactly tied documents (a tied group cut
    by ``k``, the last one, may hold different members of the tie)."""
    np.testing.assert_array_equal(new[0], old[0])
    for scores, a, b in zip(new[0], new[1], old[1]):
        values = np.unique(scores)
        for v in values[1:]:  # every tied group but the lowest
            assert set(a[scores == v]) == set(b[scores == v])


@pytest.mark.parametrize("similarity", ["cosine", "l2"])
@pytest.mark.parametrize("masked", ["exclude", "zero", -2.0])
def test_maxsim_search_equals_its_previous_form(similarity, masked):
    queries = _tokens(23, 6, 8, seed=1)
    docs = _tokens(310, 9, 8, seed=2)
    settings = dict(similarity=similarity, batch_size=5, doc_chunk=64, masked_doc_tokens=masked)
    for k in (7, 100, 400):  # k below, above the chunk, above the corpus
        new = maxsim_search(queries, docs, k, **settings)
        old = _maxsim_search_before(queries, docs, k, **settings)
        if masked == "exclude":  # continuous scores, no ties: the very same arrays
            np.testing.assert_array_equal(new[0], old[0])
            np.testing.assert_array_equal(new[1], old[1])
        else:  # masked positions floor many documents' scores at the same value: ties
            _assert_same_ranking(new, old)


def test_maxsim_search_of_fp16_documents_equals_its_previous_form():
    queries = _tokens(11, 5, 8, seed=3, dtype=torch.float16)
    docs = _tokens(200, 7, 8, seed=4, dtype=torch.float16)
    new = maxsim_search(queries, docs, 50, batch_size=4, doc_chunk=33)
    old = _maxsim_search_before(queries, docs, 50, batch_size=4, doc_chunk=33)
    np.testing.assert_array_equal(new[0], old[0])
    np.testing.assert_array_equal(new[1], old[1])
