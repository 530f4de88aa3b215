"""What a training batch is: the candidate layout, the typed batch, and the small protocols the data layer calls.

Layouts (the columns ``C`` of every ``[B, C]`` score matrix):

* ``pairwise``: ``[B, 1+n]``, each query's own positive (column 0) and its own ``n`` negatives;
* ``inbatch``: ``[B, B(1+n)]``, every document of the batch, positives first, so column ``i`` is query ``i``'s
  positive (TCT-ColBERT, CollectiveKD, EmbedDistill).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from torch import Tensor

Layout = Literal["pairwise", "inbatch"]
LAYOUTS: tuple[Layout, ...] = ("pairwise", "inbatch")


class Preparer(Protocol):
    """CPU tokenisation of a batch for one model (picklable, no weights): what dataloader workers run.

    ``candidates[i, j]`` indexes ``docs`` (``[B, C]``); the result is a flat dict of CPU tensors that the model's
    ``forward`` scores. Every model's :meth:`~kdir.models.base.Scorer.preparer` gives one.
    """

    def __call__(
        self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor, **kw: Any
    ) -> dict[str, Tensor]: ...


def candidate_columns(batch_size: int, n_neg: int, layout: Layout) -> np.ndarray:
    """Each query's candidates as positions in the batch's document list ``[p_1..p_B, n_1^1..n_1^n, ...]``.

    ``pairwise``: ``[B, 1+n]`` (own positive, own negatives). ``inbatch``: ``[B, B(1+n)]`` (every document,
    positives first, so column ``i`` is query ``i``'s own positive).
    """
    if layout == "inbatch":
        return np.broadcast_to(np.arange(batch_size * (1 + n_neg)), (batch_size, batch_size * (1 + n_neg)))
    negs = batch_size + np.arange(batch_size * n_neg).reshape(batch_size, n_neg)
    return np.concatenate([np.arange(batch_size)[:, None], negs], axis=1)


@dataclass
class TeacherFill:
    """The pairs of a batch missing from the score store, prepared for the teacher (``fill`` mode).

    The ``M`` missing entries of the ``[B, C]`` scores hold ``U <= M`` distinct pairs (a query in several rows, a
    document in several columns): each is scored once. ``queries`` / ``docs`` let the training step prepare a subset
    of them again (those scored meanwhile are not scored twice).
    """

    inputs: dict[str, Tensor]  # the teacher's prepared inputs, one candidate per distinct missing pair [U]
    rows: Tensor  # [M] batch row of each missing entry
    cols: Tensor  # [M] candidate column of each missing entry
    keys: Tensor  # [U] int64 view of the distinct pairs' uint64 store keys
    pairs: Tensor  # [M] the distinct pair (index into keys) of each missing entry
    queries: Tensor  # [U] dataset query code of each distinct pair
    docs: Tensor  # [U] dataset document code of each distinct pair


@dataclass
class TrainBatch:
    """One training batch (``B`` real queries + ``G`` generated ones), as collated in the dataloader workers.

    Lightning moves every tensor field to the device. The teacher fields are set by the teacher signal's mode:
    ``teacher_scores`` (``cached`` / ``fill``: scores read from the store, NaN where missing), ``teacher_inputs``
    (``online``: the teacher's prepared inputs), ``teacher_fill`` (``fill``: the missing pairs to score),
    ``teacher_embeddings`` (``online`` with cached teacher embeddings: ``doc [D, d]`` of the batch's distinct
    documents and, when the queries are cached too, ``query [B+G, d]``, fp16 from the embedding stores).
    """

    inputs: dict[str, Tensor]  # the student's prepared inputs (``candidates [B+G, C]`` among them)
    positive: Tensor  # [B+G] column of each row's labelled positive, -1 for generated rows
    false_negative: Tensor  # [B+G, C] bool: another labelled positive of the query sits in that column
    generated: Tensor  # [B+G] bool: an unlabelled generated query (never gets hard labels)
    rows: Tensor  # [B] example rows of the stream (their order in the epoch)
    teacher_scores: Tensor | None = None  # [B, C] fp32
    teacher_inputs: dict[str, Tensor] | None = None
    teacher_fill: TeacherFill | None = None
    teacher_embeddings: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.positive)

    def pin_memory(self) -> TrainBatch:
        """The batch in page-locked memory (``DataLoader(pin_memory=True)`` calls it in its pinning thread)."""
        return _pinned(self)


def _pinned(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {k: _pinned(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: _pinned(getattr(value, f.name)) for f in dataclasses.fields(value)}
        )
    return value
