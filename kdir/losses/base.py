"""What every loss sees: student (and teacher) scores over an explicit candidate layout.

Layouts (``Candidates.layout``):

* ``pairwise`` — ``[B, 1+n]``: row ``i`` = query ``i``'s positive (column 0) and its ``n`` negatives.
* ``inbatch`` — ``[B, B·(1+n)]``: every document of the batch, positives first, so query ``i``'s
  own positive is column ``i``; then the negatives grouped by query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

Layout = Literal["pairwise", "inbatch"]


@dataclass
class Candidates:
    """Scores of a batch in one layout.

    Attributes:
        student: ``[B, C]`` student scores.
        teacher: ``[B, C]`` teacher scores, or ``None`` without a teacher.
        positive: ``[B]`` column of each query's labelled positive.
        mask: ``[B, C]`` bool, ``True`` where a candidate takes part (teacher score known, not padding).
        false_negative: ``[B, C]`` bool, ``True`` where a candidate is another labelled positive of the
            query (hard-label losses must not push it down).
        layout: ``pairwise`` or ``inbatch``.
    """

    student: Tensor
    teacher: Tensor | None
    positive: Tensor
    mask: Tensor
    false_negative: Tensor
    layout: Layout


class Loss:
    """A loss term: a pure function of :class:`Candidates` plus the metadata the trainer needs.

    Subclasses set ``name`` (logged as ``train/loss/<name>``), ``uses_teacher`` and a default
    ``layout``, and implement ``__call__``.
    """

    name: str = "loss"
    uses_teacher: bool = False
    layouts: tuple[Layout, ...] = ("pairwise", "inbatch")

    def __init__(self, layout: Layout):
        if layout not in self.layouts:
            raise ValueError(f"loss {self.name!r} supports layouts {self.layouts}, got {layout!r}")
        self.layout = layout

    def __call__(self, c: Candidates) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
