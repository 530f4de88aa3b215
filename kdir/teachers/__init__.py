"""Teacher signals."""

from __future__ import annotations

from kdir.teachers.score_table import ScoreTable

__all__ = ["ScoreTable"]
