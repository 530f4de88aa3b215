"""Score-store lookups under training at scale: fill's growing segment count, and the in-batch layout's key count.

    python benchmarks/store_lookup.py                      # both tables (about a minute on 2 CPU cores)
    python benchmarks/store_lookup.py --appends 1 40 --batch-sizes 32 512

1. Lookup time of 2,048 pair keys (half stored, half not: a fill batch) after N appends of 50,000 pairs, as
   ``signal=fill`` writes them: one segment per append, never merged (``ScoreStore.append``, before), or merged as
   they are written (``TieredAppender``, fanout 4, after). Each open segment costs two file descriptors; the last
   column is the time spent writing (appends, and merges after).
2. The cached teacher's part of collating an in-batch batch ``[B, B(1+n)]`` (``TeacherSignal.collate``) with
   ``n = 7`` negatives: every column's pair hashed and looked up (before), or each row's own candidates plus the
   pairs a per-query index of the stored ones holds (after). The store holds every query's positive and its pool
   of 30 run candidates (4 of the 7 negatives are drawn from it, 3 from the whole corpus); both give the same
   scores (checked).

Times are medians of repeated runs in a fresh reader (segment directories built before timing).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from kdir.data.batch import candidate_columns
from kdir.data.dataset import IRDataset, TextStore
from kdir.stores import ScoreStore, pair_keys
from kdir.stores.score_store import TieredAppender
from kdir.training.signal import TeacherSignal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--appends", type=int, nargs="+", default=[1, 40, 200], help="fill appends to measure after")
    p.add_argument("--pairs-per-append", type=int, default=50_000, help="signal.flush_every")
    p.add_argument("--keys", type=int, default=2048, help="keys per lookup")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 512, 2048], help="in-batch B")
    p.add_argument("--negatives", type=int, default=7)
    p.add_argument("--queries", type=int, default=4096, help="training queries of the in-batch benchmark")
    p.add_argument("--docs", type=int, default=200_000, help="corpus size of the in-batch benchmark")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    return p.parse_args(argv)


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


class _Counted:
    """Counts the keys a store is asked to look up (``calls``: keys per call)."""

    def __init__(self, store: ScoreStore):
        self.store, self.calls = store, []

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        self.calls.append(np.asarray(keys).size)
        return self.store.__class__.lookup(self.store, keys)


def lookup_table(args: argparse.Namespace, work: Path) -> list[tuple]:
    """Rows ``(appends, segments before, ms before, segments after, ms after, s writing before, s writing after)``."""
    rng = np.random.default_rng(0)
    plain = ScoreStore.create(work / "plain.store", {"teacher": {"name": "bench"}})
    tiered_store = ScoreStore.create(work / "tiered.store", {"teacher": {"name": "bench"}})
    tiered = TieredAppender(tiered_store)
    written: list[np.ndarray] = []
    rows, done, writing = [], 0, [0.0, 0.0]
    for target in sorted(args.appends):
        while done < target:
            keys = rng.integers(0, 2**64, size=args.pairs_per_append, dtype=np.uint64)
            values = rng.standard_normal(args.pairs_per_append).astype(np.float32)
            for i, append in enumerate((plain.append, tiered.append)):
                t = time.perf_counter()
                append(keys, values)
                writing[i] += time.perf_counter() - t
            written.append(keys[:: max(1, args.pairs_per_append // 200)])  # a sample to probe
            done += 1
        stored = np.concatenate(written)
        probe = np.concatenate(
            [
                rng.choice(stored, args.keys // 2),
                rng.integers(0, 2**64, size=args.keys - args.keys // 2, dtype=np.uint64),
            ]
        )
        row = [target]
        for path in (plain.path, tiered_store.path):
            reader = ScoreStore.open(path)
            reader.lookup(probe)  # builds each segment's directory
            assert not np.isnan(reader.lookup(probe[: args.keys // 2])).any()
            row += [len(reader.segments()), _median_ms(partial(reader.lookup, probe), 30)]
        rows.append((*row, *writing))
    return rows


def _dataset(n_queries: int, n_docs: int) -> IRDataset:
    corpus = TextStore.from_pairs((f"d{i}", "x") for i in range(n_docs))
    queries = TextStore.from_pairs((f"q{i}", "x") for i in range(n_queries))
    return IRDataset(corpus, queries, {f"q{i}": {f"d{i}": 1} for i in range(n_queries)}, name="bench")


def inbatch_table(args: argparse.Namespace, work: Path) -> list[tuple]:
    """Rows ``(B, keys before, ms before, keys after, ms after, stored cells)``."""
    rng = np.random.default_rng(1)
    nq, nd, n = args.queries, args.docs, args.negatives
    ds = _dataset(nq, nd)
    pool = rng.integers(nq, nd, size=(nq, 30))  # each query's run candidates (positives are d0 .. d{nq-1})
    codes = np.unique(
        np.concatenate([np.arange(nq) * nd + np.arange(nq), (np.arange(nq)[:, None] * nd + pool).ravel()])
    )
    store = ScoreStore.create(work / "inbatch.store", {"teacher": {"name": "bench"}})
    signal = TeacherSignal("cached", store.path, force=True).bind(ds)
    keys = pair_keys(signal.q_hash[codes // nd], signal.d_hash[codes % nd])
    store.append(keys, rng.standard_normal(len(keys)).astype(np.float32))
    signal.store.refresh()
    t = time.perf_counter()
    signal.index_candidates(codes)
    index_s = time.perf_counter() - t
    rows = []
    for b in args.batch_sizes:
        q = rng.choice(nq, size=b, replace=False)
        picks = np.argsort(rng.random((b, 30)), axis=1)[:, : n - 3]
        neg = np.concatenate([np.take_along_axis(pool[q], picks, axis=1), rng.integers(nq, nd, size=(b, 3))], axis=1)
        unique, inverse = np.unique(np.concatenate([q, neg.ravel()]), return_inverse=True)  # positive of q is d{q}
        candidates = inverse.reshape(-1)[candidate_columns(b, n, "inbatch")]
        own = candidate_columns(b, n, "pairwise")
        texts = ["x"] * len(unique)
        before = partial(signal.collate, q, unique, candidates, texts, texts)
        after = partial(signal.collate, q, unique, candidates, texts, texts, own=own)
        signal.store.lookup = counted = _Counted(signal.store)
        a, c = before()["teacher_scores"].numpy(), after()["teacher_scores"].numpy()
        del signal.store.lookup
        np.testing.assert_array_equal(a, c)
        repeat = 3 if b >= 1024 else 10
        t0, t1 = _median_ms(before, repeat), _median_ms(after, repeat)
        rows.append((b, counted.calls[0], t0, counted.calls[1], t1, int(np.isfinite(a).sum())))
    print(f"(per-query index of {len(codes):,} candidate pairs built in {index_s:.2f} s)")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        rows = lookup_table(args, work)
        took = time.perf_counter() - t
        print(f"\nLookup of {args.keys:,} keys after N fill appends of {args.pairs_per_append:,} pairs ({took:.1f} s)")
        head = ["appends", "segments (fds) before", "ms before", "segments (fds) after", "ms after", "s writing b/a"]
        print("| " + " | ".join(head) + " |")
        print("|---:|---:|---:|---:|---:|---:|")
        for n, s0, t0, s1, t1, w0, w1 in rows:
            print(f"| {n} | {s0} ({2 * s0}) | {t0:.2f} | {s1} ({2 * s1}) | {t1:.2f} | {w0:.1f} / {w1:.1f} |")
        t = time.perf_counter()
        rows = inbatch_table(args, work)
        took = time.perf_counter() - t
        print(f"\nCached teacher scores of an in-batch batch, {args.negatives} negatives ({took:.1f} s)")
        print("| B | keys before | ms before | keys after | ms after | stored cells |")
        print("|---:|---:|---:|---:|---:|---:|")
        for b, k0, t0, k1, t1, stored in rows:
            print(f"| {b} | {k0:,} | {t0:.1f} | {k1:,} | {t1:.2f} | {stored:,} |")
        print(f"\npid {os.getpid()}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
