"""Models by architecture (the role, student or teacher, is a config choice): dual encoders, ColBERT (plain and
collective), cross-encoders and ensembles of them."""

from __future__ import annotations

from kdir.models.base import Teacher
from kdir.models.bi_encoder import BiEncoder
from kdir.models.colbert import ColBERT, maxsim
from kdir.models.collective import CollectiveColBERT
from kdir.models.cross_encoder import CrossEncoder
from kdir.models.dual_encoder import DualEncoder, TextFormatter
from kdir.models.ensemble import Ensemble

__all__ = [
    "BiEncoder",
    "ColBERT",
    "CollectiveColBERT",
    "CrossEncoder",
    "DualEncoder",
    "Ensemble",
    "Teacher",
    "TextFormatter",
    "maxsim",
]
