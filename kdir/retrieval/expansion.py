"""The expansion stage of CollectiveKD (Kim, Kim & Hwang, NAACL 2022, arXiv 2205.03273), as a library function.

Once per training query, ColBERT-PRF expansion embeddings (Wang et al., ICTIR 2021) of the query's feedback
passages, computed with the ColBERT teacher: corpus encoding, idf, feedback passages (the teacher's own top
``fb_docs``, a given ranking, or the labelled positives), k-means, centroid labels and weights — the steps of
:mod:`kdir.retrieval.prf`. :func:`expand_queries` writes a :class:`kdir.stores.ExpansionStore` (plus the teacher's
top-``depth`` ranking, ``<out>/ranking.trec``: CollectiveKD's hard-negative pool). ``python -m kdir.expand`` and the
quickstart's collective teacher run it.
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
from kdir.retrieval.metrics import Run, run_from_topk, write_trec_run
from kdir.retrieval.prf import (
    CorpusTokens,
    collective_knowledge,
    document_frequencies,
    encode_corpus,
    inverse_document_frequency,
    ranked_feedback,
    relevance_feedback,
    skip_mask,
    teacher_ranking,
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
) -> None:
    """Refuse bad settings and an occupied ``out`` before any encoding."""
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
    corpus: CorpusTokens,
    mode: str,
    ranking: str | Path | None,
    depth: int,
    fb_docs: int,
    batch_size: int,
    progress: bool,
    timings: dict[str, float],
) -> tuple[Run | None, list[np.ndarray] | None]:
    """The training queries' ranking (read or computed) and, in prf mode, their feedback documents."""
    ids = dataset.queries.ids
    if ranking is not None:
        run = read_trec_run(ranking)
        log.info("ranking read from %s (%d queries)", ranking, len(run))
        return run, ranked_feedback(run, ids, dataset.corpus, fb_docs, str(ranking)) if mode == "prf" else None
    if depth < 1:
        return None, None
    with _timed("search", timings):
        scores, rows = teacher_ranking(model, dataset.queries.texts, corpus, depth, batch_size, progress=progress)
    return run_from_topk(ids, dataset.corpus.ids, scores, rows), list(rows[:, :fb_docs])


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
) -> ExpansionStore:
    """Expand every query of ``dataset`` with the frozen ColBERT ``model``; write and return the store at ``out``.

    Args:
        mode: ``prf`` (the teacher's own top-``fb_docs``, the paper) or ``rf`` (the labelled positives).
        ranking: a TREC run of the queries to take the feedback from instead of searching.
        depth: depth of the teacher ranking written to ``<out>/ranking.trec`` (rf mode: 0 skips it).
        fb_docs / fb_clusters / fb_k / beta / neighbours: ColBERT-PRF's settings (feedback passages, k-means
            clusters, expansion vectors kept, weight ``beta * idf``, corpus tokens voting for a centroid's token).
    """
    from kdir.retrieval.search import build_index

    if not isinstance(model, ColBERT):
        raise KdirError(f"the expansion stage needs a ColBERT teacher (teacher=colbert), got {type(model).__name__}")
    check_settings(out, mode, ranking, depth, fb_docs, fb_clusters, fb_k, beta, neighbours, overwrite)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    with _timed("encode", timings):
        corpus = encode_corpus(model, dataset.corpus.texts, batch_size, progress)
    with _timed("idf", timings):
        df = document_frequencies(corpus.token_ids.numpy(), corpus.mask.numpy(), len(model.tokenizer))
        idf = inverse_document_frequency(df, len(corpus))
    run, feedback = _ranking(model, dataset, corpus, mode, ranking, depth, fb_docs, batch_size, progress, timings)
    if mode == "rf":
        feedback = relevance_feedback(dataset, fb_docs)
    settings = {"fb_clusters": fb_clusters, "fb_k": fb_k, "beta": beta, "neighbours": neighbours, "seed": seed}
    with _timed("clustering", timings):
        pool = corpus.pool()
        index = build_index(pool.embeddings, "Flat", faiss_gpu)
        exp = collective_knowledge(
            feedback, pool, index, idf, skip_mask(model.tokenizer), **settings, progress=progress
        )
    meta = {
        "teacher": model.provenance(),
        "data": {"dataset": dataset.name, "n_docs": len(corpus), "n_train_queries": len(dataset.queries)},
        "mode": mode,
        "ranking": str(ranking) if ranking else "teacher MaxSim",
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
