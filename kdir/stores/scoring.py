"""Scoring (query, document) pairs with a teacher into a score store: which pairs, and the resumable chunk loop.

The pairs are the training candidates (positives + the run-file pool of the examples, or fixed triples) or the
top-``depth`` candidates of any run file. They are sorted and cut into fixed chunks; chunk ``k`` is scored by
rank ``k mod world_size``, which scores only the chunk's pairs the store does not hold yet and writes them
atomically as one segment named by a hash of their keys. A killed job restarted with the same arguments finds
its finished chunks complete and scores the others in the same batches (the same bits as one uninterrupted run);
a run over another pair set (a deeper ``depth``, another run file) scores just the pairs that are new; any number
of processes gives the same store. :func:`missing_pairs` is the completeness check that ends a job.

Within a chunk, the pairs are batched by the length of their texts (query + document, longest first: less padding)
and their scores put back in the chunk's order; with ``num_workers > 0`` the next batches are tokenised in DataLoader
worker processes (:class:`PairBatches`, carrying the model's preparer, not its weights) while the model scores.

With a document-side :class:`~kdir.stores.EmbeddingStore` of a separable teacher (bi-encoder, ColBERT: ``python -m
kdir.score ... embeddings=<dir>``), documents are not encoded again: each batch reads its documents' stored
embeddings (fp16) and encodes each distinct query of the chunk once (:meth:`~kdir.models.base.Scorer.query_reps`,
:meth:`~kdir.models.base.Scorer.score_reps`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import xxhash
from lightning_fabric import Fabric
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kdir.data.collate import SortedChunkBatches
from kdir.data.dataset import IRDataset
from kdir.data.examples import QrelsExamples, RunNegatives, TripleExamples, positive_keys
from kdir.data.formats import read_trec_run, top_ranked
from kdir.errors import KdirError
from kdir.stores.embedding_store import EmbeddingStore
from kdir.stores.keys import id_hashes, pair_keys
from kdir.stores.score_store import ScoreStore


def candidate_pairs(dataset: IRDataset, examples=None, run_file: str | None = None, depth: int = 100) -> np.ndarray:
    """Sorted unique ``[N, 2]`` (query code, doc code) pairs to score."""
    n_docs = len(dataset.corpus)
    keys = [positive_keys(dataset)]
    if run_file is not None:
        for qid, cands in read_trec_run(run_file).items():
            q = dataset.queries.index.get(qid)
            if q is not None:
                keys.append(q * n_docs + dataset.corpus.codes(top_ranked(cands, depth), source=run_file))
    elif isinstance(examples, TripleExamples):
        ex = examples.build(dataset)
        keys.append((ex.queries[:, None] * n_docs + ex.negatives).reshape(-1))
    elif isinstance(examples, QrelsExamples) and isinstance(examples.sampler, RunNegatives):
        examples.build(dataset)
        pool, counts = examples.sampler.pool, examples.sampler.counts
        q, slot = np.nonzero(np.arange(pool.shape[1])[None, :] < counts[:, None])
        keys.append(q * n_docs + pool[q, slot])
    else:
        raise KdirError(
            "cannot enumerate the pairs to score: the training negatives are random. Score a run file "
            "(run_file=...), use fixed triples, or let training fill the store (signal=fill)"
        )
    keys = np.unique(np.concatenate(keys))
    return np.stack([keys // n_docs, keys % n_docs], axis=1)


def requested_keys(dataset: IRDataset, pairs: np.ndarray) -> np.ndarray:
    """``uint64 [N]`` store keys of ``[N, 2]`` (query code, doc code) pairs of ``dataset``."""
    return pair_keys(id_hashes(dataset.queries.ids)[pairs[:, 0]], id_hashes(dataset.corpus.ids)[pairs[:, 1]])


def score_into_store(
    fabric: Fabric,
    model,
    dataset: IRDataset,
    pairs: np.ndarray,
    store: ScoreStore,
    chunk_size: int,
    batch_size: int,
    doc_embeddings: EmbeddingStore | None = None,
    num_workers: int = 0,
) -> int:
    """Score the pairs of this rank's chunks that the store lacks; returns the number of pairs scored by this rank.

    ``doc_embeddings``: the teacher's document embeddings (a finished store of this model's ``doc`` side holding the
    corpus): documents are read from it instead of encoded. Otherwise each chunk's pairs are scored in
    length-sorted batches of ``batch_size``, tokenised by ``num_workers`` DataLoader workers (0: in this process)."""
    keys = requested_keys(dataset, pairs)
    d_hash = id_hashes(dataset.corpus.ids) if doc_embeddings is not None else None
    n_chunks = math.ceil(len(pairs) / chunk_size)
    todo = []
    for k in range(fabric.global_rank, n_chunks, fabric.world_size):
        lo, hi = k * chunk_size, min((k + 1) * chunk_size, len(pairs))
        new = lo + np.flatnonzero(~store.contains(keys[lo:hi]))
        if len(new):
            todo.append(new)
    bar = tqdm(
        total=len(todo), desc=f"score rank {fabric.global_rank}", disable=not fabric.is_global_zero, unit="chunk"
    )

    def write(rows: np.ndarray, values: np.ndarray) -> None:
        store.append(keys[rows], values, name=f"chunk-{xxhash.xxh64_hexdigest(keys[rows].tobytes())}")
        bar.update()

    if doc_embeddings is not None:
        for rows in todo:
            write(
                rows, _score_from_embeddings(fabric, model, dataset, pairs[rows], doc_embeddings, d_hash, batch_size)
            )
    else:
        batches = PairBatches(dataset, pairs, todo, model, batch_size)
        for chunk, values in _score_chunks(fabric, model, batches, num_workers):
            write(todo[chunk], values)
    bar.close()
    return sum(len(rows) for rows in todo)


class PairBatches(SortedChunkBatches):
    """The prepared batches of some chunks of pairs, each chunk's pairs longest first (picklable: DataLoader
    workers). Item ``i`` is ``(chunk number, positions of its pairs within the chunk int64 [b], model inputs)``.

    Args:
        dataset: the queries and corpus the pairs' codes index.
        pairs: all ``[N, 2]`` (query code, doc code) pairs.
        chunks: the rows of ``pairs`` in each chunk to score.
        model: the scorer whose :meth:`~kdir.models.base.Scorer.preparer` tokenises (only the preparer is kept).
        batch_size: pairs per batch.
    """

    def __init__(self, dataset: IRDataset, pairs: np.ndarray, chunks: list[np.ndarray], model, batch_size: int):
        self.queries, self.corpus = dataset.queries.texts, dataset.corpus.texts
        self.chunks = [pairs[rows] for rows in chunks]
        super().__init__([len(c) for c in self.chunks], batch_size)
        self.preparer = model.preparer()
        self.query_keys = id_hashes(dataset.queries.ids) if model.uses_query_keys else None

    def lengths(self, chunk: int) -> list[int]:
        """The characters of each pair's query + document texts."""
        return [len(self.queries[q]) + len(self.corpus[d]) for q, d in self.chunks[chunk].tolist()]

    def __getitem__(self, item: int) -> tuple[int, np.ndarray, dict[str, Any]]:
        chunk, pos = self.locate(item)
        batch = self.chunks[chunk][pos]
        docs, inverse = np.unique(batch[:, 1], return_inverse=True)  # each distinct document once
        kw = {} if self.query_keys is None else {"query_keys": self.query_keys[batch[:, 0]]}
        queries = [self.queries[i] for i in batch[:, 0]]
        return chunk, pos, self.preparer(queries, [self.corpus[i] for i in docs], inverse[:, None], **kw)


@torch.no_grad()
def _score_chunks(fabric: Fabric, model, batches: PairBatches, num_workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(chunk number, its scores in its order)`` of each chunk of ``batches``, once all its batches are scored."""
    loader = DataLoader(batches, batch_size=None, num_workers=num_workers) if num_workers else batches
    values, filled, current = np.empty(0, dtype=np.float32), 0, -1
    for chunk, pos, inputs in loader:
        if chunk != current:
            values, filled, current = np.empty(len(batches.chunks[chunk]), dtype=np.float32), 0, chunk
        with fabric.autocast():
            values[np.asarray(pos)] = model(inputs).float()[:, 0].cpu().numpy()
        filled += len(pos)
        if filled == len(values):
            yield chunk, values


@torch.no_grad()
def _score_from_embeddings(
    fabric: Fabric,
    model,
    dataset: IRDataset,
    chunk: np.ndarray,
    docs: EmbeddingStore,
    d_hash: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Scores of a chunk's pairs: its distinct queries encoded once, documents read from the store by their id
    hashes ``d_hash`` (of the whole corpus, computed once per job)."""
    queries, q_of = np.unique(chunk[:, 0], return_inverse=True)
    q_ids = [dataset.queries.ids[i] for i in queries]
    keys = id_hashes(q_ids) if model.uses_query_keys else None
    reps = []
    with fabric.autocast():
        for b in range(0, len(queries), batch_size):
            texts = [dataset.queries.texts[i] for i in queries[b : b + batch_size]]
            reps.append(model.query_reps(texts, None if keys is None else keys[b : b + batch_size]))
    q_reps = tuple(torch.cat(parts) for parts in zip(*reps))
    pad = model.config.get("doc_max_length") if model.multi_vector else None
    out = []
    for b in range(0, len(chunk), batch_size):
        d, inverse = np.unique(chunk[b : b + batch_size, 1], return_inverse=True)
        found = docs.lookup(d_hash[d], pad_to=pad) if pad else (docs.lookup(d_hash[d]),)
        d_reps = tuple(torch.from_numpy(np.asarray(t)).to(model.device) for t in found)
        if not model.multi_vector:
            d_reps = (d_reps[0].float(),)
        rows = torch.from_numpy(q_of[b : b + batch_size]).to(model.device)
        with fabric.autocast():
            scores = model.score_reps(tuple(t[rows] for t in q_reps), d_reps, torch.from_numpy(inverse)[:, None])
        out.append(scores.float()[:, 0].cpu().numpy())
    return np.concatenate(out)


def missing_pairs(dataset: IRDataset, pairs: np.ndarray, store: ScoreStore) -> np.ndarray:
    """The rows of ``pairs`` the store does not hold (after :meth:`ScoreStore.refresh`)."""
    store.refresh()
    return np.flatnonzero(~store.contains(requested_keys(dataset, pairs)))
