"""Scoring (query, document) pairs with a teacher into a score store: which pairs, and the resumable chunk loop.

The pairs are the training candidates (positives + the run-file pool of the examples, or fixed triples) or the
top-``depth`` candidates of any run file. They are sorted, cut into fixed chunks, and chunk ``k`` is scored by
rank ``k mod world_size`` and written atomically as segment ``chunk-<k>``: a killed job restarted with the same
arguments skips the finished chunks, and any number of processes gives the same store.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from lightning_fabric import Fabric
from tqdm.auto import tqdm

from kdir.data.dataset import IRDataset
from kdir.data.examples import QrelsExamples, RunNegatives, TripleExamples, positive_keys
from kdir.data.formats import read_trec_run, top_ranked
from kdir.errors import KdirError
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


def score_into_store(
    fabric: Fabric, model, dataset: IRDataset, pairs: np.ndarray, store: ScoreStore, chunk_size: int, batch_size: int
) -> int:
    """Score this rank's unfinished chunks; returns the number of pairs scored by this rank."""
    keys = pair_keys(id_hashes(dataset.queries.ids)[pairs[:, 0]], id_hashes(dataset.corpus.ids)[pairs[:, 1]])
    qtexts, dtexts = dataset.queries.texts, dataset.corpus.texts
    n_chunks = math.ceil(len(pairs) / chunk_size)
    mine = [
        k for k in range(fabric.global_rank, n_chunks, fabric.world_size) if not store.has_segment(f"chunk-{k:06d}")
    ]
    done = 0
    for k in tqdm(mine, desc=f"score rank {fabric.global_rank}", disable=not fabric.is_global_zero, unit="chunk"):
        chunk = pairs[k * chunk_size : (k + 1) * chunk_size]
        values = []
        for b in range(0, len(chunk), batch_size):
            q, d = chunk[b : b + batch_size, 0], chunk[b : b + batch_size, 1]
            docs, inverse = np.unique(d, return_inverse=True)
            inputs = model.prepare([qtexts[i] for i in q], [dtexts[i] for i in docs], inverse[:, None])
            with torch.no_grad(), fabric.autocast():
                values.append(model(inputs).float()[:, 0].cpu().numpy())
        store.append_segment(f"chunk-{k:06d}", keys[k * chunk_size : (k + 1) * chunk_size], np.concatenate(values))
        done += len(chunk)
    return done
