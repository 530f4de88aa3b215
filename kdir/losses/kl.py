"""Listwise KL distillation with separate teacher and student temperatures.

TCT-ColBERT (Lin, Yang & Lin 2021, "In-Batch Negatives for Knowledge Distillation with Tightly-Coupled
Teachers for Dense Retrieval", https://arxiv.org/abs/2010.11386) and CollectiveKD (Kim, Kim & Hwang 2022,
"Collective Relevance Labeling for Passage Retrieval", https://arxiv.org/abs/2205.03273) both use
τ_teacher = 0.25 on the teacher only and raw student logits (τ_student = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdir.errors import ConfigError
from kdir.losses.base import AppliesTo, Candidates, Layout, Loss


def log_softmaxes(
    student: Tensor, teacher: Tensor, mask: Tensor | None, tau_student: float, tau_teacher: float, name: str
) -> tuple[Tensor, Tensor]:
    """fp32 ``log softmax(s / τ_s)`` and ``log softmax(t / τ_t)`` over each row's unmasked ``[B, C]`` candidates."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"{name} expects [B, C] student and teacher scores, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    s, t = student.float() / tau_student, teacher.float() / tau_teacher
    if mask is not None:
        s, t = s.masked_fill(~mask, float("-inf")), t.masked_fill(~mask, float("-inf"))
    return F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)


def kl_divergence(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    tau_teacher: float = 0.25,
    tau_student: float = 1.0,
    prob_clip: float | None = None,
) -> Tensor:
    """``mean_i Σ_c P_t(c|i) [log P_t(c|i) − log P_s(c|i)]`` = KL(teacher ‖ student), in fp32.

    ``P_t = softmax(t / τ_teacher)`` and ``P_s = softmax(s / τ_student)`` over the unmasked candidates of a row.

    Args:
        student / teacher: ``[B, C]`` scores.
        mask: optional ``[B, C]`` bool; masked candidates leave both softmaxes (rows need one unmasked entry).
        prob_clip: clip both probabilities to ``[prob_clip, 1]`` first, as ``tf.keras.losses.KLDivergence``
            (ε = 1e-7) in TCT-ColBERT's ``train/model_fn.py:128,135`` (no gradient through a clipped entry).
    """
    log_ps, log_pt = log_softmaxes(student, teacher, mask, tau_student, tau_teacher, "kl")
    if prob_clip is not None:
        log_ps, log_pt = log_ps.exp().clamp(prob_clip, 1.0).log(), log_pt.exp().clamp(prob_clip, 1.0).log()
    kl = log_pt.exp() * (log_pt - log_ps)
    if mask is not None:
        kl = torch.where(mask, kl, 0.0)
    return kl.sum(-1).mean()


class KLDistill(Loss):
    """KL(teacher ‖ student) over each query's candidates: summed over candidates, averaged over queries.

    Args:
        tau_teacher: teacher temperature (0.25 in TCT-ColBERT and CollectiveKD).
        tau_student: student temperature (1: raw logits, as both papers).
        prob_clip: clip both distributions to ``[prob_clip, 1]`` (TCT-ColBERT's Keras loss: 1e-7; ``None``: exact).
    """

    name = "kl"
    uses_teacher = True

    def __init__(
        self,
        layout: Layout = "inbatch",
        tau_teacher: float = 0.25,
        tau_student: float = 1.0,
        weight: float = 1.0,
        applies_to: AppliesTo | None = None,
        prob_clip: float | None = None,
    ):
        super().__init__(layout, weight, applies_to)
        if prob_clip is not None and not 0 < prob_clip < 1:
            raise ConfigError(
                f"prob_clip must lie in (0, 1) (TCT-ColBERT's Keras: 1e-7) or be null, got {prob_clip!r}"
            )
        self.tau_teacher, self.tau_student, self.prob_clip = tau_teacher, tau_student, prob_clip

    def compute(self, c: Candidates) -> Tensor:
        if c.teacher is None:
            raise ConfigError("kl needs teacher scores: choose a teacher (e.g. teacher=colbert)")
        return kl_divergence(c.student, c.teacher, c.mask, self.tau_teacher, self.tau_student, self.prob_clip)
