"""Lightning callbacks of kdir runs: step checkpoints, training throughput, per-step distillation diagnostics."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from kdir.errors import ConfigError
from kdir.training.diagnostics import grad_norm, kd_statistics
from kdir.utils.io import save_json

log = logging.getLogger(__name__)


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training step's logged values to the loggers (``trainer.log_every_n_steps``).

    The same answer in ``training_step``, ``on_before_optimizer_step`` and ``on_train_batch_end`` of one step.
    """
    if trainer.fast_dev_run:
        return True
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(connector, "should_update_logs"):
        return bool(connector.should_update_logs)
    n = trainer.log_every_n_steps
    return bool(n) and (trainer.global_step + 1) % n == 0


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every ``every_n_train_steps`` optimizer steps, except on a step that validation follows.

    Lightning resumes a checkpoint saved at the end of such a step after that validation, which then never runs:
    its metrics, and its say in the best checkpoint, would be missing from the resumed run. The checkpoint saved
    after the validation (``model_checkpoint``'s ``last.ckpt``) stands in for it. Saved mid-epoch, a checkpoint
    resumes exactly: the stream's position is the datamodule's state, the random generators the module's.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not self._validation_follows(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @staticmethod
    def _validation_follows(trainer: pl.Trainer) -> bool:
        loop = trainer.fit_loop
        try:
            return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))
        except AttributeError:  # a Lightning without that method: validation follows an epoch's last batch
            return bool(trainer.enable_validation and loop.epoch_loop.batch_progress.is_last_batch)


class Throughput(pl.Callback):
    """Training throughput: wall time of the training loop, queries/s overall and after ``warmup_steps``.

    Counts the queries each step actually trained: the batch's real queries (``len(batch.rows)``, a shape read on
    the host, no device sync) × devices (every rank trains an equal share of the stream), so batches the stream
    cuts smaller than ``data.batch_size`` count as they are. Rows with the generated queries added to each batch
    (``len(batch)``) are counted too, apart. A batch without ``rows`` counts ``data.batch_size`` × devices.
    Validation time inside the loop is excluded. Logs ``train/queries_per_s`` on each logging step (over the steps
    since the previous one), and at the end the figures of the whole loop, also written to
    ``<output_dir>/throughput.json`` when ``output_dir`` is given: ``steps``, ``seconds``, ``queries`` (real
    queries trained), ``queries_per_s``, ``rows`` / ``rows_per_s`` (real + generated), ``queries_per_step`` (the
    configured ``data.batch_size`` × devices), ``queries_per_step_mean`` (the real mean), and after the warm-up
    ``steady_seconds``, ``steady_queries``, ``steady_queries_per_s``, ``steady_rows_per_s``.
    """

    def __init__(self, warmup_steps: int = 5, output_dir: str | Path | None = None):
        self.warmup_steps, self.output_dir = warmup_steps, output_dir
        self.stamps: list[float] = []
        self.counts: list[tuple[int, int] | None] = []  # (real queries, rows) per step; None: not a TrainBatch
        self.paused = 0.0
        self._logged_at = 0  # the stamp of the previous logging step
        self._pause_start: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stamps, self.counts, self.paused, self._logged_at = [time.perf_counter()], [], 0.0, 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self.stamps.append(time.perf_counter() - self.paused)
        rows = getattr(batch, "rows", None)
        world = getattr(trainer, "world_size", 1)
        self.counts.append(None if rows is None else (len(rows) * world, len(batch) * world))
        if is_logging_step(trainer) and trainer.loggers:  # queries/s since the previous logging step
            seconds = self.stamps[-1] - self.stamps[self._logged_at]
            if seconds > 0:
                queries = self._queries(self._logged_at, len(self.counts), _nominal(trainer))[0]
                pl_module.log("train/queries_per_s", queries / seconds, on_step=True, on_epoch=False)
            self._logged_at = len(self.stamps) - 1

    def _queries(self, start: int, stop: int, nominal: int) -> tuple[int, int]:
        """(real queries, rows) of steps ``start`` to ``stop`` (0-based); ``nominal`` per step where unknown, and
        for steps stamped without counts."""
        real = rows = 0
        for i in range(start, stop):
            c = self.counts[i] if i < len(self.counts) else None
            q, r = c if c is not None else (nominal, nominal)
            real, rows = real + q, rows + r
        return real, rows

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pause_start is not None:
            self.paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def summary(self, queries_per_step: int) -> dict[str, float]:
        """The loop's figures; ``queries_per_step``: the configured per-step batch, used for steps without counts."""
        steps = len(self.stamps) - 1
        total = self.stamps[-1] - self.stamps[0] if steps else 0.0
        queries, rows = self._queries(0, steps, queries_per_step)
        out = {
            "steps": steps,
            "queries_per_step": queries_per_step,
            "queries_per_step_mean": queries / steps if steps else 0.0,
            "queries": queries,
            "rows": rows,
            "seconds": total,
            "queries_per_s": queries / total if total else 0.0,
            "rows_per_s": rows / total if total else 0.0,
        }
        if steps > self.warmup_steps:
            steady = self.stamps[-1] - self.stamps[self.warmup_steps]
            q, r = self._queries(self.warmup_steps, steps, queries_per_step)
            out |= {
                "steady_seconds": steady,
                "steady_queries": q,
                "steady_queries_per_s": q / steady,
                "steady_rows_per_s": r / steady,
            }
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or len(self.stamps) < 2:
            return
        s = self.summary(_nominal(trainer))
        steady = s.get("steady_queries_per_s", float("nan"))
        log.info(
            "training throughput: %d batches (%d queries) in %.1f s, %.1f queries/s (%.1f after %d warm-up batches)",
            s["steps"],
            s["queries"],
            s["seconds"],
            s["queries_per_s"],
            steady,
            self.warmup_steps,
        )
        if self.output_dir is not None:
            save_json(s, Path(self.output_dir) / "throughput.json")


def _nominal(trainer: pl.Trainer) -> int:
    """The configured queries per step: ``data.batch_size`` × devices."""
    return getattr(getattr(trainer, "datamodule", None), "batch_size", 0) * getattr(trainer, "world_size", 1)


class KDDiagnostics(pl.Callback):
    """Per-step diagnostics of a distillation run, on logging steps only (``trainer.log_every_n_steps``).

    Logs ``train/lr`` (the first parameter group's), ``train/grad_norm`` (total L2 norm of the gradients before
    clipping, after AMP unscaling) and, from the step's candidates (returned by
    :meth:`~kdir.training.module.DistillModule.training_step` on logging steps), ``train/kd/<name>`` for each
    statistic of :func:`~kdir.training.diagnostics.kd_statistics`: teacher–student Spearman ρ and top-1 agreement,
    score mean/std and positive-vs-negatives margins of student and teacher, the fraction of masked teacher pairs.
    All are tensors computed on the device under ``no_grad``, read by Lightning when it writes the step's logs.
    (Per-term losses, ``train/loss/<name>``, are logged by the module; ``train/queries_per_s`` by
    :class:`Throughput`.)

    Args:
        masked_warning: log a warning (once per run) when the fraction of a logging step's candidate pairs without
            a teacher score exceeds it (missing from the score store under ``signal.force=true``: every teacher-based
            loss drops them); ``null``: never.
        histograms_every_n_logs: with a W&B logger, also log histograms of the student's and the teacher's scores
            on the first logging step and every this many after (``null``: never; one host copy each time).
    """

    def __init__(self, masked_warning: float | None = 0.5, histograms_every_n_logs: int | None = 25):
        if masked_warning is not None and not 0 <= masked_warning <= 1:
            raise ConfigError(f"masked_warning must be a fraction in [0, 1] or null, got {masked_warning!r}")
        if histograms_every_n_logs is not None and histograms_every_n_logs < 1:
            raise ConfigError(f"histograms_every_n_logs must be >= 1 or null, got {histograms_every_n_logs!r}")
        self.masked_warning, self.histograms_every_n_logs = masked_warning, histograms_every_n_logs
        self._warned, self._logs = False, 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not (trainer.loggers and is_logging_step(trainer)):
            return
        norm = grad_norm(p.grad for group in optimizer.param_groups for p in group["params"])
        if norm is not None:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        pl_module.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, Mapping) or "candidates" not in outputs:
            return  # not a logging step (or not a DistillModule)
        self._check_masked(outputs.get("masked_fraction"), trainer.global_step)
        if not trainer.loggers:
            return
        c = outputs["candidates"]
        for name, value in kd_statistics(c.student, c.teacher, c.positive, c.mask, c.false_negative).items():
            pl_module.log(f"train/kd/{name}", value, on_step=True, on_epoch=False)
        every = self.histograms_every_n_logs
        if every and self._logs % every == 0:
            self._histograms(trainer, c)
        self._logs += 1

    def _check_masked(self, fraction: float | None, step: int) -> None:
        if fraction is None or self._warned or self.masked_warning is None or fraction <= self.masked_warning:
            return
        self._warned = True
        log.warning(
            "step %d: %.0f%% of the batch's candidate pairs have no teacher score (masked, above "
            "callbacks.kd_diagnostics.masked_warning=%g): the teacher-based loss learns from the rest only; the score "
            "store (signal.store) lacks these training candidates (this warning is shown once)",
            step,
            100 * fraction,
            self.masked_warning,
        )

    @staticmethod
    def _histograms(trainer: pl.Trainer, c: Any) -> None:
        """W&B histograms of the step's student and teacher scores (those the teacher scored)."""
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not loggers or not trainer.is_global_zero:
            return
        import wandb

        sides = {"student": c.student} | ({"teacher": c.teacher} if c.teacher is not None else {})
        mask = c.mask if c.teacher is not None else torch.ones_like(c.student, dtype=torch.bool)
        data = {f"train/hist/{k}": wandb.Histogram(v[mask].float().cpu().numpy()) for k, v in sides.items()}
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs this step's values at
        for lg in loggers:
            lg.experiment.log(data | {"trainer/global_step": step})
