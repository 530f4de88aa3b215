"""Pre-tokenised documents (``data.pretokenize=true``): every corpus text tokenised once, before training.

Tokenising a batch's documents is most of a training batch's CPU cost: a fast tokenizer reads each whole text
before it truncates it (on SciFact, 32 queries x (1 + 7) documents at 200 tokens take about 117 ms of one core,
more than the whole GPU step of a MiniLM student is estimated to take). A :class:`TokenTable` holds the token ids
of every document as the student's document formatter makes them (prefix, truncation, ``[SEP]``), ragged in one
flat array; a batch then only gathers and pads its rows (:meth:`TokenTable.batch`), with the inputs the formatter
gives, exactly. The table is built in the main process before the dataloader workers start, which share it under
the fork start method (copy-on-write pages; spawn would copy it into each worker).

With ``data.pretokenize_cache=<dir>`` the table is saved there (``ids.npy``, ``offsets.npy``, then ``meta.json``, each
written atomically; ``meta.json`` last, so a killed write leaves no table that looks complete) and later runs and
DDP ranks memory-map it instead of tokenising again (one copy in the page cache). ``meta.json`` records what the
table was built from: the tokenizer (a hash of its serialised form), the formatter's settings and the texts (count
and xxh64); a table of anything else is rebuilt, with a log line naming the difference.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor

from kdir.utils.io import save_json, save_npy, texts_xxh64

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
        for s in range(0, len(texts), chunk):  # one array per chunk: no per-text objects kept
            ids = formatter.token_ids(texts[s : s + chunk])
            parts.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64))
            lengths.extend(map(len, ids))
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

    @classmethod
    def cached(cls, formatter: Any, texts: Sequence[str], cache: str | Path | None) -> TokenTable:
        """The table of ``texts``: memory-mapped from ``cache`` when it holds one built from the same tokenizer,
        settings and texts, else built (and saved there when ``cache`` is given)."""
        if cache is None:
            return cls.build(formatter, texts)
        cache, record = Path(cache), table_record(formatter, texts)
        meta = cache / "meta.json"
        if meta.is_file():
            saved = json.loads(meta.read_text())
            if saved == record:
                table = cls(np.load(cache / "ids.npy", mmap_mode="r"), np.load(cache / "offsets.npy"), saved["pad_id"])
                log.info("pre-tokenised documents read from %s (%d documents)", cache, len(table))
                return table
            differs = sorted(k for k in record.keys() | saved.keys() if record.get(k) != saved.get(k))
            log.warning("data.pretokenize_cache=%s: rebuilding it (%s differ)", cache, ", ".join(differs))
            meta.unlink(missing_ok=True)  # another rank may be rebuilding it too
        table = cls.build(formatter, texts)
        save_npy(table.ids, cache / "ids.npy")
        save_npy(table.offsets, cache / "offsets.npy")
        save_json(record, meta)  # last: the mark of a complete table
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


def table_record(formatter: Any, texts: Sequence[str]) -> dict[str, Any]:
    """What a saved table is built from: the tokenizer, the formatter's settings, the texts."""
    tokenizer = formatter.tokenizer
    return {
        "kind": "kdir-token-table/1",
        "tokenizer_xxh64": tokenizer_hash(tokenizer),
        "pad_id": int(tokenizer.pad_token_id),
        "max_length": formatter.max_length,
        "prefix": formatter.prefix,
        "add_sep": formatter.add_sep,
        "texts": len(texts),
        "texts_xxh64": texts_xxh64(texts),
    }


def tokenizer_hash(tokenizer: Any) -> str:
    """xxh64 of a fast tokenizer's serialised form, without the truncation and padding state its calls set."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return xxhash.xxh64(json.dumps(state, sort_keys=True).encode()).hexdigest()
