"""LightningDataModule: streamed, sharded training batches (+ the teacher signal's entries)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader

from kdir.data.batch import Layout, Preparer
from kdir.data.collate import EncodeCollator, Formatter, LengthSortedRows, SignalCollate, TrainCollator
from kdir.data.dataset import IRDataset
from kdir.data.examples import Examples, QrelsExamples, TripleExamples
from kdir.data.stream import ExampleStream

if TYPE_CHECKING:
    from kdir.data.generated import GeneratedQueries

log = logging.getLogger(__name__)


class DistillDataModule(pl.LightningDataModule):
    """The training stream: examples of the ``train`` split, batched, collated and tokenised in workers.

    Data flows one way: the datamodule knows the split and how examples are formed; ``kdir.run`` then
    :meth:`attach` es what the batches are for: the trained model's :class:`~kdir.data.batch.Preparer` and text
    formatters (no weights), the loss's candidate layout, the bound teacher signal, and the evaluation splits
    whose queries and corpus the validation / test loaders tokenise (longest texts first). Retrieval and
    scoring of those encodings belong to the evaluators (:class:`kdir.training.module.DistillModule`).

    Args:
        train: the training split.
        examples: how training examples are formed (``QrelsExamples`` or ``TripleExamples``).
        batch_size: queries per batch and device.
        num_workers: dataloader workers per device (each takes its own share of the stream).
        seed: seed of the example order and negative sampling.
        shuffle: permute the examples each epoch.
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
        generated: GeneratedQueries | None = None,
        generated_per_batch: int = 0,
    ):
        super().__init__()
        self.generated, self.generated_per_batch = generated, generated_per_batch
        self.train, self.batch_size, self.num_workers = train, batch_size, num_workers
        self.seed, self.shuffle = seed, shuffle
        self.examples: Examples = examples.build(train)
        self.prepare: Preparer | None = None
        self.layout: Layout = "pairwise"
        self.signal: SignalCollate | None = None
        self.stream: ExampleStream | None = None
        self.formatters: dict[str, Formatter] = {}
        self.eval_splits: dict[str, tuple[IRDataset, int]] = {}
        log.info(
            "train: %s, %d examples, %d negatives each", train.name, len(self.examples), self.examples.n_negatives
        )

    def attach(
        self,
        prepare: Preparer,
        layout: Layout,
        signal: SignalCollate | None = None,
        formatters: Mapping[str, Formatter] | None = None,
        eval_splits: Mapping[str, tuple[IRDataset, int]] | None = None,
    ) -> DistillDataModule:
        """Say what batches are for.

        Args:
            prepare: the trained model's batch tokenisation.
            layout: the loss's candidate layout.
            signal: the teacher signal, already bound to this split's store (``TeacherSignal.bind(self.train)``).
            formatters: the trained model's ``{"query": ..., "doc": ...}`` text formatters (evaluation loaders).
            eval_splits: ``{"val" | "test": (split, batch size)}`` whose queries and corpus are encoded.
        """
        self.prepare, self.layout, self.signal = prepare, layout, signal
        self.formatters, self.eval_splits = dict(formatters or {}), dict(eval_splits or {})
        return self

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
        if self.prepare is None:
            raise RuntimeError("DistillDataModule.attach(prepare, layout, signal) must come before training")
        rank, world = self._world()
        epoch = self.stream.epoch if self.stream is not None else 0
        self.stream = ExampleStream(self.examples, self.batch_size, self.seed, self.shuffle, rank, world)
        self.stream.set_epoch(epoch)
        collate = TrainCollator(
            self.train,
            self.prepare,
            self.layout,
            self.signal,
            self.generated,
            self.generated_per_batch,
            self.seed,
        )
        return DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=False,
            pin_memory=False,
        )

    def _encode_loaders(self, stage: str) -> list[DataLoader]:
        """``[queries, corpus]`` loaders of ``{"tokens", "rows"}`` batches (Lightning shards them under DDP)."""
        if stage not in self.eval_splits:
            return []
        dataset, batch_size = self.eval_splits[stage]
        out = []
        for texts, side in ((dataset.queries.texts, "query"), (dataset.corpus.texts, "doc")):
            loader = DataLoader(
                LengthSortedRows(texts),
                batch_size=batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                collate_fn=EncodeCollator(texts, self.formatters[side]),
            )
            out.append(loader)
        return out

    def val_dataloader(self) -> list[DataLoader]:
        return self._encode_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._encode_loaders("test")
