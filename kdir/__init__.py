"""kdir: knowledge distillation into dense retrievers (Hydra + PyTorch Lightning + FAISS + ir-measures)."""

from __future__ import annotations

__version__ = "0.1.0"

from kdir.utils import register_resolvers  # noqa: E402

register_resolvers()
