"""Margin-MSE (Hofstätter et al., 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture
Knowledge Distillation", https://arxiv.org/abs/2010.02666)."""

from __future__ import annotations

from torch import Tensor

from kdir.errors import ConfigError
from kdir.losses.base import AppliesTo, Candidates, Loss


def margin_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean_{i,j} [(s_i0 − s_ij) − (t_i0 − t_ij)]²`` over every negative ``j ≥ 1`` of every row ``i``.

    Args:
        student: ``[B, 1+n]`` student scores, positive in column 0 (pairwise layout).
        teacher: ``[B, 1+n]`` raw teacher scores (logits, not normalised), same layout.
        mask: optional ``[B, 1+n]`` bool; a margin counts only if both of its scores are valid.

    Computed in fp32: teacher logits are O(10) and the squared error is sensitive to rounding.
    """
    if student.shape != teacher.shape or student.dim() != 2 or student.shape[1] < 2:
        raise ValueError(
            f"margin_mse expects [B, 1+n] student and teacher scores with n >= 1, "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    s, t = student.float(), teacher.float()
    err = ((s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])).pow(2)  # [B, n]
    if mask is None:
        return err.mean()
    keep = mask[:, :1] & mask[:, 1:]
    return err.where(keep, 0.0).sum() / keep.sum().clamp(min=1)


class MarginMSE(Loss):
    """Margin-MSE: the student matches the teacher's pos − neg score margins. No hard labels, no temperature."""

    name = "margin_mse"
    uses_teacher = True
    uses_labels = True  # margins are taken from the labelled positive: real queries only
    layouts = ("pairwise",)

    def __init__(self, layout: str = "pairwise", weight: float = 1.0, applies_to: AppliesTo | None = None):
        super().__init__(layout, weight, applies_to)

    def compute(self, c: Candidates) -> Tensor:
        if c.teacher is None:
            raise ConfigError("margin_mse needs teacher scores: set teacher=... (e.g. teacher=scores)")
        return margin_mse(c.student, c.teacher, c.mask)
