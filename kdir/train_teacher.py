"""Train a teacher with hard labels: ``python -m kdir.train_teacher teacher=<cross_encoder|colbert|bi_encoder>``.

Softmax cross-entropy of the labelled positive against its negatives (cross-encoders: ``pairwise``
``[B, 1+n]``) or against every document of the batch (bi-encoders / ColBERT: ``inbatch``), the logits divided by
``temperature``, or multiplied by ``batch_logit_scale × data.batch_size`` (TCT-ColBERT trains its ColBERT teacher
with the logits × 4 × the per-core batch, ``castorini/tct_colbert`` ``train/model_fn.py:129``, ``train/loss.py:76``:
×48 at 12 per core). The optimiser and its schedule are the ``optim`` option's (``optim=tct``: TCT-ColBERT's AdamW,
10K warm-up, linear decay; ``optim=colbert_const``: CollectiveKD's constant 3e-6). The trained teacher is saved as
an HF-format folder (``<output_dir>/teacher``) and evaluated with ir-measures by the ``teacher_eval`` evaluator
(re-ranking a first-stage run, or end-to-end retrieval).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

import kdir  # noqa: F401  (registers config resolvers)
from kdir.losses import InfoNCE
from kdir.models import CrossEncoder
from kdir.retrieval.evaluators import evaluate_and_save
from kdir.training.module import DistillModule
from kdir.utils import Setting, instantiate_group, task_wrapper

log = logging.getLogger("kdir.train_teacher")


def train_teacher(cfg: DictConfig) -> dict[str, float]:
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    model = instantiate(cfg.teacher)
    layout = cfg.layout or ("pairwise" if isinstance(model, CrossEncoder) else "inbatch")
    loss = InfoNCE(layout=layout, temperature=teacher_temperature(cfg))
    log.info("training %s with %r", type(model).__name__, loss)
    datamodule = instantiate(cfg.data).attach(model.preparer(), layout)
    module = DistillModule(
        model,
        loss,
        instantiate(cfg.optim.optimizer),
        cfg.optim.warmup,
        output_dir=out,
        schedule=cfg.optim.get("schedule", "linear"),
    )
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, enable_checkpointing=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    metrics: dict[str, float] = {}
    if trainer.is_global_zero:
        model.save_pretrained(out / "teacher")
        log.info("teacher saved to %s", out / "teacher")
        if cfg.get("teacher_eval"):
            model = model.to(trainer.strategy.root_device)  # fit ends on the CPU
            metrics = evaluate_and_save(
                instantiate(cfg.teacher_eval), model, out, cfg.run_name, train_seconds=train_seconds
            )
    return metrics


def teacher_temperature(cfg: DictConfig) -> float:
    """The softmax temperature of the hard-label loss: ``temperature``, or ``1 / (batch_logit_scale × batch size)``."""
    scale = cfg.get("batch_logit_scale")
    if scale is None:
        return float(cfg.temperature)
    return 1.0 / (float(scale) * int(cfg.data.batch_size))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_teacher")
@task_wrapper(
    metric="nDCG@10",
    settings={
        "temperature": Setting(float, 0, strict=True),
        "batch_logit_scale": Setting(float, 0, strict=True, also=(None,)),
    },
)
def main(cfg: DictConfig) -> dict[str, float]:
    """Hydra entry point: :func:`train_teacher`; returns ``optimized_metric`` (default nDCG@10) to sweepers."""
    return train_teacher(cfg)


if __name__ == "__main__":
    main()
