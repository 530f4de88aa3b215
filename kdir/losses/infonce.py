"""Hard-label contrastive loss (InfoNCE; van den Oord et al., 2018, https://arxiv.org/abs/1807.03748;
in-batch negatives for dense retrieval: Karpukhin et al., 2020, DPR, https://arxiv.org/abs/2004.04906)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdir.losses.base import AppliesTo, Candidates, Layout, Loss


def infonce(scores: Tensor, positive: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """``mean_i −log softmax(s_i / τ)[positive_i]``, masked candidates left out of the softmax.

    Args:
        scores: ``[B, C]`` student scores.
        positive: ``[B]`` column of each row's positive.
        mask: optional ``[B, C]`` bool of candidates that take part (the positive always does).
        temperature: τ; use ~0.05 with cosine similarity, 1.0 with raw dot products.
    """
    logits = scores.float() / temperature
    if mask is not None:
        mask = mask.clone()
        mask[torch.arange(len(positive), device=mask.device), positive] = True
        logits = logits.masked_fill(~mask, float("-inf"))
    return F.cross_entropy(logits, positive)


class InfoNCE(Loss):
    """Softmax cross-entropy of the labelled positive against in-batch and/or hard negatives.

    Other labelled positives of the same query that appear as candidates are left out of the softmax.
    """

    name = "infonce"
    uses_labels = True

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
        return infonce(c.student, c.positive, ~c.false_negative, self.temperature)
