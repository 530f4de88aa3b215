"""What every loss sees: student (and teacher) scores over an explicit candidate layout.

Layouts (``Candidates.layout``):

* ``pairwise`` — ``[B, 1+n]``: row ``i`` = query ``i``'s positive (column 0) and its ``n`` negatives.
* ``inbatch`` — ``[B, B·(1+n)]``: every document of the batch, positives first, so query ``i``'s
  own positive is column ``i``; then the negatives grouped by query. Generated (unlabelled) queries,
  when the batch has any, are extra rows over the same columns, with no positive (``-1``).

A :class:`Loss` is a ``torch.nn.Module`` (most have no parameters; ``embed_match`` may learn a projection)
whose ``forward`` restricts the batch to the rows it ``applies_to`` (``real``, ``generated`` or ``all``
queries) and calls ``compute``. Losses that read the labelled positive (``uses_labels``) apply to real
queries only: a generated query never receives a hard label.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from torch import Tensor, nn

from kdir.data.batch import Layout
from kdir.errors import ConfigError

__all__ = ["AppliesTo", "Candidates", "Layout", "Loss"]
AppliesTo = Literal["real", "generated", "all"]


@dataclass
class Candidates:
    """Scores (and embeddings) of a batch in one layout.

    Attributes:
        student: ``[B, C]`` student scores.
        teacher: ``[B, C]`` teacher scores, or ``None`` without a teacher.
        positive: ``[B]`` column of each query's labelled positive (``-1`` for generated queries).
        mask: ``[B, C]`` bool, ``True`` where a candidate takes part (teacher score known, not padding).
        false_negative: ``[B, C]`` bool, ``True`` where a candidate is another labelled positive of the
            query (hard-label losses must not push it down).
        layout: ``pairwise`` or ``inbatch``.
        generated: ``[B]`` bool, ``True`` for generated (unlabelled) queries; ``None``: all real.
        embeddings: ``{"query": (student [B, d_s], teacher [B, d_t]), "doc": (student, teacher)}``: the
            queries' embeddings and those of each query's own positive document (``doc`` rows of generated
            queries are undefined), for embedding matching, plus ``"docs"``: every distinct document of the batch
            ``[D, d]`` (not per row), when a term matches them; ``{}`` when no loss needs them.
    """

    student: Tensor
    teacher: Tensor | None
    positive: Tensor
    mask: Tensor
    false_negative: Tensor
    layout: Layout
    generated: Tensor | None = None
    embeddings: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    n_real: int | None = None  # the first n_real rows are real and the rest generated (a host int: no device sync)

    def __len__(self) -> int:
        return self.student.shape[0]

    def rows(self, applies_to: AppliesTo) -> Tensor | slice | None:
        """The rows of ``applies_to`` queries: ``None`` (every row), a ``slice`` when ``n_real`` is known (no host
        sync), else a ``[B]`` bool selection."""
        if applies_to == "all" or self.generated is None:
            return None
        if self.n_real is not None:
            if applies_to == "real":
                return None if self.n_real == len(self) else slice(0, self.n_real)
            return slice(self.n_real, len(self))
        if applies_to == "real" and not self.generated.any():
            return None
        return ~self.generated if applies_to == "real" else self.generated.clone()

    def select(self, rows: Tensor | slice) -> Candidates:
        """The candidates of the selected rows (the columns stay: in-batch documents are shared)."""
        opt = lambda t: None if t is None else t[rows]  # noqa: E731
        n_real = None
        if isinstance(rows, slice) and self.n_real is not None:
            n_real = max(0, min(rows.stop, self.n_real) - rows.start)
        return replace(
            self,
            n_real=n_real,
            student=self.student[rows],
            teacher=opt(self.teacher),
            positive=self.positive[rows],
            mask=self.mask[rows],
            false_negative=self.false_negative[rows],
            generated=opt(self.generated),
            embeddings={k: (s, t) if k == "docs" else (s[rows], t[rows]) for k, (s, t) in self.embeddings.items()},
        )


class Loss(nn.Module):
    """A loss term: a pure function of :class:`Candidates` plus the metadata the trainer needs.

    Subclasses set ``name`` (logged as ``train/loss/<name>``), ``uses_teacher``, ``uses_labels`` (reads the
    labelled positive), ``uses_embeddings``, the supported ``layouts``, and implement :meth:`compute`.

    Args:
        layout: the candidate layout the batch is built in.
        weight: multiplies the term (in a :class:`~kdir.losses.composite.Composite` sum, and alone).
        applies_to: ``real``, ``generated`` or ``all`` queries (default: ``real`` if the loss reads labels,
            else ``all``). A loss that reads labels cannot apply to generated queries.
    """

    name: str = "loss"
    uses_teacher: bool = False
    uses_labels: bool = False
    uses_embeddings: bool = False
    layouts: tuple[Layout, ...] = ("pairwise", "inbatch")

    def __init__(self, layout: Layout, weight: float = 1.0, applies_to: AppliesTo | None = None):
        super().__init__()
        if layout not in self.layouts:
            raise ConfigError(f"loss {self.name!r} supports layouts {self.layouts}, got {layout!r}")
        applies_to = applies_to or ("real" if self.uses_labels else "all")
        if applies_to not in ("real", "generated", "all"):
            raise ConfigError(f"applies_to must be real, generated or all, got {applies_to!r}")
        if self.uses_labels and applies_to != "real":
            raise ConfigError(
                f"loss {self.name!r} reads hard labels: it applies to real queries only "
                f"(generated queries have none), got applies_to={applies_to!r}"
            )
        self.layout, self.weight, self.applies_to = layout, float(weight), applies_to

    def compute(self, c: Candidates) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, c: Candidates) -> Tensor:
        """``weight ×`` the term over the rows it applies to (0, still in the graph, if there are none)."""
        rows = c.rows(self.applies_to)
        if rows is not None:
            if rows.start >= rows.stop if isinstance(rows, slice) else not rows.any():
                return c.student.sum() * 0.0
            c = c.select(rows)
        return self.weight * self.compute(c)

    def terms(self, c: Candidates) -> dict[str, Tensor]:
        """The weighted value of each term, by name (one term unless a composite)."""
        return {self.name: self(c)}

    def extra_repr(self) -> str:
        skip = {"training"}
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k not in skip)
