"""Search: FAISS (exact inner product by default, any ``index_factory`` string), exact torch top-k, and exhaustive
MaxSim top-k for multi-vector models.

GPU indexes are used when the installed faiss build sees a GPU (``faiss-gpu``); otherwise CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from kdir.errors import ConfigError

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
            raise ConfigError("use_gpu=true but faiss sees no GPU (install faiss-gpu on GPU nodes)")
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


@torch.no_grad()
def exact_search(queries: Tensor, docs: Tensor, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner product in torch, on the tensors' device (a GPU without faiss-gpu, too):
    ``(scores [Nq, k], doc_rows [Nq, k])``, best first."""
    k = min(k, len(docs))
    scores, rows = [], []
    for s in range(0, len(queries), batch_size):
        top = (queries[s : s + batch_size].float() @ docs.float().T).topk(k, dim=1)
        scores.append(top.values.cpu())
        rows.append(top.indices.cpu())
    return torch.cat(scores).numpy(), torch.cat(rows).numpy()


@torch.no_grad()
def maxsim_search(
    queries: tuple[Tensor, Tensor],
    docs: tuple[Tensor, Tensor],
    k: int,
    similarity: str = "cosine",
    batch_size: int = 64,
    doc_chunk: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive late-interaction top-``k``: ``(scores [Nq, k], doc_rows [Nq, k])``, best first.

    ``queries`` / ``docs`` are ``(token embeddings [N, L, dim], mask [N, L])`` (fp16 is fine); the corpus moves to
    ``device`` once and each block of ``batch_size`` queries is scored against chunks of ``doc_chunk`` documents.
    """
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
                maxsim(qb, mb, d[c : c + doc_chunk].float(), d_mask[c : c + doc_chunk], similarity)
                for c in range(0, len(d), doc_chunk)
            ],
            dim=1,
        )
        top = scores.topk(k, dim=1)
        top_scores.append(top.values.cpu())
        top_rows.append(top.indices.cpu())
    return torch.cat(top_scores).numpy(), torch.cat(top_rows).numpy()
