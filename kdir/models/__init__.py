"""Models by architecture; the role (student or teacher) is a config choice. Every model is a
:class:`~kdir.models.base.Scorer`: dual encoders, ColBERT (plain and collective), cross-encoders, ensembles."""

from __future__ import annotations

from kdir.models.base import Scorer
from kdir.models.colbert import ColBERT, maxsim
from kdir.models.collective import CollectiveColBERT
from kdir.models.cross_encoder import CrossEncoder
from kdir.models.dual_encoder import DualEncoder, TextFormatter
from kdir.models.ensemble import Ensemble

__all__ = [
    "ColBERT",
    "CollectiveColBERT",
    "CrossEncoder",
    "DualEncoder",
    "Ensemble",
    "Scorer",
    "TextFormatter",
    "maxsim",
]
