"""Teachers (frozen scorers) and the teacher signal of a training batch."""

from __future__ import annotations

from kdir.teachers.base import Teacher
from kdir.teachers.bi_encoder import BiEncoder
from kdir.teachers.colbert import ColBERT, maxsim
from kdir.teachers.collective import CollectiveColBERT
from kdir.teachers.cross_encoder import CrossEncoder
from kdir.teachers.ensemble import Ensemble
from kdir.teachers.signal import TeacherSignal

__all__ = [
    "BiEncoder",
    "ColBERT",
    "CollectiveColBERT",
    "CrossEncoder",
    "Ensemble",
    "Teacher",
    "TeacherSignal",
    "maxsim",
]
