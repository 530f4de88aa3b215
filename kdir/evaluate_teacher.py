"""Evaluate a teacher without training it: ``python -m kdir.evaluate_teacher teacher=<option> teacher_eval=<option>``.

Re-ranks a first-stage run (``RerankEvaluator``) or retrieves end to end (ColBERT, ``MaxSimEvaluator``) with any
teacher of the ``teacher`` group, e.g. the collective ColBERT with the expansions of the evaluated queries;
writes ``run.trec`` and ``metrics.json`` and prints the table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import kdir  # noqa: F401  (registers config resolvers)
from kdir.errors import KdirError
from kdir.retrieval.evaluators import evaluate_and_save
from kdir.utils import resolve_device, task_wrapper

log = logging.getLogger("kdir.evaluate_teacher")


def evaluate_teacher(cfg: DictConfig) -> dict[str, float]:
    out = Path(cfg.paths.output_dir)
    if not cfg.get("teacher_eval"):
        raise KdirError("choose how to evaluate the teacher: teacher_eval=rerank_scifact|maxsim_scifact|...")
    evaluator = instantiate(cfg.teacher_eval)
    device = resolve_device(cfg.device)
    model = instantiate(cfg.teacher).freeze().to(device)
    log.info("evaluating %s on %s (%s)", type(model).__name__, evaluator.dataset.name, device)
    return evaluate_and_save(evaluator, model, out, cfg.run_name, cfg.progress)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate_teacher")
@task_wrapper(metric="nDCG@10")
def main(cfg: DictConfig) -> dict[str, float]:
    """Hydra entry point: :func:`evaluate_teacher`; returns ``optimized_metric`` (default nDCG@10) to sweepers."""
    return evaluate_teacher(cfg)


if __name__ == "__main__":
    main()
