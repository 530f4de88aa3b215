"""Student encoders."""

from __future__ import annotations

from kdir.students.dual_encoder import DualEncoder, TextFormatter

__all__ = ["DualEncoder", "TextFormatter"]
