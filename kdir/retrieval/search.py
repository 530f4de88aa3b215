"""Dense retrieval with FAISS: exact inner product by default, any ``index_factory`` string as an option.

GPU indexes are used when the installed faiss build sees a GPU (``faiss-gpu``); otherwise CPU.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def build_index(docs: np.ndarray, factory: str = "Flat", use_gpu: bool | None = None):
    """Index ``docs [N, dim]`` (float32) for inner-product search.

    Args:
        factory: a FAISS ``index_factory`` string (``Flat``, ``HNSW32``, ``IVF1024,PQ64``, ...).
        use_gpu: ``None`` = use every GPU faiss can see.
    """
    import faiss  # imported here: stages that never search (teacher training on a GPU node) need no faiss

    docs = np.ascontiguousarray(docs, dtype=np.float32)
    index = faiss.index_factory(docs.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if (use_gpu is None and n_gpus > 0) or use_gpu:
        if n_gpus == 0:
            raise RuntimeError("use_gpu=true but faiss sees no GPU (install faiss-gpu on GPU nodes)")
        index = faiss.index_cpu_to_all_gpus(index)
        log.info("faiss: %s on %d GPU(s)", factory, n_gpus)
    if not index.is_trained:
        index.train(docs)
    index.add(docs)
    return index


def search(
    queries: np.ndarray, docs: np.ndarray, k: int, factory: str = "Flat", use_gpu: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents per query by inner product: ``(scores [Nq, k], doc_rows [Nq, k])``, best first."""
    import faiss

    index = build_index(docs, factory, use_gpu)
    k = min(k, docs.shape[0])
    if "HNSW" in factory:  # an HNSW search returns at most efSearch hits: make room for all k
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", max(k, 16))
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, rows
