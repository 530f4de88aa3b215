"""Persistent stores: teacher scores keyed by stable (query id, document id) hashes."""

from __future__ import annotations

from kdir.stores.keys import id_hashes, pair_keys, pair_keys_from_ids
from kdir.stores.score_store import ScoreStore

__all__ = ["ScoreStore", "id_hashes", "pair_keys", "pair_keys_from_ids"]
