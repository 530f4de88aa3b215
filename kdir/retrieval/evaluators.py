"""Evaluators: end-to-end retrieval (FAISS, or MaxSim for multi-vector models) and re-ranking, scored with
ir-measures; each returns ``(metrics, run)``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from kdir.data.dataset import IRDataset
from kdir.errors import ConfigError, KdirError
from kdir.retrieval.encode import Side, encode_batch, encode_texts
from kdir.retrieval.metrics import Run, evaluate_run, parse_measures, run_from_topk, write_trec_run
from kdir.retrieval.search import (
    build_index,
    check_backend,
    check_factory,
    check_index,
    load_index,
    maxsim_search,
    save_index,
    search_index,
    to_gpu,
)
from kdir.stores import id_hashes
from kdir.utils.io import save_json, texts_xxh64
from kdir.utils.report import print_metrics

if TYPE_CHECKING:
    from kdir.models.base import Scorer

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("nDCG@10", "RR@10", "R@100", "R@1000")


class Evaluator(Protocol):
    """What every evaluator offers: ``evaluate(model)`` → ``(metrics, run)`` on its dataset split."""

    dataset: IRDataset

    def evaluate(
        self, model: Scorer, device: str | torch.device | None = None, progress: bool = True
    ) -> tuple[dict[str, float], Run]: ...


class RetrievalEvaluator:
    """End-to-end dense retrieval over a dataset's whole corpus, scored with ir-measures.

    The protocol the training module drives on the datamodule's evaluation loaders (sharded over ranks by
    Lightning): :meth:`encode_step` per batch, :meth:`retrieve` on the gathered encodings, :meth:`score` the run.
    Standalone, :meth:`evaluate` does all of it in one process.

    The index is checked before anything is encoded (:func:`kdir.retrieval.search.check_index`): its factory
    string at construction as far as it can be without a model, then on a dummy of the model's dimension when
    :meth:`evaluate` starts (or at the first document batch of :meth:`encode_step`).

    Args:
        dataset: the split to evaluate (its queries, its qrels, the full corpus).
        metrics: ir-measures strings, e.g. ``nDCG@10``, ``RR(rel=2)@10``, ``R@1000``.
        depth: documents retrieved per query (the run file's depth).
        index_factory: FAISS ``index_factory`` string (``Flat`` = exact inner product).
        use_gpu: search on a GPU (``None``: when there is one, see ``search_backend``; ``False``: on the CPU).
        batch_size: encoding batch size.
        nprobe: IVF lists a query visits (``None``: enough for ``depth`` hits per query; see
            :mod:`kdir.retrieval.search`).
        ef_search: HNSW ``efSearch``, at least ``depth`` (``None``: ``max(depth, 16)``).
        index_path: save the corpus index here (and ``<index_path>.json``: factory, model provenance, corpus
            fingerprint). :meth:`evaluate` loads it instead of encoding the corpus when the record matches the
            model (class, settings, weights hash), the corpus (ids and texts hashes) and the factory; when it does
            not, the index is rebuilt and the file replaced (a warning says what differed).
        corpus_store: encode the corpus into this :class:`~kdir.stores.EmbeddingStore` folder (streamed chunk by
            chunk to disk, resumable; reused as it is when it holds this model's encodings of this corpus, e.g. from
            ``python -m kdir.encode`` on many GPUs) and build the index from it a chunk at a time: memory holds the
            index and one chunk, not the corpus. ``None``: the corpus is encoded in memory.
        index_shards: split the FAISS index into this many shards (``faiss.IndexShards``, one per GPU in turn when
            faiss sees GPUs; top-k merged by faiss). Needs ``corpus_store``.
        train_sample: vectors drawn from the store to train an index that needs it (IVF, PQ; default 131,072).
        query_batch_size: queries encoded and searched at a time.
        search_backend: ``auto`` (FAISS on faiss-gpu's GPUs; else, for ``Flat``, torch's exact search on CUDA; else
            FAISS on the CPU), ``faiss``, or ``torch`` (``Flat`` only): :func:`kdir.retrieval.search.resolve_backend`.
        num_workers: DataLoader worker processes tokenising the next batches while the model encodes (0: in this
            process); standalone :meth:`evaluate` only (Lightning's evaluation loaders have their own workers).
    """

    uses_faiss = True  # MaxSim subclasses search without FAISS: no index to check, save or reuse

    def __init__(
        self,
        dataset: IRDataset,
        metrics: Sequence[str] = DEFAULT_METRICS,
        depth: int = 1000,
        index_factory: str = "Flat",
        use_gpu: bool | None = None,
        batch_size: int = 128,
        nprobe: int | None = None,
        ef_search: int | None = None,
        index_path: str | Path | None = None,
        corpus_store: str | Path | None = None,
        index_shards: int = 1,
        train_sample: int | None = None,
        query_batch_size: int = 65536,
        num_workers: int = 0,
        search_backend: str = "auto",
    ):
        parse_measures(metrics)  # fail early on a bad name
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r}: expected an integer >= 1, or null for the default")
        self.dataset, self.metrics, self.depth = dataset, list(metrics), depth
        self.index_factory, self.use_gpu, self.batch_size = index_factory, use_gpu, batch_size
        self.nprobe, self.ef_search = nprobe, ef_search
        self.index_path = Path(index_path) if index_path else None
        self.corpus_store = Path(corpus_store) if corpus_store else None
        for name, value in (("index_shards", index_shards), ("query_batch_size", query_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected an integer >= 1")
        self.num_workers = _check_workers(num_workers)
        if index_shards > 1 and self.corpus_store is None:
            raise ConfigError(f"index_shards={index_shards} needs corpus_store=<dir>: shards are built from the store")
        self.index_shards, self.train_sample, self.query_batch_size = index_shards, train_sample, query_batch_size
        self._knobs: dict[int, dict] = {}
        self._corpus_fingerprint: dict | None = None
        self.search_backend = search_backend
        if self.uses_faiss:
            check_factory(index_factory)
            check_backend(search_backend, index_factory)

    def check_index(self, dim: int) -> dict:
        """Check the index settings for ``dim``-d embeddings and this corpus (once per dimension); returns the
        index's knobs (:func:`kdir.retrieval.search.index_knobs`)."""
        if dim not in self._knobs:
            self._knobs[dim] = check_index(
                self.index_factory, dim, len(self.dataset.corpus), self.nprobe, self.ef_search
            )
        return self._knobs[dim]

    def check_model(self, model: Scorer, device: str | torch.device | None = None) -> dict | None:
        """:meth:`check_index` for ``model``'s embedding size (``None`` for evaluators that use no FAISS index)."""
        return self.check_index(_model_dim(model, device)) if self.uses_faiss else None

    def encode_step(self, model: Scorer, tokens: dict[str, torch.Tensor], side: Side) -> tuple[torch.Tensor, ...]:
        """The encodings of one batch of one side (see :func:`kdir.retrieval.encode.encode_batch`); the first
        document batch checks the index for their dimension."""
        out = encode_batch(model, tokens, side)
        if self.uses_faiss and side == "doc" and not self._knobs:
            self.check_index(out[0].shape[-1])
        return out

    def retrieve(self, queries: tuple[torch.Tensor, ...], docs: tuple[torch.Tensor, ...], model: Scorer) -> Run:
        """Top-``depth`` run from query ``[Nq, d]`` and corpus ``[Nd, d]`` embeddings (rows in dataset order);
        with ``index_path`` the index is saved there."""
        d = docs[0].detach().float().cpu().numpy()
        knobs = self.check_index(d.shape[1])
        index = build_index(d, self.index_factory, self.use_gpu, self.search_backend)
        if self.index_path is not None:
            self._save(index, model)
        return self._search(index, queries, knobs)

    def _search(self, index, queries: tuple[torch.Tensor, ...], knobs: dict) -> Run:
        q = queries[0].detach().float().cpu().numpy()
        scores, rows = search_index(index, q, self.depth, knobs, self.nprobe, self.ef_search)
        return run_from_topk(self.dataset.queries.ids, self.dataset.corpus.ids, scores, rows)

    def index_record(self, model: Scorer) -> dict:
        """What a saved index is built from: factory, the model's provenance, the corpus fingerprint."""
        if self._corpus_fingerprint is None:
            corpus = self.dataset.corpus
            self._corpus_fingerprint = {"documents": len(corpus), "ids_xxh64": texts_xxh64(corpus.ids),
                                        "texts_xxh64": texts_xxh64(corpus.texts)}  # fmt: skip
        return {
            "kind": "kdir-faiss-index/1",
            "factory": self.index_factory,
            "metric": "inner_product",
            "model": model.provenance(),
            "corpus": self._corpus_fingerprint,
        }

    def _save(self, index, model: Scorer) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # one writer: rank 0
        save_index(index, self.index_path, self.index_record(model))
        log.info("index saved to %s", self.index_path)

    def _saved_index(self, model: Scorer):
        """The index saved at ``index_path`` if it was built from this model, corpus and factory, else ``None``."""
        index, differs = load_index(self.index_path, self.index_record(model))
        if index is not None:
            log.info("index_path=%s: the saved index matches: the corpus is not encoded", self.index_path)
            return index
        if differs != ["no saved index"]:
            log.warning("index_path=%s: rebuilding it (%s)", self.index_path, "; ".join(differs))
        return None

    def score(self, run: Run) -> dict[str, float]:
        return evaluate_run(run, self.dataset.qrels, self.metrics)

    def evaluate(
        self, model: Scorer, device: str | torch.device | None = None, progress: bool = True
    ) -> tuple[dict[str, float], Run]:
        """Encode, search and score in one process (``python -m kdir.evaluate``); returns ``(metrics, run)``.

        The index is checked first (before anything is encoded); a matching index saved at ``index_path`` is
        loaded and the corpus is not encoded.
        """
        kw = dict(
            batch_size=self.batch_size,
            device=device,
            progress=progress,
            out_device=self._out_device(model),
            num_workers=self.num_workers,
        )
        knobs = self.check_model(model, device)
        saved = self._saved_index(model) if self.uses_faiss and self.index_path is not None else None
        if saved is not None:
            index = to_gpu(saved, self.index_factory, self.use_gpu, self.search_backend)
        elif self.corpus_store is not None:
            index = self._index_from_store(model, device, progress)
        else:
            queries = encode_texts(model, self.dataset.queries.texts, "query", **kw)
            docs = encode_texts(model, self.dataset.corpus.texts, "doc", **kw)
            run = self.retrieve(queries, docs, model)
            return self.score(run), run
        run = self._search_in_batches(index, model, knobs, kw)
        return self.score(run), run

    def _index_from_store(self, model: Scorer, device: str | torch.device | None, progress: bool):
        """The corpus encoded into ``corpus_store`` (or found there) and indexed from it chunk by chunk."""
        from kdir.retrieval.store_index import build_index_from_store

        store = self._encode_to_store(model, device, progress)
        start = time.perf_counter()
        index, _ = build_index_from_store(
            store,
            self.index_factory,
            "ip",
            self.train_sample,
            self.use_gpu,
            shards=self.index_shards,
            backend=self.search_backend,
        )
        log.info("index %s over %d documents built from %s in %.1f s", self.index_factory, index.ntotal,
                 self.corpus_store, time.perf_counter() - start)  # fmt: skip
        if self.index_path is not None:
            self._save(index, model)
        return index

    def _encode_to_store(self, model: Scorer, device: str | torch.device | None, progress: bool):
        """The corpus encoded into ``corpus_store`` (streamed, resumed, or reused as it is)."""
        from kdir.retrieval.stream_encode import encode_into_store

        corpus = self.dataset.corpus
        return encode_into_store(
            model, corpus.texts, corpus.ids, self.corpus_store, "doc", batch_size=self.batch_size,
            progress=progress, dataset=self.dataset.name, device=device, num_workers=self.num_workers,
        )  # fmt: skip

    def _search_in_batches(self, index, model: Scorer, knobs: dict, kw: dict) -> Run:
        """Encode and search ``query_batch_size`` queries at a time."""
        texts, parts = self.dataset.queries.texts, []
        for s in range(0, len(texts), self.query_batch_size):
            q = encode_texts(model, texts[s : s + self.query_batch_size], "query", **kw)[0]
            parts.append(search_index(index, q.float().cpu().numpy(), self.depth, knobs, self.nprobe, self.ef_search))
        scores, rows = (np.concatenate(p) for p in zip(*parts))
        return run_from_topk(self.dataset.queries.ids, self.dataset.corpus.ids, scores, rows)

    def _out_device(self, model: Scorer) -> str | torch.device:
        return "cpu"  # FAISS reads host memory


def _check_workers(num_workers: int) -> int:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers={num_workers!r}: expected an integer >= 0")
    return num_workers


def _model_dim(model: Scorer, device: str | torch.device | None = None) -> int:
    """A single-vector model's embedding size: its ``dim``, else that of one encoded probe query."""
    dim = getattr(model, "dim", None)
    if isinstance(dim, int):
        return dim
    return int(encode_texts(model, ["dimension probe"], "query", device=device)[0].shape[-1])


def _candidate_lists(dataset: IRDataset, run_file: str, depth: int) -> list[np.ndarray]:
    from kdir.data.formats import read_trec_run, top_ranked

    run = read_trec_run(run_file)
    out = []
    for qid in dataset.queries.ids:
        cands = run.get(qid, {})
        out.append(dataset.corpus.codes(top_ranked(cands, depth), source=run_file))
    return out


class RerankEvaluator:
    """Re-rank the top-``depth`` candidates of a first-stage run with any scorer (e.g. a cross-encoder teacher).

    Models whose documents encode apart from the query (:attr:`~kdir.models.base.Scorer.separable`: bi-encoders,
    ColBERT, the collective ColBERT) encode each distinct candidate document once per evaluation, in length-sorted
    batches, and score every query against those encodings; cross-encoders score every (query, document) pair.

    Args:
        dataset: the split (queries, qrels, corpus).
        run_file: the first-stage TREC run (e.g. ``run.trec`` of ``python -m kdir.evaluate``).
        depth: candidates re-ranked per query.
        metrics: ir-measures strings.
        batch_size: queries per scoring call.
        encode_batch_size: documents per encoding call (separable models).
        num_workers: DataLoader worker processes tokenising the candidate documents of separable models.
    """

    def __init__(
        self,
        dataset: IRDataset,
        run_file: str,
        depth: int = 100,
        metrics: Sequence[str] = DEFAULT_METRICS,
        batch_size: int = 8,
        encode_batch_size: int = 128,
        num_workers: int = 0,
    ):
        parse_measures(metrics)
        self.dataset, self.run_file, self.depth, self.metrics = dataset, run_file, depth, list(metrics)
        self.batch_size, self.encode_batch_size = batch_size, encode_batch_size
        self.num_workers = _check_workers(num_workers)

    @torch.no_grad()
    def evaluate(self, model, device: str | torch.device | None = None, progress: bool = True) -> tuple[dict, Run]:
        from tqdm.auto import tqdm

        ds, cands = self.dataset, _candidate_lists(self.dataset, self.run_file, self.depth)
        model.eval()
        uses_keys = model.uses_query_keys  # the collective ColBERT: per-query expansions
        encoded = self._encode_candidates(model, cands, progress) if model.separable else None
        run: Run = {}
        for s in tqdm(range(0, len(cands), self.batch_size), desc="re-rank", disable=not progress):
            rows = range(s, min(s + self.batch_size, len(cands)))
            width = max(len(cands[i]) for i in rows)
            if width == 0:
                continue
            grid = np.stack(
                [
                    np.pad(cands[i], (0, width - len(cands[i])), mode="edge")
                    if len(cands[i])
                    else np.zeros(width, dtype=np.int64)
                    for i in rows
                ]
            )
            docs, inverse = np.unique(grid, return_inverse=True)
            inverse = inverse.reshape(grid.shape)
            queries = [ds.queries.texts[i] for i in rows]
            keys = id_hashes([ds.queries.ids[i] for i in rows]) if uses_keys else None
            if encoded is None:
                inputs = model.prepare(queries, [ds.corpus.texts[d] for d in docs], inverse, **_keys(keys))
                scores = model(inputs)
            else:
                codes, reps = encoded
                doc_reps = _batch_docs(model, tuple(t[np.searchsorted(codes, docs)] for t in reps))
                scores = model.score_reps(model.query_reps(queries, keys), doc_reps, torch.from_numpy(inverse))
            scores = scores.float().cpu().numpy()
            for r, i in enumerate(rows):
                run[ds.queries.ids[i]] = {ds.corpus.ids[d]: float(x) for d, x in zip(cands[i], scores[r])}
        return evaluate_run(run, ds.qrels, self.metrics), run

    def _encode_candidates(
        self, model: Scorer, cands: list[np.ndarray], progress: bool
    ) -> tuple[np.ndarray, tuple[torch.Tensor, ...]] | None:
        """The sorted distinct candidate codes and their document encodings (CPU), each document once."""
        nonempty = [c for c in cands if len(c)]
        if not nonempty:
            return None
        codes = np.unique(np.concatenate(nonempty))
        texts = [self.dataset.corpus.texts[c] for c in codes]
        # fp32 token embeddings: re-ranked scores are the model's own (the candidates of one evaluation, not a corpus)
        reps = encode_texts(
            model,
            texts,
            "doc",
            batch_size=self.encode_batch_size,
            progress=progress,
            token_dtype=torch.float32,
            num_workers=self.num_workers,
        )
        return codes, reps


def _keys(keys: np.ndarray | None) -> dict:
    return {} if keys is None else {"query_keys": keys}


def _batch_docs(model: Scorer, reps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A batch's document encodings on the model's device. Token embeddings (padded to the model's document length
    by :func:`encode_batch`) are cut back to the batch's longest document, as a batch tokenised together is padded:
    with ``masked_doc_tokens`` other than ``exclude`` padding positions score, and the scores then equal those of
    ``model(prepare(...))`` (each document's last token, ``[SEP]``, is in the mask)."""
    reps = tuple(t.to(model.device) for t in reps)
    if not model.multi_vector:
        return reps
    emb, mask = reps
    width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    return emb[:, :width], mask[:, :width]


class MaxSimEvaluator(RetrievalEvaluator):
    """End-to-end ColBERT retrieval by exhaustive MaxSim over the whole corpus.

    Token embeddings are kept in fp16, padded to the model's maximum lengths; each block of queries is
    scored against every document and the top-``depth`` kept (:func:`kdir.retrieval.search.maxsim_search`). In
    memory by default (fine up to ~10^5 documents); with ``corpus_store`` the tokens go to an embedding store on disk
    and are searched from it a chunk at a time (memory bounded; the cost stays one MaxSim per query and document).
    """

    uses_faiss = False

    def __init__(
        self,
        dataset: IRDataset,
        depth: int = 1000,
        metrics: Sequence[str] = DEFAULT_METRICS,
        batch_size: int = 64,
        doc_chunk: int = 1024,
        corpus_store: str | Path | None = None,
        num_workers: int = 0,
    ):
        super().__init__(
            dataset, metrics, depth, batch_size=batch_size, corpus_store=corpus_store, num_workers=num_workers
        )
        self.doc_chunk = doc_chunk

    def retrieve(self, queries: tuple[torch.Tensor, ...], docs: tuple[torch.Tensor, ...], model: Scorer) -> Run:
        """Top-``depth`` run from ``(embeddings [N, L, dim], mask [N, L])`` of the queries and the corpus."""
        if not model.multi_vector:
            raise KdirError(f"MaxSim evaluation needs a multi-vector model (ColBERT), got {type(model).__name__}")
        scores, rows = maxsim_search(queries, docs, self.depth, **self._maxsim_settings(model))
        return run_from_topk(self.dataset.queries.ids, self.dataset.corpus.ids, scores, rows)

    def _maxsim_settings(self, model: Scorer) -> dict:
        """The MaxSim search arguments: the model's similarity and masked-token rule, this evaluator's blocks."""
        return dict(
            similarity=model.config["similarity"],
            batch_size=self.batch_size,
            doc_chunk=self.doc_chunk,
            device=model.device,
            masked_doc_tokens=model.config.get("masked_doc_tokens", "exclude"),
        )

    def evaluate(
        self, model: Scorer, device: str | torch.device | None = None, progress: bool = True
    ) -> tuple[dict[str, float], Run]:
        """Encode and search in one process; with ``corpus_store`` the document tokens are streamed to the store
        and searched from it ``doc_chunk`` documents at a time (:func:`~kdir.retrieval.store_index.
        maxsim_search_store`), so memory holds one chunk, not the corpus."""
        if self.corpus_store is None:
            return super().evaluate(model, device, progress)
        from kdir.retrieval.store_index import maxsim_search_store

        if not model.multi_vector:
            raise KdirError(f"MaxSim evaluation needs a multi-vector model (ColBERT), got {type(model).__name__}")
        store = self._encode_to_store(model, device, progress)
        kw = dict(
            batch_size=self.batch_size,
            device=device,
            progress=progress,
            out_device=model.device,
            num_workers=self.num_workers,
        )
        queries = encode_texts(model, self.dataset.queries.texts, "query", **kw)
        settings = self._maxsim_settings(model)
        scores, rows = maxsim_search_store(
            queries, store, self.depth, **settings, pad_to=model.config["doc_max_length"]
        )
        run = run_from_topk(self.dataset.queries.ids, self.dataset.corpus.ids, scores, rows)
        return self.score(run), run

    def _out_device(self, model: Scorer) -> str | torch.device:
        return model.device  # the token embeddings stay where MaxSim runs


def evaluate_and_save(
    evaluator: Evaluator, model: Scorer, out: Path, run_name: str, progress: bool = True, **extra
) -> dict[str, float]:
    """Evaluate a teacher; write ``run.trec`` and ``metrics.json`` (+ ``extra`` fields) to ``out``; print a table."""
    start = time.perf_counter()
    metrics, run = evaluator.evaluate(model, progress=progress)
    seconds = time.perf_counter() - start
    write_trec_run(run, out / "run.trec", tag=run_name)
    record = {"dataset": evaluator.dataset.name, "metrics": metrics, "eval_seconds": seconds, **extra}
    save_json(record, out / "metrics.json")
    print_metrics({run_name: metrics}, title=f"{evaluator.dataset.name} (teacher, {seconds:.1f} s)")
    return metrics
