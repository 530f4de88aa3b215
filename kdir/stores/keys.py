"""Stable 64-bit keys for ids and (query, document) pairs.

An id hashes to ``xxh64(utf8(id), seed=0)``: the same value in every process, on every machine and
Python version (unlike :func:`hash`, which is salted per process for ``str``). A pair key mixes the two
id hashes with a splitmix64 finaliser, so keys are uniform over ``[0, 2**64)``.

Keys are not checked for collisions: among ``n`` distinct pairs (or ids) the probability that any two
share a key is about ``n**2 / 2**65``, e.g. ~4e-5 for 40M MS MARCO pairs, ~2e-3 for 300M pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

KEY_SCHEME = "xxh64-pair/1"  # recorded in a store's meta; change it if the functions below ever change

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    """``uint64 [len(ids)]``: ``xxh64`` (seed 0) of each id's UTF-8 bytes."""
    return np.fromiter(map(xxhash.xxh64_intdigest, map(str.encode, ids)), dtype=np.uint64, count=len(ids))


def pair_keys(q_hashes: np.ndarray, d_hashes: np.ndarray) -> np.ndarray:
    """``uint64`` pair keys of query and document hashes, broadcast together (e.g. ``[B, 1]`` with ``[B, C]``).

    ``splitmix64((q * 0x9E3779B97F4A7C15) ^ d)`` in wrapping 64-bit arithmetic. The multiplier is odd, so
    for a fixed query distinct documents never share a key (and vice versa).
    """
    q, d = np.asarray(q_hashes), np.asarray(d_hashes)
    if q.dtype != np.uint64 or d.dtype != np.uint64:
        raise TypeError(f"pair_keys expects uint64 id hashes (from id_hashes), got {q.dtype} and {d.dtype}")
    with np.errstate(over="ignore"):  # uint64 products wrap by design
        x = (q * _GOLDEN) ^ d
        x = (x ^ (x >> _S30)) * _MIX1
        x = (x ^ (x >> _S27)) * _MIX2
        return np.asarray(x ^ (x >> _S31), dtype=np.uint64)


def pair_keys_from_ids(qids: Sequence[str], pids: Sequence[str]) -> np.ndarray:
    """``uint64 [N]`` keys of the pairs ``(qids[i], pids[i])``."""
    if len(qids) != len(pids):
        raise ValueError(f"pair_keys_from_ids: {len(qids)} query ids but {len(pids)} document ids")
    return pair_keys(id_hashes(qids), id_hashes(pids))
