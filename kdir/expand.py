"""Collective knowledge of CollectiveKD (Kim, Kim & Hwang, NAACL 2022, arXiv 2205.03273): ``python -m kdir.expand``.

Offline, once per training query, ColBERT-PRF expansion embeddings (Wang et al., ICTIR 2021) of the query's
feedback passages, computed with the ColBERT teacher::

    python -m kdir.expand teacher.model.path=<ColBERT folder> data=<training data> out=<store dir>

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

The whole corpus is held in memory (fp16 token embeddings) and searched exhaustively: fine up to ~10^5 passages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import kdir  # noqa: F401  (registers config resolvers)
from kdir.data.dataset import IRDataset
from kdir.data.formats import read_trec_run
from kdir.errors import KdirError
from kdir.models.colbert import ColBERT
from kdir.retrieval.metrics import Run, run_from_topk, write_trec_run
from kdir.retrieval.prf import (
    CorpusTokens,
    collective_knowledge,
    document_frequencies,
    encode_corpus,
    inverse_document_frequency,
    ranked_feedback,
    relevance_feedback,
    skip_mask,
    teacher_ranking,
    token_strings,
)
from kdir.stores import ExpansionStore, id_hashes
from kdir.stores.expansion_store import check_writable
from kdir.utils import resolve_device

log = logging.getLogger("kdir.expand")


# ---------------------------------------------------------------------------------------------- the stage


@contextmanager
def _timed(name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    log.info("%s: %.1f s", name, timings[name])


def _check(cfg: DictConfig) -> None:
    if cfg.mode not in ("prf", "rf"):
        raise KdirError(
            f"mode must be 'prf' (teacher top-{cfg.fb_docs}) or 'rf' (labelled positives), got {cfg.mode!r}"
        )
    if cfg.beta < 0 or cfg.fb_docs < 1 or cfg.fb_clusters < 1 or cfg.fb_k < 1 or cfg.neighbours < 1:
        raise KdirError(
            "need beta >= 0 and fb_docs, fb_clusters, fb_k, neighbours >= 1, got "
            f"beta={cfg.beta} fb_docs={cfg.fb_docs} fb_clusters={cfg.fb_clusters} fb_k={cfg.fb_k} "
            f"neighbours={cfg.neighbours}"
        )
    if cfg.mode == "prf" and cfg.ranking is None and cfg.depth < cfg.fb_docs:
        raise KdirError(f"depth={cfg.depth} must be >= fb_docs={cfg.fb_docs} in prf mode")
    check_writable(cfg.out, cfg.overwrite)  # fail before the encoding, not after


def _ranking(
    cfg: DictConfig, model: ColBERT, dataset: IRDataset, corpus: CorpusTokens, timings: dict[str, float]
) -> tuple[Run | None, list[np.ndarray] | None]:
    """The training queries' ranking (read or computed) and, in prf mode, their feedback documents."""
    ids, n_fb = dataset.queries.ids, cfg.fb_docs
    if cfg.ranking is not None:
        run = read_trec_run(cfg.ranking)
        log.info("ranking read from %s (%d queries)", cfg.ranking, len(run))
        return run, ranked_feedback(run, ids, dataset.corpus, n_fb, str(cfg.ranking)) if cfg.mode == "prf" else None
    if cfg.depth < 1:
        return None, None
    with _timed("search", timings):
        scores, rows = teacher_ranking(
            model, dataset.queries.texts, corpus, cfg.depth, cfg.batch_size, progress=cfg.progress
        )
    return run_from_topk(ids, dataset.corpus.ids, scores, rows), list(rows[:, :n_fb])


def expand(cfg: DictConfig) -> ExpansionStore:
    """Run the stage; returns the written store (its folder also holds ``ranking.trec``)."""
    from kdir.retrieval.search import build_index
    from kdir.training.signal import teacher_meta

    _check(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = instantiate(cfg.teacher.model)
    if not isinstance(model, ColBERT):
        raise KdirError(f"kdir.expand needs a ColBERT teacher (teacher=colbert), got {type(model).__name__}")
    model = model.freeze().to(device)
    dataset: IRDataset = instantiate(cfg.get("dataset") or cfg.data.train)
    timings: dict[str, float] = {}
    with _timed("encode", timings):
        corpus = encode_corpus(model, dataset.corpus.texts, cfg.batch_size, cfg.progress)
    with _timed("idf", timings):
        df = document_frequencies(corpus.token_ids.numpy(), corpus.mask.numpy(), len(model.tokenizer))
        idf = inverse_document_frequency(df, len(corpus))
    run, feedback = _ranking(cfg, model, dataset, corpus, timings)
    if cfg.mode == "rf":
        feedback = relevance_feedback(dataset, cfg.fb_docs)
    with _timed("clustering", timings):
        pool = corpus.pool()
        index = build_index(pool.embeddings, "Flat", cfg.faiss_gpu)
        settings = {k: cfg[k] for k in ("fb_clusters", "fb_k", "beta", "neighbours", "seed")}
        exp = collective_knowledge(
            feedback, pool, index, idf, skip_mask(model.tokenizer), **settings, progress=cfg.progress
        )
    meta = {
        "teacher": teacher_meta(model),
        "data": {"dataset": dataset.name, "n_docs": len(corpus), "n_train_queries": len(dataset.queries)},
        "mode": cfg.mode,
        "ranking": str(cfg.ranking) if cfg.ranking else "teacher MaxSim",
        "fb_docs": cfg.fb_docs,
        "kmeans_init": "avg_step_position",
        **settings,
        "seconds": timings,
    }
    keys = id_hashes([dataset.queries.ids[q] for q in exp.queries])
    tokens = token_strings(model.tokenizer, exp.token_ids)
    store = ExpansionStore.write(cfg.out, keys, exp.vectors, exp.weights, tokens, meta, overwrite=cfg.overwrite)
    if run is not None:
        write_trec_run(run, Path(cfg.out) / "ranking.trec", tag="colbert")
    log.info("expansion store %s: %d of %d training queries, k=%d", cfg.out, len(store), len(dataset.queries), store.k)
    return store


@hydra.main(version_base="1.3", config_path="../conf", config_name="expand")
def main(cfg: DictConfig) -> None:
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / "config.yaml", resolve=True)
    try:
        expand(cfg)
    except (KdirError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        log.error("%s: %s", type(e).__name__, e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
