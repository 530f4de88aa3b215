"""The collective teacher of CollectiveKD (Kim, Kim & Hwang, NAACL 2022, arXiv 2205.03273).

A frozen ColBERT whose query is extended with the query's cached expansion vectors ("collective knowledge":
ColBERT-PRF centroids of its top-ranked feedback passages, built by ``python -m kdir.expand``). Original query
tokens (the ``[MASK]``-padded query) weigh 1, expansion vector ``e_k`` weighs ``w_k = β·idf``::

    T(q, d) = Σ_i max_j −‖q_i − d_j‖²  +  Σ_k w_k · max_j −‖e_k − d_j‖²

(``colbert/modeling/colbert.py:64-138`` of the official code). There the masked document tokens are zero vectors
(``D * mask``, lines 50-53), so each max also sees ``−‖q_i‖²`` / ``−‖e_k‖²``: ``masked_doc_tokens="zero"``, which
the recipe (``experiment=collective_kd``) sets for the teacher and the student. Queries absent from the store get
zero weights, so their scores are the plain ColBERT scores (self-KD). Forcing the labelled positive to its row
maximum is the teacher signal's job, not the model's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdir.errors import KdirError
from kdir.models.base import to_device
from kdir.models.colbert import ColBERT, ColBERTPreparer, MaskedDocTokens, Similarity, maxsim
from kdir.stores.expansion_store import ExpansionStore

log = logging.getLogger(__name__)


def collective_maxsim(
    q: Tensor,
    q_mask: Tensor,
    expansion: Tensor,
    expansion_weights: Tensor,
    d: Tensor,
    d_mask: Tensor,
    similarity: Similarity = "l2",
    masked_doc_tokens: MaskedDocTokens = "exclude",
) -> Tensor:
    """``[Nq, Nd]`` weighted MaxSim of queries extended with expansion vectors.

    Args:
        q / q_mask: query token embeddings ``[Nq, Lq, dim]`` and their mask (weight 1 where ``True``).
        expansion / expansion_weights: ``[Nq, k, dim]`` expansion vectors and their weights ``[Nq, k]``.
        d / d_mask: document token embeddings ``[Nd, Ld, dim]`` and their bool mask.
        masked_doc_tokens: ``exclude``, ``zero`` or a number (:func:`~kdir.models.colbert.maxsim`); with ``zero`` an
            expansion vector's floor is ``−‖e_k‖²`` (``l2``), as the official ``D * mask``.
    """
    tokens = torch.cat([q, expansion.to(q.device, q.dtype)], dim=1)  # in the embeddings' dtype, as maxsim computes
    weights = torch.cat([q_mask.float(), expansion_weights.to(q.device, torch.float32)], dim=1)
    return maxsim(tokens, weights, d, d_mask, similarity, masked_doc_tokens=masked_doc_tokens)


class CollectivePreparer:
    """The collective teacher's batch tokenisation: ColBERT's inputs plus ``query_expansion [B, k, dim]`` and
    ``query_expansion_weights [B, k]`` (CPU). ``query_keys`` are the ``uint64 [B]`` xxh64 hashes of the query ids
    (:func:`kdir.stores.id_hashes`); a query absent from the store gets zero weights."""

    def __init__(self, colbert: ColBERTPreparer, expansion: ExpansionStore):
        self.colbert, self.expansion = colbert, expansion

    def __call__(
        self,
        queries: Sequence[str],
        docs: Sequence[str],
        candidates: np.ndarray | Tensor,
        query_keys: np.ndarray | None = None,
    ) -> dict[str, Tensor]:
        if query_keys is None:
            raise KdirError(
                "the collective ColBERT teacher needs the batch's query-id hashes (query_keys=id_hashes(qids)) to "
                "look up their expansions; it serves the training batches of the teacher signal"
            )
        keys = np.asarray(query_keys)
        if keys.shape != (len(queries),):
            raise KdirError(f"query_keys must be [B={len(queries)}] uint64 hashes, got shape {keys.shape}")
        vectors, weights = self.expansion.lookup(keys)
        inputs = self.colbert(queries, docs, candidates)
        inputs["query_expansion"] = torch.from_numpy(vectors)
        inputs["query_expansion_weights"] = torch.from_numpy(weights)
        return inputs


class CollectiveColBERT(ColBERT):
    """ColBERT scoring with per-query expansion vectors from an :class:`~kdir.stores.ExpansionStore`.

    Args:
        model_name_or_path / dim / ...: as :class:`~kdir.models.ColBERT` (``similarity`` defaults to ``l2``,
            the paper's negative squared L2).
        expansion: the expansion store folder written by ``python -m kdir.expand`` for this ColBERT.
    """

    name = "collective_colbert"
    uses_query_keys = True  # the teacher signal passes the batch's query-id hashes to prepare()

    def __init__(
        self, model_name_or_path: str | Path, expansion: str | Path, similarity: Similarity = "l2", **colbert_kwargs
    ) -> None:
        super().__init__(model_name_or_path, similarity=similarity, **colbert_kwargs)
        self.expansion = ExpansionStore.open(expansion)
        if self.expansion.dim != self.config["dim"]:
            raise KdirError(
                f"{expansion}: expansion vectors have dim {self.expansion.dim}, but the ColBERT "
                f"{model_name_or_path} has dim {self.config['dim']}"
            )
        recorded = self.expansion.meta.get("teacher", {}).get("weights")
        if recorded is not None and recorded != self.weights_hash():
            log.warning(
                "%s was built with other ColBERT weights (%s) than %s; CollectiveKD uses the same checkpoint "
                "for the expansion and the teacher",
                expansion,
                recorded[:12],
                model_name_or_path,
            )
        self.config["expansion"] = str(expansion)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> CollectiveColBERT:
        """Load a ColBERT folder as the collective teacher: ``expansion`` is required and ``similarity`` is ``l2``
        (the paper's) unless given, whatever similarity the folder records."""
        return super().from_pretrained(path, **({"similarity": "l2"} | overrides))

    def preparer(self) -> CollectivePreparer:
        """ColBERT's tokenisation plus each query's expansion vectors, looked up by its id hash."""
        return CollectivePreparer(super().preparer(), self.expansion)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """``[B, C]`` fp32 expanded-query scores of the candidates."""
        inputs = to_device(inputs, self.device)
        q, q_mask = self.encode(
            {"input_ids": inputs["query_input_ids"], "attention_mask": inputs["query_attention_mask"]}, "query"
        )
        d = self.encode({"input_ids": inputs["doc_input_ids"], "attention_mask": inputs["doc_attention_mask"]}, "doc")
        query = (q, q_mask, inputs["query_expansion"], inputs["query_expansion_weights"])
        return self.score_reps(query, d, inputs["candidates"])

    def query_reps(self, queries: Sequence[str], query_keys: np.ndarray | None = None) -> tuple[Tensor, ...]:
        """Query token embeddings, their mask, and each query's expansion vectors ``[B, k, dim]`` and weights."""
        if query_keys is None:
            raise KdirError("the collective ColBERT needs the queries' id hashes (query_keys) for their expansions")
        vectors, weights = self.expansion.lookup(np.asarray(query_keys))
        q, q_mask = super().query_reps(queries)
        return q, q_mask, torch.from_numpy(vectors).to(q.device), torch.from_numpy(weights).to(q.device)

    def score_reps(self, queries: tuple[Tensor, ...], docs: tuple[Tensor, ...], candidates: Tensor) -> Tensor:
        """:func:`collective_maxsim` of ``(q, q_mask, expansion, weights)`` against ``(d, d_mask)``, gathered."""
        scores = collective_maxsim(*queries, *docs, self.config["similarity"], self.config["masked_doc_tokens"])
        return scores.gather(1, candidates.to(scores.device))
