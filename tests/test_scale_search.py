"""Evaluation and mining from an embedding store on disk: the corpus streamed to the store, the FAISS index built
from it chunk by chunk (sharded or not), queries searched in batches, MaxSim searched a chunk at a time."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
from conftest import counting_doc_encodes, run_cli

from kdir.data.dataset import IRDataset
from kdir.errors import ConfigError
from kdir.models import ColBERT, DualEncoder
from kdir.retrieval.evaluators import MaxSimEvaluator, RetrievalEvaluator
from kdir.retrieval.store_index import build_index_from_store
from kdir.retrieval.stream_encode import encode_into_store
from kdir.stores import EmbeddingStore


@pytest.fixture(scope="module")
def split(quickstart):
    return IRDataset.from_beir(quickstart["data"], "test")


@pytest.fixture(scope="module")
def student(quickstart):
    torch.manual_seed(0)
    return DualEncoder(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32).eval()


def _top(run: dict, n: int = 10) -> dict[str, list[str]]:
    return {q: sorted(d, key=lambda p: -d[p])[:n] for q, d in run.items()}


def test_store_backed_evaluation_equals_in_memory_and_reuses_the_store(split, student, tmp_path):
    metrics = ["nDCG@10", "R@100"]
    memory, run_memory = RetrievalEvaluator(split, metrics, depth=100).evaluate(student, progress=False)
    evaluator = RetrievalEvaluator(split, metrics, depth=100, corpus_store=tmp_path / "corpus", query_batch_size=64)
    stored, run_stored = evaluator.evaluate(student, progress=False)
    assert EmbeddingStore.open(tmp_path / "corpus").meta["data"]["count"] == len(split.corpus)
    # fp16 on disk against fp32 in memory: the same ranking up to near-ties
    for name in metrics:
        assert abs(stored[name] - memory[name]) < 0.01, (name, stored[name], memory[name])
    a, b = _top(run_memory), _top(run_stored)
    overlap = np.mean([len(set(a[q]) & set(b[q])) / 10 for q in a])
    assert overlap > 0.97 and set(run_stored) == set(run_memory) == set(split.queries.ids)
    q = split.queries.ids[0]
    for pid in b[q][:3]:
        assert abs(run_stored[q][pid] - run_memory[q][pid]) < 2e-2 * max(1.0, abs(run_memory[q][pid]))
    # a second evaluation encodes no document: the store holds this model's encodings of this corpus
    with counting_doc_encodes(student) as docs_encoded:
        again, run_again = evaluator.evaluate(student, progress=False)
    assert sum(docs_encoded) == 1  # the probe that reads the model's dimension, not the corpus
    assert again == stored and run_again == run_stored


def test_sharded_indexes_give_the_unsharded_top_k(split, student, tmp_path):
    store = encode_into_store(student, split.corpus.texts, split.corpus.ids, tmp_path / "s", "doc", chunk_size=300)
    queries = torch.randn(20, student.dim).numpy().astype(np.float32)
    one, keys1 = build_index_from_store(store, "Flat", chunk_size=128)
    three, keys3 = build_index_from_store(store, "Flat", chunk_size=128, shards=3)
    assert three.ntotal == one.ntotal == len(split.corpus) and (keys1 == keys3).all()
    s1, r1 = one.search(queries, 50)
    s3, r3 = three.search(queries, 50)
    assert np.allclose(s1, s3, atol=1e-6)
    assert all(set(a[:45]) == set(b[:45]) for a, b in zip(r1, r3))  # ties at the tail may order differently
    # brute force over the stored fp16 vectors
    vectors = store.lookup(store.keys()).astype(np.float32)
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    assert all(set(a) == set(b[:10]) for a, b in zip(exact, r3))
    with pytest.raises(ConfigError, match="index_shards"):
        build_index_from_store(store, "Flat", shards=0)


def test_sharded_ivf_search_sets_nprobe_on_every_shard(split, student, tmp_path):
    evaluator = RetrievalEvaluator(
        split, ["R@100"], depth=100, corpus_store=tmp_path / "c", index_factory="IVF16,Flat", index_shards=2
    )
    exact, _ = RetrievalEvaluator(split, ["R@100"], depth=100).evaluate(student, progress=False)
    metrics, run = evaluator.evaluate(student, progress=False)
    assert all(len(docs) == 100 for docs in run.values())  # the automatic nprobe reached every shard
    assert metrics["R@100"] >= exact["R@100"] - 0.05
    with pytest.raises(ConfigError, match="index_shards=2 needs corpus_store"):
        RetrievalEvaluator(split, ["R@100"], index_shards=2)


@pytest.mark.parametrize("masked", ["exclude", "zero"])
def test_maxsim_from_the_store_equals_in_memory_maxsim(masked, split, quickstart, tmp_path):
    torch.manual_seed(0)
    similarity = "l2" if masked == "zero" else "cosine"
    model = ColBERT(
        quickstart["model"], dim=16, query_max_length=8, doc_max_length=48, similarity=similarity,
        masked_doc_tokens=masked,
    ).eval()  # fmt: skip
    memory, run_memory = MaxSimEvaluator(split, depth=20, metrics=["nDCG@10"]).evaluate(model, progress=False)
    evaluator = MaxSimEvaluator(split, depth=20, metrics=["nDCG@10"], doc_chunk=97, corpus_store=tmp_path / "t")
    stored, run_stored = evaluator.evaluate(model, progress=False)
    assert EmbeddingStore.open(tmp_path / "t").multi_vector
    q = split.queries.ids[:50]
    assert stored == pytest.approx(memory, abs=1e-6)
    for qid in q:
        assert _top(run_stored, 15)[qid] == _top(run_memory, 15)[qid]
        pid = next(iter(run_memory[qid]))
        assert run_stored[qid][pid] == pytest.approx(run_memory[qid][pid], abs=1e-4)


def test_mine_and_evaluate_commands_read_a_store_from_kdir_encode(tmp_path, quickstart):
    common = ["student=tiny", "data=quickstart", "student.doc_max_length=32"]
    r = run_cli("kdir.encode", *common, f"out={tmp_path / 'corpus'}", "chunk_size=500", "devices=1",
                "accelerator=cpu", "progress=false", f"hydra.run.dir={tmp_path / 'enc'}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MiB" in r.stdout and EmbeddingStore.open(tmp_path / "corpus").meta["chunk_size"] == 500
    r = run_cli("kdir.mine", *common, "depth=20", f"corpus_store={tmp_path / 'corpus'}",
                f"hydra.run.dir={tmp_path / 'mine'}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    with_store = json.loads((tmp_path / "mine" / "metrics.json").read_text())["metrics"]
    r = run_cli("kdir.mine", *common, "depth=20", f"hydra.run.dir={tmp_path / 'mine_memory'}")
    assert r.returncode == 0, r.stderr[-3000:]
    in_memory = json.loads((tmp_path / "mine_memory" / "metrics.json").read_text())["metrics"]
    assert with_store["R@20"] == pytest.approx(in_memory["R@20"], abs=0.01)
    # another student's store is refused, with a store path to use instead that works as printed
    r = run_cli("kdir.mine", "student=tiny", "data=quickstart", "student.doc_max_length=24", "depth=20",
                f"corpus_store={tmp_path / 'corpus'}", f"hydra.run.dir={tmp_path / 'other'}")  # fmt: skip
    assert r.returncode != 0 and "corpus" in r.stderr


def test_kdir_run_refuses_a_corpus_store_and_its_hint_works(tmp_path, quickstart, student):
    out = tmp_path / "run"
    r = run_cli("kdir.run", f"eval.test.corpus_store={tmp_path / 'store'}", "trainer.max_steps=1",
                f"hydra.run.dir={out}")  # fmt: skip
    assert r.returncode != 0
    line = r.stderr.strip().splitlines()[-1]
    assert "eval.test.corpus_store" in line and "python -m kdir.evaluate" in line
    command = shlex.split(line[line.index("python -m kdir.evaluate") :])
    student.save_pretrained(out / "student")  # what the run exports when it finishes
    r = run_cli(*command[2:], f"hydra.run.dir={tmp_path / 'eval'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert EmbeddingStore.open(tmp_path / "store").meta["data"]["count"] > 0


def test_the_readme_scale_commands_compose(tmp_path):
    """Every ``python -m kdir.<command>`` line of the README's scale section composes (``<placeholders>`` dropped)."""
    import re

    from conftest import ROOT, compose_cfg

    section = (ROOT / "README.md").read_text().split("## Scale: MS MARCO")[1].split("\n## ")[0]
    lines = [x.strip() for x in section.replace("\\\n", " ").splitlines() if x.strip().startswith("python -m kdir.")]
    assert len(lines) == 5, lines
    for line in lines:
        words = shlex.split(re.sub(r"\S*<[^>]*>\S*", "", line))
        cfg = compose_cfg(tmp_path, words[3:], name=words[2].removeprefix("kdir."))
        assert cfg is not None, line
