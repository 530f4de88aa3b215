"""Persistent stores: teacher scores keyed by (query id, document id) hashes; query expansions keyed by query id."""

from __future__ import annotations

from kdir.stores.embedding_store import EmbeddingStore
from kdir.stores.expansion_store import ExpansionStore
from kdir.stores.keys import id_hashes, pair_keys, pair_keys_from_ids
from kdir.stores.score_store import (
    ScoreStore,
    import_differences,
    sibling_store,
    teacher_differences,
)

__all__ = [
    "EmbeddingStore",
    "ExpansionStore",
    "ScoreStore",
    "id_hashes",
    "import_differences",
    "pair_keys",
    "pair_keys_from_ids",
    "sibling_store",
    "teacher_differences",
]
