"""Collation: ids → texts → token tensors (each text tokenised once per batch), plus teacher scores."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from kdir.data.dataset import IRDataset
from kdir.data.examples import positive_keys

if TYPE_CHECKING:
    from kdir.losses.base import Layout
    from kdir.students.dual_encoder import TextFormatter
    from kdir.teachers.score_table import ScoreTable


def candidate_docs(positives: np.ndarray, negatives: np.ndarray, layout: Layout) -> np.ndarray:
    """Document codes of each query's candidates: ``[B, 1+n]`` (pairwise) or ``[B, B(1+n)]`` (inbatch).

    The batch's document list is ``positives`` then ``negatives`` row by row (positives first), so
    in-batch column ``i`` is query ``i``'s own positive.
    """
    docs = np.concatenate([positives, negatives.reshape(-1)])
    if layout == "inbatch":
        return np.broadcast_to(docs, (len(positives), len(docs)))
    return np.concatenate([positives[:, None], negatives], axis=1)


def candidate_columns(batch_size: int, n_neg: int, layout: Layout) -> np.ndarray:
    """Column of each candidate in the batch's document list (positives first), same shape as candidate_docs."""
    if layout == "inbatch":
        return np.broadcast_to(np.arange(batch_size * (1 + n_neg)), (batch_size, batch_size * (1 + n_neg)))
    negs = batch_size + np.arange(batch_size * n_neg).reshape(batch_size, n_neg)
    return np.concatenate([np.arange(batch_size)[:, None], negs], axis=1)


class TrainCollator:
    """Builds a training batch from a stream item.

    Output keys: ``query`` / ``doc`` token dicts (unique documents only), ``doc_index`` (position of each
    document of the batch list in ``doc``), ``columns`` (candidate layout into the batch list), ``positive``,
    ``false_negative``, and ``teacher`` (``[B, C]`` scores, NaN where unknown) when a score table is given.
    """

    def __init__(self, dataset: IRDataset, query_formatter: TextFormatter, doc_formatter: TextFormatter,
                 layout: Layout, teacher: ScoreTable | None = None):  # fmt: skip
        self.dataset, self.layout, self.teacher = dataset, layout, teacher
        self.query_formatter, self.doc_formatter = query_formatter, doc_formatter
        self.positive_keys = positive_keys(dataset)
        self.n_docs = len(dataset.corpus)

    def __call__(self, item: dict) -> dict:
        q, pos, neg = item["queries"], item["positives"], item["negatives"]
        b, n = len(q), neg.shape[1]
        docs = np.concatenate([pos, neg.reshape(-1)])
        unique, inverse = np.unique(docs, return_inverse=True)
        qtexts, dtexts = self.dataset.queries.texts, self.dataset.corpus.texts
        cands = candidate_docs(pos, neg, self.layout)  # [B, C]
        keys = q[:, None] * self.n_docs + cands
        hit = np.searchsorted(self.positive_keys, keys).clip(max=len(self.positive_keys) - 1)
        is_pos = self.positive_keys[hit] == keys
        positive = np.arange(b) if self.layout == "inbatch" else np.zeros(b, dtype=np.int64)
        is_pos[np.arange(b), positive] = False  # the labelled column itself is not a false negative
        batch = {
            "query": self.query_formatter([qtexts[i] for i in q]),
            "doc": self.doc_formatter([dtexts[i] for i in unique]),
            "doc_index": torch.from_numpy(inverse.reshape(-1)),
            "columns": torch.from_numpy(np.ascontiguousarray(candidate_columns(b, n, self.layout))),
            "positive": torch.from_numpy(positive),
            "false_negative": torch.from_numpy(is_pos),
            "rows": item["rows"],
        }
        if self.teacher is not None:
            batch["teacher"] = torch.from_numpy(self.teacher.lookup(q, cands))
        return batch


class EncodeCollator:
    """Tokenises a list of row numbers of one text list (queries or corpus) for encoding."""

    def __init__(self, texts: list[str], formatter: TextFormatter):
        self.texts, self.formatter = texts, formatter

    def __call__(self, rows: list[int]) -> dict:
        return {"tokens": self.formatter([self.texts[i] for i in rows]), "rows": torch.as_tensor(rows)}
