"""ColBERT-PRF steps of CollectiveKD's collective knowledge (Kim, Kim & Hwang, NAACL 2022, arXiv 2205.03273;
ColBERT-PRF: Wang et al., ICTIR 2021). ``python -m kdir.expand`` runs them in order:

1. encode the corpus: unit-norm token embeddings, padding and punctuation masked;
2. document frequencies of the token ids over the masked corpus → ``idf(t) = ln((1 + N) / (df(t) + 1))``;
3. feedback passages: the teacher's own top-``fb_docs`` by exhaustive MaxSim (``mode=prf``, the paper's setting;
   its top-``depth`` ranking is written to ``<out>/ranking.trec``, the hard-negative pool; ``ranking=<run>`` reads
   an existing run instead) or the first ``fb_docs`` labelled positives (``mode=rf``, the paper's RF variant);
4. k-means over the feedback passages' token embeddings, ``min(fb_clusters, #tokens)`` clusters seeded with
   ``avg_step_position`` (:func:`avg_step_position`);
5. each centroid is labelled with the most frequent token id among its ``neighbours`` nearest corpus token
   embeddings (exact inner product over all unmasked tokens), special tokens and ``[unused*]`` skipped;
6. weight ``w = β·idf(label)``; the ``fb_k`` heaviest centroids (unnormalised), their weights and token strings
   go to a :class:`kdir.stores.ExpansionStore` at ``out``.

By default the corpus' token embeddings are held in memory (fp16) and searched exhaustively: fine up to ~10^5
passages. At scale (``token_store=<dir>`` of ``kdir.expand``) they are streamed to a multi-vector
:class:`~kdir.stores.EmbeddingStore` on disk and every step reads them from there (:class:`StoreTokenPool`): the idf a
chunk of documents at a time (:func:`store_document_frequencies`), the feedback passages from a given ranking, from
exhaustive MaxSim a chunk at a time, or from the token index as ColBERT v1's end-to-end retrieval does
(:func:`token_index_ranking`: each query token's nearest ``faiss_depth`` corpus tokens nominate their documents, which
are then re-ranked by exact MaxSim), and the centroid labels from a FAISS index over the stored tokens built with any
``index_factory`` (CollectiveKD labels centroids with ColBERT's compressed IVF-PQ token index).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor
from tqdm.auto import tqdm

from kdir.data.dataset import IRDataset, TextStore
from kdir.data.formats import top_ranked
from kdir.errors import KdirError
from kdir.models.base import to_device
from kdir.models.colbert import ColBERT
from kdir.retrieval.encode import encode_texts
from kdir.retrieval.metrics import Run
from kdir.retrieval.search import maxsim_search
from kdir.stores import EmbeddingStore

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- 1. corpus


class _Pool:
    offsets: np.ndarray

    def doc_rows(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, lengths)``: the pool rows of ``docs``' tokens concatenated in order, and each doc's length."""
        docs = np.asarray(docs, dtype=np.int64)
        starts = self.offsets[docs]
        lengths = self.offsets[docs + 1] - starts
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.repeat(starts, lengths) + within, lengths


@dataclass
class TokenPool(_Pool):
    """The unmasked document tokens of a corpus, document after document (a ColBERT index without compression).

    Attributes:
        embeddings: ``float32 [T, dim]`` token embeddings.
        token_ids: ``int64 [T]`` their token ids.
        offsets: ``int64 [N + 1]``: document ``i`` owns rows ``offsets[i]:offsets[i + 1]``.
    """

    embeddings: np.ndarray
    token_ids: np.ndarray
    offsets: np.ndarray


class _StoreRows:
    """Rows of a multi-vector store's token vectors (fp32) or token ids, read from its memory maps when indexed."""

    def __init__(self, store: EmbeddingStore, token_ids: bool):
        self.store, self.ids = store, token_ids
        self.shape = (store.n_vectors,) if token_ids else (store.n_vectors, store.dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        out = self.store.vector_rows(np.asarray(rows, dtype=np.int64).reshape(-1), token_ids=self.ids)
        out = out.astype(np.int64 if self.ids else np.float32)
        return out.reshape(*np.shape(rows), *self.shape[1:])


class StoreTokenPool(_Pool):
    """:class:`TokenPool`'s interface over a multi-vector embedding store (its documents in corpus order): the token
    vectors and ids stay on disk; only the offsets (8 bytes per document) are in memory."""

    def __init__(self, store: EmbeddingStore):
        if not store.multi_vector:
            raise KdirError(f"{store.path}: the expansion stage needs a multi-vector (ColBERT) token store")
        self.store = store
        self.offsets = np.zeros(len(store) + 1, dtype=np.int64)
        np.cumsum(store.lengths(), out=self.offsets[1:])
        self.embeddings, self.token_ids = _StoreRows(store, False), _StoreRows(store, True)


@dataclass
class CorpusTokens:
    """ColBERT document token embeddings, padded per document: ``embeddings [N, L, dim]`` (fp16, CPU),
    ``mask [N, L]`` (bool: tokens that take part in MaxSim) and ``token_ids [N, L]`` (int64)."""

    embeddings: Tensor
    mask: Tensor
    token_ids: Tensor

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def pool(self) -> TokenPool:
        """The unmasked tokens as a :class:`TokenPool`."""
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.mask.sum(1).numpy(), out=offsets[1:])
        return TokenPool(self.embeddings[self.mask].float().numpy(), self.token_ids[self.mask].numpy(), offsets)


@torch.no_grad()
def encode_corpus(model: ColBERT, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> CorpusTokens:
    """Encode ``texts`` as documents in length-sorted batches (eval mode, no gradients)."""
    model.eval()
    order = np.argsort([-len(t) for t in texts], kind="stable")
    n, length, dim = len(texts), model.config["doc_max_length"], model.config["dim"]
    emb = torch.zeros(n, length, dim, dtype=torch.float16)
    mask = torch.zeros(n, length, dtype=torch.bool)
    ids = torch.zeros(n, length, dtype=torch.long)
    width = 1
    for s in tqdm(range(0, n, batch_size), desc="encode corpus", disable=not progress):
        idx = torch.as_tensor(order[s : s + batch_size])
        inputs = model.tokenize([texts[i] for i in idx.tolist()], "doc")
        e, m = model.encode(to_device(inputs, model.device), "doc")
        w = e.shape[1]
        emb[idx, :w], mask[idx, :w], ids[idx, :w] = e.half().cpu(), m.cpu(), inputs["input_ids"]
        width = max(width, w)
    return CorpusTokens(emb[:, :width].contiguous(), mask[:, :width].contiguous(), ids[:, :width].contiguous())


# ---------------------------------------------------------------------------------------------- 2. idf


def document_frequencies(token_ids: np.ndarray, mask: np.ndarray, vocab_size: int, chunk: int = 65536) -> np.ndarray:
    """``int64 [vocab_size]``: in how many documents (rows) each token id occurs among the unmasked tokens."""
    token_ids, mask = np.asarray(token_ids), np.asarray(mask, dtype=bool)
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocab_size):
        raise KdirError(f"token ids must lie in [0, {vocab_size}), got [{token_ids.min()}, {token_ids.max()}]")
    df = np.zeros(vocab_size, dtype=np.int64)
    for s in range(0, len(token_ids), chunk):
        ids = np.sort(np.where(mask[s : s + chunk], token_ids[s : s + chunk], -1), axis=1)
        first = np.ones(ids.shape, dtype=bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]  # the first of each run of equal ids in a sorted row
        df += np.bincount(ids[first & (ids >= 0)], minlength=vocab_size)
    return df


def store_document_frequencies(pool: StoreTokenPool, vocab_size: int, chunk: int = 65536) -> np.ndarray:
    """:func:`document_frequencies` of the documents of a token store, read ``chunk`` documents at a time."""
    df = np.zeros(vocab_size, dtype=np.int64)
    n = len(pool.offsets) - 1
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        ids = pool.token_ids[np.arange(pool.offsets[lo], pool.offsets[hi])]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise KdirError(f"token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
        doc = np.repeat(np.arange(hi - lo, dtype=np.int64), np.diff(pool.offsets[lo : hi + 1]))
        df += np.bincount(np.unique(doc * vocab_size + ids) % vocab_size, minlength=vocab_size)
    return df


def inverse_document_frequency(df: np.ndarray, n_docs: int) -> np.ndarray:
    """``idf(t) = ln((1 + N) / (df(t) + 1))`` (ColBERT-PRF, as in CollectiveKD's released code)."""
    return np.log((1.0 + n_docs) / (np.asarray(df, dtype=np.float64) + 1.0))


# ---------------------------------------------------------------------------------------------- 3. feedback


@torch.no_grad()
def teacher_ranking(
    model: ColBERT,
    queries: Sequence[str],
    corpus: CorpusTokens,
    depth: int,
    batch_size: int = 64,
    doc_chunk: int = 1024,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive MaxSim top-``depth``: ``(scores float32 [Q, k], doc rows int64 [Q, k])``, best first.

    The corpus embeddings move to the model's device once (fp16) and are scored in chunks of ``doc_chunk``.
    """
    model.eval()
    queries_enc = encode_texts(model, list(queries), "query", batch_size, progress=progress, out_device=model.device)
    return maxsim_search(
        queries_enc,
        (corpus.embeddings, corpus.mask),
        depth,
        model.config["similarity"],
        batch_size,
        doc_chunk,
        model.device,
        masked_doc_tokens=model.config.get("masked_doc_tokens", "exclude"),
    )


def ranked_feedback(
    run: Run, query_ids: Sequence[str], corpus: TextStore, fb_docs: int, source: str
) -> list[np.ndarray]:
    """Per query, the corpus rows of its top-``fb_docs`` documents in ``run`` (empty if the run lacks it)."""
    return [corpus.codes(top_ranked(run.get(q, {}), fb_docs), source=source) for q in query_ids]


@torch.no_grad()
def token_index_ranking(
    model: ColBERT,
    queries: Sequence[str],
    pool: StoreTokenPool,
    index,
    depth: int,
    faiss_depth: int = 256,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """ColBERT v1's end-to-end retrieval (Khattab & Zaharia 2020, §3.6): each query token's ``faiss_depth`` nearest
    corpus tokens in ``index`` (over the pool's vectors) nominate their documents; each query's nominated documents
    are re-ranked by exact MaxSim over their stored tokens. ``(scores float32 [Q, depth], doc rows int64 [Q, depth])``,
    best first (row -1, score -inf, where fewer documents were nominated). Cost: one index search per query token and
    one MaxSim per nominated document, not per corpus document."""
    from kdir.models.colbert import maxsim

    q_emb, q_mask = encode_texts(model, list(queries), "query", batch_size, progress=progress)
    n_docs = len(pool.offsets) - 1
    scores = np.full((len(queries), depth), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), depth), -1, dtype=np.int64)
    pad_to, similarity = model.config["doc_max_length"], model.config["similarity"]
    masked = model.config.get("masked_doc_tokens", "exclude")
    for s in tqdm(range(0, len(queries), batch_size), desc="token-index retrieval", disable=not progress):
        qe, qm = q_emb[s : s + batch_size].float(), q_mask[s : s + batch_size]
        tokens = qe[qm].numpy()  # the query tokens that take part in MaxSim
        _, hits = index.search(np.ascontiguousarray(tokens), faiss_depth)
        owner = np.repeat(np.arange(len(qe)), qm.sum(1).numpy())  # the query of each query token
        docs = np.searchsorted(pool.offsets, hits, side="right") - 1  # the document of each token hit
        valid = (hits >= 0) & (docs < n_docs)
        pairs = np.unique(np.repeat(owner, faiss_depth)[valid.reshape(-1)] * n_docs + docs[valid])
        nominated, column = np.unique(pairs % n_docs, return_inverse=True)
        emb, mask = pool.store.lookup(pool.store.keys_at(nominated), pad_to=pad_to)
        full = maxsim(qe.to(model.device), qm.to(model.device), torch.from_numpy(emb).float().to(model.device),
                      torch.from_numpy(mask).to(model.device), similarity, masked_doc_tokens=masked).cpu()  # fmt: skip
        allowed = torch.full_like(full, float("-inf"))
        allowed[torch.from_numpy(pairs // n_docs), torch.from_numpy(column)] = 0.0
        top = (full + allowed).topk(min(depth, full.shape[1]), dim=1)
        k = top.values.shape[1]
        found = torch.isfinite(top.values).numpy()
        scores[s : s + len(qe), :k] = np.where(found, top.values.numpy(), -np.inf)
        rows[s : s + len(qe), :k] = np.where(found, nominated[top.indices.numpy()], -1)
    return scores, rows


def relevance_feedback(dataset: IRDataset, fb_docs: int) -> list[np.ndarray]:
    """Per query, the corpus rows of its first ``fb_docs`` labelled positives (qrels order)."""
    positives = dataset.positives()
    return [dataset.corpus.codes(positives.get(q, [])[:fb_docs]) for q in dataset.queries.ids]


# ---------------------------------------------------------------------------------------------- 4. clustering


def avg_step_position(doc_lengths: Sequence[int], n_clusters: int) -> np.ndarray:
    """k-means seed rows (into the concatenated tokens of the feedback documents), ColBERT-PRF's ``avg_step_position``.

    The ``n_clusters`` seeds are split across the ``D`` documents at the boundaries ``floor(i·n_clusters / D)``,
    ``i = 0..D``, so document ``i`` gets ``floor((i+1)·n/D) − floor(i·n/D)`` seeds: when ``D`` does not divide
    ``n``, the extra seeds go to the later documents (7 seeds over 3 documents: 2, 2, 3; 8 seeds: 2, 3, 3). Within
    a document of ``L`` tokens, ``m`` seeds sit at positions ``floor(j·(L−1)/(m−1))``, ``j = 0..m−1`` (one seed:
    position 0); a document with fewer tokens than seeds repeats positions. These are the reference code's
    ``np.linspace(...).astype(int64)``, in exact integer arithmetic. Documents must have at least one token.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if not len(lengths) or (lengths < 1).any():
        raise KdirError(f"avg_step_position needs documents with at least one token, got lengths {lengths.tolist()}")
    bounds = np.arange(len(lengths) + 1) * n_clusters // len(lengths)
    per_doc = np.diff(bounds)
    doc = np.repeat(np.arange(len(lengths)), per_doc)  # the document of each seed
    j = np.arange(n_clusters) - bounds[doc]  # the seed's number within its document
    pos = j * (lengths[doc] - 1) // np.maximum(per_doc[doc] - 1, 1)
    starts = np.cumsum(lengths) - lengths
    return starts[doc] + pos


def cluster_feedback(embeddings: np.ndarray, doc_lengths: Sequence[int], n_clusters: int, seed: int = 0) -> np.ndarray:
    """``float32 [min(n_clusters, T), dim]`` k-means centroids (not renormalised) of feedback tokens ``[T, dim]``."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(embeddings, dtype=np.float32)
    n = min(n_clusters, len(x))
    init = x[avg_step_position(doc_lengths, n)]
    with warnings.catch_warnings():  # repeated seeds (short documents) leave clusters to be relocated
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(n_clusters=n, init=init, n_init=1, random_state=seed).fit(x)
    return kmeans.cluster_centers_.astype(np.float32)


# ---------------------------------------------------------------------------------------------- 5.-6. labels


def skip_mask(tokenizer) -> np.ndarray:
    """``bool [len(tokenizer)]``: the token ids no centroid may be labelled with (special tokens, ``[unused*]``)."""
    skip = np.zeros(len(tokenizer), dtype=bool)
    skip[list(tokenizer.all_special_ids)] = True
    skip[[i for t, i in tokenizer.get_vocab().items() if t.startswith("[unused")]] = True
    return skip


def nearest_token_ids(index, token_ids: np.ndarray, vectors: np.ndarray, n: int) -> np.ndarray:
    """``int64 [M, n]``: token ids of the ``n`` nearest pool tokens of each vector, nearest first (-1: none).

    ``index`` is a FAISS inner-product index over the pool's unit-norm token embeddings, so its ranking equals
    the L2 ranking (``‖v − x‖² = ‖v‖² + 1 − 2⟨v, x⟩``) even for unnormalised centroids.
    """
    _, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), n)
    return np.where(rows >= 0, token_ids[np.maximum(rows, 0)], -1)


def label_centroids(neighbour_ids: np.ndarray, skip: np.ndarray) -> np.ndarray:
    """``int64 [M]``: the most frequent allowed token id among each row of ``neighbour_ids [M, n]`` (-1: none).

    Ties go to the token met first, i.e. the nearest (as the reference code's stable sort). Ids of ``skip``
    (and -1) are not counted.
    """
    ids = np.asarray(neighbour_ids, dtype=np.int64)
    ids = np.where((ids >= 0) & ~skip[np.maximum(ids, 0)], ids, -1)
    counts = (ids[:, :, None] == ids[:, None, :]).sum(-1)
    counts[ids < 0] = 0
    best = counts.argmax(1)  # first position of the highest count
    labels = np.take_along_axis(ids, best[:, None], 1)[:, 0]
    return np.where(counts.max(1, initial=0) > 0, labels, -1)


def select_expansions(labels: np.ndarray, idf: np.ndarray, beta: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` heaviest centroids of each query: ``(slots int64 [Q, k], weights float32 [Q, k])``.

    ``labels [Q, C]`` holds each centroid's token id (-1: unlabelled or absent); a centroid weighs
    ``beta · idf[label]``. Slots index ``C``, heaviest first (ties: lower centroid number first); missing slots
    are -1 with weight 0.
    """
    labels = np.asarray(labels, dtype=np.int64)
    valid = labels >= 0
    w = np.where(valid, beta * np.asarray(idf)[np.maximum(labels, 0)], -np.inf)
    if w.shape[1] < k:
        w = np.pad(w, ((0, 0), (0, k - w.shape[1])), constant_values=-np.inf)
    slots = np.argsort(-w, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(w, slots, 1)
    ok = np.isfinite(top)
    return np.where(ok, slots, -1), np.where(ok, top, 0.0).astype(np.float32)


@dataclass
class Expansions:
    """Expansions of the queries ``queries`` (rows of the training split): ``vectors [Q, k, dim]``,
    ``weights [Q, k]`` and ``token_ids [Q, k]`` (-1 in padded slots)."""

    queries: np.ndarray
    vectors: np.ndarray
    weights: np.ndarray
    token_ids: np.ndarray


def _cluster_chunk(
    feedback: Sequence[np.ndarray], pool: TokenPool | StoreTokenPool, fb_clusters: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids ``[n, fb_clusters, dim]`` of each query's feedback tokens, and which exist ``[n, fb_clusters]``."""
    dim = pool.embeddings.shape[1]
    centroids = np.zeros((len(feedback), fb_clusters, dim), dtype=np.float32)
    exists = np.zeros((len(feedback), fb_clusters), dtype=bool)
    with threadpool_limits(1):  # a few hundred points per k-means: threads only add contention
        for i, docs in enumerate(feedback):
            rows, lengths = pool.doc_rows(docs)
            c = cluster_feedback(pool.embeddings[rows], lengths[lengths > 0], fb_clusters, seed)
            centroids[i, : len(c)], exists[i, : len(c)] = c, True
    return centroids, exists


def collective_knowledge(
    feedback: Sequence[np.ndarray],
    pool: TokenPool | StoreTokenPool,
    index,
    idf: np.ndarray,
    skip: np.ndarray,
    fb_clusters: int = 24,
    fb_k: int = 10,
    beta: float = 1.0,
    neighbours: int = 10,
    seed: int = 0,
    chunk: int = 4096,
    progress: bool = True,
) -> Expansions:
    """Steps 4-6 for every query whose feedback documents have at least one token (the others are left out).

    ``feedback[i]`` are the corpus rows of query ``i``'s feedback documents; ``index`` searches ``pool``.
    """
    has_tokens = np.array([(pool.offsets[d + 1] - pool.offsets[d]).sum() > 0 for d in feedback], dtype=bool)
    queries = np.flatnonzero(has_tokens)
    dim = pool.embeddings.shape[1]
    vectors = np.zeros((len(queries), fb_k, dim), dtype=np.float32)
    weights = np.zeros((len(queries), fb_k), dtype=np.float32)
    token_ids = np.full((len(queries), fb_k), -1, dtype=np.int64)
    bar = tqdm(total=len(queries), desc="collective knowledge", disable=not progress)
    for s in range(0, len(queries), chunk):
        part = queries[s : s + chunk]
        centroids, exists = _cluster_chunk([feedback[q] for q in part], pool, fb_clusters, seed)
        labels = np.full(exists.shape, -1, dtype=np.int64)
        labels[exists] = label_centroids(nearest_token_ids(index, pool.token_ids, centroids[exists], neighbours), skip)
        slots, w = select_expansions(labels, idf, beta, fb_k)
        found = slots >= 0
        rows = np.arange(len(part))[:, None]
        vectors[s : s + len(part)] = np.where(found[..., None], centroids[rows, np.maximum(slots, 0)], 0.0)
        weights[s : s + len(part)] = w
        token_ids[s : s + len(part)] = np.where(found, labels[rows, np.maximum(slots, 0)], -1)
        bar.update(len(part))
    bar.close()
    return Expansions(queries, vectors, weights, token_ids)


def token_strings(tokenizer, token_ids: np.ndarray) -> list[list[str]]:
    """Token strings of ``token_ids [Q, k]`` ("" for -1)."""
    vocab = np.array(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) + [""], dtype=object)
    return vocab[np.asarray(token_ids)].tolist()  # -1 picks the trailing ""
