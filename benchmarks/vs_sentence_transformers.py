"""kdir vs sentence-transformers, side by side: Margin-MSE training throughput and SciFact evaluation.

    python benchmarks/vs_sentence_transformers.py --store <CE score store> --negatives <train run> [--steps 40]

Training: the same student (paraphrase-MiniLM-L3-v2, mean pooling, dot product, 64/128 tokens), the same
(query, positive, negative) triples of SciFact train with the same cached cross-encoder margins, batch size,
learning rate, warm-up, steps, precision and data-loader workers. kdir trains through ``python -m kdir.run``,
run in this process by ``kdir.utils.run_command`` (fixed triples + cached scores imported once into a score
store); sentence-transformers through its ``SentenceTransformerTrainer`` with ``MarginMSELoss``. Both loops
are timed by callbacks from the first to the last training batch (model loading, data import and the
trainers' setup excluded) and count the queries each step actually trained; the steady rate skips the first
``--warmup`` batches. ``benchmarks/gpu.py`` is the GPU benchmark (several negatives, MFU, memory, data wait).

Evaluation: the zero-shot L3 (cosine, 128 tokens) on SciFact test (300 queries, 5,183 documents): kdir's
``RetrievalEvaluator`` (encode → FAISS → TREC run → ir-measures) vs ``SentenceTransformer.encode`` → FAISS
``IndexFlatIP`` → ir-measures, wall time and the same metrics. On a GPU both run in bf16.

Needs ``pip install -e .[bench]``. Prints a table of figures and kdir/ST ratios; ``--out`` saves them as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(os.environ.get("KDIR_SHARED", "../shared"))
L3 = SHARED / "models/paraphrase-MiniLM-L3-v2"
METRICS = ["nDCG@10", "RR@10", "R@100", "R@1000"]


def write_triples(store: Path, negatives: Path, depth: int, out: Path, seed: int) -> int:
    """Hofstätter-format triples ``pos_score neg_score qid pos neg``: every (train query, positive) of
    ``data=scifact`` with one negative drawn from its top-``depth`` run candidates, scored from the store."""
    from kdir.data.dataset import IRDataset, holdout
    from kdir.data.formats import read_trec_run, top_ranked
    from kdir.stores import ScoreStore, pair_keys_from_ids

    ds = holdout(IRDataset.from_beir(SHARED / "data/scifact", "train"), size=100, part="rest", seed=0)
    run, rng, rows = read_trec_run(negatives), np.random.default_rng(seed), []
    for qid, rels in ds.qrels.items():
        pos = [p for p, r in rels.items() if r > 0]
        pool = [d for d in top_ranked(run.get(qid, {}), depth) if d not in rels]
        for p in pos:
            if pool:
                rows.append((qid, p, pool[rng.integers(len(pool))]))
    scores = ScoreStore.open(store)
    s_pos = scores.lookup(pair_keys_from_ids([r[0] for r in rows], [r[1] for r in rows]))
    s_neg = scores.lookup(pair_keys_from_ids([r[0] for r in rows], [r[2] for r in rows]))
    with out.open("w") as f:
        for (q, p, n), a, b in zip(rows, s_pos, s_neg):
            f.write(f"{a:.6f}\t{b:.6f}\t{q}\t{p}\t{n}\n")
    return len(rows)


def kdir_train(triples: Path, args, work: Path) -> dict:
    from kdir.utils import run_command

    out = work / "kdir_run"
    overrides = [
        "experiment=margin_mse",
        "student=minilm_l3",
        f"student.model_name_or_path={L3}",
        "student.similarity=dot",
        "student.query_max_length=64",
        "student.doc_max_length=128",
        "teacher=scores",
        f"signal.store={work / 'kdir.store'}",
        f"signal.import_file={triples}",
        "signal.import_format=margin_scores",
        "data=scifact",
        "~data.examples",  # fixed triples instead of qrels + negatives
        "+data.examples._target_=kdir.data.examples.TripleExamples",
        f"+data.examples.path='{triples}'",
        "+data.examples.format=margin_scores",
        "optim=adamw",
        f"optim.optimizer.lr={args.lr}",
        f"optim.warmup={args.warmup_frac}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "eval.val=null",
        "eval.test=null",
        "~callbacks.model_checkpoint",
        f"callbacks.throughput.warmup_steps={args.warmup}",
        "logger=none",
        "eval_untrained=false",
        "export_student=false",
        f"trainer.max_steps={args.steps}",
        "trainer.max_epochs=-1",
        f"trainer.accelerator={args.accelerator}",
        f"trainer.precision={args.precision}",
        "+trainer.enable_checkpointing=false",
        f"seed={args.seed}",
        "run_name=bench",
        f"hydra.run.dir={out}",
    ]
    status = run_command("kdir.run", *overrides)  # `python -m kdir.run ...`, in this process
    if status != 0:
        raise SystemExit(f"kdir.run exited with status {status}; see {out}/run.log")
    return json.loads((out / "throughput.json").read_text())


def gpu_bench():
    """``benchmarks/gpu.py`` as a module (loaded once, under the name it gives itself)."""
    import importlib.util

    name = "kdir_benchmarks_gpu"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("gpu.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def st_train(triples: Path, args, work: Path) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments

    from kdir.data.dataset import IRDataset

    bench = gpu_bench()  # its clock of sentence-transformers' steps and count of the queries each trained

    ds = IRDataset.from_beir(SHARED / "data/scifact", "train")
    qtext = dict(zip(ds.queries.ids, ds.queries.texts))
    dtext = dict(zip(ds.corpus.ids, ds.corpus.texts))
    cols: dict[str, list] = {"query": [], "positive": [], "negative": [], "label": []}
    for line in triples.read_text().splitlines():
        a, b, q, p, n = line.split("\t")
        cols["query"].append(qtext[q])
        cols["positive"].append(dtext[p])
        cols["negative"].append(dtext[n])
        cols["label"].append(float(a) - float(b))
    model = SentenceTransformer(str(L3), device=args.device)
    model.max_seq_length = 128  # one limit for queries and documents; SciFact queries are far below 64 tokens

    clock, loss = bench.st_clock(args.device.startswith("cuda")), bench.counting_margin_mse(model)
    targs = Arguments(
        output_dir=str(work / "st_run"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        **bench.st_warmup(args.warmup_frac),
        weight_decay=0.01,
        max_grad_norm=1.0,
        bf16=args.precision.startswith("bf16"),
        dataloader_num_workers=args.workers,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        seed=args.seed,
        use_cpu=args.device == "cpu",
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=targs, train_dataset=Dataset.from_dict(cols), loss=loss, callbacks=[clock]
    )
    trainer.train()
    s, counts = [clock.begin, *clock.ends], loss.queries  # counts: the queries of each step (its labels' rows)
    steps = len(s) - 1
    out = {
        "steps": steps,
        "queries_per_step": args.batch_size,
        "queries": sum(counts),
        "seconds": s[-1] - s[0],
        "queries_per_s": sum(counts) / (s[-1] - s[0]),
    }
    if steps > args.warmup:
        steady = s[-1] - s[args.warmup]
        out |= {"steady_seconds": steady, "steady_queries_per_s": sum(counts[args.warmup :]) / steady}
    return out


def _autocast(device: str):
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def kdir_eval(args) -> dict:
    from kdir.data.dataset import IRDataset
    from kdir.models import DualEncoder
    from kdir.retrieval.evaluators import RetrievalEvaluator

    evaluator = RetrievalEvaluator(
        IRDataset.from_beir(SHARED / "data/scifact", "test"), METRICS, depth=1000, batch_size=args.eval_batch_size
    )
    model = DualEncoder(str(L3), pooling="mean", similarity="cosine", query_max_length=64, doc_max_length=128)
    model = model.to(args.device)
    start = time.perf_counter()
    with _autocast(args.device):
        metrics, _ = evaluator.evaluate(model, device=args.device, progress=False)
    return {"seconds": time.perf_counter() - start, "metrics": metrics}


def st_eval(args) -> dict:
    import faiss
    import ir_measures
    from sentence_transformers import SentenceTransformer

    from kdir.data.dataset import IRDataset

    ds = IRDataset.from_beir(SHARED / "data/scifact", "test")
    model = SentenceTransformer(str(L3), device=args.device)
    model.max_seq_length = 128
    start = time.perf_counter()
    with _autocast(args.device):
        kw = dict(batch_size=args.eval_batch_size, normalize_embeddings=True, convert_to_numpy=True)
        q = model.encode(list(ds.queries.texts), **kw)
        d = model.encode(list(ds.corpus.texts), **kw)
    index = faiss.IndexFlatIP(d.shape[1])
    index.add(d.astype(np.float32))
    scores, rows = index.search(q.astype(np.float32), 1000)
    run = {
        qid: {ds.corpus.ids[r]: float(s) for r, s in zip(rr, ss)} for qid, rr, ss in zip(ds.queries.ids, rows, scores)
    }
    qrels = {q: dict(r) for q, r in ds.qrels.items()}
    metrics = {
        str(k): v
        for k, v in ir_measures.calc_aggregate(list(map(ir_measures.parse_measure, METRICS)), qrels, run).items()
    }
    return {"seconds": time.perf_counter() - start, "metrics": metrics}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=Path("outputs/scifact_kd/ce.store"), help="teacher score store")
    p.add_argument("--negatives", type=Path, default=Path("outputs/scifact_kd/mine_l6/negatives.trec"))
    p.add_argument("--depth", type=int, default=20, help="negatives drawn from each query's top-depth")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="batches left out of the steady rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-frac", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=0, help="data-loader workers, both frameworks")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", choices=["train", "eval"], action="append", default=[])
    p.add_argument("--out", type=Path, help="save the figures as JSON")
    args = p.parse_args()
    args.accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    args.precision = "bf16-mixed" if args.accelerator == "gpu" else "32-true"
    logging.basicConfig(level=logging.WARNING)
    hw = (
        torch.cuda.get_device_name(0) if args.accelerator == "gpu" else f"{platform.processor() or platform.machine()}"
    )
    result: dict = {
        "device": args.device,
        "hardware": hw,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "precision": args.precision,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "train" not in args.skip:
            triples = work / "triples.tsv"
            n = write_triples(args.store, args.negatives, args.depth, triples, args.seed)
            result["train"] = {"triples": n, "steps": args.steps, "batch_size": args.batch_size}
            result["train"]["st"] = st_train(triples, args, work)
            result["train"]["kdir"] = kdir_train(triples, args, work)
        if "eval" not in args.skip:
            result["eval"] = {"st": st_eval(args), "kdir": kdir_eval(args)}
    report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def report(r: dict) -> None:
    print(
        f"\nkdir vs sentence-transformers on {r['hardware']} ({r['device']}, {r['cpu_cores']} cores, "
        f"{r['torch_threads']} torch threads, {r['precision']})"
    )
    if "train" in r:
        t, k, s = r["train"], r["train"]["kdir"], r["train"]["st"]
        print(
            f"\nMargin-MSE training, L3 student, {t['steps']} steps x batch {t['batch_size']} "
            f"({t['triples']} SciFact triples with cached cross-encoder margins)"
        )
        print(f"  {'':34}{'kdir':>12}{'sent-trans':>12}{'kdir / ST':>12}")
        print(
            f"  {'training loop (s)':34}{k['seconds']:>12.1f}{s['seconds']:>12.1f}{k['seconds'] / s['seconds']:>12.2f}"
        )
        print(
            f"  {'queries/s':34}{k['queries_per_s']:>12.2f}{s['queries_per_s']:>12.2f}"
            f"{k['queries_per_s'] / s['queries_per_s']:>12.2f}"
        )
        if "steady_queries_per_s" in k and "steady_queries_per_s" in s:
            a, b = k["steady_queries_per_s"], s["steady_queries_per_s"]
            print(f"  {'queries/s after warm-up':34}{a:>12.2f}{b:>12.2f}{a / b:>12.2f}")
    if "eval" in r:
        k, s = r["eval"]["kdir"], r["eval"]["st"]
        print("\nSciFact test evaluation, zero-shot L3 (encode 300 queries + 5,183 docs, exact top 1000, ir-measures)")
        print(f"  {'':34}{'kdir':>12}{'sent-trans':>12}{'ST / kdir':>12}")
        print(f"  {'wall time (s)':34}{k['seconds']:>12.1f}{s['seconds']:>12.1f}{s['seconds'] / k['seconds']:>12.2f}")
        for m in METRICS:
            print(f"  {m:34}{k['metrics'][m]:>12.4f}{s['metrics'][m]:>12.4f}")


if __name__ == "__main__":
    main()
