"""LightningDataModule: streamed training batches (+ teacher scores) and retrieval-evaluation loaders."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader

from kdir.data.collate import TrainCollator
from kdir.data.dataset import IRDataset
from kdir.data.examples import Examples, QrelsExamples, TripleExamples
from kdir.data.stream import ExampleStream

if TYPE_CHECKING:
    from kdir.data.collate import Preparer
    from kdir.data.generated import GeneratedQueries
    from kdir.losses.base import Layout
    from kdir.retrieval.evaluators import RetrievalEvaluator
    from kdir.training.signal import TeacherSignal

log = logging.getLogger(__name__)


class DistillDataModule(pl.LightningDataModule):
    """Training stream over ``train`` + evaluation over ``val`` / ``test`` evaluators.

    Args:
        train: the training split.
        examples: how training examples are formed (``QrelsExamples`` or ``TripleExamples``).
        batch_size: queries per batch and device.
        num_workers: dataloader workers per device (each takes its own share of the stream).
        seed: seed of the example order and negative sampling.
        model / layout / signal: set by ``kdir.run``: the trained model (its ``prepare`` tokenises), the
            candidate layout and the teacher signal (``None``: no teacher scores in the batch).
        val / test: evaluators, set by ``kdir.run`` from the ``eval`` config.
        generated: unlabelled generated queries (``kdir.generate_queries``), added to every batch as
            ``generated_per_batch`` extra rows (inbatch layout; they never get hard labels).
    """

    def __init__(
        self,
        train: IRDataset,
        examples: QrelsExamples | TripleExamples,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 42,
        shuffle: bool = True,
        model: Preparer | None = None,
        layout: Layout = "pairwise",
        signal: TeacherSignal | None = None,
        val: RetrievalEvaluator | None = None,
        test: RetrievalEvaluator | None = None,
        generated: GeneratedQueries | None = None,
        generated_per_batch: int = 0,
    ):
        super().__init__()
        self.generated, self.generated_per_batch = generated, generated_per_batch
        self.train, self.batch_size, self.num_workers = train, batch_size, num_workers
        self.seed, self.shuffle, self.model, self.layout = seed, shuffle, model, layout
        self.examples: Examples = examples.build(train)
        self.signal = signal.bind(train) if signal is not None else None
        self.val, self.test = val, test
        self.stream: ExampleStream | None = None
        log.info(
            "train: %s, %d examples, %d negatives each; teacher signal: %s",
            train.name,
            len(self.examples),
            self.examples.n_negatives,
            self.signal.mode if self.signal else "none",
        )

    def _world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        if self.stream is not None:
            self.stream.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        if self.model is None:
            raise RuntimeError("DistillDataModule needs the trained model (for tokenisation): pass model=...")
        rank, world = self._world()
        epoch = self.stream.epoch if self.stream is not None else 0
        self.stream = ExampleStream(self.examples, self.batch_size, self.seed, self.shuffle, rank, world)
        self.stream.set_epoch(epoch)
        collate = TrainCollator(
            self.train, self.model, self.layout, self.signal, self.generated, self.generated_per_batch, self.seed
        )
        return DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=False,
            pin_memory=False,
        )

    def _eval_loaders(self, evaluator: RetrievalEvaluator | None) -> list[DataLoader]:
        if evaluator is None:
            return []
        return evaluator.dataloaders(self.model.query_formatter, self.model.doc_formatter, self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test)
