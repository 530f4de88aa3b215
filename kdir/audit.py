"""The teacher audit alone: ``python -m kdir.audit [the overrides of python -m kdir.run]``.

Composes ``conf/run.yaml`` as ``kdir.run`` does, builds the student, the teacher and its signal, the training data
and the validation evaluator, and runs only :func:`kdir.training.audit.audit` (no training): the table of the
teacher against the untrained student, the warning when the teacher is not above it, and ``audit.json`` in the run
folder. ``audit.depth`` / ``audit.max_queries`` / ``audit.batch_size`` as in a training run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import kdir  # noqa: F401  (registers config resolvers)
from kdir.errors import KdirError
from kdir.training.audit import run_audit
from kdir.utils import resolve_device, task_wrapper

log = logging.getLogger("kdir.audit")


def audit(cfg: DictConfig) -> dict:
    """Build what ``kdir.run`` builds before training, then audit the teacher; returns the audit's record."""
    if not cfg.get("signal"):
        raise KdirError(
            "kdir.audit needs a teacher signal: choose a teacher, e.g. teacher=quickstart or teacher=colbert"
        )
    out = Path(cfg.paths.output_dir)
    accelerator = str(cfg.get("trainer", {}).get("accelerator", "auto"))
    device = resolve_device("cpu" if accelerator == "cpu" else "auto")
    student = instantiate(cfg.student)
    teacher = instantiate(cfg.teacher) if cfg.get("teacher") else None
    signal = instantiate(cfg.signal, model=teacher)
    val = instantiate(cfg.eval.val) if cfg.get("eval") and cfg.eval.get("val") else None
    datamodule = instantiate(cfg.data)
    signal.bind(datamodule.train, datamodule.generated)
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    result = run_audit(
        student, signal, datamodule.train, datamodule.examples, val, out, (), cfg.get("audit"),
        name=choices.get("teacher"), seed=cfg.seed, device=device, progress=False,
    )  # fmt: skip
    print(f"outputs: {out}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
@task_wrapper
def main(cfg: DictConfig) -> dict:
    """Hydra entry point: :func:`audit`."""
    return audit(cfg)


if __name__ == "__main__":
    main()
