"""Losses: pure functions of score tensors (one file each) and their config-facing classes."""

from __future__ import annotations

from kdir.losses.base import Candidates, Loss
from kdir.losses.composite import Composite
from kdir.losses.embed_match import EmbedMatch, embed_match
from kdir.losses.infonce import InfoNCE, infonce
from kdir.losses.kl import KLDistill, kl_divergence
from kdir.losses.margin_mse import MarginMSE, margin_mse
from kdir.losses.softmax_ce_distill import SoftmaxCEDistill, softmax_ce_distill

__all__ = [
    "Candidates",
    "Composite",
    "EmbedMatch",
    "InfoNCE",
    "KLDistill",
    "Loss",
    "MarginMSE",
    "SoftmaxCEDistill",
    "embed_match",
    "infonce",
    "kl_divergence",
    "margin_mse",
    "softmax_ce_distill",
]
