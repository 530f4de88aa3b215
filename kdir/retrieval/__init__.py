"""Retrieval: encoding, search (FAISS, exhaustive MaxSim), ir-measures metrics and the evaluators."""

from __future__ import annotations
