"""A FAISS index built from an :class:`~kdir.stores.embedding_store.EmbeddingStore`, one chunk at a time.

The vectors are read from disk a chunk at a time and added to the index, so building holds the index plus one
chunk (not a second copy of the corpus). Indexes that need training (IVF, PQ, ...) are trained first on a uniform
random sample of the stored vectors (FAISS's k-means needs about 39 to 256 points per centroid; the default sample of
131,072 covers ``IVF4096``, say, at 32 per list). Row ``i`` of the index is the store's vector ``i``: the returned
``uint64`` keys map index rows back to ids (for a multi-vector store, the key of each token vector's document).

``shards > 1`` splits the index into that many FAISS indexes over contiguous parts of the store, joined by
``faiss.IndexShards`` (successive ids, so index rows stay store rows), which searches every shard and merges their
top-k. With GPUs, shard ``i`` lives on GPU ``i mod n_gpus``: an index too large for one device is spread over all of
them (faiss's own ``shard=True`` cloner option does the same for an index already built in host memory). Shards that
need training are trained once, on the sample, and copied.

Search the index with :func:`kdir.retrieval.search.search_index` (which sets ``nprobe`` / ``efSearch`` on every shard).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from kdir.errors import ConfigError
from kdir.retrieval.search import (
    SearchBackend,
    check_index,
    faiss_gpus,
    gpu_clone,
    maxsim_search,
    new_index,
    to_gpu,
)
from kdir.stores.embedding_store import EmbeddingStore

__all__ = ["DEFAULT_TRAIN_SAMPLE", "build_index_from_store", "maxsim_search_store"]

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


def _place(index: Any, shard: int, factory: str, gpu: bool | None) -> Any:
    """Shard ``shard`` on GPU ``shard mod n_gpus`` when faiss sees GPUs (and ``gpu`` allows), else left on the CPU.

    The shards of one GPU share its ``StandardGpuResources``; an HNSW shard (no GPU form in faiss) stays on the
    CPU (:func:`kdir.retrieval.search.gpu_clone`). Without faiss-gpu the shards stay on the CPU: ``IndexShards``
    joins faiss indexes, so the torch exact search of an unsharded ``Flat`` index does not apply.
    """
    n_gpus = faiss_gpus()
    if gpu and not n_gpus:
        raise ConfigError("use_gpu=true but faiss sees no GPU (install faiss-gpu on GPU nodes; index_shards=1 with "
                          "index_factory=Flat searches on the GPU with torch)")  # fmt: skip
    if gpu is False or not n_gpus:
        return index
    return gpu_clone(index, factory, gpu, device=shard % n_gpus)


def build_index_from_store(
    store: EmbeddingStore,
    factory: str = "Flat",
    metric: Metric = "ip",
    train_sample: int | None = None,
    gpu: bool | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    shards: int = 1,
    backend: SearchBackend = "auto",
) -> tuple[Any, np.ndarray]:
    """Index every vector of ``store`` (fp16 on disk, fp32 in FAISS); returns ``(index, keys uint64 [ntotal])``.

    Args:
        store: a finished (or, opened with ``allow_incomplete``, partly written) store.
        factory: a FAISS ``index_factory`` string (``Flat``, ``HNSW32``, ``IVF1024,Flat``, ``IVF256,PQ16``, ...).
        metric: ``ip`` (inner product: kdir's dot and cosine students) or ``l2``.
        train_sample: vectors drawn to train an index that needs it (default :data:`DEFAULT_TRAIN_SAMPLE`, at most
            all of them).
        gpu: ``None``: on every GPU faiss sees; without faiss-gpu an unsharded inner-product ``Flat`` index goes to
            torch's exact search on CUDA when there is one (:func:`kdir.retrieval.search.to_gpu`); else the CPU.
            ``True``: on a GPU (an error without); ``False``: CPU.
        chunk_size: ids read per step (default: the store's chunk size).
        seed: of the training sample.
        shards: FAISS indexes the vectors are split into (``faiss.IndexShards``; on GPUs, one per device in turn).
        backend: ``auto``, ``faiss`` or ``torch`` (:func:`kdir.retrieval.search.resolve_backend`; ``torch``: an
            unsharded inner-product ``Flat`` index only).
    """
    import faiss

    n = store.n_vectors
    if not n:
        raise ConfigError(f"{store.path}: the store holds no vectors to index")
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= n:
        raise ConfigError(f"index_shards={shards!r}: expected an integer between 1 and the {n} stored vectors")
    if backend == "torch" and shards > 1:
        raise ConfigError(f"search_backend=torch searches one exact index: index_shards={shards} needs faiss")
    empty = _new_index(store.dim, factory, metric, n)
    if not empty.is_trained:
        empty.train(store.sample(min(n, int(train_sample or DEFAULT_TRAIN_SAMPLE)), seed=seed))
    if shards == 1:
        parts = [to_gpu(empty, factory, gpu, backend)]
    else:
        parts = [_place(faiss.clone_index(empty), i, factory, gpu) for i in range(shards)]
    bounds = [i * n // shards for i in range(shards + 1)]  # shard i holds vectors bounds[i]:bounds[i + 1]
    row_keys = np.empty(n, dtype=np.uint64)
    filled = 0
    for keys, vectors in store.chunks(chunk_size):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for i, part in enumerate(parts):
            lo, hi = max(bounds[i], filled), min(bounds[i + 1], filled + len(keys))
            if lo < hi:
                part.add(vectors[lo - filled : hi - filled])
        row_keys[filled : filled + len(keys)] = keys
        filled += len(keys)
    if shards == 1:
        return parts[0], row_keys
    index = faiss.IndexShards(store.dim, True, True)  # threaded, successive ids: row i of the store is id i
    for part in parts:
        index.add_shard(part)
    return index, row_keys  # faiss's Python wrapper keeps a reference to each added shard


@torch.no_grad()
def maxsim_search_store(
    queries: tuple[torch.Tensor, torch.Tensor],
    store: EmbeddingStore,
    k: int,
    similarity: str = "cosine",
    batch_size: int = 64,
    doc_chunk: int = 4096,
    device: str | torch.device | None = None,
    masked_doc_tokens: str | float = "exclude",
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive MaxSim top-``k`` over a multi-vector store, ``doc_chunk`` documents read at a time:
    ``(scores [Nq, k], store rows [Nq, k])``, best first; memory holds one chunk and the running top-k.

    Each chunk is padded to ``pad_to`` token positions (the model's ``doc_max_length``: a document then has masked
    positions exactly when it had them encoded in a batch, which matters for ``masked_doc_tokens`` other than
    ``exclude``) and scored by :func:`kdir.retrieval.search.maxsim_search`.
    """
    if not store.multi_vector:
        raise ConfigError(f"{store.path}: MaxSim search needs a multi-vector (ColBERT) store")
    keys = store.keys()
    k = min(k, len(keys))
    device = torch.device(device) if device is not None else torch.device("cpu")
    queries = (queries[0].to(device, torch.float32), queries[1].to(device))  # once, not once per chunk
    best_scores = best_rows = None
    for c in range(0, len(keys), doc_chunk):
        emb, mask = store.lookup(keys[c : c + doc_chunk], pad_to=pad_to)
        docs = (torch.from_numpy(emb), torch.from_numpy(mask))
        scores, rows = maxsim_search(
            queries, docs, k, similarity, batch_size, doc_chunk, device, masked_doc_tokens=masked_doc_tokens
        )
        scores, rows = torch.from_numpy(scores), torch.from_numpy(rows) + c
        if best_scores is not None:
            scores, rows = torch.cat([best_scores, scores], 1), torch.cat([best_rows, rows], 1)
        top = scores.topk(min(k, scores.shape[1]), dim=1)  # ties: the earlier chunk (lower row) first, as topk is
        best_scores, best_rows = top.values, rows.gather(1, top.indices)
    return best_scores.numpy(), best_rows.numpy()
