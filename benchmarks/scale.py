"""Cost against corpus size: encode → index → search → ir-measures, and CollectiveKD's expansion stage, in memory
(``corpus_store=null`` / ``token_store=null``) and streamed through an embedding store on disk.

    python benchmarks/scale.py                                  # eval at 100k, 300k, 1M; expansion at 100k, 300k
    python benchmarks/scale.py --eval-sizes 30000 --expand-sizes 30000 --modes store   # a quick look

A synthetic corpus is generated on the fly from the quickstart collection: passage ``i`` is quickstart passage
``i mod N`` with its words shuffled by a generator seeded with ``i`` (the first ``N`` are the originals, so the
quickstart's test qrels still judge them), encoded by the quickstart's tiny BERT (a mean-pooled dual encoder for
retrieval, a 16-d ColBERT for the expansion). Each measurement runs in a process of its own, so its peak RSS
(``ru_maxrss``) is its own; ``rss base`` is the process after imports and corpus generation, before any encoding (the
corpus' texts themselves are in it). In store mode the corpus is encoded once per size, by the first index's run,
and the next index is built from the same store (``encode s``: the encoding's share of ``s``). Prints a table with
the growth ratio of time and of peak RSS above base between consecutive sizes (3× and 3.3× more passages), and the
store's size on disk; ``--out`` writes JSON.
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

SIZES_EVAL = (100_000, 300_000, 1_000_000)
SIZES_EXPAND = (100_000, 300_000)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _dataset(size: int):
    import numpy as np

    from kdir.data.dataset import IRDataset, TextStore
    from kdir.data.quickstart import ensure

    base = IRDataset.from_beir(ensure("data"), "test")
    n = len(base.corpus)
    ids, texts = list(base.corpus.ids), list(base.corpus.texts)
    words = [t.split() for t in base.corpus.texts]
    for i in range(n, size):
        w = list(words[i % n])
        np.random.default_rng(i).shuffle(w)
        ids.append(f"s{i}")
        texts.append(" ".join(w))
    corpus = TextStore(ids[:size], texts[:size], {d: k for k, d in enumerate(ids[:size])})
    qrels = {q: {d: r for d, r in docs.items() if corpus.index.get(d, size) < size} for q, docs in base.qrels.items()}
    return IRDataset(corpus, base.queries, {q: d for q, d in qrels.items() if d}, name=f"synthetic-{size}")


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def one(stage: str, size: int, mode: str, factory: str, work: Path, cleanup: bool = True) -> dict:
    """One measurement (run in a child process): seconds per step, peak RSS, store size."""
    import torch

    from kdir.data.quickstart import ensure

    torch.manual_seed(0)
    dataset = _dataset(size)
    base = _rss_mb()
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"{stage}-{size}.store"
    encode_s = None
    start = time.perf_counter()
    if stage == "eval":
        from kdir.models import DualEncoder
        from kdir.retrieval.evaluators import RetrievalEvaluator
        from kdir.retrieval.stream_encode import encode_into_store

        model = DualEncoder(ensure("model"), pooling="mean", query_max_length=16, doc_max_length=32).eval()
        if mode == "store":  # encoded by the first factory's run of this size, reused by the next
            t0 = time.perf_counter()
            encode_into_store(model, dataset.corpus.texts, dataset.corpus.ids, store, "doc", batch_size=512)
            encode_s = round(time.perf_counter() - t0, 1)
        evaluator = RetrievalEvaluator(
            dataset, ["nDCG@10", "R@100"], depth=100, index_factory=factory, batch_size=512,
            corpus_store=store if mode == "store" else None,
        )  # fmt: skip
        metrics, _ = evaluator.evaluate(model, progress=False)
    else:
        from kdir.models import ColBERT
        from kdir.retrieval.expansion import expand_queries

        model = ColBERT(ensure("model"), dim=16, query_max_length=8, doc_max_length=32).freeze()
        out = work / f"expansion-{size}-{mode}"
        shutil.rmtree(store, ignore_errors=True)
        exp = expand_queries(
            model, dataset, out, depth=10, fb_docs=3, fb_clusters=8, fb_k=4, neighbours=5, batch_size=512,
            overwrite=True, progress=False, token_store=store if mode == "store" else None,
        )  # fmt: skip
        metrics = {"expanded": len(exp), **exp.meta["seconds"]}
        encode_s = metrics["encode"]
        shutil.rmtree(out, ignore_errors=True)
    seconds = time.perf_counter() - start
    record = {
        "stage": stage,
        "size": size,
        "mode": mode,
        "factory": factory,
        "seconds": round(seconds, 1),
        "encode_s": encode_s,
        "rss_base_mb": round(base),
        "rss_peak_mb": round(_rss_mb()),
        "store_mb": round(_size_mb(store), 1),
        "metrics": metrics,
    }
    if cleanup:
        shutil.rmtree(store, ignore_errors=True)
    return record


def _child(stage: str, size: int, mode: str, factory: str, work: Path, cleanup: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", stage, str(size), mode, factory, "--work", str(work)]
    cmd += [] if cleanup else ["--keep"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"stage": stage, "size": size, "mode": mode, "factory": factory, "error": done.stderr.strip()[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = (
        "| stage | index | mode | passages | s | encode s | × time | rss base MB | rss peak MB | peak − base "
        "| × above base | store MB |"
    )
    lines = [head, "|" + "---|" * 12]
    previous: dict[tuple, dict] = {}
    for r in rows:
        key = (r["stage"], r["factory"], r["mode"])
        if "error" in r:
            lines.append(
                f"| {r['stage']} | {r['factory']} | {r['mode']} | {r['size']:,} | failed: {r['error'][-80:]} |"
            )
            continue
        above = r["rss_peak_mb"] - r["rss_base_mb"]
        p = previous.get(key)
        t_ratio = f"{r['seconds'] / p['seconds']:.2f}" if p else ""
        m_ratio = f"{above / max(p['rss_peak_mb'] - p['rss_base_mb'], 1):.2f}" if p else ""
        lines.append(
            f"| {r['stage']} | {r['factory']} | {r['mode']} | {r['size']:,} | {r['seconds']} | {r['encode_s']} | "
            f"{t_ratio} | {r['rss_base_mb']} | {r['rss_peak_mb']} | {above} | {m_ratio} | {r['store_mb']} |"
        )
        previous[key] = r
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-sizes", type=int, nargs="*", default=list(SIZES_EVAL))
    ap.add_argument("--expand-sizes", type=int, nargs="*", default=list(SIZES_EXPAND))
    ap.add_argument("--factories", nargs="*", default=["Flat", "IVF1024,PQ16"])
    ap.add_argument("--modes", nargs="*", default=["memory", "store"], choices=["memory", "store"])
    ap.add_argument("--work", type=Path, default=Path("outputs/bench_scale"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", nargs=4, metavar=("STAGE", "SIZE", "MODE", "FACTORY"), help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        stage, size, mode, factory = args.one
        print(json.dumps(one(stage, int(size), mode, factory, args.work, cleanup=not args.keep)))
        return
    rows = []
    jobs = [("eval", f, m, s) for m in args.modes for s in args.eval_sizes for f in args.factories]
    jobs += [("expand", "Flat", m, s) for m in args.modes for s in args.expand_sizes]
    for i, (stage, factory, mode, size) in enumerate(jobs):
        last = not any(j[0] == stage and j[2] == "store" and j[3] == size for j in jobs[i + 1 :])
        rows.append(_child(stage, size, mode, factory, args.work, cleanup=last))
        print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: (r["stage"], r["factory"], r["mode"], r["size"]))
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
