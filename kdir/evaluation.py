"""Retrieval evaluation: encode queries and corpus, FAISS top-k, TREC run, ir-measures metrics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdir.data.collate import EncodeCollator
from kdir.data.dataset import IRDataset
from kdir.metrics import Run, evaluate_run, parse_measures, run_from_topk
from kdir.retrieval import search

if TYPE_CHECKING:
    from kdir.students.dual_encoder import DualEncoder, TextFormatter

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("nDCG@10", "RR@10", "R@100", "R@1000")


class LengthSortedRows(Dataset):
    """Row numbers of ``texts``, longest first, so encoding batches carry little padding."""

    def __init__(self, texts: Sequence[str]):
        self.order = np.argsort([-len(t) for t in texts], kind="stable")

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> int:
        return int(self.order[i])


class RetrievalEvaluator:
    """End-to-end dense retrieval over a dataset's whole corpus, scored with ir-measures.

    Args:
        dataset: the split to evaluate (its queries, its qrels, the full corpus).
        metrics: ir-measures strings, e.g. ``nDCG@10``, ``RR(rel=2)@10``, ``R@1000``.
        depth: documents retrieved per query (the run file's depth).
        index_factory: FAISS ``index_factory`` string (``Flat`` = exact inner product).
        use_gpu: FAISS on GPU (``None``: when available).
        batch_size: encoding batch size.
    """

    def __init__(self, dataset: IRDataset, metrics: Sequence[str] = DEFAULT_METRICS, depth: int = 1000,
                 index_factory: str = "Flat", use_gpu: bool | None = None, batch_size: int = 128):  # fmt: skip
        parse_measures(metrics)  # fail early on a bad name
        self.dataset, self.metrics, self.depth = dataset, list(metrics), depth
        self.index_factory, self.use_gpu, self.batch_size = index_factory, use_gpu, batch_size

    def dataloaders(self, query_formatter: TextFormatter, doc_formatter: TextFormatter, num_workers: int = 0
                    ) -> list[DataLoader]:  # fmt: skip
        """``[queries, corpus]`` loaders of ``{"tokens", "rows"}`` batches (Lightning shards them under DDP)."""
        out = []
        for texts, fmt in ((self.dataset.queries.texts, query_formatter), (self.dataset.corpus.texts, doc_formatter)):
            out.append(DataLoader(LengthSortedRows(texts), batch_size=self.batch_size, shuffle=False,
                                  num_workers=num_workers, collate_fn=EncodeCollator(texts, fmt)))  # fmt: skip
        return out

    def retrieve(self, queries: np.ndarray | torch.Tensor, docs: np.ndarray | torch.Tensor) -> Run:
        """Top-``depth`` run from query ``[Nq, d]`` and corpus ``[Nd, d]`` embeddings (rows in dataset order)."""
        q = np.asarray(queries, dtype=np.float32)
        d = np.asarray(docs, dtype=np.float32)
        scores, rows = search(q, d, self.depth, self.index_factory, self.use_gpu)
        return run_from_topk(self.dataset.queries.ids, self.dataset.corpus.ids, scores, rows)

    def score(self, run: Run) -> dict[str, float]:
        return evaluate_run(run, self.dataset.qrels, self.metrics)

    def evaluate(self, encoder: DualEncoder, device: str | torch.device | None = None, progress: bool = True
                 ) -> tuple[dict[str, float], Run]:  # fmt: skip
        """Encode, search and score in one process (``python -m kdir.evaluate``); returns ``(metrics, run)``."""
        kw = dict(batch_size=self.batch_size, device=device, progress=progress)
        q = encoder.encode_queries(self.dataset.queries.texts, **kw)
        d = encoder.encode_docs(self.dataset.corpus.texts, **kw)
        run = self.retrieve(q.numpy(), d.numpy())
        return self.score(run), run
