"""Embedding matching (EmbedDistill; Kim et al. 2023, https://arxiv.org/abs/2301.12005, L_emb,Q / L_emb,D).

``L = mean_i dist(e^T_i, Proj(e^S_i))`` with ``dist`` the Euclidean distance (not squared; the default),
the mean squared error, or ``1 − cos``. ``Proj`` is a learned linear map, present when the student's and the
teacher's dimensions differ (``student_dim`` / ``teacher_dim``); it is trained with the student (the
DistillModule optimises the loss's parameters) and used for matching only, never at retrieval time.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdir.errors import ConfigError
from kdir.losses.base import AppliesTo, Candidates, Layout, Loss

Distance = Literal["l2", "mse", "cosine"]


def embed_match(student: Tensor, teacher: Tensor, distance: Distance = "l2") -> Tensor:
    """Mean over rows of ``‖t − s‖₂`` (``l2``), ``‖t − s‖₂² / dim`` (``mse``) or ``1 − cos(t, s)`` (``cosine``)."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ConfigError(
            f"embed_match expects [N, dim] student and teacher embeddings of one size, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)} (set student_dim/teacher_dim "
            "to learn a projection)"
        )
    s, t = student.float(), teacher.float()
    if distance == "l2":
        return torch.linalg.vector_norm(t - s, dim=-1).mean()
    if distance == "mse":
        return F.mse_loss(s, t)
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ConfigError(f"distance must be l2, mse or cosine, got {distance!r}")


class EmbedMatch(Loss):
    """Match the student's query (``side=query``), positive-document (``side=doc``) or batch-document
    (``side=docs``) embeddings to the teacher's.

    Args:
        side: ``query`` (applies to generated queries too by default), ``doc`` (each real query's own
            positive; a generated query has none) or ``docs`` (every distinct document of the batch: positives,
            negatives and generated queries' source passages, whoever's rows are trained; a bi-encoder student).
        distance: ``l2`` (Euclidean, not squared), ``mse`` or ``cosine``.
        student_dim / teacher_dim: when both are given and differ, a learned ``Linear(student_dim, teacher_dim)``
            maps the student's embeddings first.
        normalize: L2-normalise both sides first (a cosine teacher must be matched by a normalised student).
    """

    name = "embed_match"
    uses_embeddings = True

    def __init__(
        self,
        side: Literal["query", "doc", "docs"] = "query",
        distance: Distance = "l2",
        layout: Layout = "inbatch",
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        normalize: bool = False,
        weight: float = 1.0,
        applies_to: AppliesTo | None = None,
    ):
        if side not in ("query", "doc", "docs"):
            raise ConfigError(f"side must be query, doc or docs, got {side!r}")
        self.uses_labels = side == "doc"  # the positive document of the query: real queries only
        super().__init__(layout, weight, applies_to)
        if distance not in ("l2", "mse", "cosine"):
            raise ConfigError(f"distance must be l2, mse or cosine, got {distance!r}")
        self.side, self.distance, self.normalize = side, distance, normalize
        self.name = f"embed_match_{side}"
        project = student_dim is not None and teacher_dim is not None and student_dim != teacher_dim
        self.projection = nn.Linear(student_dim, teacher_dim) if project else None

    def compute(self, c: Candidates) -> Tensor:
        if self.side not in c.embeddings:
            raise ConfigError(
                f"embed_match needs {self.side} embeddings of student and teacher in the batch: the "
                "teacher must embed (a bi-encoder, or a cross-encoder with dual_pooling)"
            )
        s, t = c.embeddings[self.side]
        if self.projection is not None:
            s = self.projection(s.float())
        if self.normalize:
            s, t = F.normalize(s.float(), dim=-1), F.normalize(t.float(), dim=-1)
        return embed_match(s, t, self.distance)
