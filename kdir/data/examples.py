"""Training examples ``(query, positive, negatives)`` as int-code arrays, and where negatives come from.

An :class:`Examples` holds one row per (query, positive) pair. Negatives are either fixed
(a triples file) or drawn every epoch by a :class:`NegativeSampler` (random from the corpus,
or from the candidates of a run file such as BM25 or a mined top-k), vectorised over the shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from kdir.data.dataset import IRDataset
from kdir.data.formats import read_id_triples, read_margin_scores, read_trec_run, top_ranked
from kdir.errors import ConfigError, EmptySplitError, KdirError, UnknownIdError


class NegativeSampler(Protocol):
    """Draws ``n`` negatives per example; ``positive_keys`` = sorted ``query * n_docs + doc`` of all positives."""

    def sample(self, queries: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray: ...

    def bind(self, dataset: IRDataset, positive_keys: np.ndarray) -> None: ...


def _is_positive(queries: np.ndarray, docs: np.ndarray, positive_keys: np.ndarray, n_docs: int) -> np.ndarray:
    keys = queries[:, None] * n_docs + docs if docs.ndim == 2 else queries * n_docs + docs
    pos = np.searchsorted(positive_keys, keys).clip(max=len(positive_keys) - 1)
    return positive_keys[pos] == keys


class RandomNegatives:
    """Uniform negatives from the whole corpus, never a labelled positive of the query."""

    def bind(self, dataset: IRDataset, positive_keys: np.ndarray) -> None:
        self.n_docs, self.positive_keys = len(dataset.corpus), positive_keys

    def sample(self, queries: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        out = rng.integers(0, self.n_docs, size=(len(queries), n))
        for _ in range(100):  # redraw the (rare) collisions with positives
            bad = _is_positive(queries, out, self.positive_keys, self.n_docs)
            if not bad.any():
                return out
            out[bad] = rng.integers(0, self.n_docs, size=int(bad.sum()))
        raise EmptySplitError("could not draw negatives that are not positives: is every document a positive?")


class RunNegatives:
    """Negatives drawn uniformly, without replacement, from each query's top-``depth`` run candidates.

    Args:
        path: TREC run file (e.g. BM25 top-1000, or a retriever's run from ``kdir.evaluate``).
        depth: keep the ``depth`` best-scored candidates per query.
        exclude_positives: drop labelled positives from the pool. TCT-ColBERT's HN mining does
            not (set ``False`` to be faithful to it).
        fallback_random: queries with fewer than ``n`` candidates are topped up with random
            documents; if ``False`` that is an error.
    """

    def __init__(
        self, path: str | Path, depth: int = 200, exclude_positives: bool = True, fallback_random: bool = True
    ):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"negatives.depth must be a whole number >= 1, got {depth!r}")
        self.path, self.depth = str(path), depth
        self.exclude_positives, self.fallback_random = exclude_positives, fallback_random

    def bind(self, dataset: IRDataset, positive_keys: np.ndarray) -> None:
        run = read_trec_run(self.path)
        n_docs, n_q = len(dataset.corpus), len(dataset.queries)
        self.pool = np.full((n_q, self.depth), -1, dtype=np.int64)
        self.counts = np.zeros(n_q, dtype=np.int64)
        for qid, cands in run.items():
            q = dataset.queries.index.get(qid)
            if q is None:
                continue  # the run may cover more queries than this split
            docs = dataset.corpus.codes(top_ranked(cands, self.depth), source=self.path)
            if self.exclude_positives:
                docs = docs[~_is_positive(np.full(len(docs), q), docs, positive_keys, n_docs)]
            self.pool[q, : len(docs)], self.counts[q] = docs, len(docs)
        if not self.counts.any():
            raise UnknownIdError(f"{self.path}: no query of the run is in the training split {dataset.name}")
        self.random = RandomNegatives()
        self.random.bind(dataset, positive_keys)

    def sample(self, queries: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        counts = self.counts[queries]
        keys = rng.random((len(queries), self.depth))
        keys[np.arange(self.depth)[None, :] >= counts[:, None]] = np.inf  # invalid slots sort last
        picks = np.argsort(keys, axis=1)[:, :n]
        out = np.full((len(queries), n), -1, dtype=np.int64)  # more negatives than the depth: all random after it
        out[:, : picks.shape[1]] = np.take_along_axis(self.pool[queries], picks, axis=1)
        short = np.arange(n)[None, :] >= counts[:, None]
        if short.any():
            if not self.fallback_random:
                q = int(queries[short.any(1)][0])
                raise EmptySplitError(f"{self.path}: query code {q} has fewer than {n} negative candidates")
            out[short] = self.random.sample(queries, n, rng)[short]
        return out


@dataclass
class Examples:
    """One row per training example (int codes into the dataset's queries and corpus).

    Attributes:
        queries: ``[N]`` query codes.
        positives: ``[N]`` positive document codes.
        negatives: ``[N, n]`` fixed negative codes, or ``None`` when a sampler draws them.
    """

    queries: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray | None = None
    sampler: NegativeSampler | None = None
    n_negatives: int = 0

    def __len__(self) -> int:
        return len(self.queries)

    def negatives_for(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``[len(rows), n]`` negatives of the given example rows (fixed, or drawn with ``rng``)."""
        if self.negatives is not None:
            return self.negatives[rows]
        if self.sampler is None or self.n_negatives == 0:
            return np.zeros((len(rows), 0), dtype=np.int64)
        return self.sampler.sample(self.queries[rows], self.n_negatives, rng)


def positive_keys(dataset: IRDataset) -> np.ndarray:
    """Sorted ``query_code * n_docs + doc_code`` of every labelled positive (for vectorised membership tests)."""
    n_docs = len(dataset.corpus)
    keys = [
        dataset.queries.index[q] * n_docs + dataset.corpus.index[d]
        for q, ds in dataset.positives().items()
        for d in ds
    ]
    return np.unique(np.asarray(keys, dtype=np.int64))


class QrelsExamples:
    """One example per (query, positive) pair of the qrels, negatives drawn each epoch.

    Args:
        negatives: a :class:`NegativeSampler` (``RandomNegatives``, ``RunNegatives``) or ``None``.
        n_negatives: negatives per example.
    """

    def __init__(self, negatives: NegativeSampler | None = None, n_negatives: int = 1):
        if isinstance(n_negatives, bool) or not isinstance(n_negatives, int) or n_negatives < 0:
            raise ConfigError(
                f"data.examples.n_negatives must be a whole number >= 0 (0: in-batch candidates only), "
                f"got {n_negatives!r}"
            )
        if n_negatives > 0 and negatives is None:
            raise KdirError(
                f"data.examples.n_negatives={n_negatives} needs a negative sampler: choose one with "
                "negatives=random|run|... (negatives=run negatives.path=<run.trec>), or train on in-batch "
                "candidates only with data.examples.n_negatives=0"
            )
        self.sampler, self.n_negatives = negatives, n_negatives

    def build(self, dataset: IRDataset) -> Examples:
        pos = dataset.positives()
        q = np.asarray([dataset.queries.index[qid] for qid, ds in pos.items() for _ in ds], dtype=np.int64)
        d = np.asarray([dataset.corpus.index[pid] for ds in pos.values() for pid in ds], dtype=np.int64)
        if len(q) == 0:
            raise EmptySplitError(f"{dataset.name}: no training positives")
        if self.sampler is not None:
            self.sampler.bind(dataset, positive_keys(dataset))
        return Examples(q, d, None, self.sampler, self.n_negatives)


class TripleExamples:
    """Fixed ``(query, positive, negative)`` triples from a file.

    Args:
        path: MS MARCO id triples (``qid pos neg``) or Hofstätter's teacher TSV
            (``pos_score neg_score qid pos neg``, scores ignored here: the teacher reads them).
        format: ``ids`` or ``margin_scores``.
        negatives: must be ``None``: the triples fix the negatives, a sampler would be silently ignored.
    """

    def __init__(self, path: str | Path, format: str = "ids", negatives: NegativeSampler | None = None):
        if negatives is not None:
            raise KdirError(
                f"{path}: fixed triples bring their own negatives, so a negative sampler "
                f"({type(negatives).__name__}) would be ignored: use negatives=none with these data, or data "
                "with qrels examples (e.g. data=msmarco_hn) to sample negatives"
            )
        if format not in ("ids", "margin_scores"):
            raise ConfigError(f"unknown triples format {format!r}: expected 'ids' or 'margin_scores'")
        self.path, self.format = str(path), format

    def build(self, dataset: IRDataset) -> Examples:
        rows = (
            read_id_triples(self.path)
            if self.format == "ids"
            else (r[0:1] + r[3:] for r in read_margin_scores(self.path))
        )
        qs, ps, ns = [], [], []
        qi, di = dataset.queries.index, dataset.corpus.index
        for lineno, qid, pos, neg in rows:
            try:
                qs.append(qi[qid])
                ps.append(di[pos])
                ns.append(di[neg])
            except KeyError as e:
                raise UnknownIdError(f"{self.path}:{lineno}: id {e.args[0]!r} is not in {dataset.name}") from None
        if not qs:
            raise EmptySplitError(f"{self.path}: no triples")
        return Examples(np.asarray(qs), np.asarray(ps), np.asarray(ns)[:, None], None, 1)
