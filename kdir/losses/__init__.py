"""Losses: pure functions of score tensors (one file each) and their config-facing classes."""

from __future__ import annotations

from kdir.losses.base import Candidates, Loss
from kdir.losses.infonce import InfoNCE, infonce
from kdir.losses.margin_mse import MarginMSE, margin_mse

__all__ = ["Candidates", "InfoNCE", "Loss", "MarginMSE", "infonce", "margin_mse"]
