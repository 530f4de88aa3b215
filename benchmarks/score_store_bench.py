"""Benchmark the teacher score store at MS MARCO scale against the usual pandas + dict cache.

    python benchmarks/score_store_bench.py --pairs 40000000 --out /tmp/kdir-bench

Generates N scored (qid, pid) pairs shaped like MS MARCO training candidates (N/100 queries x 100
documents of an 8.8M passage collection, numeric ids as strings), builds a :class:`kdir.stores.ScoreStore`
from the arrays, times ``import_tsv`` on a smaller TSV, then serves training-style batches (32 queries x 64
candidates, a mix of stored and missing pairs) in two fresh subprocesses:

* kdir: ``ScoreStore.open`` + ``lookup`` of precomputed pair keys (and, on a subset, hashing the string ids
  per batch first, as a collator would);
* baseline: the common practice of loading the scores into a pandas DataFrame (here from an ``.npz`` dump of
  the same arrays, int ids) and building a nested ``{qid: {pid: score}}`` dict, then ``dict.get`` per pair.

Every lookup of both is checked against the generated scores. Needs ``pip install -e .[bench]``
(pandas, psutil) and, at 40M pairs, about 10 GB of free memory (the dict baseline) and 2 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N_DOCS = 8_841_823  # MS MARCO passage collection
MAX_QID = 1_200_000  # MS MARCO passage qids are below ~1.19M


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=40_000_000, help="scored pairs in the store")
    p.add_argument("--docs-per-query", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("/tmp/kdir-bench"), help="work folder (replaces an earlier run)")
    p.add_argument("--segment-pairs", type=int, default=4_000_000, help="pairs per append before compaction")
    p.add_argument("--tsv-lines", type=int, default=2_000_000, help="lines of the import_tsv throughput test")
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--batch-queries", type=int, default=32)
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--hit-rate", type=float, default=0.8, help="share of looked-up pairs that are stored")
    p.add_argument("--string-batches", type=int, default=200, help="batches also timed from string ids (kdir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the pandas + dict baseline")
    p.add_argument("--child", choices=["compact", "kdir", "baseline"], help=argparse.SUPPRESS)  # subprocess mode
    return p.parse_args(argv)


def peak_rss_bytes() -> int:
    """This process's peak resident set: ``VmHWM`` (ru_maxrss would include the parent's, kept across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------------- data
def generate(n_pairs: int, per_query: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``qids [Q]``, ``pids [Q, per_query]`` (distinct per query) and float32 ``scores [Q, per_query]``."""
    n_q = n_pairs // per_query
    qids = np.sort(rng.choice(max(MAX_QID, 3 * n_q), size=n_q, replace=False))
    base = rng.integers(0, N_DOCS, size=n_q)
    stride = rng.integers(1, N_DOCS // per_query, size=n_q)  # pid_j = base + j * stride (mod N): distinct
    pids = (base[:, None] + stride[:, None] * np.arange(per_query)[None, :]) % N_DOCS
    scores = (rng.standard_normal((n_q, per_query)) * 3 + 5).astype(np.float32)
    return {"qids": qids, "pids": pids, "scores": scores, "base": base, "stride": stride}


def key_tables(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every query id and of every document id of the collection (the ids as strings)."""
    from kdir.stores import id_hashes

    return id_hashes([str(q) for q in data["qids"].tolist()]), id_hashes([str(d) for d in range(N_DOCS)])


def make_batches(data: dict[str, np.ndarray], args: argparse.Namespace, rng: np.random.Generator) -> dict:
    """Training-style lookups: query rows ``[NB, B]``, pids ``[NB, B, C]`` and the expected scores (NaN: missing)."""
    n_q, per_query = data["pids"].shape
    rows = rng.integers(0, n_q, size=(args.batches, args.batch_queries))
    shape = (args.batches, args.batch_queries, args.candidates)
    hit = rng.random(shape) < args.hit_rate
    pids = np.where(
        hit, data["pids"][rows[..., None], rng.integers(0, per_query, size=shape)], rng.integers(0, N_DOCS, size=shape)
    )
    # exact expectation, also for "misses" that happen to be among the query's documents
    offset = (pids - data["base"][rows][..., None]) % N_DOCS
    stride = data["stride"][rows][..., None]
    slot = offset // stride
    stored = (offset % stride == 0) & (slot < per_query)
    expected = np.where(stored, data["scores"][rows[..., None], np.minimum(slot, per_query - 1)], np.nan)
    return {"qids": data["qids"][rows], "pids": pids, "rows": rows, "expected": expected.astype(np.float32)}


# ---------------------------------------------------------------------------------------------------- build
def build(args: argparse.Namespace) -> dict:
    """Generate the data, build the store, time ``import_tsv``; write what the subprocesses need."""
    from kdir.stores import ScoreStore, pair_keys, pair_keys_from_ids

    rng = np.random.default_rng(args.seed)
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not (out / "store" / "meta.json").is_file():
            raise SystemExit(f"{out} is not empty and holds no earlier benchmark: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    data = generate(args.pairs, args.docs_per_query, rng)
    n_q, per_query = data["pids"].shape
    res["queries"], res["pairs"] = n_q, n_q * per_query

    with Timer() as t:
        q_table, d_table = key_tables(data)
    res["hash_ids_s"] = t.s
    with Timer() as t:
        keys = pair_keys(q_table[:, None], d_table[data["pids"]])  # [Q, per_query]
    res["pair_keys_s"] = t.s
    sample = rng.integers(0, keys.size, size=10_000)
    qs = [str(q) for q in data["qids"][sample // per_query].tolist()]
    ps = [str(p) for p in data["pids"].reshape(-1)[sample].tolist()]
    assert (pair_keys_from_ids(qs, ps) == keys.reshape(-1)[sample]).all(), "vectorised keys != string-id keys"
    res["key_check"] = f"{len(sample):,} sampled pairs == pair_keys_from_ids"

    store = ScoreStore.create(out / "store", {"teacher": {"name": "synthetic"}, "data": {"pairs": res["pairs"]}})
    flat_keys, flat_scores = keys.reshape(-1), data["scores"].reshape(-1)
    with Timer() as t:
        for start in range(0, len(flat_keys), args.segment_pairs):
            stop = start + args.segment_pairs
            store.append(flat_keys[start:stop], flat_scores[start:stop])
    res["append_s"], res["segments"] = t.s, len(list((out / "store" / "segments").glob("*.keys.npy")))
    res["build_peak_rss"] = peak_rss_bytes()
    compacted = run_child(args, "compact")
    res["compact_s"], res["compact_peak_rss"] = compacted["compact_s"], compacted["peak_rss"]
    store.refresh()
    res["store_bytes"] = sum(f.stat().st_size for f in (out / "store").rglob("*") if f.is_file())
    assert len(store) == res["pairs"]

    # import_tsv throughput on the first tsv-lines pairs
    n_tsv = min(args.tsv_lines, res["pairs"])
    q_tsv = np.repeat(data["qids"], per_query)[:n_tsv].tolist()
    p_tsv, s_tsv = data["pids"].reshape(-1)[:n_tsv].tolist(), flat_scores[:n_tsv]
    with open(out / "scores.tsv", "w") as f:
        f.writelines(f"{q}\t{p}\t{s}\n" for q, p, s in zip(q_tsv, p_tsv, map(str, s_tsv)))
    tsv_store = ScoreStore.create(out / "tsv-store", {"teacher": {"name": "synthetic"}})
    with Timer() as t:
        tsv_store.import_tsv(out / "scores.tsv", format="pairs")
    res["tsv_lines"], res["import_tsv_s"] = n_tsv, t.s
    np.testing.assert_array_equal(tsv_store.lookup(flat_keys[:n_tsv]), s_tsv)

    batches = make_batches(data, args, rng)
    batch_keys = pair_keys(q_table[batches["rows"]][..., None], d_table[batches["pids"]])
    np.savez(
        out / "batches.npz", keys=batch_keys, qids=batches["qids"], pids=batches["pids"], expected=batches["expected"]
    )
    res["hit_share"] = float(np.mean(~np.isnan(batches["expected"])))
    if not args.no_baseline:
        np.savez(
            out / "baseline.npz",
            qid=np.repeat(data["qids"], per_query),
            pid=data["pids"].reshape(-1),
            score=flat_scores,
        )
    return res


# ---------------------------------------------------------------------------------------------------- serve
def compact_store(args: argparse.Namespace) -> dict:
    """In a fresh process: merge the appended segments into one."""
    from kdir.stores import ScoreStore

    with Timer() as t:
        ScoreStore.open(args.out / "store").compact()
    return {"compact_s": t.s, "peak_rss": peak_rss_bytes()}


def serve_kdir(args: argparse.Namespace) -> dict:
    """In a fresh process: open the store and serve every batch of precomputed keys."""
    from kdir.stores import ScoreStore, id_hashes, pair_keys

    batches = np.load(args.out / "batches.npz")
    keys, expected = batches["keys"], batches["expected"]
    res: dict = {}
    with Timer() as t:
        store = ScoreStore.open(args.out / "store")
        store.lookup(keys[0])
    res["open_s"] = t.s
    got = np.empty_like(expected)
    with Timer() as t:
        for b in range(len(keys)):
            got[b] = store.lookup(keys[b])
    res["lookup_s"], res["keys"] = t.s, keys.size
    res["peak_rss"] = peak_rss_bytes()
    import psutil

    res["file_backed_rss"] = psutil.Process().memory_info().shared  # mapped store pages, page cache
    res["verified"] = bool(np.array_equal(got, expected, equal_nan=True))

    n = min(args.string_batches, len(keys))  # from string ids: hash + lookup, as a collator would
    qids = [[str(q) for q in batch] for batch in batches["qids"][:n].tolist()]
    pids = [[str(p) for p in batch.reshape(-1).tolist()] for batch in batches["pids"][:n]]
    shape = keys.shape[1:]
    with Timer() as t:
        for b in range(n):
            scores = store.lookup(pair_keys(id_hashes(qids[b])[:, None], id_hashes(pids[b]).reshape(shape)))
            assert np.array_equal(scores, expected[b], equal_nan=True)
    res["string_lookup_s"], res["string_keys"] = t.s, n * keys[0].size
    return res


def serve_baseline(args: argparse.Namespace) -> dict:
    """In a fresh process: pandas DataFrame -> nested ``{qid: {pid: score}}`` dict, then ``dict.get`` per pair."""
    import pandas as pd

    res: dict = {}
    with Timer() as t:
        arrays = np.load(args.out / "baseline.npz")
        df = pd.DataFrame({"qid": arrays["qid"], "pid": arrays["pid"], "score": arrays["score"]})
        del arrays
    res["load_df_s"] = t.s
    with Timer() as t:
        table: dict[int, dict[int, float]] = {}
        for q, p, s in zip(df["qid"].tolist(), df["pid"].tolist(), df["score"].tolist()):
            inner = table.get(q)
            if inner is None:
                inner = table[q] = {}
            inner[p] = s
        del df
    res["build_dict_s"] = t.s
    res["open_s"] = res["load_df_s"] + res["build_dict_s"]

    batches = np.load(args.out / "batches.npz")
    expected = batches["expected"]
    qids, pids = batches["qids"].tolist(), batches["pids"].tolist()  # ids as Python objects, as in a dataset
    got = np.empty_like(expected)
    nan, empty = float("nan"), {}
    with Timer() as t:
        for b in range(len(qids)):
            got[b] = [
                [row.get(p, nan) for p in cands] for row, cands in zip((table.get(q, empty) for q in qids[b]), pids[b])
            ]
    res["lookup_s"], res["keys"] = t.s, expected.size
    res["peak_rss"] = peak_rss_bytes()
    res["verified"] = bool(np.array_equal(got, expected, equal_nan=True))
    return res


def run_child(args: argparse.Namespace, mode: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--out",
        str(args.out),
        "--string-batches",
        str(args.string_batches),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace, b: dict, k: dict, base: dict | None) -> None:
    gb, mb = 1e9, 1e6
    print(
        f"kdir ScoreStore benchmark: {b['pairs']:,} pairs ({b['queries']:,} queries x {args.docs_per_query} docs, "
        f"{N_DOCS:,}-passage id space); lookups: {args.batches:,} batches of {args.batch_queries} x "
        f"{args.candidates} keys, {b['hit_share']:.0%} stored"
    )
    print()
    print("build (parent process)")
    rows = [
        (f"hash ids ({b['queries']:,} qids + {N_DOCS:,} pids)", f"{b['hash_ids_s']:.2f} s"),
        ("pair keys, vectorised", f"{b['pair_keys_s']:.2f} s  ({b['key_check']})"),
        (f"append ({b['segments']} segments)", f"{b['append_s']:.2f} s"),
        ("compact (fresh subprocess)", f"{b['compact_s']:.2f} s, peak RSS {b['compact_peak_rss'] / gb:.2f} GB"),
        (
            "build total (keys + append + compact)",
            f"{b['pair_keys_s'] + b['append_s'] + b['compact_s']:.2f} s (+ {b['hash_ids_s']:.2f} s id hashing)",
        ),
        ("store on disk", f"{b['store_bytes'] / mb:,.0f} MB ({b['store_bytes'] / b['pairs']:.1f} B/pair)"),
        ("peak RSS of generating + appending", f"{b['build_peak_rss'] / gb:.2f} GB"),
        (
            f"import_tsv ({b['tsv_lines']:,} lines, pairs)",
            f"{b['import_tsv_s']:.2f} s = {b['tsv_lines'] / b['import_tsv_s']:,.0f} lines/s",
        ),
    ]
    for name, value in rows:
        print(f"  {name:<42} {value}")
    print()
    print("serving (fresh subprocess each, warm page cache)")
    header = ("", "kdir ScoreStore", "pandas -> dict", "kdir / baseline")
    table = [
        (
            "open / load (s)",
            f"{k['open_s']:.3f}",
            f"{base['open_s']:.1f}" if base else "-",
            f"{k['open_s'] / base['open_s']:.4f}" if base else "-",
        ),
        (
            "lookup (keys/s)",
            f"{k['keys'] / k['lookup_s']:,.0f}",
            f"{base['keys'] / base['lookup_s']:,.0f}" if base else "-",
            f"{(k['keys'] / k['lookup_s']) / (base['keys'] / base['lookup_s']):.2f}" if base else "-",
        ),
        (
            "lookup per batch (ms)",
            f"{k['lookup_s'] / args.batches * 1e3:.3f}",
            f"{base['lookup_s'] / args.batches * 1e3:.3f}" if base else "-",
            f"{k['lookup_s'] / base['lookup_s']:.2f}" if base else "-",
        ),
        (
            "peak RSS (GB)",
            f"{k['peak_rss'] / gb:.2f}",
            f"{base['peak_rss'] / gb:.2f}" if base else "-",
            f"{k['peak_rss'] / base['peak_rss']:.3f}" if base else "-",
        ),
        (
            "verified vs ground truth",
            "all" if k["verified"] else "MISMATCH",
            ("all" if base["verified"] else "MISMATCH") if base else "-",
            "",
        ),
    ]
    print(f"  {header[0]:<26}{header[1]:>18}{header[2]:>18}{header[3]:>18}")
    for row in table:
        print(f"  {row[0]:<26}{row[1]:>18}{row[2]:>18}{row[3]:>18}")
    print()
    print(
        f"  kdir peak RSS includes {k['file_backed_rss'] / mb:,.0f} MB of file-backed (mmap) store pages, "
        "reclaimable page cache"
    )
    print(
        f"  kdir from string ids (hash + lookup, {k['string_keys']:,} keys): "
        f"{k['string_keys'] / k['string_lookup_s']:,.0f} keys/s"
    )
    if base:
        print(
            f"  baseline load = DataFrame from .npz {base['load_df_s']:.1f} s + nested dict build "
            f"{base['build_dict_s']:.1f} s; dict keyed by int ids, batches given as Python int lists"
        )
    target = "OK" if k["peak_rss"] < 1.5 * gb else "OVER"
    print(f"  kdir serving peak RSS target < 1.5 GB: {target}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps({"compact": compact_store, "kdir": serve_kdir, "baseline": serve_baseline}[args.child](args)))
        return
    b = build(args)
    k = run_child(args, "kdir")
    base = None if args.no_baseline else run_child(args, "baseline")
    report(args, b, k, base)
    if not k["verified"] or (base and not base["verified"]):
        raise SystemExit("lookups do not match the ground truth")


if __name__ == "__main__":
    main()
