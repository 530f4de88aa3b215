"""A FAISS index built from an :class:`~kdir.stores.embedding_store.EmbeddingStore`, one chunk at a time.

The vectors are read from disk a chunk at a time and added to the index, so building holds the index plus one
chunk (not a second copy of the corpus). Indexes that need training (IVF, PQ, ...) are trained first on a uniform
random sample of the stored vectors (FAISS's k-means needs about 39 to 256 points per centroid; the default sample of
131,072 covers ``IVF4096``, say, at 32 per list). Row ``i`` of the index is the store's vector ``i``: the returned
``uint64`` keys map index rows back to ids (for a multi-vector store, the key of each token vector's document).

Search the index with :func:`kdir.retrieval.search.search_index` (which sets ``nprobe`` / ``efSearch``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from kdir.errors import ConfigError
from kdir.retrieval.search import check_index, new_index, to_gpu
from kdir.stores.embedding_store import EmbeddingStore

__all__ = ["DEFAULT_TRAIN_SAMPLE", "build_index_from_store"]

DEFAULT_TRAIN_SAMPLE = 131_072
Metric = Literal["ip", "l2"]


def _new_index(dim: int, factory: str, metric: Metric, n_vectors: int) -> Any:
    import faiss

    if metric == "ip":
        check_index(factory, dim, n_docs=n_vectors)  # a ConfigError naming the setting: too many lists, ...
        return new_index(dim, factory)
    if metric != "l2":
        raise ConfigError(f"metric must be 'ip' (inner product) or 'l2', got {metric!r}")
    try:
        return faiss.index_factory(int(dim), str(factory), faiss.METRIC_L2)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"index_factory={factory!r}: faiss cannot build it for {dim}-d L2 search ({msg})") from None


def build_index_from_store(
    store: EmbeddingStore,
    factory: str = "Flat",
    metric: Metric = "ip",
    train_sample: int | None = None,
    gpu: bool | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
) -> tuple[Any, np.ndarray]:
    """Index every vector of ``store`` (fp16 on disk, fp32 in FAISS); returns ``(index, keys uint64 [ntotal])``.

    Args:
        store: a finished (or, opened with ``allow_incomplete``, partly written) store.
        factory: a FAISS ``index_factory`` string (``Flat``, ``HNSW32``, ``IVF1024,Flat``, ``IVF256,PQ16``, ...).
        metric: ``ip`` (inner product: kdir's dot and cosine students) or ``l2``.
        train_sample: vectors drawn to train an index that needs it (default :data:`DEFAULT_TRAIN_SAMPLE`, at most
            all of them).
        gpu: ``None``: on every GPU faiss sees (CPU without one); ``True``: on GPUs (an error without); ``False``: CPU.
        chunk_size: ids read per step (default: the store's chunk size).
        seed: of the training sample.
    """
    n = store.n_vectors
    if not n:
        raise ConfigError(f"{store.path}: the store holds no vectors to index")
    index = to_gpu(_new_index(store.dim, factory, metric, n), factory, gpu)
    if not index.is_trained:
        index.train(store.sample(min(n, int(train_sample or DEFAULT_TRAIN_SAMPLE)), seed=seed))
    row_keys = np.empty(n, dtype=np.uint64)
    filled = 0
    for keys, vectors in store.chunks(chunk_size):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        row_keys[filled : filled + len(keys)] = keys
        filled += len(keys)
    return index, row_keys
