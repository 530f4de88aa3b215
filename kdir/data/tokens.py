"""Pre-tokenised documents (``data.pretokenize=true``): every corpus text tokenised once, before training.

Tokenising a batch's documents is most of a training batch's CPU cost: a fast tokenizer reads each whole text
before it truncates it (on SciFact, 32 queries x (1 + 7) documents at 200 tokens take about 125 ms of one core,
more than the whole GPU step of a MiniLM student is estimated to take). A :class:`TokenTable` holds the token ids
of every document as the student's document formatter makes them (prefix, truncation, ``[SEP]``), ragged in one
flat array; a batch then only gathers and pads its rows (:meth:`TokenTable.batch`), with the inputs the formatter
gives, exactly. The table is built in the main process before the dataloader workers start, which share it under
the fork start method (copy-on-write pages; spawn would copy it into each worker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


class TokenTable:
    """Token ids of texts, ragged: ``ids[offsets[i]:offsets[i + 1]]`` are text ``i``'s (special tokens included).

    Args:
        ids: every text's ids, one after the other (``uint16`` when the vocabulary fits, else ``int32``).
        offsets: ``[N + 1]`` start of each text in ``ids`` (and the end of the last).
        pad_id: the tokenizer's padding id.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, pad_id: int):
        self.ids, self.offsets, self.pad_id = ids, offsets, int(pad_id)

    @classmethod
    def build(cls, formatter: Any, texts: Sequence[str], chunk: int = 8192) -> TokenTable:
        """Tokenise ``texts`` with ``formatter.token_ids`` (a :class:`~kdir.models.dual_encoder.TextFormatter`),
        ``chunk`` texts at a time."""
        start, parts, lengths = time.perf_counter(), [], []
        for s in range(0, len(texts), chunk):
            for ids in formatter.token_ids(texts[s : s + chunk]):
                parts.append(np.asarray(ids, dtype=np.int64))
                lengths.append(len(ids))
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        dtype = np.uint16 if flat.size == 0 or flat.max() < 2**16 else np.int32
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        table = cls(flat.astype(dtype), offsets, formatter.tokenizer.pad_token_id)
        log.info(
            "pre-tokenised %d documents: %d tokens (%.1f MB) in %.1f s",
            len(lengths), len(flat), table.ids.nbytes / 2**20, time.perf_counter() - start,
        )  # fmt: skip
        return table

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Tokens of each text (of ``rows``)."""
        lengths = np.diff(self.offsets)
        return lengths if rows is None else lengths[np.asarray(rows)]

    def batch(self, rows: np.ndarray) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"} [len(rows), longest]`` of texts ``rows``, padded on the right."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], self.lengths(rows)
        width = int(lengths.max()) if len(rows) else 0
        positions = np.arange(width)
        mask = positions < lengths[:, None]
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        ids[mask] = self.ids[(starts[:, None] + positions)[mask]]
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
