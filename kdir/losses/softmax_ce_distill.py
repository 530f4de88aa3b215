"""Score distillation by softmax cross-entropy (EmbedDistill's L_score; Kim et al. 2023, "EmbedDistill: A
Geometric Knowledge Distillation for Information Retrieval", https://arxiv.org/abs/2301.12005)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdir.errors import ConfigError
from kdir.losses.base import AppliesTo, Candidates, Layout, Loss
from kdir.losses.kl import log_softmaxes


def softmax_ce_distill(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """``mean_i Σ_c −softmax(t_i / τ)_c · log softmax(s_i / τ)_c`` (one τ for both), in fp32.

    Equals KL(teacher ‖ student) plus the teacher's entropy (a constant): same gradients, different value.
    """
    log_ps, log_pt = log_softmaxes(student, teacher, mask, temperature, temperature, "softmax_ce_distill")
    ce = -log_pt.exp() * log_ps
    if mask is not None:
        ce = torch.where(mask, ce, 0.0)
    return ce.sum(-1).mean()


class SoftmaxCEDistill(Loss):
    """Cross-entropy between the teacher's and the student's softmax over each query's candidates.

    Applies to generated queries too by default (it needs no label).
    """

    name = "softmax_ce_distill"
    uses_teacher = True

    def __init__(
        self,
        layout: Layout = "inbatch",
        temperature: float = 1.0,
        weight: float = 1.0,
        applies_to: AppliesTo | None = None,
    ):
        super().__init__(layout, weight, applies_to)
        self.temperature = temperature

    def compute(self, c: Candidates) -> Tensor:
        if c.teacher is None:
            raise ConfigError("softmax_ce_distill needs teacher scores: choose a teacher")
        return softmax_ce_distill(c.student, c.teacher, c.mask, self.temperature)
