"""The expansion stage of CollectiveKD (Kim, Kim & Hwang, NAACL 2022, arXiv 2205.03273), as a library function.

Once per training query, ColBERT-PRF expansion embeddings (Wang et al., ICTIR 2021) of the query's feedback
passages, computed with the ColBERT teacher: corpus encoding, idf, feedback passages (the teacher's own top
``fb_docs``, a given ranking, or the labelled positives), k-means, centroid labels and weights — the steps of
:mod:`kdir.retrieval.prf`. :func:`expand_queries` writes a :class:`kdir.stores.ExpansionStore` (plus the teacher's
top-``depth`` ranking, ``<out>/ranking.trec``: CollectiveKD's hard-negative pool). ``python -m kdir.expand`` and the
quickstart's collective teacher run it.

In memory by default; with ``token_store`` the document tokens are streamed to an embedding store on disk (resumable,
reused by later expansions with the same teacher and corpus) and every step reads them from there, so memory holds
the token index and a chunk (:mod:`kdir.retrieval.prf`). ``token_index`` is the FAISS factory of the index that
labels centroids (``Flat``: exact, the default; e.g. ``IVF65536,PQ32`` at MS MARCO scale, as CollectiveKD's ColBERT
index); ``candidates=token_index`` finds the teacher's own ranking through it (ColBERT v1's end-to-end retrieval)
instead of exhaustive MaxSim, and ``ranking=<run>`` takes the feedback from any first-stage run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from kdir.data.dataset import IRDataset
from kdir.data.formats import read_trec_run
from kdir.errors import KdirError
from kdir.models.colbert import ColBERT
from kdir.retrieval.encode import encode_texts
from kdir.retrieval.metrics import Run, write_trec_run
from kdir.retrieval.prf import (
    StoreTokenPool,
    collective_knowledge,
    document_frequencies,
    encode_corpus,
    inverse_document_frequency,
    ranked_feedback,
    relevance_feedback,
    skip_mask,
    store_document_frequencies,
    teacher_ranking,
    token_index_ranking,
    token_strings,
)
from kdir.stores import ExpansionStore, id_hashes
from kdir.stores.expansion_store import check_writable

log = logging.getLogger("kdir.expand")


@contextmanager
def _timed(name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    log.info("%s: %.1f s", name, timings[name])


def check_settings(
    out: str | Path,
    mode: str = "prf",
    ranking: str | Path | None = None,
    depth: int = 100,
    fb_docs: int = 3,
    fb_clusters: int = 24,
    fb_k: int = 10,
    beta: float = 1.0,
    neighbours: int = 10,
    overwrite: bool = False,
    candidates: str = "exhaustive",
    token_store: str | Path | None = None,
    token_index: str = "Flat",
    faiss_depth: int = 256,
) -> None:
    """Refuse bad settings and an occupied ``out`` before any encoding."""
    from kdir.retrieval.search import check_factory

    if candidates not in ("exhaustive", "token_index"):
        raise KdirError(f"candidates={candidates!r}: expected exhaustive (MaxSim over the corpus) or token_index")
    if candidates == "token_index" and token_store is None:
        raise KdirError("candidates=token_index needs token_store=<dir> (the tokens it retrieves are read from it)")
    if faiss_depth < 1:
        raise KdirError(f"faiss_depth={faiss_depth}: expected a positive number of token hits per query token")
    check_factory(token_index, "token_index")
    if mode not in ("prf", "rf"):
        raise KdirError(f"mode must be 'prf' (teacher top-{fb_docs}) or 'rf' (labelled positives), got {mode!r}")
    if beta < 0 or fb_docs < 1 or fb_clusters < 1 or fb_k < 1 or neighbours < 1:
        raise KdirError(
            "need beta >= 0 and fb_docs, fb_clusters, fb_k, neighbours >= 1, got "
            f"beta={beta} fb_docs={fb_docs} fb_clusters={fb_clusters} fb_k={fb_k} neighbours={neighbours}"
        )
    if mode == "prf" and ranking is None and depth < fb_docs:
        raise KdirError(f"depth={depth} must be >= fb_docs={fb_docs} in prf mode")
    check_writable(out, overwrite)


def _ranking(
    model: ColBERT,
    dataset: IRDataset,
    search,
    mode: str,
    ranking: str | Path | None,
    depth: int,
    fb_docs: int,
    timings: dict[str, float],
) -> tuple[Run | None, list[np.ndarray] | None]:
    """The training queries' ranking (read, or ``search(depth)``: ``(scores, rows)``) and, in prf mode, their feedback
    documents."""
    ids = dataset.queries.ids
    if ranking is not None:
        run = read_trec_run(ranking)
        log.info("ranking read from %s (%d queries)", ranking, len(run))
        return run, ranked_feedback(run, ids, dataset.corpus, fb_docs, str(ranking)) if mode == "prf" else None
    if depth < 1:
        return None, None
    with _timed("search", timings):
        scores, rows = search(depth)
    run = {
        q: {dataset.corpus.ids[r]: float(x) for r, x in zip(rr, ss) if r >= 0} for q, rr, ss in zip(ids, rows, scores)
    }
    return run, [r[:fb_docs][r[:fb_docs] >= 0] for r in rows]


def _probe_enough(index, k: int) -> None:
    """An IVF token index visits enough lists for ``k`` hits per search (:func:`~kdir.retrieval.search.auto_nprobe`;
    faiss's default of one list would label centroids from a single cell)."""
    from kdir.retrieval.search import _param_space, auto_nprobe, index_knobs

    nlist = index_knobs(index)["nlist"]
    if nlist is not None:
        nprobe = min(nlist, auto_nprobe(nlist, index.ntotal, k))
        _param_space().set_index_parameter(index, "nprobe", nprobe)
        log.info("token index: nprobe %d of %d lists", nprobe, nlist)


def expand_queries(
    model: ColBERT,
    dataset: IRDataset,
    out: str | Path,
    *,
    mode: str = "prf",
    ranking: str | Path | None = None,
    depth: int = 100,
    fb_docs: int = 3,
    fb_clusters: int = 24,
    fb_k: int = 10,
    beta: float = 1.0,
    neighbours: int = 10,
    batch_size: int = 64,
    faiss_gpu: bool | None = None,
    seed: int = 42,
    overwrite: bool = False,
    progress: bool = True,
    token_store: str | Path | None = None,
    token_index: str = "Flat",
    train_sample: int | None = None,
    candidates: str = "exhaustive",
    faiss_depth: int = 256,
) -> ExpansionStore:
    """Expand every query of ``dataset`` with the frozen ColBERT ``model``; write and return the store at ``out``.

    Args:
        mode: ``prf`` (the teacher's own top-``fb_docs``, the paper) or ``rf`` (the labelled positives).
        ranking: a TREC run of the queries to take the feedback from instead of searching.
        depth: depth of the teacher ranking written to ``<out>/ranking.trec`` (rf mode: 0 skips it).
        fb_docs / fb_clusters / fb_k / beta / neighbours: ColBERT-PRF's settings (feedback passages, k-means
            clusters, expansion vectors kept, weight ``beta * idf``, corpus tokens voting for a centroid's token).
        token_store: stream the document tokens to this embedding store folder (``None``: in memory).
        token_index: FAISS ``index_factory`` of the token index labelling centroids (and, with
            ``candidates=token_index``, retrieving); ``train_sample`` tokens train it when it needs training.
        candidates: ``exhaustive`` (MaxSim against every document) or ``token_index`` (ColBERT v1's end-to-end
            retrieval, ``faiss_depth`` token hits per query token; needs ``token_store``).
    """
    from kdir.retrieval.search import build_index
    from kdir.retrieval.store_index import build_index_from_store, maxsim_search_store
    from kdir.retrieval.stream_encode import encode_into_store

    if not isinstance(model, ColBERT):
        raise KdirError(f"the expansion stage needs a ColBERT teacher (teacher=colbert), got {type(model).__name__}")
    check_settings(
        out, mode, ranking, depth, fb_docs, fb_clusters, fb_k, beta, neighbours, overwrite, candidates, token_store,
        token_index, faiss_depth,
    )  # fmt: skip
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    vocab = len(model.tokenizer)
    similarity, masked = model.config["similarity"], model.config.get("masked_doc_tokens", "exclude")
    if token_store is None:
        with _timed("encode", timings):
            corpus = encode_corpus(model, dataset.corpus.texts, batch_size, progress)
        with _timed("idf", timings):
            idf = inverse_document_frequency(
                document_frequencies(corpus.token_ids.numpy(), corpus.mask.numpy(), vocab), len(corpus)
            )
        pool = corpus.pool()
        with _timed("token_index", timings):
            index = build_index(pool.embeddings, token_index, faiss_gpu)

        def search(k: int) -> tuple[np.ndarray, np.ndarray]:
            return teacher_ranking(model, dataset.queries.texts, corpus, k, batch_size, progress=progress)
    else:
        with _timed("encode", timings):
            store = encode_into_store(
                model, dataset.corpus.texts, dataset.corpus.ids, token_store, "doc", batch_size=batch_size,
                progress=progress, dataset=dataset.name,
            )  # fmt: skip
        pool = StoreTokenPool(store)
        with _timed("idf", timings):
            idf = inverse_document_frequency(store_document_frequencies(pool, vocab), len(store))
        with _timed("token_index", timings):
            index, _ = build_index_from_store(store, token_index, "ip", train_sample, faiss_gpu, seed=seed)

        def search(k: int) -> tuple[np.ndarray, np.ndarray]:
            texts = dataset.queries.texts
            if candidates == "token_index":
                return token_index_ranking(model, texts, pool, index, k, faiss_depth, batch_size, progress)
            queries = encode_texts(model, texts, "query", batch_size, progress=progress, out_device=model.device)
            return maxsim_search_store(
                queries, store, k, similarity, batch_size, device=model.device, masked_doc_tokens=masked,
                pad_to=model.config["doc_max_length"],
            )  # fmt: skip

    _probe_enough(index, max(neighbours, faiss_depth if candidates == "token_index" else 0))
    run, feedback = _ranking(model, dataset, search, mode, ranking, depth, fb_docs, timings)
    if mode == "rf":
        feedback = relevance_feedback(dataset, fb_docs)
    settings = {"fb_clusters": fb_clusters, "fb_k": fb_k, "beta": beta, "neighbours": neighbours, "seed": seed}
    with _timed("clustering", timings):
        exp = collective_knowledge(
            feedback, pool, index, idf, skip_mask(model.tokenizer), **settings, progress=progress
        )
    meta = {
        "teacher": model.provenance(),
        "data": {"dataset": dataset.name, "n_docs": len(dataset.corpus), "n_train_queries": len(dataset.queries)},
        "mode": mode,
        "ranking": str(ranking) if ranking else f"teacher MaxSim ({candidates})",
        "token_store": str(token_store) if token_store else None,
        "token_index": token_index,
        "fb_docs": fb_docs,
        "kmeans_init": "avg_step_position",
        **settings,
        "seconds": timings,
    }
    keys = id_hashes([dataset.queries.ids[q] for q in exp.queries])
    tokens = token_strings(model.tokenizer, exp.token_ids)
    store = ExpansionStore.write(out, keys, exp.vectors, exp.weights, tokens, meta, overwrite=overwrite)
    if run is not None:
        write_trec_run(run, Path(out) / "ranking.trec", tag="colbert")
    log.info("expansion store %s: %d of %d training queries, k=%d", out, len(store), len(dataset.queries), store.k)
    return store
