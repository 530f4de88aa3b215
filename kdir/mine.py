"""Hard-negative mining: ``python -m kdir.mine student=<option> data=<training data> [depth=200] [out=<run.trec>]``.

Encode the training split's queries and the corpus with the student, search with FAISS (``index_factory``,
exact inner product by default; ``nprobe`` / ``ef_search`` for IVF / HNSW indexes; ``index_path`` saves the corpus
index and reuses it for the same student and corpus) and write each training query's top-``depth`` TREC run.
Labelled positives are kept in the run (TCT-ColBERT's HN mining does not filter them);
``RunNegatives(exclude_positives=...)`` decides at training time. Also scores the run on the training qrels
(``R@depth``: how many labelled positives the student already ranks within the pool) and saves ``metrics.json``.
``precision`` (``auto``: bf16 autocast on CUDA, fp32 elsewhere) and ``num_workers`` (tokenising DataLoader workers)
set how the encoding runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import kdir  # noqa: F401  (registers config resolvers)
from kdir.data.dataset import IRDataset
from kdir.errors import KdirError
from kdir.retrieval.encode import autocast, resolve_precision
from kdir.retrieval.evaluators import RetrievalEvaluator
from kdir.retrieval.metrics import positive_share, write_trec_run
from kdir.utils import print_metrics, resolve_device, save_json, task_wrapper
from kdir.utils.settings import count

log = logging.getLogger("kdir.mine")


def mine(cfg: DictConfig) -> dict[str, float]:
    out_dir = Path(cfg.paths.output_dir)
    if cfg.depth < 1:
        raise KdirError(f"depth={cfg.depth}: expected a positive number of candidates per query")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    dataset: IRDataset = instantiate(cfg.data.train)
    metrics = list(dict.fromkeys([f"R@{cfg.depth}", *cfg.metrics]))
    evaluator = RetrievalEvaluator(
        dataset,
        metrics=metrics,
        depth=cfg.depth,
        index_factory=cfg.index_factory,
        use_gpu=cfg.use_gpu,
        batch_size=cfg.batch_size,
        nprobe=cfg.nprobe,
        ef_search=cfg.ef_search,
        index_path=cfg.index_path,
        corpus_store=cfg.corpus_store,
        index_shards=cfg.index_shards,
        train_sample=cfg.train_sample,
        num_workers=cfg.num_workers,
    )
    encoder = instantiate(cfg.student).to(device)
    if cfg.depth > len(dataset.corpus):
        log.warning(
            "depth=%d exceeds the corpus (%d documents): every document is kept", cfg.depth, len(dataset.corpus)
        )
    log.info(
        "mining top-%d for %s: %d training queries, %d documents, device %s, precision %s",
        cfg.depth,
        dataset.name,
        len(dataset.queries),
        len(dataset.corpus),
        device,
        precision,
    )
    start = time.perf_counter()
    with autocast(precision, device):
        scores, run = evaluator.evaluate(encoder, device=device)
    seconds = time.perf_counter() - start
    run_path = write_trec_run(run, cfg.out, tag=cfg.run_name)
    share = positive_share(run, dataset)
    save_json(
        {
            "dataset": dataset.name,
            "depth": cfg.depth,
            "queries": len(run),
            "documents": len(dataset.corpus),
            "run": str(run_path),
            "metrics": scores,
            "positive_share": share,
            "seconds": seconds,
        },
        out_dir / "metrics.json",
    )
    print_metrics(
        {cfg.run_name: scores | {"positive share": share}},
        title=f"{dataset.name} training queries, top {cfg.depth} ({seconds:.1f} s)",
    )
    print(f"run: {run_path}\noutputs: {out_dir}")
    return scores


@hydra.main(version_base="1.3", config_path="../conf", config_name="mine")
@task_wrapper(metric=lambda cfg: f"R@{cfg.depth}", settings={"num_workers": count()})
def main(cfg: DictConfig) -> dict[str, float]:
    """Hydra entry point: :func:`mine`; returns ``optimized_metric`` (default ``R@<depth>``) to sweepers."""
    return mine(cfg)


if __name__ == "__main__":
    main()
