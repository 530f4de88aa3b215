"""Retrieval evaluation: ``python -m kdir.evaluate student=<option> eval=<option> [split=test]``.

Encode the corpus and queries, FAISS top-k (exact inner product unless ``eval.<split>.index_factory``
says otherwise; ``eval.<split>.nprobe`` / ``ef_search`` tune IVF / HNSW search; ``eval.<split>.index_path`` saves the
corpus index and reuses it, without encoding the corpus, for the same model and corpus), write a TREC run, score it
with ir-measures, print a table, save ``metrics.json``. A bad index setting stops before anything is encoded.
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
from kdir.errors import ConfigError, KdirError
from kdir.retrieval.encode import autocast, resolve_precision
from kdir.retrieval.metrics import write_trec_run
from kdir.utils import print_metrics, resolve_device, save_json, task_wrapper
from kdir.utils.settings import count

log = logging.getLogger("kdir.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    out = Path(cfg.paths.output_dir)
    if not cfg.eval.get(cfg.split):
        raise KdirError(f"eval={cfg.eval} has no {cfg.split!r} split (choose split=val or split=test)")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    evaluator = instantiate(cfg.eval[cfg.split], num_workers=cfg.num_workers)
    encoder = instantiate(cfg.student).to(device)
    log.info(
        "evaluating on %s: %d queries, %d documents, device %s, precision %s",
        evaluator.dataset.name,
        len(evaluator.dataset.queries),
        len(evaluator.dataset.corpus),
        device,
        precision,
    )
    try:  # the index settings, before anything is encoded
        if hasattr(evaluator, "check_model"):
            evaluator.check_model(encoder, device)
    except ConfigError as e:
        raise ConfigError(f"eval.{cfg.split}.{e}") from None
    start = time.perf_counter()
    with autocast(precision, device):
        metrics, run = evaluator.evaluate(encoder, device=device)
    seconds = time.perf_counter() - start
    write_trec_run(run, out / "run.trec", tag=cfg.run_name)
    save_json({"dataset": evaluator.dataset.name, "metrics": metrics, "seconds": seconds}, out / "metrics.json")
    print_metrics({cfg.run_name: metrics}, title=f"{evaluator.dataset.name} ({seconds:.1f} s)")
    print(f"outputs: {out}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@task_wrapper(settings={"num_workers": count()})
def main(cfg: DictConfig) -> dict[str, float]:
    """Hydra entry point: :func:`evaluate`; ``optimized_metric`` names one of its measures."""
    return evaluate(cfg)


if __name__ == "__main__":
    main()
