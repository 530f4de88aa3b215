"""Collation: ids → texts → token tensors (each text tokenised once per batch), plus teacher scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from kdir.data.batch import Layout, Preparer, TrainBatch, candidate_columns
from kdir.data.dataset import IRDataset
from kdir.data.examples import Examples, RunNegatives, positive_keys
from kdir.errors import ConfigError

if TYPE_CHECKING:
    from kdir.data.generated import GeneratedQueries


class SignalCollate(Protocol):
    """What the collator asks of a teacher signal (:class:`kdir.training.signal.TeacherSignal`): its batch
    entries (``teacher_scores`` / ``teacher_inputs`` / ``teacher_fill``) for the batch's candidates, and, for the
    inbatch layout, an index of the pairs its store holds among those the examples can give each query."""

    def collate(
        self,
        queries: np.ndarray,
        docs: np.ndarray,
        candidates: np.ndarray,
        query_texts: list[str],
        doc_texts: list[str],
        n_generated: int = 0,
        own: np.ndarray | None = None,
        generated: np.ndarray | None = None,
    ) -> dict[str, Any]: ...

    def index_candidates(self, pair_codes: np.ndarray) -> None: ...


def own_candidate_codes(examples: Examples, positives: np.ndarray, n_docs: int) -> np.ndarray | None:
    """Sorted unique ``query * n_docs + doc`` of every pair the examples can make one of a query's own candidates:
    the labelled ``positives`` (:func:`~kdir.data.examples.positive_keys`), fixed negatives, or a run sampler's pool
    (as :func:`kdir.stores.scoring.candidate_pairs`); ``None`` when negatives may be any document of the corpus."""
    parts = [np.asarray(positives, dtype=np.int64)]
    if examples.negatives is not None:
        parts.append((examples.queries[:, None] * n_docs + examples.negatives).ravel())
    elif examples.sampler is not None and examples.n_negatives > 0:
        if not isinstance(examples.sampler, RunNegatives):
            return None
        pool, counts = examples.sampler.pool, examples.sampler.counts
        q, slot = np.nonzero(np.arange(pool.shape[1])[None, :] < counts[:, None])
        parts.append(q * n_docs + pool[q, slot])
    return np.unique(np.concatenate(parts))


class TrainCollator:
    """Builds a training batch from a stream item (runs in dataloader workers).

    The batch's document list is de-duplicated, so each text is tokenised once; ``candidates`` index it in
    the chosen layout. The result is a :class:`~kdir.data.batch.TrainBatch`: ``inputs`` (the trained model's
    prepared batch), ``positive``, ``false_negative``, ``rows``, ``generated``, plus the teacher signal's entries
    when a signal is given.

    With ``generated`` queries (EmbedDistill), ``generated_per_batch`` of them are drawn for every batch and
    appended as extra rows over the same in-batch documents, with no positive (``-1``) and ``generated=True``:
    losses that read labels skip them. With ``generated_source_docs`` the documents the drawn queries were generated
    from (their ``source_id``, a corpus id) join the batch's documents, as extra columns of every row: the teacher's
    distribution over the candidates of a generated query then holds the passage it was made from (never a label).

    With the inbatch layout and the training ``examples`` given, the signal indexes the stored pairs among those the
    examples can give each query (:func:`own_candidate_codes`), and a batch looks up each row's own candidates and,
    in its other columns, only the indexed pairs (``B(1+n)`` plus the stored pairs, instead of ``B²(1+n)`` keys).
    """

    def __init__(
        self,
        dataset: IRDataset,
        prepare: Preparer,
        layout: Layout,
        signal: SignalCollate | None = None,
        generated: GeneratedQueries | None = None,
        generated_per_batch: int = 0,
        seed: int = 0,
        examples: Examples | None = None,
        generated_source_docs: bool = False,
    ):
        if generated is not None and generated_per_batch > 0 and layout != "inbatch":
            raise ConfigError("generated queries need the inbatch layout (they have no documents of their own)")
        self.dataset, self.prepare, self.layout, self.signal = dataset, prepare, layout, signal
        # a preparer reading a pre-tokenised table (data.pretokenize) takes the batch documents' corpus rows
        self.tabled = getattr(prepare, "doc_table", None) is not None
        self.generated = generated if generated is not None and generated_per_batch > 0 else None
        self.n_generated = min(generated_per_batch, len(generated)) if self.generated is not None else 0
        self.seed = seed
        self.source_codes = (
            source_codes(self.generated, dataset) if generated_source_docs and self.n_generated else None
        )
        self.positive_keys = positive_keys(dataset)
        self.n_docs = len(dataset.corpus)
        if layout == "inbatch" and signal is not None and examples is not None:
            codes = own_candidate_codes(examples, self.positive_keys, self.n_docs)
            if codes is not None:
                signal.index_candidates(codes)

    def __call__(self, item: dict) -> TrainBatch:
        q, pos, neg = item["queries"], item["positives"], item["negatives"]
        b, n = len(q), neg.shape[1]
        unique, inverse = np.unique(np.concatenate([pos, neg.reshape(-1)]), return_inverse=True)
        candidates = inverse.reshape(-1)[candidate_columns(b, n, self.layout)]  # [B, C] into `unique`
        g, drawn = self.n_generated, None
        if g:
            rows = np.asarray(item["rows"])
            rng = np.random.default_rng([self.seed, int(rows[0]), len(rows), 7])
            drawn = rng.choice(len(self.generated), g, replace=False)
            if self.source_codes is not None:  # the drawn queries' source passages, as extra in-batch columns
                sources = self.source_codes[drawn]
                extra = np.setdiff1d(sources[sources >= 0], unique)
                columns = np.arange(len(unique), len(unique) + len(extra))
                unique = np.concatenate([unique, extra])
                candidates = np.concatenate([candidates, np.broadcast_to(columns, (b, len(columns)))], axis=1)
        keys = q[:, None] * self.n_docs + unique[candidates]
        hit = np.searchsorted(self.positive_keys, keys).clip(max=len(self.positive_keys) - 1)
        is_pos = self.positive_keys[hit] == keys
        positive = np.arange(b) if self.layout == "inbatch" else np.zeros(b, dtype=np.int64)
        is_pos[np.arange(b), positive] = False  # the labelled column itself is not a false negative
        qtexts = [self.dataset.queries.texts[i] for i in q]
        dtexts = [self.dataset.corpus.texts[i] for i in unique]
        if g:  # generated rows: same in-batch columns, no positive, no false negatives
            qtexts += [self.generated.texts[i] for i in drawn]
            candidates = np.concatenate([candidates, np.broadcast_to(candidates[:1], (g, candidates.shape[1]))])
            positive = np.concatenate([positive, np.full(g, -1)])
            is_pos = np.concatenate([is_pos, np.zeros((g, is_pos.shape[1]), dtype=bool)])
        teacher = {}
        if self.signal is not None:
            own = candidate_columns(b, n, "pairwise") if self.layout == "inbatch" else None  # [B, 1+n] columns
            teacher = self.signal.collate(q, unique, candidates, qtexts, dtexts, g, own=own, generated=drawn)
        return TrainBatch(
            inputs=self.prepare(qtexts, dtexts, candidates, **({"doc_rows": unique} if self.tabled else {})),
            positive=torch.from_numpy(positive),
            false_negative=torch.from_numpy(is_pos),
            generated=torch.arange(b + g) >= b,
            rows=item["rows"],
            **teacher,
        )


def source_codes(generated: GeneratedQueries, dataset: IRDataset) -> np.ndarray:
    """The corpus code of each generated query's ``source_id`` (``-1``: none, or not a document of ``dataset``).

    Raises :class:`~kdir.errors.ConfigError` when fewer than half the sources are documents of the corpus (queries
    infilled from real queries name a query, not a passage).
    """
    index = dataset.corpus.index
    codes = np.array([index.get(s, -1) if s is not None else -1 for s in generated.sources], dtype=np.int64)
    if (codes >= 0).mean() < 0.5:
        raise ConfigError(
            f"data.generated_source_docs=true, but only {int((codes >= 0).sum())} of {len(codes)} generated queries "
            f"name a document of {dataset.name} as their source: set data.generated_source_docs=false for queries "
            "generated from queries (generator=bart_infill)"
        )
    return codes


Formatter = Callable[[Sequence[str]], dict[str, torch.Tensor]]  # texts of one side -> token tensors


class LengthSortedRows(Dataset):
    """Row numbers of ``texts``, longest first, so encoding batches carry little padding."""

    def __init__(self, texts: Sequence[str]):
        self.order = np.argsort([-len(t) for t in texts], kind="stable")

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> int:
        return int(self.order[i])


class EncodeCollator:
    """Tokenises a list of row numbers of one text list (queries or corpus) for encoding."""

    def __init__(self, texts: Sequence[str], formatter: Formatter):
        self.texts, self.formatter = texts, formatter

    def __call__(self, rows: list[int]) -> dict:
        return {"tokens": self.formatter([self.texts[i] for i in rows]), "rows": torch.as_tensor(rows)}


class SortedChunkBatches(Dataset):
    """Batches of ``batch_size`` items of each chunk in turn, each chunk's items longest first (stable), for loaders
    that write a chunk at a time (picklable: DataLoader workers). Subclasses give each chunk's ``lengths`` and build
    item ``i``'s batch from :meth:`locate`."""

    def __init__(self, sizes: Sequence[int], batch_size: int):
        self.batch_size = batch_size
        counts = [-(-n // batch_size) for n in sizes]
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first item of each chunk
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.first[-1])

    def lengths(self, chunk: int) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def order(self, chunk: int) -> np.ndarray:
        """Positions of the chunk's items, longest first (stable)."""
        if self._order is None or self._order[0] != chunk:
            self._order = chunk, np.argsort([-n for n in self.lengths(chunk)], kind="stable")
        return self._order[1]

    def locate(self, item: int) -> tuple[int, np.ndarray]:
        """``(chunk, positions of the batch's items within the chunk)`` of item ``item``."""
        if not 0 <= item < len(self):
            raise IndexError(item)
        chunk = int(np.searchsorted(self.first, item, side="right") - 1)
        b = item - int(self.first[chunk])
        return chunk, self.order(chunk)[b * self.batch_size : (b + 1) * self.batch_size]
