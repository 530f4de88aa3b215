"""Data: file formats, datasets and splits, training examples and negatives, the typed batch, the sharded stream,
collation (tokenisation in dataloader workers), pre-tokenised documents, the datamodule, generated queries and the
offline quickstart."""

from __future__ import annotations
