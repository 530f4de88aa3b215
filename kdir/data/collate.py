"""Collation: ids → texts → token tensors (each text tokenised once per batch), plus teacher scores."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from kdir.data.dataset import IRDataset
from kdir.data.examples import positive_keys

if TYPE_CHECKING:
    from kdir.data.generated import GeneratedQueries
    from kdir.losses.base import Layout
    from kdir.models.dual_encoder import TextFormatter
    from kdir.training.signal import TeacherSignal


class Preparer(Protocol):
    """What the trained model offers the collator: CPU tokenisation of a batch in a candidate layout."""

    def prepare(self, queries: list[str], docs: list[str], candidates: np.ndarray) -> dict: ...


def candidate_columns(batch_size: int, n_neg: int, layout: Layout) -> np.ndarray:
    """Each query's candidates as positions in the batch's document list ``[p_1..p_B, n_1^1..n_1^n, ...]``.

    ``pairwise``: ``[B, 1+n]`` (own positive, own negatives). ``inbatch``: ``[B, B(1+n)]`` (every document,
    positives first, so column ``i`` is query ``i``'s own positive).
    """
    if layout == "inbatch":
        return np.broadcast_to(np.arange(batch_size * (1 + n_neg)), (batch_size, batch_size * (1 + n_neg)))
    negs = batch_size + np.arange(batch_size * n_neg).reshape(batch_size, n_neg)
    return np.concatenate([np.arange(batch_size)[:, None], negs], axis=1)


class TrainCollator:
    """Builds a training batch from a stream item (runs in dataloader workers).

    The batch's document list is de-duplicated, so each text is tokenised once; ``candidates`` index it in
    the chosen layout. Output keys: ``inputs`` (the trained model's ``prepare`` output), ``positive``,
    ``false_negative``, ``rows``, ``generated``, plus the teacher signal's entries (``teacher`` scores,
    ``teacher_inputs`` or ``teacher_fill``) when a signal is given.

    With ``generated`` queries (EmbedDistill), ``generated_per_batch`` of them are drawn for every batch and
    appended as extra rows over the same in-batch documents, with no positive (``-1``) and ``generated=True``:
    losses that read labels skip them.
    """

    def __init__(
        self,
        dataset: IRDataset,
        model: Preparer,
        layout: Layout,
        signal: TeacherSignal | None = None,
        generated: GeneratedQueries | None = None,
        generated_per_batch: int = 0,
        seed: int = 0,
    ):
        if generated is not None and generated_per_batch > 0 and layout != "inbatch":
            raise ValueError("generated queries need the inbatch layout (they have no documents of their own)")
        self.dataset, self.model, self.layout, self.signal = dataset, model, layout, signal
        self.generated = generated if generated is not None and generated_per_batch > 0 else None
        self.n_generated = min(generated_per_batch, len(generated)) if self.generated is not None else 0
        self.seed = seed
        self.positive_keys = positive_keys(dataset)
        self.n_docs = len(dataset.corpus)

    def __call__(self, item: dict) -> dict:
        q, pos, neg = item["queries"], item["positives"], item["negatives"]
        b, n = len(q), neg.shape[1]
        unique, inverse = np.unique(np.concatenate([pos, neg.reshape(-1)]), return_inverse=True)
        candidates = inverse.reshape(-1)[candidate_columns(b, n, self.layout)]  # [B, C] into `unique`
        keys = q[:, None] * self.n_docs + unique[candidates]
        hit = np.searchsorted(self.positive_keys, keys).clip(max=len(self.positive_keys) - 1)
        is_pos = self.positive_keys[hit] == keys
        positive = np.arange(b) if self.layout == "inbatch" else np.zeros(b, dtype=np.int64)
        is_pos[np.arange(b), positive] = False  # the labelled column itself is not a false negative
        qtexts = [self.dataset.queries.texts[i] for i in q]
        dtexts = [self.dataset.corpus.texts[i] for i in unique]
        g = self.n_generated
        if g:  # generated rows: same in-batch columns, no positive, no false negatives
            rows = np.asarray(item["rows"])
            rng = np.random.default_rng([self.seed, int(rows[0]), len(rows), 7])
            qtexts += [self.generated.texts[i] for i in rng.choice(len(self.generated), g, replace=False)]
            candidates = np.concatenate([candidates, np.broadcast_to(candidates[:1], (g, candidates.shape[1]))])
            positive = np.concatenate([positive, np.full(g, -1)])
            is_pos = np.concatenate([is_pos, np.zeros((g, is_pos.shape[1]), dtype=bool)])
        batch = {
            "inputs": self.model.prepare(qtexts, dtexts, candidates),
            "positive": torch.from_numpy(positive),
            "false_negative": torch.from_numpy(is_pos),
            "generated": torch.arange(b + g) >= b,
            "rows": item["rows"],
        }
        if self.signal is not None:
            batch |= self.signal.collate(q, unique, candidates, qtexts, dtexts, n_generated=g)
        return batch


class EncodeCollator:
    """Tokenises a list of row numbers of one text list (queries or corpus) for encoding."""

    def __init__(self, texts: list[str], formatter: TextFormatter):
        self.texts, self.formatter = texts, formatter

    def __call__(self, rows: list[int]) -> dict:
        return {"tokens": self.formatter([self.texts[i] for i in rows]), "rows": torch.as_tensor(rows)}
