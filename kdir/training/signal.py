"""The teacher signal of a training batch: ``cached`` (score store), ``online`` (teacher in the training
step) or ``fill`` (serve the cache, compute only the missing pairs, write them back).

Pairs are keyed by hashed (query id, document id) (``kdir.stores.keys``), so a store serves any dataset
whose ids it was scored on. Reading a store whose recorded teacher (class, scoring settings, weights) does
not match the configured one, or an imported store with a teacher model, is an error unless ``force=True``.

``fill`` looks pairs up twice: in the dataloader workers (which pick up the segments written since, at one
``stat`` call a batch), and, for the pairs a worker found missing, in the training step, against the pairs
computed but not yet written and the store as it is then, so that a pair is scored once per run however far
the workers read ahead. Its segments are merged as they are written (:class:`~kdir.stores.score_store.TieredAppender`),
so a lookup searches ``O(log n)`` of them after ``n`` writes.

``online`` with cached teacher embeddings (``doc_embeddings`` / ``query_embeddings``: embedding stores, filled once by
the frozen bi-encoder teacher itself when missing, resumable): the dataloader workers read the batch's documents' (and
queries') teacher embeddings from the stores, so the teacher encodes only what is not cached (the queries, or
nothing) in the step; scores and embedding matching use the cached vectors as they would the online ones.

``cached`` with the in-batch layout ``[B, B(1+n)]``: each row's own candidates are looked up, and its other columns
only where a per-query index of the stored pairs (built once from the candidates the training examples can give a
query, and the run a ``kdir.score`` store recorded) holds the pair, so a batch costs the pairs stored, not ``B²``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from kdir.data.batch import TeacherFill, TrainBatch
from kdir.errors import ConfigError, KdirError, MissingFileError, NonFiniteError, OutputExistsError
from kdir.stores import (
    EmbeddingStore,
    ScoreStore,
    id_hashes,
    import_differences,
    pair_keys,
    sibling_store,
    teacher_differences,
)
from kdir.stores.score_store import TieredAppender

if TYPE_CHECKING:
    from kdir.data.dataset import IRDataset
    from kdir.data.generated import GeneratedQueries
    from kdir.models.base import Scorer

log = logging.getLogger(__name__)
Mode = Literal["cached", "online", "fill"]


def teacher_meta(model: Scorer) -> dict:
    """Provenance of a teacher model: its class, settings and weights hash (:meth:`Scorer.provenance`)."""
    return model.provenance()


def force_positive_max(scores: Tensor, positive: Tensor) -> Tensor:
    """``scores`` with each row's labelled-positive entry (column ``positive[i]``; ``-1`` = none) raised to the
    row maximum (CollectiveKD, Kim et al. 2022, §3: T̃(q_i, P_i) = max_d T(q_i, d))."""
    rows = torch.nonzero(positive >= 0).squeeze(1)
    out = scores.clone()
    best = scores[rows].nan_to_num(float("-inf")).max(dim=1).values
    own = scores[rows, positive[rows]]
    out[rows, positive[rows]] = torch.where(best.isneginf(), own, best)  # a row of missing pairs stays missing
    return out


def _is_import(meta: dict) -> bool:
    """Whether a store's meta says it was imported from a score file (finished or, before import records, not)."""
    return meta.get("imported") is not None or str(meta.get("teacher", {}).get("name", "")).startswith("imported:")


class TeacherSignal:
    """Teacher scores for each batch's candidates.

    Args:
        mode: ``cached``, ``online`` or ``fill``.
        store: score-store folder (``cached`` / ``fill``); created by ``fill`` or by ``import_file``.
        model: the teacher (``online`` / ``fill``; in ``cached`` mode only used to check provenance).
        import_file: a ``qid pid score`` TSV, Hofstätter TSV or JSONL imported into ``store`` when the store
            does not exist yet (or an earlier import did not finish): built aside and published complete
            (:meth:`~kdir.stores.ScoreStore.import_new`).
        import_format: ``pairs``, ``margin_scores`` or ``jsonl``.
        force: accept a store whose recorded teacher (class, scoring settings, weights) differs from ``model``,
            or an imported store with a ``model``; in ``cached`` mode also accept missing pairs (they are masked
            out of the loss; a batch with no cached pair at all is still an error).
        flush_every: ``fill`` writes the newly computed pairs to the store in segments of this size.
        force_positive_max: set the teacher score of each query's labelled positive to the maximum of its row
            (CollectiveKD: the expanded teacher's drift cannot rank another passage above the gold one).
        doc_embeddings: ``online`` with a single-vector bi-encoder teacher: an embedding store of the teacher's
            document embeddings of the training corpus (``kdir.encode`` with the teacher, or filled here at
            :meth:`bind` when missing or unfinished: resumable, chunk by chunk); the step reads them, not the teacher.
        query_embeddings: likewise for the training queries and the generated ones (their ids prefixed
            ``generated:``); without it the teacher encodes the batch's queries in the step.
        embed_batch_size: texts per forward pass when filling an embedding store.
    """

    def __init__(
        self,
        mode: Mode = "cached",
        store: str | Path | None = None,
        model: Scorer | None = None,
        import_file: str | Path | None = None,
        import_format: str = "pairs",
        force: bool = False,
        flush_every: int = 50_000,
        force_positive_max: bool = False,
        doc_embeddings: str | Path | None = None,
        query_embeddings: str | Path | None = None,
        embed_batch_size: int = 256,
    ):
        if mode not in ("cached", "online", "fill"):
            raise ConfigError(f"teacher signal mode must be cached, online or fill; got {mode!r}")
        if mode in ("cached", "fill") and store is None:
            raise ConfigError(f"teacher signal mode {mode!r} needs a score store path (signal.store=...)")
        if mode in ("online", "fill") and model is None:
            raise ConfigError(
                f"teacher signal mode {mode!r} needs a teacher model (e.g. teacher=colbert teacher.path=...)"
            )
        self.mode, self.model, self.force, self.flush_every = mode, model, force, flush_every
        self.force_positive_max = force_positive_max
        self.store_path = Path(store) if store is not None else None
        self.import_file, self.import_format = import_file, import_format
        self.store: ScoreStore | None = None
        self._writer: TieredAppender | None = None
        self._pending = (np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.float32))  # sorted keys, scores
        self._prepare = model.preparer() if model is not None else None
        self._query_keys = model is not None and model.uses_query_keys
        self._has_model = model is not None  # also known to dataloader workers (which get no model)
        self._provenance: dict | None = None
        self._dataset: IRDataset | None = None
        self._index: tuple[np.ndarray, np.ndarray] | None = None  # stored pairs per query: (starts [Q+1], docs)
        self.embedding_paths = {"doc": doc_embeddings, "query": query_embeddings}
        self.embed_batch_size = embed_batch_size
        self.embedding_stores: dict[str, EmbeddingStore] = {}
        if doc_embeddings is None and query_embeddings is not None:
            raise ConfigError("signal.query_embeddings needs signal.doc_embeddings (the documents' cached embeddings)")
        if doc_embeddings is not None:
            if mode != "online" or model is None or not model.embeds or model.multi_vector:
                raise ConfigError(
                    "signal.doc_embeddings caches a single-vector bi-encoder teacher's embeddings (signal=online, "
                    f"e.g. teacher=bi_encoder); got mode {mode!r} with {type(model).__name__}"
                )
            self._query_format = model.formatter("query")  # the workers tokenise queries that are not cached

    def __getstate__(self) -> dict:
        """Dataloader workers get the tokenisation and the store, not the teacher's weights nor the writer."""
        return self.__dict__ | {"model": None, "_writer": None}

    def bind(self, dataset: IRDataset, generated: GeneratedQueries | None = None) -> TeacherSignal:
        """Hash the dataset's ids and open (or import / create) the store, checking its provenance.

        With ``import_file`` the store is that file's finished import: imported (atomically) when there is none
        or when an earlier import did not finish; a store imported from another or a changed file is an error.
        With cached teacher embeddings, their stores are opened (or filled) for the corpus and for the dataset's
        queries plus the ``generated`` ones.
        """
        self.q_hash, self.d_hash = id_hashes(dataset.queries.ids), id_hashes(dataset.corpus.ids)
        gen_ids = [f"generated:{i}" for i in generated.ids] if generated is not None else []
        self.g_hash = id_hashes(gen_ids)
        self._dataset, self._index = dataset, None
        if self.model is not None:
            self.model.freeze()
        if self.embedding_paths["doc"] is not None:
            corpus = dataset.corpus
            self.embedding_stores = {"doc": self._embedding_store("doc", corpus.texts, corpus.ids, dataset.name)}
            if self.embedding_paths["query"] is not None:
                texts = list(dataset.queries.texts) + (list(generated.texts) if generated is not None else [])
                ids = list(dataset.queries.ids) + gen_ids
                self.embedding_stores["query"] = self._embedding_store("query", texts, ids, dataset.name)
        if self.store_path is None:
            return self
        if self.import_file is not None:
            self.store = self._imported_store()
        elif (self.store_path / "meta.json").is_file():
            self.store = ScoreStore.open(self.store_path)
        elif self.mode == "fill":
            self.store = ScoreStore.create(self.store_path, {"teacher": self._teacher(), "data": {}})
        else:
            raise MissingFileError(
                f"{self.store_path}: no score store (score it with `python -m kdir.score`, "
                "or set signal.import_file=..., or signal=fill)"
            )
        self._check_provenance()
        return self

    def _embedding_store(self, side: str, texts: list[str], ids: list[str], name: str) -> EmbeddingStore:
        """The teacher's finished embedding store of ``side`` for ``ids``: opened (provenance checked), or filled."""
        path = Path(self.embedding_paths[side])
        chunk_size = {}
        if (path / "meta.json").is_file():
            store = EmbeddingStore.open(path, allow_incomplete=True)
            if not store.complete:  # an interrupted fill: resumed below, with the layout it was started with
                chunk_size = {"chunk_size": int(store.meta["chunk_size"])}
            else:
                store.check_provenance(self._teacher(), side)
                missing = int((store.rows(id_hashes(ids)) < 0).sum())
                if missing:
                    raise ConfigError(
                        f"signal.{side}_embeddings={path}: {missing} of {len(ids)} {side} ids of {name} are not in "
                        f"the store: point signal.{side}_embeddings at a new folder (it is filled with the teacher)"
                    )
                log.info("teacher embeddings: %s (%d %s vectors, cached)", path, len(store), side)
                return store
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            raise ConfigError(
                f"signal.{side}_embeddings={path} is not filled yet, and this job has several processes that would "
                "all fill it: fill it first with one process (the same run with trainer.devices=1 fills it before it "
                "trains; stop it then), and start this job again"
            )
        from kdir.retrieval.stream_encode import encode_into_store

        log.info("teacher embeddings: encoding %d %s texts of %s into %s", len(texts), side, name, path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        store = encode_into_store(
            self.model,
            texts,
            ids,
            path,
            side,
            batch_size=self.embed_batch_size,
            dataset=name,
            device=device,
            progress=True,
            **chunk_size,
        )
        self.model.to("cpu")  # moved to the training device with the module
        return store

    def _teacher(self) -> dict:
        """The configured teacher's provenance (computed once: it hashes the weights)."""
        if self._provenance is None:
            self._provenance = teacher_meta(self.model)
        return self._provenance

    def _imported_store(self) -> ScoreStore:
        """The finished import of ``import_file`` at ``store_path``, importing it if needed."""
        path, source = self.store_path, Path(self.import_file)
        replace = False
        if (path / "meta.json").is_file():
            store = ScoreStore.open(path)
            meta = store.meta
            record = meta.get("imported")
            if record is None and not _is_import(meta):
                log.info("%s holds scored pairs, not an import: signal.import_file=%s is not used", path, source)
                return store
            if record is not None:
                if not source.is_file():
                    log.warning("%s: %s is gone; using the scores imported from it", path, source)
                    return store
                if not (differs := import_differences(record, source, self.import_format)):
                    return store
                st = source.stat()
                new = sibling_store(path, [str(source.resolve()), st.st_size, st.st_mtime_ns, self.import_format])
                raise OutputExistsError(
                    f"{path} holds another import ({'; '.join(differs)}): set "
                    f"signal.store={new} to import {source} there, or delete {path} to import it again"
                )
            log.warning("%s: an earlier import of %s did not finish; importing it again", path, source)
            replace = True
        if self.model is not None and not self.force and source.is_file():  # refuse before a long import
            raise KdirError(self._imported_message({"file": str(source), "format": self.import_format}))
        log.info("importing %s into score store %s", source, path)
        return ScoreStore.import_new(path, source, self.import_format, replace=replace)

    def _imported_message(self, record: dict) -> str:
        size = f", {record['size']} bytes" if "size" in record else ""
        return (
            f"{self.store_path} holds scores imported from {record.get('file')} ({record.get('format')}{size}), "
            f"not scores of the configured teacher {type(self.model).__name__}: set signal.force=true to use them "
            "with it anyway (or choose teacher=scores: a score file, no model)"
        )

    def _check_provenance(self) -> None:
        if self.model is None:  # a score-file teacher: nothing to compare
            return
        meta = self.store.meta
        if _is_import(meta):
            msg = self._imported_message(meta.get("imported") or {"file": meta.get("data", {}).get("imported_from")})
        else:
            recorded = meta.get("teacher", {})
            if not (differs := teacher_differences(recorded, self._teacher())):
                return
            new = sibling_store(self.store_path, self._teacher())
            msg = (
                f"{self.store_path}: scored by teacher {recorded.get('name')}, which differs from the configured "
                f"one ({'; '.join(differs)}); score this teacher into its own store (python -m kdir.score ... "
                f"store={new}, then signal.store={new}), or set signal.force=true to use it anyway"
            )
        if not self.force:
            raise KdirError(msg)
        log.warning("%s (forced)", msg)

    # ---------------------------------------------------------------- collate (dataloader workers)
    def index_candidates(self, pair_codes: np.ndarray) -> None:
        """Index which pairs of the bound dataset the store holds, per query (``cached`` mode; else nothing).

        ``pair_codes``: ``query * n_docs + doc`` codes of the pairs a query can have as its own candidates (its
        positives and its negatives' pool, see :func:`kdir.data.collate.own_candidate_codes`); the run a
        ``kdir.score`` store records it scored (``meta["data"]``: ``dataset``, ``source`` and ``depth``) is added
        when it scored this dataset and the run file is there. :meth:`collate` with ``own`` columns then looks a
        row's other columns up only where the index holds the pair: the same scores as looking every column up, since
        the index is used only when it covers every pair of the store (a store holding others is looked up in full).
        Costs one lookup per pair, once; keeps 4 bytes per stored pair.
        """
        if self.mode != "cached" or self.store is None:
            return
        n_docs = len(self.d_hash)
        codes = [np.asarray(pair_codes, dtype=np.int64).ravel()]
        data = self.store.meta.get("data") or {}
        run, depth = data.get("source"), data.get("depth")
        ours = self._dataset is not None and data.get("dataset") == self._dataset.name
        if ours and isinstance(run, str) and isinstance(depth, int) and Path(run).is_file():
            from kdir.stores.scoring import candidate_pairs

            try:
                pairs = candidate_pairs(self._dataset, run_file=run, depth=depth)
                codes.append(pairs[:, 0] * n_docs + pairs[:, 1])
            except KdirError as e:  # a run of other ids: its pairs are not this dataset's
                log.warning("%s: the store's run %s is not used for its in-batch index (%s)", self.store_path, run, e)
        codes = np.unique(np.concatenate(codes))
        stored = np.zeros(len(codes), dtype=bool)
        step = 1 << 22
        for i in range(0, len(codes), step):
            c = codes[i : i + step]
            keys = pair_keys(self.q_hash[c // n_docs], self.d_hash[c % n_docs])
            stored[i : i + step] = ~np.isnan(self.store.lookup(keys))
        kept = codes[stored]  # sorted: by query, then document
        if len(kept) < len(self.store):  # it holds other pairs, maybe cross pairs of these queries: look all up
            log.info(
                "teacher scores: %s holds %d pairs besides the %d candidate pairs of the training queries; in-batch "
                "batches look every pair up (cost B^2)",
                self.store_path,
                len(self.store) - len(kept),
                len(kept),
            )
            return
        starts = np.searchsorted(kept, np.arange(len(self.q_hash) + 1, dtype=np.int64) * n_docs)
        self._index = starts, (kept % n_docs).astype(np.int32 if n_docs < 2**31 else np.int64)
        log.info("teacher scores: %d of %d candidate pairs of the training queries are stored", len(kept), len(codes))

    def collate(
        self,
        queries: np.ndarray,
        docs: np.ndarray,
        candidates: np.ndarray,
        query_texts: list[str],
        doc_texts: list[str],
        n_generated: int = 0,
        own: np.ndarray | None = None,
        generated: np.ndarray | None = None,
    ) -> dict:
        """Batch entries for the teacher: ``queries [B]`` / ``docs [D]`` dataset codes, ``candidates [B + G, C]``.

        The last ``n_generated`` rows of ``candidates`` / ``query_texts`` are generated queries (rows ``generated``
        of the generated queries; no cached score: online teachers only). ``own [B, k]``: the columns of each row's
        own candidates, given when every row has the same candidates (the inbatch layout); in ``cached`` mode with
        an index (:meth:`index_candidates`) the other columns are then looked up only where the index holds the pair.
        """
        if self.embedding_stores:
            out = {
                "teacher_embeddings": {"doc": torch.from_numpy(self.embedding_stores["doc"].lookup(self.d_hash[docs]))}
            }
            if "query" in self.embedding_stores:
                keys = self.q_hash[queries]
                if n_generated:
                    keys = np.concatenate([keys, self.g_hash[np.asarray(generated)]])
                out["teacher_embeddings"]["query"] = torch.from_numpy(self.embedding_stores["query"].lookup(keys))
            else:
                out["teacher_inputs"] = {"query": self._query_format(query_texts)}
            return out
        if self.mode == "online":
            kw = {}
            if self._query_keys:  # e.g. the collective teacher's expansions
                kw["query_keys"] = np.concatenate([self.q_hash[queries], np.zeros(n_generated, dtype=np.uint64)])
            return {"teacher_inputs": self._prepare(query_texts, doc_texts, candidates, **kw)}
        if n_generated:
            raise KdirError("generated queries have no cached teacher scores: use an online teacher (signal=online)")
        if self.mode == "cached":
            if own is not None and self._index is not None:
                scores, found = self._indexed_scores(queries, docs, candidates, own)
            else:
                scores = self.store.lookup(pair_keys(self.q_hash[queries][:, None], self.d_hash[docs][candidates]))
                found = int(scores.size - np.isnan(scores).sum())
            if found < scores.size:
                self._check_missing(scores, found, candidates, doc_texts)
            return {"teacher_scores": torch.from_numpy(scores)}
        self.store.refresh_if_changed()  # fill: segments written since the last batch (one stat call otherwise)
        keys = pair_keys(self.q_hash[queries][:, None], self.d_hash[docs][candidates])  # [B, C]
        scores = self.store.lookup(keys)
        out = {"teacher_scores": torch.from_numpy(scores)}
        rows, cols = np.nonzero(np.isnan(scores))
        if not len(rows):
            return out
        distinct, first, pairs = np.unique(keys[rows, cols], return_index=True, return_inverse=True)
        r, c = rows[first], cols[first]  # one entry per distinct missing pair (a query may fill several rows)
        inputs = self._prepare([query_texts[i] for i in r], doc_texts, candidates[r, c][:, None])
        out["teacher_fill"] = TeacherFill(
            inputs,
            torch.from_numpy(rows),
            torch.from_numpy(cols),
            torch.from_numpy(distinct.view(np.int64)),
            torch.from_numpy(pairs.reshape(-1)),
            torch.from_numpy(queries[r]),
            torch.from_numpy(docs[candidates[r, c]]),
        )
        return out

    def _indexed_scores(
        self, queries: np.ndarray, docs: np.ndarray, candidates: np.ndarray, own: np.ndarray
    ) -> tuple[np.ndarray, int]:
        """``[B, C]`` scores (NaN: not looked up or not stored) and how many are stored, with every row's candidates
        ``candidates[0]``: each row's ``own`` columns and the batch documents the index holds for its query are looked
        up, once per (row, document), and written to every column of that document."""
        b, n_docs = len(queries), len(docs)
        starts, indexed = self._index
        lo, n = starts[queries], starts[queries + 1] - starts[queries]
        total = int(n.sum())
        rows = [np.repeat(np.arange(b), own.shape[1]), np.repeat(np.arange(b), n)]
        at = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(total)  # the index entries of every row's query
        by_code = np.argsort(docs, kind="stable")
        pos = np.searchsorted(docs, indexed[at], sorter=by_code).clip(max=n_docs - 1)
        in_batch = docs[by_code[pos]] == indexed[at]
        rows[1] = rows[1][in_batch]
        cells = np.concatenate(
            [rows[0] * n_docs + candidates[rows[0], own.ravel()], rows[1] * n_docs + by_code[pos[in_batch]]]
        )
        cells = np.unique(cells)
        r, d = cells // n_docs, cells % n_docs  # (row, batch document) to look up
        values = self.store.lookup(pair_keys(self.q_hash[queries[r]], self.d_hash[docs[d]]))
        hit = ~np.isnan(values)
        r, d, values = r[hit], d[hit], values[hit]
        columns = candidates[0]
        by_doc = np.argsort(columns, kind="stable")  # the columns of each batch document, grouped
        col_starts = np.searchsorted(columns, np.arange(n_docs + 1), sorter=by_doc)
        k = col_starts[d + 1] - col_starts[d]
        col = by_doc[np.repeat(col_starts[d] - np.cumsum(k) + k, k) + np.arange(int(k.sum()))]
        scores = np.full(candidates.shape, np.nan, dtype=np.float32)
        scores[np.repeat(r, k), col] = np.repeat(values, k)
        return scores, int(k.sum())

    def _check_missing(self, scores: np.ndarray, found: int, candidates: np.ndarray, doc_texts: list[str]) -> None:
        """``cached``: raise for a batch with pairs missing from the store (unless forced) or none stored at all."""
        if found and self.force:
            return
        row, col = np.unravel_index(int(np.argmax(np.isnan(scores))), scores.shape)  # the first missing pair
        example = f"(e.g. query row {row}, document {doc_texts[candidates[row, col]][:60]!r})"
        if self._has_model:
            compute = "use signal=fill to compute them with the teacher"
        else:
            compute = "score them (python -m kdir.score) or import scores of this data (signal.import_file=...)"
        if found == 0:
            raise KdirError(
                f"none of the {scores.size} candidate pairs of a batch are in {self.store_path} {example}: "
                f"the store holds no scores of this training data; {compute} (signal.force=true would mask "
                "every pair and leave nothing to learn from)"
            )
        if not self.force:
            raise KdirError(
                f"{scores.size - found} of {scores.size} candidate pairs of a batch are not in "
                f"{self.store_path} {example}; {compute}, or set signal.force=true to mask them"
            )

    # ---------------------------------------------------------------- training step
    @torch.no_grad()
    def scores(self, batch: TrainBatch) -> Tensor:
        """``[B, C]`` fp32 teacher scores for a collated batch (runs the teacher for online / fill)."""
        return self._labels(self._raw_scores(batch), batch)

    @torch.no_grad()
    def outputs(self, batch: TrainBatch, positive: Tensor, batch_docs: bool = False) -> tuple[Tensor, ...]:
        """Teacher scores ``[B, C]``, query embeddings ``[B, d]`` and own-positive document embeddings ``[B, d]``;
        with ``batch_docs`` also every distinct document's embedding ``[D, d]`` (a bi-encoder teacher)."""
        if self.mode != "online" or not self.model.embeds:
            raise KdirError(
                f"embedding matching needs an online teacher that embeds (a bi-encoder, or a "
                f"cross-encoder with dual_pooling), got {type(self.model).__name__} in mode {self.mode!r}"
            )
        if batch_docs:
            if not hasattr(self.model, "outputs_of"):
                raise ConfigError(
                    f"matching every batch document's embedding (side=docs) needs a bi-encoder teacher, got "
                    f"{type(self.model).__name__}"
                )
            q, d = self._cached_embeddings(batch) if batch.teacher_embeddings is not None else self.embed(batch)
            scores, q, own = self.model.outputs_of(q, d, batch.inputs["candidates"], positive)
            return self._labels(scores.float(), batch), q, own, d
        if batch.teacher_embeddings is not None:
            q, d = self._cached_embeddings(batch)
            scores, q, d = self.model.outputs_of(q, d, batch.inputs["candidates"], positive)
        else:
            scores, q, d = self.model.outputs(batch.teacher_inputs, positive)
        return self._labels(scores.float(), batch), q, d

    @torch.no_grad()
    def embed(self, batch: TrainBatch) -> tuple[Tensor, Tensor]:
        """Teacher embeddings of the batch's queries ``[B, d]`` and distinct documents ``[D, d]`` (bi-encoders)."""
        if self.mode != "online" or not self.model.embeds:
            raise KdirError(
                f"gathering candidates across devices needs an online bi-encoder teacher, got "
                f"{type(self.model).__name__} in mode {self.mode!r}"
            )
        if batch.teacher_embeddings is not None:
            return self._cached_embeddings(batch)
        return self.model.embed(batch.teacher_inputs)

    def _cached_embeddings(self, batch: TrainBatch) -> tuple[Tensor, Tensor]:
        """The batch's teacher query ``[B+G, d]`` (cached, or encoded now) and document ``[D, d]`` embeddings, fp32."""
        cached = batch.teacher_embeddings
        if "query" in cached:
            q = cached["query"]
        else:
            from kdir.models.base import to_device

            q = self.model.encode(to_device(batch.teacher_inputs["query"], self.model.device), "query")
        return q.float(), cached["doc"].to(q.device).float()

    def nonfinite(self, scores: Tensor) -> Tensor:
        """0-d count of the unusable entries of teacher ``scores``: ±inf, and NaN except in ``cached`` mode (there
        NaN is a pair missing from the store, masked out of the loss). No host sync: the caller checks the count."""
        return (scores.isinf() if self.mode == "cached" else ~scores.isfinite()).sum()

    def nonfinite_error(self, scores: Tensor | None, where: str, count: int | None = None) -> NonFiniteError:
        """The error for teacher ``scores`` with unusable entries, naming ``where`` (the step) and the teacher;
        ``scores=None``: only their ``count`` is known (counted on the device over several steps)."""
        if self.mode == "cached":
            teacher = f"score store {self.store_path} (it holds non-finite scores: import or score it again)"
        else:
            teacher = f"the {self.mode} teacher {type(self.model).__name__}"
        if scores is None:
            return NonFiniteError(
                f"{where}: {count} teacher scores were not finite, from {teacher}; training stopped, no results "
                "written (finite_check=step names the first step and an example)"
            )
        bad = torch.nonzero(scores.isinf() if self.mode == "cached" else ~scores.isfinite())
        row, col = bad[0].tolist()
        return NonFiniteError(
            f"{where}: {len(bad)} of {scores.numel()} teacher scores are not finite (e.g. {scores[row, col].item()} "
            f"at query row {row}, candidate {col}), from {teacher}; training stopped, no results written"
        )

    def _labels(self, scores: Tensor, batch: TrainBatch) -> Tensor:
        if not self.force_positive_max:
            return scores
        return force_positive_max(scores, batch.positive.to(scores.device))

    def _raw_scores(self, batch: TrainBatch) -> Tensor:
        if batch.teacher_embeddings is not None:
            q, d = self._cached_embeddings(batch)
            return self.model.score_reps((q,), (d,), batch.inputs["candidates"]).float()
        if self.mode == "online":
            return self.model(batch.teacher_inputs).float()
        scores = batch.teacher_scores.float()
        fill = batch.teacher_fill
        if fill is None:
            return scores
        keys = fill.keys.cpu().numpy().view(np.uint64)  # [U] the distinct pairs the worker found missing
        known = self._known(keys)  # scored since the worker looked (by this process, or written by any)
        todo = np.flatnonzero(np.isnan(known))
        if len(todo):
            inputs = fill.inputs if len(todo) == len(keys) else self._prepare_pairs(fill, todo)
            values = self.model(inputs).float()[:, 0].cpu().numpy()
            known[todo] = values
            finite = np.isfinite(values)  # a non-finite score is never stored (the training step stops on it)
            self._remember(keys[todo][finite], values[finite])
        scores = scores.clone()
        scores[fill.rows, fill.cols] = torch.from_numpy(known).to(scores.device)[fill.pairs.to(scores.device)]
        return scores

    def _known(self, keys: np.ndarray) -> np.ndarray:
        """Scores of ``keys`` computed by this process and not yet written, else in the store now (NaN: neither)."""
        pending, values = self._pending
        out = np.full(len(keys), np.nan, dtype=np.float32)
        if len(pending):
            pos = np.searchsorted(pending, keys).clip(max=len(pending) - 1)
            hit = pending[pos] == keys
            out[hit] = values[pos[hit]]
        rest = np.flatnonzero(np.isnan(out))
        if len(rest):
            self.store.refresh_if_changed()
            out[rest] = self.store.lookup(keys[rest])
        return out

    def _remember(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add newly computed pairs (not pending, not stored) to the pending ones; write them out every
        ``flush_every``."""
        pending, scores = self._pending
        order = np.argsort(keys, kind="stable")
        merged = np.concatenate([pending, keys[order]])
        by_key = np.argsort(merged, kind="stable")  # timsort: one merge of two sorted runs
        self._pending = merged[by_key], np.concatenate([scores, values[order]])[by_key]
        if len(self._pending[0]) >= self.flush_every:
            self.flush()

    def _prepare_pairs(self, fill: TeacherFill, todo: np.ndarray) -> dict[str, Tensor]:
        """The teacher's inputs for the distinct missing pairs ``todo`` of ``fill`` (one candidate each)."""
        queries, corpus = self._dataset.queries.texts, self._dataset.corpus.texts
        q = fill.queries.cpu().numpy()[todo]
        docs, column = np.unique(fill.docs.cpu().numpy()[todo], return_inverse=True)
        return self._prepare([queries[i] for i in q], [corpus[i] for i in docs], column.reshape(-1, 1))

    def flush(self) -> None:
        """Write the scores computed in ``fill`` mode to the store: one new segment (atomically), merged with the
        earlier ones of this run as they add up (:class:`~kdir.stores.score_store.TieredAppender`)."""
        keys, values = self._pending
        if not len(keys):
            return
        if self._writer is None:
            self._writer = TieredAppender(self.store)
        self._writer.append(keys, values)
        log.info(
            "teacher fill: wrote %d new pairs to %s (pid %d, %d segments of this run)",
            len(keys),
            self.store_path,
            os.getpid(),
            len(self._writer.segments),
        )
        self._pending = (np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.float32))

    def to(self, device: torch.device | str) -> TeacherSignal:
        if self.model is not None:
            self.model.to(device)
        return self
