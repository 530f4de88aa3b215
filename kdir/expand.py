"""Collective knowledge of CollectiveKD (Kim, Kim & Hwang, NAACL 2022, arXiv 2205.03273): ``python -m kdir.expand``.

Offline, once per training query, ColBERT-PRF expansion embeddings (Wang et al., ICTIR 2021) of the query's
feedback passages, computed with the ColBERT teacher::

    python -m kdir.expand teacher.path=<ColBERT folder> data=<training data> out=<store dir>

The steps (corpus encoding, idf, feedback passages, k-means, centroid labels, weights) are
:mod:`kdir.retrieval.prf`'s; this command runs them and writes a :class:`kdir.stores.ExpansionStore` at ``out``
(plus the teacher's top-``depth`` ranking, ``<out>/ranking.trec``: CollectiveKD's hard-negative pool).
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
from omegaconf import DictConfig

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
from kdir.utils import Setting, resolve_device, task_wrapper
from kdir.utils.settings import count, positive_int

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
    model = instantiate(cfg.teacher)
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
@task_wrapper(
    settings={"depth": count(), "beta": Setting(float, 0)}  # depth=0: no teacher ranking (rf mode)
    | dict.fromkeys(("fb_docs", "fb_clusters", "fb_k", "neighbours"), positive_int())
)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: :func:`expand`."""
    expand(cfg)


if __name__ == "__main__":
    main()
