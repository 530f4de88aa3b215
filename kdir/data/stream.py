"""The training stream: examples grouped into batches, sharded by (rank, dataloader worker).

Each epoch the example order is a seeded permutation, cut into ``n_batches`` nearly equal batches with
``n_batches`` a multiple of the world size. Rank ``r`` takes batches ``r, r+W, ...`` and worker ``w`` of
that rank every ``num_workers``-th of those. So every example is seen exactly once per epoch across all
ranks, and every rank runs the same number of steps (no DDP hang on a ragged last batch).

A resumed run starts an epoch part-way: ``set_epoch(epoch, start)`` skips each rank's first ``start`` steps
(the batches already trained), and the rest of the epoch is the same batches, in the same order, with the same
negatives as without the interruption (they depend only on (seed, epoch, batch)).
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
    """

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if len(examples) < world_size:
            raise EmptySplitError(f"{len(examples)} training examples cannot feed {world_size} ranks")
        self.examples, self.batch_size, self.seed, self.shuffle = examples, batch_size, seed, shuffle
        self.rank, self.world_size, self.epoch, self.start = rank, world_size, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from this rank's step ``start`` on (the steps before it are already trained)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start step {start} is outside the epoch's {len(self)} steps")
        self.epoch, self.start = epoch, start

    def n_batches(self) -> int:
        """Batches per epoch over all ranks (a multiple of the world size)."""
        n = math.ceil(len(self.examples) / self.batch_size)
        return math.ceil(n / self.world_size) * self.world_size

    def __len__(self) -> int:
        return self.n_batches() // self.world_size

    def batches(self) -> list[np.ndarray]:
        """The whole epoch's plan: example rows of every batch, all ranks."""
        n = len(self.examples)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        return np.array_split(order, self.n_batches())

    def steps(self) -> range:
        """Plan indices of this rank's batches still to train this epoch (from step ``start``), in step order."""
        return range(self.rank, self.n_batches(), self.world_size)[self.start :]

    def __iter__(self) -> Iterator[dict]:
        # the epoch and start are read now, when the loader creates its iterator, not at the first batch
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self._batches(self.batches(), self.steps()[worker::n_workers], self.epoch)

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
