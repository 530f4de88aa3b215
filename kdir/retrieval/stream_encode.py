"""Streamed, sharded, resumable encoding of many texts into an :class:`~kdir.stores.embedding_store.EmbeddingStore`.

:func:`encode_into_store` encodes one side of a corpus (or of the queries) chunk by chunk, writing each chunk to disk
as it is finished, so memory holds one chunk of embeddings whatever the corpus size (8.8M MS MARCO passages). Rank
``r`` of ``world_size`` encodes its shard: the contiguous run of whole chunks :func:`~kdir.stores.embedding_store.
shard_layout` gives it. Contiguous, not strided: the store's row order then stays the ids' order with no permutation
to keep, each shard's files are written front to back, and because chunks are cut from the whole id list (not from
each rank's share) every world size encodes the very same batches, so the stored bits do not depend on it (given the
same hardware and threads per process: Fabric gives each CPU rank its share of the cores unless ``OMP_NUM_THREADS``
is set).

Within a chunk the texts are encoded in length-sorted batches (less padding, as :func:`kdir.retrieval.encode.
encode_texts` does over all texts) and written back in row order. A rerun after a kill skips the finished chunks and
writes the same bits. The model's :meth:`~kdir.models.base.Scorer.formatter` objects are picklable, so with
``num_workers > 0`` the next batches are tokenised in DataLoader worker processes while the model encodes.

With Lightning Fabric (``Fabric(accelerator="cpu", devices=2, strategy="ddp")``, as :mod:`kdir.score` launches it)
pass ``fabric=``: each rank writes its shard, and rank 0 records the store finished after a barrier. Without a
process group, independent jobs (``rank=``, ``world_size=``) may write the shards; the last to finish records it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdir.data.collate import SortedChunkBatches
from kdir.errors import ConfigError, EmptySplitError, UnknownIdError
from kdir.models.base import Scorer, to_device
from kdir.retrieval.encode import Side, encode_batch
from kdir.stores.embedding_store import DEFAULT_CHUNK_SIZE, EmbeddingStore, embedding_meta, shard_layout
from kdir.stores.keys import id_hashes

log = logging.getLogger(__name__)

__all__ = ["encode_into_store"]


class ChunkBatches(SortedChunkBatches):
    """The length-sorted, tokenised batches of some chunks of texts, in order (picklable: DataLoader workers).

    Item ``i`` is ``(chunk number, positions of its texts within the chunk int64 [b], tokens)``.

    Args:
        texts: all texts (indexed by global row).
        chunks: ``(first row, end row)`` of each chunk to encode.
        formatter: the model's :meth:`~kdir.models.base.Scorer.formatter` of the side.
        batch_size: texts per batch.
    """

    def __init__(self, texts: Sequence[str], chunks: list[tuple[int, int]], formatter: Any, batch_size: int):
        super().__init__([hi - lo for lo, hi in chunks], batch_size)
        self.texts, self.chunks, self.formatter = texts, chunks, formatter

    def lengths(self, chunk: int) -> list[int]:
        """The characters of the chunk's texts (longest first, as :func:`~kdir.retrieval.encode.encode_texts`)."""
        lo, hi = self.chunks[chunk]
        return [len(self.texts[i]) for i in range(lo, hi)]

    def __getitem__(self, item: int) -> tuple[int, np.ndarray, dict[str, torch.Tensor]]:
        chunk, pos = self.locate(item)
        lo = self.chunks[chunk][0]
        return chunk, pos, self.formatter([self.texts[lo + int(p)] for p in pos])


class _ChunkBuffer:
    """One chunk's encodings, gathered batch by batch in sorted order and given back in row order."""

    def __init__(self, rows: int, dim: int, multi_vector: bool):
        self.rows, self.multi_vector, self.filled = rows, multi_vector, 0
        self.single = None if multi_vector else np.empty((rows, dim), dtype=np.float16)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, pos: np.ndarray, out: tuple[torch.Tensor, ...], input_ids: torch.Tensor) -> None:
        if self.single is not None:
            self.single[pos] = out[0].half().cpu().numpy()
        else:
            emb, mask = (t.cpu() for t in out)
            ids = torch.nn.functional.pad(input_ids, (0, mask.shape[1] - input_ids.shape[1]))
            self.parts.append((pos, mask.sum(1).numpy(), emb[mask].numpy(), ids[mask].numpy()))
        self.filled += len(pos)

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(vectors, lengths, token ids)`` in row order (``lengths``, ``token ids``: multi-vector only)."""
        if self.single is not None:
            return self.single, None, None
        pos, lengths, emb, ids = (np.concatenate(p) for p in zip(*self.parts))
        starts = np.cumsum(lengths) - lengths  # where each document's tokens sit in the sorted order
        order = np.argsort(pos)
        lengths, starts = lengths[order].astype(np.int64), starts[order]
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        take = np.repeat(starts, lengths) + within
        return emb[take], lengths, ids[take]


def _barrier(fabric: Any, world_size: int) -> bool:
    """Wait for every rank (Fabric's barrier, or torch.distributed's); ``False`` when there is no process group."""
    if fabric is not None:
        fabric.barrier()
        return True
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        return True
    return world_size == 1


@torch.inference_mode()
def encode_into_store(
    model: Scorer,
    texts: Sequence[str],
    ids: Sequence[str],
    path: str | Path,
    side: Side,
    batch_size: int = 128,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    dataset: str = "",
    num_workers: int = 0,
    device: str | torch.device | None = None,
    fabric: Any = None,
) -> EmbeddingStore:
    """Encode ``texts`` (of ``ids``, one side) into the store at ``path``, resuming it if it exists.

    Args:
        model: any kdir encoder (single-vector dual encoders, multi-vector ColBERT); run in eval mode.
        texts / ids: the texts and their unique ids, row ``i`` of the store being ``ids[i]``.
        path: the store folder (created, or resumed at its last finished chunk).
        side: ``query`` or ``doc``.
        batch_size: texts per forward pass.
        chunk_size: texts per chunk, the unit written to disk and resumed (a chunk's embeddings are in memory).
        rank / world_size: which shard this process writes, of how many (taken from ``fabric`` when given).
        progress: a tqdm bar over this rank's batches.
        dataset: the data's name, recorded in the store's meta.
        num_workers: DataLoader worker processes tokenising the next batches (0: in this process).
        device: where to encode (default: the model's; Fabric's device with ``fabric``).
        fabric: a launched ``lightning_fabric.Fabric``: ranks, device and barriers come from it.

    Returns:
        The store, opened complete (or, for independent ranks without a process group that are not the last to
        finish, opened as far as it is written).
    """
    from tqdm.auto import tqdm

    if fabric is not None:
        rank, world_size, device = fabric.global_rank, fabric.world_size, device or fabric.device
    if side not in ("query", "doc"):
        raise ConfigError(f"side must be 'query' or 'doc', got {side!r}")
    if len(texts) != len(ids):
        raise ValueError(f"encode_into_store: {len(texts)} texts but {len(ids)} ids")
    if not len(ids):
        raise EmptySplitError(f"{path}: no texts to encode")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must lie in [0, {world_size}), got {rank}")
    keys = id_hashes(list(ids))
    if len(np.unique(keys)) != len(keys):
        raise UnknownIdError(f"{path}: the ids to encode are not unique ({len(keys) - len(np.unique(keys))} repeats)")
    device = device or model.device
    fmt = model.formatter(side)
    was_training = model.training
    model.eval()
    try:
        probe = encode_batch(model, to_device(fmt([texts[0]]), device), side)
        meta = embedding_meta(
            model.provenance(), side, probe[0].shape[-1], model.multi_vector, keys, dataset, world_size, chunk_size
        )
        store = EmbeddingStore.create(path, meta)
        if store.complete:  # this encoder's encodings of these texts, written before (with any layout): reuse them
            log.info("%s holds these encodings already: reused", path)
            return EmbeddingStore.open(path)
        start, stop, _ = shard_layout(len(keys), chunk_size, world_size, rank)
        writer = store.writer(rank, keys[start:stop])
        try:
            pending = writer.pending
            if writer.done:
                log.info("%s: shard %d resumes after %d finished chunks", path, rank, writer.done)
            batches = ChunkBatches(texts, pending, fmt, batch_size)
            loader = DataLoader(batches, batch_size=None, num_workers=num_workers) if num_workers else batches
            buffer, current = None, -1
            bar = tqdm(total=len(batches), desc=f"encode {side} (shard {rank})", disable=not progress, unit="batch")
            for chunk, pos, tokens in loader:
                if chunk != current:
                    lo, hi = pending[chunk]
                    buffer, current = _ChunkBuffer(hi - lo, store.dim, store.multi_vector), chunk
                out = encode_batch(model, to_device(tokens, device), side)
                buffer.add(np.asarray(pos), out, tokens["input_ids"])
                if buffer.filled == buffer.rows:
                    writer.write(*buffer.arrays())
                bar.update()
            bar.close()
            writer.finish()
        finally:
            writer.close()
    finally:
        model.train(was_training)
    if _barrier(fabric, world_size):  # every shard is finished: rank 0 records it
        if rank == 0:
            store.finalize()
        _barrier(fabric, world_size)
        return EmbeddingStore.open(path)
    store.finalize()  # independent ranks: whichever finishes last records the store finished
    return EmbeddingStore.open(path, allow_incomplete=True)
