"""Cross-device in-batch candidates: identity on one process; order, loss and gradients on two gloo ranks.

The process groups meet through a file store in the test's folder (no TCP port to pick, so none to clash over),
with a generous timeout for a loaded machine; every rank waits for the others before it tears its group down, and
the spawned processes end without the interpreter's teardown (``conftest.spawn``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import gloo_group, spawn
from torch import Tensor

from kdir.training.distributed import all_gather_with_grad, gather_inbatch

DIM, N_NEG, SIZES = 4, 1, (2, 3)  # rank0 holds 2 queries, rank1 holds 3, one negative each


def _inputs(rank: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s queries ``[B, DIM]`` and in-batch documents ``[B(1+n), DIM]`` (positives first), seeded."""
    g = torch.Generator().manual_seed(100 + rank)
    b = SIZES[rank]
    q = torch.randn(b, DIM, generator=g, dtype=torch.float64)
    return q, torch.randn(b * (1 + N_NEG), DIM, generator=g, dtype=torch.float64)


def test_identity_without_process_group():
    assert not dist.is_initialized()
    x = torch.randn(5, 3, requires_grad=True)
    assert all_gather_with_grad(x) is x
    docs, offset = gather_inbatch(x, 2)
    assert docs is x and offset == 0


def test_identity_with_world_size_one(tmp_path):
    with gloo_group(tmp_path / "store", 0, 1):
        x = torch.randn(5, 3)
        assert all_gather_with_grad(x) is x
        assert gather_inbatch(x, 2) == (x, 0)


def _worker(rank: int, world: int, out: str) -> None:
    with gloo_group(Path(out) / "store", rank, world):
        _compute(rank, out)


def _compute(rank: int, out: str) -> None:
    b = SIZES[rank]
    res: dict = {}
    # Column order: tag every local document with (rank, position).
    ids = (100 * rank + torch.arange(b * (1 + N_NEG), dtype=torch.float64))[:, None]
    gathered_ids, res["offset"] = gather_inbatch(ids, b)
    res["ids"] = gathered_ids.squeeze(1).tolist()
    # Uneven plain gather with gradient: rank r weighs the gathered rows by (r + 1).
    x = torch.ones(b, 2, dtype=torch.float64, requires_grad=True)
    y = all_gather_with_grad(x)
    res["gathered_rows"] = y.shape[0]
    (y.sum() * (rank + 1)).backward()
    res["x_grad"] = x.grad
    # InfoNCE over the global pool.
    q, d = (t.requires_grad_() for t in _inputs(rank))
    docs, offset = gather_inbatch(d, b)
    loss = F.cross_entropy(q @ docs.T, offset + torch.arange(b))
    loss.backward()
    res.update(loss=loss.detach(), q_grad=q.grad, d_grad=d.grad, n_cols=docs.shape[0])
    torch.save(res, f"{out}/rank{rank}.pt")


def test_two_gloo_ranks_uneven_batches(tmp_path):
    world = len(SIZES)
    spawn(_worker, args=(world, str(tmp_path)), nprocs=world)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # (1) global column order: positives of rank0, rank1, then negatives of rank0, rank1.
    expected = [0.0, 1.0, 100.0, 101.0, 102.0, 2.0, 3.0, 103.0, 104.0, 105.0]
    assert [r["ids"] for r in res] == [expected, expected]
    assert [r["offset"] for r in res] == [0, 2]
    assert [r["gathered_rows"] for r in res] == [5, 5] and [r["n_cols"] for r in res] == [10, 10]
    # Backward of the gather sums all ranks' gradients: d/dx of (1·Σy + 2·Σy) = 3.
    for r in res:
        assert torch.equal(r["x_grad"], torch.full_like(r["x_grad"], 3.0))

    # Single-process reference over the concatenated batch with the same global candidate order.
    inputs = [tuple(t.requires_grad_() for t in _inputs(r)) for r in range(world)]
    q_all = torch.cat([q for q, _ in inputs])
    pos = [d[:b] for (_, d), b in zip(inputs, SIZES)]
    neg = [d[b:] for (_, d), b in zip(inputs, SIZES)]
    scores = q_all @ torch.cat(pos + neg).T  # [5, 10]
    starts = [0, SIZES[0]]
    per_rank = [F.cross_entropy(scores[s : s + b], torch.arange(s, s + b)) for s, b in zip(starts, SIZES)]
    # (2) loss: each rank's loss equals its slice of the reference, so their sum equals the reference sum.
    for r in range(world):
        torch.testing.assert_close(res[r]["loss"], per_rank[r].detach())
    total = sum(per_rank)
    torch.testing.assert_close(sum(r["loss"] for r in res), total.detach())
    # (3) gradients: each rank's q and d gradients are the rows of d(Σ_r loss_r) — summed, not averaged, over ranks.
    total.backward()
    for r, (q, d) in enumerate(inputs):
        torch.testing.assert_close(res[r]["q_grad"], q.grad)
        torch.testing.assert_close(res[r]["d_grad"], d.grad)
    # Negatives of rank0 receive gradient from rank1's loss too: the gather sends it back.
    assert res[0]["d_grad"][SIZES[0] :].abs().sum() > 0
