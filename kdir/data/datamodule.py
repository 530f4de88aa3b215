"""LightningDataModule: streamed, sharded training batches (+ the teacher signal's entries).

The datamodule's checkpoint state is where the training stream stands (the epoch and each rank's steps already
trained in it), so that a resumed run trains the rest of an interrupted epoch, batch for batch, and no example
twice.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader

from kdir.data.batch import Layout, Preparer
from kdir.data.collate import EncodeCollator, Formatter, LengthSortedRows, SignalCollate, TrainCollator
from kdir.data.dataset import IRDataset
from kdir.data.examples import Examples, QrelsExamples, TripleExamples
from kdir.data.stream import ExampleStream
from kdir.data.tokens import TokenTable
from kdir.errors import ConfigError

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
        generated_source_docs: the passages the drawn generated queries were made from (their ``source_id``) join
            each batch's documents (queries generated from documents: ``generator=title|sentence|crop|doc2query_t5``).
        pin_memory: collate batches into page-locked memory, so host-to-GPU copies are asynchronous (Lightning moves
            batches with ``non_blocking=True``). ``None``: when training on CUDA.
        persistent_workers: keep the dataloader workers (training and evaluation loaders) alive between epochs and
            validations instead of starting them again each time (the stream's epoch reaches them through shared
            memory). Needs ``num_workers > 0``.
        prefetch_factor: batches each worker prepares ahead (``None``: PyTorch's default, 2).
        bucket_batches: length bucketing: within each window of this many batches, examples are grouped by the
            length of their positive document (less padding; exactly once per epoch still).
            ``0``: off (the papers' random batches). See :mod:`kdir.data.stream`.
        pretokenize: tokenise every corpus document once, before training, with the student's document formatter
            (:mod:`kdir.data.tokens`); batches then gather their documents' ids instead of tokenising the texts
            (the same inputs). Dual-encoder students.
        pretokenize_cache: a folder for the table: later runs and DDP ranks memory-map it (rebuilt when the
            tokenizer, its settings or the corpus differ). ``None``: built in memory by every run.
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
        generated_source_docs: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        bucket_batches: int = 0,
        pretokenize: bool = False,
        pretokenize_cache: str | None = None,
    ):
        super().__init__()
        if not isinstance(pretokenize, bool):
            raise ConfigError(f"data.pretokenize={pretokenize!r}: expected true or false")
        if pretokenize_cache is not None and not pretokenize:
            raise ConfigError("data.pretokenize_cache needs data.pretokenize=true")
        self.pretokenize, self.pretokenize_cache, self._doc_table = pretokenize, pretokenize_cache, None
        for name, value in (("bucket_batches", bucket_batches), ("num_workers", num_workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"data.{name}={value!r}: expected an integer >= 0")
        if prefetch_factor is not None and (not isinstance(prefetch_factor, int) or prefetch_factor < 1):
            raise ConfigError(f"data.prefetch_factor={prefetch_factor!r}: expected an integer >= 1, or null")
        if (persistent_workers or prefetch_factor is not None) and num_workers == 0:
            key = "persistent_workers=true" if persistent_workers else f"prefetch_factor={prefetch_factor}"
            raise ConfigError(f"data.{key} needs dataloader workers: set data.num_workers >= 1")
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.prefetch_factor, self.bucket_batches = prefetch_factor, bucket_batches
        self.generated, self.generated_per_batch = generated, generated_per_batch
        self.generated_source_docs = generated_source_docs
        self.train, self.batch_size, self.num_workers = train, batch_size, num_workers
        self.seed, self.shuffle = seed, shuffle
        self.examples: Examples = examples.build(train)
        self.prepare: Preparer | None = None
        self.layout: Layout = "pairwise"
        self.signal: SignalCollate | None = None
        self.stream: ExampleStream | None = None
        self.formatters: dict[str, Formatter] = {}
        self.eval_splits: dict[str, tuple[IRDataset, int]] = {}
        self.position = (0, 0)  # (epoch, this rank's steps already trained in it) where the next epoch starts
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
        """The stream's next iterator covers ``epoch``: from the start, or where a resumed run stopped in it."""
        if epoch != self.position[0]:
            self.position = (epoch, 0)
        if self.stream is not None:
            self.stream.set_epoch(*self.position)

    def _plan(self) -> dict[str, Any]:
        """What fixes an epoch's batches: a mid-epoch resume needs the same."""
        _, world = self._world()
        return {
            "examples": len(self.examples),
            "batch_size": self.batch_size,
            "world_size": world,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: ``epoch`` and ``steps_done`` (per rank) in it, and the settings of its plan.

        Read from the fit loop when a checkpoint is saved: the batches trained so far, not those the loader has
        already fetched ahead. An epoch trained to its end is saved as the start of the next.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        epoch, done = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "steps_done": done} | self._plan()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the stream where ``state`` says; a mid-epoch position needs the plan it was saved with."""
        if not state or self.trainer is None or self.trainer.state.fn != "fit":
            return  # testing a checkpoint: no stream to resume
        epoch, done = int(state["epoch"]), int(state["steps_done"])
        saved = {k: state[k] for k in self._plan() if k in state}
        now = self._plan()
        if done and saved != {k: now[k] for k in saved}:
            diff = ", ".join(f"{k} {saved[k]} (now {now[k]})" for k in saved if saved[k] != now[k])
            raise ConfigError(
                f"cannot resume part-way through epoch {epoch} ({done} steps done): the checkpoint's training stream "
                f"had {diff}; resume with the same data, data.batch_size, seed and trainer.devices"
            )
        self.position = (epoch, done)
        log.info("training stream resumes at epoch %d, step %d of the epoch", epoch, done)
        # the stream is resumable: Lightning's warning about a mid-epoch checkpoint does not apply
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def train_dataloader(self) -> DataLoader:
        if self.prepare is None:
            raise RuntimeError("DistillDataModule.attach(prepare, layout, signal) must come before training")
        rank, world = self._world()
        prepare = self._preparer()
        lengths = self._lengths() if self.bucket_batches > 1 else None
        self.stream = ExampleStream(
            self.examples, self.batch_size, self.seed, self.shuffle, rank, world, self.bucket_batches, lengths
        )
        self.set_epoch(self.position[0])
        collate = TrainCollator(
            self.train,
            prepare,
            self.layout,
            self.signal,
            self.generated,
            self.generated_per_batch,
            self.seed,
            examples=self.examples,  # the inbatch layout indexes the stored pairs among the examples' candidates
            generated_source_docs=self.generated_source_docs,
        )
        return DataLoader(self.stream, batch_size=None, collate_fn=collate, **self._loader_settings())

    def _preparer(self) -> Preparer:
        """The attached preparer; with ``pretokenize``, reading the corpus tokens from a table built once."""
        if not self.pretokenize:
            return self.prepare
        with_table = getattr(self.prepare, "with_doc_table", None)
        if with_table is None:
            raise ConfigError(
                f"data.pretokenize=true needs a dual-encoder student (one document formatter); "
                f"{type(self.prepare).__name__} tokenises its batches itself: set data.pretokenize=false"
            )
        if self._doc_table is None:
            texts = self.train.corpus.texts
            self._doc_table = TokenTable.cached(self.prepare.doc_formatter, texts, self.pretokenize_cache)
        return with_table(self._doc_table)

    def _loader_settings(self) -> dict[str, Any]:
        """Workers, pinned memory, persistence and prefetching of every loader of this datamodule."""
        pin = self.pin_memory
        if pin is None:
            pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        out: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": pin}
        if self.num_workers:
            out["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                out["prefetch_factor"] = self.prefetch_factor
        return out

    def _lengths(self) -> np.ndarray:
        """Each example's length for bucketing: the tokens of its positive document with a pre-tokenised table,
        else its characters (a proxy for its tokens)."""
        if self._doc_table is not None:
            return self._doc_table.lengths(self.examples.positives)
        texts = self.train.corpus.texts
        doc_chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        return doc_chars[self.examples.positives]

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
                collate_fn=EncodeCollator(texts, self.formatters[side]),
                **self._loader_settings(),
            )
            out.append(loader)
        return out

    def val_dataloader(self) -> list[DataLoader]:
        return self._encode_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._encode_loaders("test")
