"""Cross-device candidate pools: gather document embeddings of all ranks, with gradient.

By default the ``inbatch`` pool is per device: each query is scored against the documents of its own rank's
batch. :func:`gather_inbatch` widens it to the global batch (every rank's documents), which changes the
objective, not just its cost:

* the softmax runs over ``W×`` more candidates, so the probability (soft-label) mass each candidate receives
  from the teacher and the student changes, and listwise/KL targets depend on the world size;
* teacher scores, masks and false-negative flags must cover the foreign documents too (gathered or masked);
* TCT-ColBERT and CollectiveKD define their in-batch targets per device, so the option is off by default and
  should stay off for them.

Gradients follow :func:`torch.distributed.nn.functional.all_gather`: the backward sums the gradients that
every rank's loss sends to a row, so each rank receives the gradient of the **sum** of the per-rank losses
with respect to its own rows. DDP then averages parameter gradients over ranks, which yields the gradient of
the mean per-rank loss, as without gathering.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_padded(x: Tensor, counts: list[int]) -> tuple[Tensor, Tensor]:
    """All ranks' ``x`` zero-padded to ``[W, M, ...]`` (with gradient) and their ``counts`` ``[W, k]``.

    ``counts`` are per-rank integers to share; the last one must be ``x.shape[0]``.
    """
    world = dist.get_world_size()
    local = torch.tensor(counts, dtype=torch.long, device=x.device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    counts_all = torch.stack(gathered)  # [W, k]
    pad = int(counts_all[:, -1].max()) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    from torch.distributed.nn.functional import all_gather

    return torch.stack(all_gather(x)), counts_all


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` of every rank along dim 0 (row counts may differ per rank), with gradient.

    Rows are padded to the largest count, gathered and stripped. The backward sums the gradients of all ranks
    for this rank's rows (see the module docstring). Identity without an initialised process group or with
    world size 1.
    """
    if _world_size() == 1:
        return x
    stacked, counts = _gather_padded(x, [x.shape[0]])  # [W, M, ...], [W, 1]
    keep = torch.arange(stacked.shape[1], device=x.device) < counts  # [W, M]
    return stacked.flatten(0, 1)[keep.flatten()]


def gather_inbatch(docs: Tensor, n_pos: int) -> tuple[Tensor, int]:
    """Global ``inbatch`` candidate matrix from this rank's candidate documents ``[C_local, dim]``.

    ``docs`` is in in-batch order (``n_pos`` positives first, then the negatives). Returns the documents of all
    ranks ordered ``[pos_rank0, pos_rank1, ..., neg_rank0, neg_rank1, ...]`` and ``offset``, the number of
    positives on lower ranks: local query ``i``'s own positive is global column ``offset + i``. Ranks may hold
    different ``n_pos`` and ``C_local``. Gradient semantics as :func:`all_gather_with_grad`; ``(docs, 0)``
    without an initialised process group or with world size 1.
    """
    if not 0 <= n_pos <= docs.shape[0]:
        raise ValueError(f"n_pos={n_pos} outside [0, {docs.shape[0]}]")
    if _world_size() == 1:
        return docs, 0
    stacked, counts = _gather_padded(docs, [n_pos, docs.shape[0]])  # [W, M, dim], [W, 2]
    j = torch.arange(stacked.shape[1], device=docs.device)  # [M]
    pos = counts[:, :1]  # [W, 1]
    is_pos = j < pos  # [W, M]
    is_neg = (j >= pos) & (j < counts[:, 1:])
    flat_idx = torch.cat([is_pos.flatten().nonzero(), is_neg.flatten().nonzero()]).squeeze(1)  # row-major: rank, j
    offset = int(counts[: dist.get_rank(), 0].sum())
    return stacked.flatten(0, 1).index_select(0, flat_idx), offset
