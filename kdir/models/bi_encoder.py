"""Bi-encoder teacher: a :class:`kdir.models.DualEncoder` used as a scorer (e.g. a stronger dense retriever).

``score(q, d) = <f_q(q), f_d(d)>`` (dot or cosine, as configured); each distinct document of a call is
encoded once, the full query × document matrix computed, then gathered at the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from kdir.models.base import Teacher, as_candidates, to_device
from kdir.models.dual_encoder import DualEncoder


class BiEncoder(Teacher):
    """A dual-encoder teacher: takes :class:`~kdir.models.DualEncoder`'s arguments, builds one (``self.model``)."""

    name = "bi_encoder"

    def __init__(self, model_name_or_path: str | Path, **kwargs):
        super().__init__()
        self.model = DualEncoder(model_name_or_path, **kwargs)
        self.config = dict(self.model.config)

    def prepare(self, queries: Sequence[str], docs: Sequence[str], candidates: np.ndarray | Tensor) -> dict:
        """Tokenise the queries and the (distinct) documents once; ``candidates [B, C]`` index the documents."""
        return self.model.prepare(queries, docs, as_candidates(candidates, len(queries), len(docs)))

    def forward(self, inputs: dict) -> Tensor:
        """``[B, C]`` fp32 scores: the full query × document matrix, gathered at the candidates."""
        return self.model(to_device(inputs, self.device))

    def embed(self, inputs: dict) -> tuple[Tensor, Tensor]:
        """Query embeddings ``[B, dim]`` and document embeddings ``[D, dim]`` of a prepared batch."""
        return self.model.embed(to_device(inputs, self.device))

    def outputs(self, inputs: dict, positive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scores ``[B, C]``, query embeddings and each query's ``positive``-column document embedding."""
        return self.model.outputs(to_device(inputs, self.device), positive)

    def embed_queries(self, texts: Sequence[str], **kw) -> Tensor:
        """``[N, dim]`` fp32 CPU query embeddings (see :meth:`DualEncoder.encode_texts` for ``kw``)."""
        return self.model.encode_queries(texts, **kw)

    def embed_docs(self, texts: Sequence[str], **kw) -> Tensor:
        """``[N, dim]`` fp32 CPU document embeddings."""
        return self.model.encode_docs(texts, **kw)

    def _save(self, path: Path) -> None:
        self.model.save_pretrained(path)
