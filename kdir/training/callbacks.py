"""Lightning callbacks of kdir runs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from kdir.utils.io import save_json

log = logging.getLogger(__name__)


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

    Counts training batches × per-device batch size × devices (training queries; each brings its candidates).
    Validation time inside the loop is excluded. Logs the figures and writes them to ``<output_dir>/throughput.json``
    when ``output_dir`` is given.
    """

    def __init__(self, warmup_steps: int = 5, output_dir: str | Path | None = None):
        self.warmup_steps, self.output_dir = warmup_steps, output_dir
        self.stamps: list[float] = []
        self.paused = 0.0
        self._pause_start: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stamps, self.paused = [time.perf_counter()], 0.0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self.stamps.append(time.perf_counter() - self.paused)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pause_start is not None:
            self.paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def summary(self, queries_per_step: int) -> dict[str, float]:
        steps = len(self.stamps) - 1
        total = self.stamps[-1] - self.stamps[0] if steps else 0.0
        out = {
            "steps": steps,
            "queries_per_step": queries_per_step,
            "seconds": total,
            "queries_per_s": steps * queries_per_step / total if total else 0.0,
        }
        if steps > self.warmup_steps:
            steady = self.stamps[-1] - self.stamps[self.warmup_steps]
            out |= {
                "steady_seconds": steady,
                "steady_queries_per_s": (steps - self.warmup_steps) * queries_per_step / steady,
            }
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or len(self.stamps) < 2:
            return
        dm = getattr(trainer, "datamodule", None)
        per_step = getattr(dm, "batch_size", 0) * trainer.world_size
        s = self.summary(per_step)
        steady = s.get("steady_queries_per_s", float("nan"))
        log.info(
            "training throughput: %d batches in %.1f s, %.1f queries/s (%.1f after %d warm-up batches)",
            s["steps"],
            s["seconds"],
            s["queries_per_s"],
            steady,
            self.warmup_steps,
        )
        if self.output_dir is not None:
            save_json(s, Path(self.output_dir) / "throughput.json")
