"""DistillModule: a student, an optional teacher signal and a loss, trained with Lightning.

Validation and test are end-to-end dense retrieval: the eval loaders encode queries and the corpus
(sharded across ranks), embeddings are gathered, FAISS retrieves, ir-measures scores the run, and
metrics are logged as ``val/nDCG@10`` etc.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from transformers import get_linear_schedule_with_warmup

from kdir.evaluation import RetrievalEvaluator
from kdir.losses.base import Candidates, Loss
from kdir.metrics import write_trec_run
from kdir.students.dual_encoder import DualEncoder
from kdir.teachers.signal import TeacherSignal

log = logging.getLogger(__name__)


class DistillModule(pl.LightningModule):
    """Train ``student`` with ``loss`` (on teacher scores carried by the batch, when the loss uses them).

    Args:
        student: the dual encoder being trained.
        loss: a :class:`~kdir.losses.base.Loss`.
        optimizer: partial optimizer (``torch.optim.AdamW`` with lr etc.); bias/LayerNorm get no weight decay.
        warmup: linear warm-up steps (``>= 1``) or fraction of all steps (``< 1``), then linear decay to 0.
        val / test: evaluators for end-to-end retrieval at validation / test time.
        output_dir: where test run files and metrics go.
        signal: the teacher signal (``None`` for hard-label losses). Its teacher model is frozen, moved to
            this module's device, and kept out of the checkpoint and the optimizer.
    """

    def __init__(self, student: DualEncoder, loss: Loss, optimizer: Callable[..., torch.optim.Optimizer],
                 warmup: float = 0.1, val: RetrievalEvaluator | None = None, test: RetrievalEvaluator | None = None,
                 output_dir: str | Path | None = None, signal: TeacherSignal | None = None):  # fmt: skip
        super().__init__()
        self.student, self.loss, self.optimizer_factory, self.warmup = student, loss, optimizer, warmup
        self.signal = signal  # a plain attribute, not a submodule: no teacher weights in checkpoints
        self.evaluators = {"val": val, "test": test}
        self.output_dir = Path(output_dir) if output_dir else None
        self._encoded: dict[str, list[tuple[Tensor, Tensor]]] = {"query": [], "doc": []}

    # ------------------------------------------------------------------ training
    def candidates(self, batch: dict) -> Candidates:
        """Student scores (and teacher scores) ``[B, C]`` in the batch's candidate layout."""
        student = self.student(batch["inputs"]).float()
        teacher = self.signal.scores(batch) if self.signal is not None else None
        mask = torch.ones_like(student, dtype=torch.bool) if teacher is None else ~torch.isnan(teacher)
        return Candidates(student, teacher, batch["positive"], mask, batch["false_negative"], self.loss.layout)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        c = self.candidates(batch)
        loss = self.loss(c)
        bs = c.student.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log(f"train/loss/{self.loss.name}", loss, batch_size=bs)
        return loss

    def on_fit_start(self) -> None:
        self._set_epoch()
        if self.signal is not None:
            self.signal.to(self.device)

    def on_train_end(self) -> None:
        if self.signal is not None:
            self.signal.flush()

    def on_train_epoch_start(self) -> None:
        self._set_epoch()

    def _set_epoch(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.student.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        opt = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        sched = get_linear_schedule_with_warmup(opt, warmup, max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- evaluation
    def _encode_step(self, batch: dict, dataloader_idx: int) -> None:
        side = "query" if dataloader_idx == 0 else "doc"
        self._encoded[side].append((batch["rows"], self.student.encode(batch["tokens"], side).float()))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._encode_step(batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._encode_step(batch, dataloader_idx)

    def _gathered(self, side: str, n: int) -> Tensor:
        rows = torch.cat([r for r, _ in self._encoded[side]])
        emb = torch.cat([e for _, e in self._encoded[side]])
        if self.trainer.world_size > 1:  # equal shards per rank (DistributedSampler pads)
            rows = self.all_gather(rows).reshape(-1)
            emb = self.all_gather(emb).reshape(-1, emb.shape[-1])
        full = torch.zeros(n, emb.shape[-1], dtype=torch.float32)
        full[rows.cpu()] = emb.cpu()
        return full

    def _finish_eval(self, stage: str) -> None:
        evaluator = self.evaluators[stage]
        try:
            if evaluator is None or self.trainer.sanity_checking or not self._encoded["doc"]:
                return
            ds = evaluator.dataset
            q, d = self._gathered("query", len(ds.queries)), self._gathered("doc", len(ds.corpus))
            run = evaluator.retrieve(q.numpy(), d.numpy())
            metrics = evaluator.score(run)
            self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=stage == "val")
            if stage == "test" and self.output_dir is not None and self.trainer.is_global_zero:
                write_trec_run(run, self.output_dir / "runs" / "test.trec", tag="kdir")
                (self.output_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
        finally:
            self._encoded = {"query": [], "doc": []}

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")
