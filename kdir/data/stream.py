"""The training stream: examples grouped into batches, sharded by (rank, dataloader worker).

Each epoch the example order is a seeded permutation, cut into ``n_batches`` nearly equal batches with
``n_batches`` a multiple of the world size. Rank ``r`` takes batches ``r, r+W, ...`` and worker ``w`` of
that rank every ``num_workers``-th of those. So every example is seen exactly once per epoch across all
ranks, and every rank runs the same number of steps (no DDP hang on a ragged last batch).

A resumed run starts an epoch part-way: ``set_epoch(epoch, start)`` skips each rank's first ``start`` steps
(the batches already trained), and the rest of the epoch is the same batches, in the same order, with the same
negatives as without the interruption (they depend only on (seed, epoch, batch)).

The epoch and start live in a shared-memory tensor: persistent dataloader workers (``persistent_workers=True``),
which keep the copy of the stream they were started with, read the epoch the main process set when the loader
starts its next iterator.

Length bucketing (``bucket_batches=k``): the epoch's permutation is cut into windows of ``k`` consecutive batches;
within a window the examples are sorted by length (of their positive document) and cut again into batches of the
same sizes, whose order is then shuffled within the window. Every example is still seen exactly once per epoch,
each rank still runs the same number of steps, and the plan still depends only on (seed, epoch): batches hold texts
of similar length, so less padding (the in-batch documents of the inbatch layout, the queries' and positives'
tensors; sampled negatives keep their own lengths). It changes which examples share a batch, hence the in-batch
negatives: off by default, as in the papers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdir.data.examples import Examples
from kdir.errors import EmptySplitError


class ExampleStream(IterableDataset):
    """Yields ``dict(rows, queries, positives, negatives)`` int arrays, one batch at a time.

    Args:
        examples: the training examples.
        batch_size: examples per batch and rank.
        seed: base seed; the order and the sampled negatives depend only on (seed, epoch, batch).
        shuffle: permute the examples each epoch.
        rank / world_size: this process's place in data-parallel training (set by the datamodule).
        bucket_batches: length bucketing window in batches (``0``: off; see the module docstring).
        lengths: ``[N]`` length of each example (e.g. its positive document's characters), needed for bucketing.
    """

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        bucket_batches: int = 0,
        lengths: np.ndarray | None = None,
    ):
        super().__init__()
        if len(examples) < world_size:
            raise EmptySplitError(f"{len(examples)} training examples cannot feed {world_size} ranks")
        if bucket_batches and (lengths is None or len(lengths) != len(examples)):
            raise ValueError(f"bucket_batches={bucket_batches} needs one length per example")
        self.examples, self.batch_size, self.seed, self.shuffle = examples, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.bucket_batches, self.lengths = bucket_batches, lengths
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, start), seen by every worker

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @property
    def start(self) -> int:
        return int(self._position[1])

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from this rank's step ``start`` on (the steps before it are already trained)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start step {start} is outside the epoch's {len(self)} steps")
        self._position[0], self._position[1] = epoch, start

    def n_batches(self) -> int:
        """Batches per epoch over all ranks (a multiple of the world size)."""
        n = math.ceil(len(self.examples) / self.batch_size)
        return math.ceil(n / self.world_size) * self.world_size

    def __len__(self) -> int:
        return self.n_batches() // self.world_size

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The whole epoch's plan: example rows of every batch, all ranks."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.examples)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        plan = np.array_split(order, self.n_batches())
        return self._bucketed(plan, epoch) if self.bucket_batches > 1 else plan

    def _bucketed(self, plan: list[np.ndarray], epoch: int) -> list[np.ndarray]:
        """Each window of ``bucket_batches`` batches re-cut by length, same batch sizes, batch order shuffled."""
        rng = np.random.default_rng([self.seed, epoch, 2])
        out: list[np.ndarray] = []
        for w in range(0, len(plan), self.bucket_batches):
            window = plan[w : w + self.bucket_batches]
            rows = np.concatenate(window)
            rows = rows[np.argsort(self.lengths[rows], kind="stable")]
            cuts = np.cumsum([len(b) for b in window])[:-1]
            parts = np.split(rows, cuts)
            out.extend(parts[i] for i in (rng.permutation(len(parts)) if self.shuffle else range(len(parts))))
        return out

    def steps(self) -> range:
        """Plan indices of this rank's batches still to train this epoch (from step ``start``), in step order."""
        return range(self.rank, self.n_batches(), self.world_size)[self.start :]

    def __iter__(self) -> Iterator[dict]:
        # the epoch and start are read now, when the loader creates its iterator, not at the first batch
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        return self._batches(self.batches(epoch), self.steps()[worker::n_workers], epoch)

    def _batches(self, plan: list[np.ndarray], mine: range, epoch: int) -> Iterator[dict]:
        ex = self.examples
        for b in mine:
            rows = plan[b]
            if len(rows) == 0:  # only when there are fewer examples than batches
                continue
            rng = np.random.default_rng([self.seed, epoch, b, 1])
            yield {
                "rows": torch.from_numpy(rows),
                "queries": ex.queries[rows],
                "positives": ex.positives[rows],
                "negatives": ex.negatives_for(rows, rng),
            }
