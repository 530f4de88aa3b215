"""DistillModule: a student, an optional teacher signal and a loss, trained with Lightning.

Validation and test are end-to-end dense retrieval: the eval loaders encode queries and the corpus
(sharded across ranks), embeddings are gathered, FAISS retrieves, ir-measures scores the run, and
metrics are logged as ``val/nDCG@10`` etc.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from kdir.data.batch import TrainBatch
from kdir.data.datamodule import DistillDataModule
from kdir.errors import ConfigError, NonFiniteError
from kdir.losses.base import Candidates, Loss
from kdir.models.base import Scorer
from kdir.retrieval.evaluators import RetrievalEvaluator
from kdir.retrieval.metrics import write_trec_run
from kdir.training.callbacks import is_logging_step
from kdir.training.resume import gathered_rng_states, set_rng_states
from kdir.training.signal import TeacherSignal
from kdir.utils.io import save_json

log = logging.getLogger(__name__)


class DistillModule(pl.LightningModule):
    """Train ``student`` with ``loss`` (on teacher scores carried by the batch, when the loss uses them).

    Args:
        student: the trained model: a :class:`~kdir.models.DualEncoder`, or a ColBERT (multi-vector, evaluated
            by MaxSim).
        loss: a :class:`~kdir.losses.base.Loss` (its parameters, e.g. an embedding-matching projection, are
            optimised with the student's).
        optimizer: partial optimizer (``torch.optim.AdamW`` with lr etc.); bias/LayerNorm get no weight decay.
        warmup: linear warm-up steps (``>= 1``) or fraction of all steps (``< 1``), then linear decay to 0.
        val / test: evaluators for end-to-end retrieval at validation / test time. The module encodes the batches
            of the datamodule's evaluation loaders (queries, corpus) with ``encode_step``, gathers them over
            ranks, then ``retrieve`` s and ``score`` s the run.
        output_dir: where test run files and metrics go.
        signal: the teacher signal (``None`` for hard-label losses). Its teacher model is frozen, moved to
            this module's device, and kept out of the checkpoint and the optimizer.
        gather_across_devices: ``inbatch`` layout only: score every query against the candidate documents of
            all ranks (gradients flow through the gather). Off by default: TCT-ColBERT and CollectiveKD use the
            per-device pool. Needs a single-vector student and no teacher or a bi-encoder teacher.
        schedule: ``linear`` (warm-up then linear decay to 0), ``constant`` (warm-up then constant, as
            CollectiveKD's released training) or ``cosine`` (warm-up then half a cosine to 0 at the last step, as
            matchmaker's ``get_cosine_schedule_with_warmup``).
        finite_check: when the step's loss terms and teacher scores are checked for non-finite values. ``step``:
            every step, before the optimizer applies it (one host sync per step). ``log``: counted on the device each
            step and read on logging steps (``trainer.log_every_n_steps``) and at each epoch's end, with no per-step
            sync; the error then names the steps since the previous check, some of which were already applied.
    """

    def __init__(
        self,
        student: Scorer,
        loss: Loss,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup: float = 0.1,
        val: RetrievalEvaluator | None = None,
        test: RetrievalEvaluator | None = None,
        output_dir: str | Path | None = None,
        signal: TeacherSignal | None = None,
        gather_across_devices: bool = False,
        schedule: str = "linear",
        finite_check: str = "step",
    ):
        super().__init__()
        if schedule not in ("linear", "constant", "cosine"):
            raise ConfigError(f"schedule must be linear, constant or cosine, got {schedule!r}")
        if finite_check not in ("step", "log"):
            raise ConfigError(f"finite_check={finite_check!r}: expected step (every step) or log (on logging steps)")
        if gather_across_devices and loss.layout != "inbatch":
            raise ConfigError("gather_across_devices needs the inbatch layout")
        if getattr(loss, "matches_batch_docs", False) and not hasattr(student, "outputs_of"):
            raise ConfigError(
                "an embedding-matching term with side=docs needs a single-vector student, got "
                f"{type(student).__name__}"
            )
        self.student, self.loss, self.optimizer_factory, self.warmup = student, loss, optimizer, warmup
        self.signal = signal  # a plain attribute, not a submodule: no teacher weights in checkpoints
        self.evaluators = {"val": val, "test": test}
        self.output_dir = Path(output_dir) if output_dir else None
        self.gather_across_devices, self.schedule = gather_across_devices, schedule
        self._encoded: dict[str, list[tuple]] = {"query": [], "doc": []}
        self._rng_to_restore: dict | None = None  # generator states of a checkpoint, restored at the next step
        self.finite_check = finite_check
        self._unchecked: Tensor | None = (
            None  # finite_check=log: [terms + teacher] non-finite counts since the last read
        )
        self._checked_at = 0  # finite_check=log: the global step after the last read

    # ------------------------------------------------------------------ training
    def candidates(self, batch: TrainBatch) -> Candidates:
        """Student scores (and teacher scores, embeddings) ``[B, C]`` in the batch's candidate layout."""
        positive, false_negative = batch.positive, batch.false_negative
        embeddings: dict[str, tuple[Tensor, Tensor]] = {}
        if self.gather_across_devices and self.trainer.world_size > 1:
            student, teacher, positive, false_negative = self._gathered_scores(batch)
        elif getattr(self.loss, "matches_batch_docs", False) or getattr(self.loss, "side", None) == "docs":
            cand = batch.inputs["candidates"]
            s_q, s_all = self.student.embed(batch.inputs)
            student, s_q, s_d = self.student.outputs_of(s_q, s_all, cand, positive)
            teacher, t_q, t_d, t_all = self.signal.outputs(batch, positive, batch_docs=True)
            embeddings = {"query": (s_q, t_q), "doc": (s_d, t_d), "docs": (s_all, t_all)}
        elif self.loss.uses_embeddings:
            student, s_q, s_d = self.student.outputs(batch.inputs, positive)
            teacher, t_q, t_d = self.signal.outputs(batch, positive)
            embeddings = {"query": (s_q, t_q), "doc": (s_d, t_d)}
        else:
            student = self.student(batch.inputs)
            teacher = self.signal.scores(batch) if self.signal is not None else None
        student = student.float()
        mask = torch.ones_like(student, dtype=torch.bool) if teacher is None else ~torch.isnan(teacher)
        if teacher is not None and self.signal.mode == "cached":
            # NaN: a pair missing from the store (signal.force=true), masked; zeroed so that no loss's gradient
            # sees it (0 · NaN is NaN). Other modes keep their NaNs: a teacher that outputs one is an error.
            teacher = teacher.where(mask, 0.0)
        n_real = len(batch.rows)  # the real queries come first, then the generated ones (a host-side count)
        return Candidates(
            student, teacher, positive, mask, false_negative, self.loss.layout, batch.generated, embeddings, n_real
        )

    def _gathered_scores(self, batch: TrainBatch) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Scores against the in-batch documents of every rank (positives first over all ranks)."""
        from kdir.training.distributed import gather_inbatch

        if self.loss.uses_embeddings or not self.student.embeds:
            raise ConfigError("gather_across_devices needs a single-vector student and no embedding-matching loss")
        inputs, positive = batch.inputs, batch.positive
        n_pos = len(batch.rows)  # the real queries, each with its positive (a host-side count: no sync)
        order = inputs["candidates"][0]  # inbatch: every row lists all documents of the batch, positives first
        q, d = self.student.embed(inputs)
        docs, offset = gather_inbatch(d[order], n_pos)
        local_col = torch.arange(len(order), device=q.device, dtype=torch.float32)[:, None]
        rank = torch.full_like(local_col, float(self.global_rank))
        origin, _ = gather_inbatch(torch.cat([rank, local_col], 1), n_pos)  # (rank, local column) per global column
        mine = origin[:, 0] == self.global_rank
        false_negative = torch.zeros(len(q), len(docs), dtype=torch.bool, device=q.device)
        false_negative[:, mine] = batch.false_negative[:, origin[mine, 1].long()]
        teacher = None
        if self.signal is not None:
            t_q, t_d = self.signal.embed(batch)
            t_docs, _ = gather_inbatch(t_d[order], n_pos)
            teacher = (t_q @ t_docs.T).float()
        positive = torch.where(positive >= 0, positive + offset, positive)
        return q @ docs.T, teacher, positive, false_negative

    def training_step(self, batch: TrainBatch, batch_idx: int) -> Tensor | dict:
        """The loss (and its terms, logged as ``train/loss/<name>``).

        On logging steps (``trainer.log_every_n_steps``) it also returns the step's detached ``candidates`` and the
        ``masked_fraction`` of teacher pairs (read in the step's finite check: no extra host sync) for
        :class:`~kdir.training.callbacks.KDDiagnostics`.
        """
        c = self.candidates(batch)
        terms = self.loss.terms(c)
        loss = sum(terms.values())
        diagnose = is_logging_step(self.trainer)
        masked = (~c.mask).sum() if diagnose and c.teacher is not None else None
        if self.finite_check == "step":
            n_masked = self._check_finite(c, terms, batch_idx, masked)
        else:
            n_masked = self._count_nonfinite(c, terms, batch_idx, masked, read=diagnose)
        bs = len(c)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/loss/{name}", value, batch_size=bs)
        if not diagnose:
            return loss
        out = {"loss": loss, "candidates": replace(c, student=c.student.detach(), embeddings={})}
        if n_masked is not None:
            out["masked_fraction"] = n_masked / c.mask.numel()
        return out

    def _nonfinite_counts(self, c: Candidates, terms: dict[str, Tensor]) -> list[Tensor]:
        """0-d counts of non-finite values: one per loss term, then the teacher's scores (when there are any)."""
        checks = [(~torch.isfinite(v.detach())).sum() for v in terms.values()]
        if self.signal is not None:
            checks.append(self.signal.nonfinite(c.teacher))
        return checks

    def _count_nonfinite(
        self, c: Candidates, terms: dict[str, Tensor], batch_idx: int, count: Tensor | None, read: bool
    ) -> int | None:
        """``finite_check=log``: add this step's non-finite counts up on the device; on a reading step, read them
        (with ``count``, in one host sync) and raise as :meth:`_check_finite` does, naming the steps since the last
        read."""
        counts = torch.stack(self._nonfinite_counts(c, terms))
        same = self._unchecked is not None and self._unchecked.shape == counts.shape
        self._unchecked = self._unchecked + counts if same else counts
        if not read:
            return None
        return self._read_nonfinite(c, terms, batch_idx, count)

    def _read_nonfinite(
        self,
        c: Candidates | None,
        terms: dict[str, Tensor],
        batch_idx: int,
        count: Tensor | None = None,
        last: int | None = None,
    ) -> int | None:
        """Read the counts gathered since the last read (``finite_check=log``), up to global step ``last`` (this
        step's by default); raise if any is not zero."""
        if self._unchecked is None:
            return None if count is None else int(count)
        values = torch.cat([self._unchecked, count.reshape(1)]) if count is not None else self._unchecked
        bad = values.tolist()
        value = bad.pop() if count is not None else None
        last = self.global_step if last is None else last
        first, self._checked_at, self._unchecked = self._checked_at, last + 1, None
        if any(bad):
            if first == last and c is not None:  # only this step: the error names it, with an example
                self._raise_nonfinite(c, terms, batch_idx, bad)
            self._raise_nonfinite(None, {}, batch_idx, bad, f"global steps {first}-{last}")
        return value

    def on_train_epoch_end(self) -> None:
        if self.finite_check == "log" and self._unchecked is not None:
            self._read_nonfinite(None, {}, -1, last=self.global_step - 1)

    def on_validation_start(self) -> None:
        # finite_check=log: the steps since the last read are checked before they are validated (and checkpointed)
        if self.finite_check == "log" and self._unchecked is not None and self.trainer.state.fn == "fit":
            self._read_nonfinite(None, {}, -1, last=self.global_step - 1)

    def _check_finite(
        self, c: Candidates, terms: dict[str, Tensor], batch_idx: int, count: Tensor | None = None
    ) -> int | None:
        """Stop before training on a non-finite teacher score or loss term (one host sync per step).

        Raises :class:`~kdir.errors.NonFiniteError` naming the step and the teacher or the loss terms; it ends the
        run before anything (test results, metrics, the exported student) is written. ``count``, a 0-d integer
        tensor, is read in the same sync: its value is returned (``None`` without one).
        """
        checks = self._nonfinite_counts(c, terms)
        if count is not None:
            checks.append(count)
        bad = torch.stack(checks).tolist()
        value = bad.pop() if count is not None else None
        if any(bad):
            self._raise_nonfinite(c, terms, batch_idx, bad)
        return value

    def _raise_nonfinite(
        self, c: Candidates | None, terms: dict[str, Tensor], batch_idx: int, bad: list[int], steps: str | None = None
    ) -> None:
        """The error for the non-finite counts ``bad``: the loss terms in order, then the teacher's scores when the
        batch had any. ``steps`` (``finite_check=log``) names the steps since the last read; ``c`` / ``terms`` are
        the current step's (``None`` / empty at an epoch's end)."""
        where = steps or f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        n_terms = len(bad) - (self.signal is not None)  # a run with a teacher signal has teacher scores every step
        if n_terms < len(bad) and bad[-1]:
            if c is not None and c.teacher is not None:
                raise self.signal.nonfinite_error(c.teacher, where)
            raise self.signal.nonfinite_error(None, where, count=bad[-1])
        if terms:
            values = ", ".join(f"{name}={v.detach().float().mean().item():g}" for name, v in terms.items())
        else:
            values = f"{sum(bad[:n_terms])} non-finite loss values"
        lr = self.trainer.optimizers[0].defaults.get("lr") if self.trainer.optimizers else None
        hint = f" (e.g. optim.optimizer.lr={lr / 10:g})" if isinstance(lr, (int, float)) else ""
        raise NonFiniteError(
            f"{where}: the training loss is not finite ({values}); training stopped, no results written. "
            f"If training diverged, lower the learning rate{hint}"
        )

    def on_fit_start(self) -> None:
        # Hugging Face loads models in eval mode and Lightning keeps the modes it finds: train with dropout
        # (a frozen document tower stays in eval mode, see DualEncoder.train; the teacher signal is never trained)
        # (the stream's epoch is set when each epoch starts: here a resumed run's loops are not restored yet)
        self.student.train()
        if self.signal is not None:
            self.signal.to(self.device)

    def on_train_end(self) -> None:
        if self.signal is not None:
            self.signal.flush()

    def on_train_epoch_start(self) -> None:
        self._set_epoch()

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save every rank's random generator states with the checkpoint (a collective: all ranks save)."""
        checkpoint["rng_states"] = gathered_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore this rank's generator states where the interrupted run stood when it saved them.

        Saved at the end of an epoch, they are restored now: the loader of the next epoch draws its seed from torch's
        generator before the first step, in the resumed run as in the uninterrupted one. Saved mid-epoch, they are
        restored right before the resumed run's first step (:meth:`on_train_batch_start`): whatever the resumed run
        draws while it sets itself up (its loader's seed) does not count.
        """
        states = checkpoint.get("rng_states") or []
        self._rng_to_restore = states[self.global_rank] if self.global_rank < len(states) else None
        stream = checkpoint.get(DistillDataModule.__qualname__) or {}
        if self._rng_to_restore is not None and stream.get("steps_done") == 0 and self.trainer.state.fn == "fit":
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_start(self, batch: TrainBatch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # a mid-epoch checkpoint's states, right before the first step
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def _set_epoch(self) -> None:
        dm = self.trainer.datamodule
        if isinstance(dm, DistillDataModule):
            dm.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in [*self.student.parameters(), *self.loss.parameters()]:
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        opt = self._optimizer_factory()([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if getattr(opt, "_step_supports_amp_scaling", False) and self._clips_mixed_precision():
            raise ConfigError(
                f"optim.optimizer.fused=true with trainer.precision={self.trainer.precision} and "
                f"trainer.gradient_clip_val={self.trainer.gradient_clip_val}: Lightning does not clip the gradients "
                "of a fused optimizer under mixed precision; set optim.optimizer.fused=auto (or false)"
            )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        if self.schedule == "constant":
            sched = get_constant_schedule_with_warmup(opt, warmup)
        elif self.schedule == "cosine":
            sched = get_cosine_schedule_with_warmup(opt, warmup, max(total, 1))
        else:
            sched = get_linear_schedule_with_warmup(opt, warmup, max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _clips_mixed_precision(self) -> bool:
        """Whether the trainer clips gradients under mixed precision (``16-mixed``, ``bf16-mixed``)."""
        return "mixed" in str(self.trainer.precision) and bool(self.trainer.gradient_clip_val)

    def _optimizer_factory(self) -> Callable[..., torch.optim.Optimizer]:
        """The optimizer, with ``fused=auto`` decided: fused (one kernel per step for all parameters) unless the
        trainer clips gradients under mixed precision, which Lightning refuses for fused optimizers; then torch's
        default (foreach on CUDA)."""
        factory = self.optimizer_factory
        if isinstance(factory, functools.partial) and factory.keywords.get("fused") == "auto":
            return functools.partial(factory, fused=None if self._clips_mixed_precision() else True)
        return factory

    # ---------------------------------------------------------------- evaluation
    def _encode_step(self, batch: dict, dataloader_idx: int) -> None:
        side = "query" if dataloader_idx == 0 else "doc"
        evaluator = self.evaluators["test" if self.trainer.testing else "val"]
        self._encoded[side].append((batch["rows"], *evaluator.encode_step(self.student, batch["tokens"], side)))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._encode_step(batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._encode_step(batch, dataloader_idx)

    def _gathered(self, side: str, n: int) -> tuple[Tensor, ...]:
        """This side's encodings of all ranks, in dataset row order (one tensor, or embeddings + mask)."""
        parts = [torch.cat(p) for p in zip(*self._encoded[side])]
        rows, values = parts[0], parts[1:]
        if self.trainer.world_size > 1:  # equal shards per rank (DistributedSampler pads)
            rows = self.all_gather(rows).reshape(-1)
            values = [self.all_gather(v).reshape(-1, *v.shape[1:]) for v in values]
        out = []
        for v in values:
            full = torch.zeros(n, *v.shape[1:], dtype=v.dtype, device=v.device)
            full[rows.to(v.device)] = v
            out.append(full)
        return tuple(out)

    def _finish_eval(self, stage: str) -> None:
        evaluator = self.evaluators[stage]
        try:
            if evaluator is None or self.trainer.sanity_checking or not self._encoded["doc"]:
                return
            ds = evaluator.dataset
            q, d = self._gathered("query", len(ds.queries)), self._gathered("doc", len(ds.corpus))
            run = evaluator.retrieve(q, d, self.student)
            metrics = evaluator.score(run)
            self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=stage == "val")
            if stage == "test" and self.output_dir is not None and self.trainer.is_global_zero:
                write_trec_run(run, self.output_dir / "runs" / "test.trec", tag="kdir")
                save_json(metrics, self.output_dir / "test_metrics.json")
        finally:
            self._encoded = {"query": [], "doc": []}

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")
