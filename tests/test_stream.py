"""The training stream: every example exactly once per epoch across (rank, worker) shards."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import gloo_group, spawn
from torch.utils.data import DataLoader

from kdir.data.examples import Examples
from kdir.data.stream import ExampleStream


def _examples(n: int) -> Examples:
    return Examples(np.arange(n), np.arange(n) % 7, np.zeros((n, 0), dtype=np.int64))


def _rows_of(stream: ExampleStream, workers: int) -> list[list[int]]:
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [item["rows"].tolist() for item in loader]


@pytest.mark.parametrize("n,batch,world,workers", [(65, 8, 2, 2), (100, 32, 3, 1), (5, 4, 2, 0), (64, 8, 1, 2)])
def test_every_example_once_and_equal_steps_per_rank(n, batch, world, workers):
    per_rank = [
        _rows_of(ExampleStream(_examples(n), batch, seed=1, rank=r, world_size=world), workers) for r in range(world)
    ]
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank: no DDP hang
    assert all(len(b) == len(ExampleStream(_examples(n), batch, rank=0, world_size=world)) for b in per_rank)


def test_epochs_reshuffle_deterministically():
    s = ExampleStream(_examples(40), 8, seed=3)
    first = [b.tolist() for b in s.batches()]
    assert first == [b.tolist() for b in ExampleStream(_examples(40), 8, seed=3).batches()]
    s.set_epoch(1)
    assert first != [b.tolist() for b in s.batches()]


def test_sampled_negatives_do_not_depend_on_worker_count(quickstart):
    from kdir.data.dataset import IRDataset
    from kdir.data.examples import QrelsExamples, RandomNegatives

    ds = IRDataset.from_beir(quickstart["data"], "train")
    ex = QrelsExamples(RandomNegatives(), 2).build(ds)

    def negs(workers):
        items = DataLoader(ExampleStream(ex, 64, seed=5), batch_size=None, num_workers=workers)
        return {int(r): n.tolist() for it in items for r, n in zip(it["rows"], it["negatives"])}

    assert negs(0) == negs(2)


def _ddp_worker(rank: int, world: int, store: str, out: str, n: int) -> None:
    with gloo_group(store, rank, world):
        stream = ExampleStream(_examples(n), 8, seed=0, rank=dist.get_rank(), world_size=dist.get_world_size())
        rows = _rows_of(stream, workers=2)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)


def test_ddp_two_gloo_processes_see_each_example_once(tmp_path):
    out, n = tmp_path / "rows.json", 203
    spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(out), n), nprocs=2)
    per_rank = json.loads(out.read_text())
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}
    assert len(per_rank[0]) == len(per_rank[1])
    assert not set(i for b in per_rank[0] for i in b) & set(i for b in per_rank[1] for i in b)


def test_too_few_examples_for_ranks_is_an_error():
    from kdir.errors import EmptySplitError

    with pytest.raises(EmptySplitError):
        ExampleStream(_examples(1), 8, world_size=2)


def test_stream_items_are_tensors_or_arrays():
    item = next(iter(ExampleStream(_examples(10), 4)))
    assert isinstance(item["rows"], torch.Tensor) and item["negatives"].shape == (4, 0)
