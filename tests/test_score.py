"""The scoring stage: values, kill-and-resume, and 2-process sharded scoring equal to one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, run_cli

from kdir.data.dataset import IRDataset
from kdir.models import DualEncoder
from kdir.stores import ScoreStore, pair_keys_from_ids
from kdir.stores.scoring import candidate_pairs


@pytest.fixture(scope="module")
def teacher_dir(quickstart, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "bi"
    DualEncoder(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32).save_pretrained(path)
    return path


def _args(teacher_dir, store, *extra):
    run = "${quickstart:data}/runs/train.trec"
    return (
        "kdir.score",
        "teacher=bi_encoder",
        f"teacher.path={teacher_dir}",
        f"store={store}",
        f"run_file={run}",
        "depth=5",
        "chunk_size=700",
        "batch_size=64",
        "accelerator=cpu",
        f"hydra.run.dir={store.parent / (store.name + '.run')}",
        *extra,
    )


def _contents(store_path, dataset) -> tuple[np.ndarray, np.ndarray]:
    pairs = candidate_pairs(dataset, run_file=str(dataset_run(dataset)), depth=5)
    keys = pair_keys_from_ids(
        [dataset.queries.ids[q] for q in pairs[:, 0]], [dataset.corpus.ids[d] for d in pairs[:, 1]]
    )
    return keys, ScoreStore.open(store_path).lookup(keys)


def dataset_run(dataset):
    from kdir.data.quickstart import ensure

    return f"{ensure('data')}/runs/train.trec"


@pytest.fixture(scope="module")
def reference(teacher_dir, tmp_path_factory, quickstart):
    store = tmp_path_factory.mktemp("ref") / "ref.store"
    r = run_cli(*_args(teacher_dir, store))
    assert r.returncode == 0, r.stderr[-3000:]
    return store


def test_scores_cover_the_pairs_and_equal_the_teacher(reference, teacher_dir, quickstart):
    ds = IRDataset.from_beir(quickstart["data"], "train")
    keys, values = _contents(reference, ds)
    assert len(keys) > 6000 and not np.isnan(values).any()
    meta = ScoreStore.open(reference).meta
    teacher = DualEncoder.from_pretrained(teacher_dir)
    assert meta["teacher"]["weights"] == teacher.weights_hash() and meta["count"] == len(keys)
    q = ds.queries.ids[:3]
    d = [next(iter(ds.qrels[x])) for x in q]
    texts = [ds.queries.texts[ds.queries.index[x]] for x in q]
    direct = teacher.score(texts, [ds.corpus.texts[ds.corpus.index[x]] for x in d], [[0], [1], [2]])[:, 0]
    other = teacher.score(texts[::-1], [ds.corpus.texts[ds.corpus.index[x]] for x in d], [[0], [1], [2]])[:, 0]
    assert not np.allclose(other.numpy(), direct.numpy(), rtol=1e-3)  # the scores depend on the query
    assert np.allclose(
        ScoreStore.open(reference).lookup(pair_keys_from_ids(q, d)), direct.numpy(), rtol=1e-4
    )  # batch shapes differ: fp32 noise


def test_killed_scoring_job_resumes_to_the_same_store(reference, teacher_dir, tmp_path, quickstart):
    store = tmp_path / "resumed.store"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", *_args(teacher_dir, store, "compact=false")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((store / "segments").glob("*chunk-*.keys.npy"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list((store / "segments").glob("*.keys.npy")))
    assert 0 < n_before < 10, "the job should have been killed part-way (10 chunks in all)"
    r = run_cli(*_args(teacher_dir, store))
    assert r.returncode == 0, r.stderr[-3000:]
    ds = IRDataset.from_beir(quickstart["data"], "train")
    keys, got = _contents(store, ds)
    _, want = _contents(reference, ds)
    assert np.array_equal(got, want)
    assert len(ScoreStore.open(store)) == len(keys)


def test_two_gloo_processes_score_the_same_store(reference, teacher_dir, tmp_path, quickstart):
    store = tmp_path / "ddp.store"
    r = run_cli(*_args(teacher_dir, store, "devices=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    ds = IRDataset.from_beir(quickstart["data"], "train")
    keys, got = _contents(store, ds)
    _, want = _contents(reference, ds)
    assert np.array_equal(got, want) and len(ScoreStore.open(store)) == len(keys)


def test_random_negatives_cannot_be_enumerated(quickstart):
    from kdir.data.examples import QrelsExamples, RandomNegatives
    from kdir.errors import KdirError

    ds = IRDataset.from_beir(quickstart["data"], "train")
    with pytest.raises(KdirError, match="training negatives are random"):
        candidate_pairs(ds, QrelsExamples(RandomNegatives(), 1))


def test_scoring_from_document_embeddings_equals_encoding_per_pair(reference, teacher_dir, tmp_path, quickstart):
    """embeddings=<dir>: the corpus is encoded once into an embedding store and pairs are scored from it (fp16
    documents), equal to the per-pair scores up to fp16 rounding; a second job reuses the store."""
    ds = IRDataset.from_beir(quickstart["data"], "train")
    store, emb = tmp_path / "e.store", tmp_path / "docs.emb"
    r = run_cli(*_args(teacher_dir, store, f"embeddings={emb}"))
    assert r.returncode == 0, r.stderr[-3000:]
    keys, values = _contents(store, ds)
    _, expected = _contents(reference, ds)
    assert not np.isnan(values).any()
    assert np.allclose(values, expected, atol=2e-3 * np.abs(expected).max())
    from kdir.stores import EmbeddingStore

    assert len(EmbeddingStore.open(emb)) == len(ds.corpus)
    stamp = (emb / "meta.json").stat().st_mtime_ns
    r = run_cli(*_args(teacher_dir, tmp_path / "again.store", f"embeddings={emb}"))
    assert r.returncode == 0, r.stderr[-3000:]
    logged = "".join(f.read_text() for f in (tmp_path / "again.store.run").glob("*.log"))
    assert "holds these encodings already: reused" in logged and (emb / "meta.json").stat().st_mtime_ns == stamp
    assert np.array_equal(_contents(tmp_path / "again.store", ds)[1], values)


def test_embeddings_are_refused_for_a_cross_encoder(tmp_path, quickstart):
    r = run_cli(
        "kdir.score",
        "teacher=cross_encoder",
        f"teacher.path={quickstart['model']}",
        "teacher.max_length=48",
        "teacher.query_max_length=16",
        f"store={tmp_path / 's'}",
        f"signal.store={tmp_path / 's'}",  # else the config's default names the quickstart's own teacher store
        "run_file=${quickstart:data}/runs/train.trec",
        "depth=2",
        f"embeddings={tmp_path / 'e'}",
        "accelerator=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2 and "cross-encoder" in r.stderr and not (tmp_path / "e").exists()
