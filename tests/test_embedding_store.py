"""Embedding stores: streamed encoding equals the in-memory encode loop (dual encoder and ColBERT), lookups by key in
any order, a killed job resumed to the same bits, two Fabric processes writing the same bits as one, provenance
refusals, damaged and unfinished stores, and FAISS indexes built from a store chunk by chunk.

Run as a script, this module is the encoding job the kill and multi-process tests launch:
``python -m test_embedding_store {encode,fabric} <model> <data> <n docs> <store> <chunk size> [<seconds per batch>]``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdir.errors import ConfigError, DamagedStoreError, OutputExistsError, UnknownIdError
from kdir.stores.embedding_store import (
    EmbeddingStore,
    IncompleteStoreError,
    embedding_meta,
    shard_layout,
)
from kdir.stores.keys import id_hashes

ROOT = Path(__file__).resolve().parents[1]
N_DOCS, CHUNK, BATCH = 400, 96, 32  # 5 chunks (4 full, one of 16 rows), 3 batches a chunk


def _corpus(data: str | Path, n: int) -> tuple[list[str], list[str]]:
    from kdir.data.dataset import IRDataset

    corpus = IRDataset.from_beir(data, "test").corpus
    return corpus.texts[:n], corpus.ids[:n]


def _student(model: str | Path):
    from kdir.models import DualEncoder

    return DualEncoder(model, pooling="mean", query_max_length=16, doc_max_length=32)  # as conftest's tiny_student


def _contents(store: EmbeddingStore) -> tuple[np.ndarray, np.ndarray]:
    keys, vectors = zip(*store.chunks())
    return np.concatenate(keys), np.concatenate(vectors)


def _assert_same_bits(a: EmbeddingStore, b: EmbeddingStore) -> None:
    ka, va = _contents(a)
    kb, vb = _contents(b)
    assert np.array_equal(ka, kb)
    assert va.dtype == vb.dtype == np.float16 and np.array_equal(va.view(np.uint16), vb.view(np.uint16))


@pytest.fixture(scope="module")
def corpus(quickstart) -> tuple[list[str], list[str]]:
    return _corpus(quickstart["data"], N_DOCS)


@pytest.fixture(scope="module")
def colbert(quickstart):
    from kdir.models import ColBERT

    torch.manual_seed(0)
    return ColBERT(quickstart["model"], dim=16, query_max_length=16, doc_max_length=32)


@pytest.fixture(scope="module")
def de_store(tiny_student, corpus, tmp_path_factory) -> EmbeddingStore:
    from kdir.retrieval.stream_encode import encode_into_store

    texts, ids = corpus
    path = tmp_path_factory.mktemp("emb") / "docs.emb"
    return encode_into_store(tiny_student, texts, ids, path, "doc", BATCH, CHUNK, dataset="quickstart/test")


# ---------------------------------------------------------------- 1. streamed encoding equals encode_texts


def test_dual_encoder_store_equals_encode_texts(de_store, tiny_student, corpus, tmp_path):
    from kdir.retrieval.encode import encode_texts
    from kdir.retrieval.stream_encode import encode_into_store

    texts, ids = corpus
    (want,) = encode_texts(tiny_student, texts, "doc", batch_size=BATCH)  # fp32 [N, 64], all texts length-sorted
    assert len(de_store) == N_DOCS and de_store.dim == want.shape[1] and not de_store.multi_vector
    keys, vectors = _contents(de_store)
    assert np.array_equal(keys, id_hashes(ids))
    # chunks sort their own texts, so batches differ from encode_texts': fp32 noise, below fp16's resolution here
    np.testing.assert_allclose(vectors.astype(np.float32), want.numpy(), atol=2e-3, rtol=0)
    # one chunk of all texts: the very batches of encode_texts, so its fp16 bits exactly
    whole = encode_into_store(tiny_student, texts, ids, tmp_path / "one.emb", "doc", BATCH, chunk_size=N_DOCS)
    assert np.array_equal(_contents(whole)[1], want.half().numpy())
    meta = de_store.meta
    assert meta["encoder"] == json.loads(json.dumps(tiny_student.provenance()))
    assert meta["side"] == "doc" and meta["dtype"] == "float16" and meta["finished"] and meta["vectors"] == N_DOCS
    assert meta["data"]["count"] == N_DOCS and meta["data"]["dataset"] == "quickstart/test"
    assert sorted(p.name for p in de_store.path.iterdir()) == ["meta.json", "shard-00000-of-00001"]
    progress = json.loads((de_store.path / "shard-00000-of-00001" / "progress.json").read_text())
    assert [c["rows"] for c in progress["chunks"]] == [96, 96, 96, 96, 16] and progress["finished"]


def test_dataloader_workers_tokenise_the_same_bits(de_store, tiny_student, corpus, tmp_path):
    from kdir.retrieval.stream_encode import encode_into_store

    texts, ids = corpus
    n = 2 * CHUNK + 10
    got = encode_into_store(tiny_student, texts[:n], ids[:n], tmp_path / "w.emb", "doc", BATCH, CHUNK, num_workers=2)
    assert np.array_equal(_contents(got)[1], _contents(de_store)[1][:n])


def test_colbert_store_equals_encode_texts(colbert, corpus, tmp_path):
    from kdir.retrieval.encode import encode_texts
    from kdir.retrieval.stream_encode import encode_into_store

    texts, ids = corpus
    texts, ids = texts[:300], ids[:300]
    store = encode_into_store(colbert, texts, ids, tmp_path / "cb.emb", "doc", BATCH, CHUNK)
    emb, mask = encode_texts(colbert, texts, "doc", batch_size=BATCH)  # fp16 [N, 32, 16] padded, bool [N, 32]
    assert store.multi_vector and store.dim == 16 and len(store) == 300
    assert np.array_equal(store.lengths(), mask.sum(1).numpy()) and store.n_vectors == int(mask.sum())
    perm = np.random.default_rng(1).permutation(300)
    got, got_mask, token_ids = store.lookup(id_hashes([ids[i] for i in perm]), pad_to=32, token_ids=True)
    want, want_mask = emb[perm].numpy(), mask[perm].numpy()
    assert np.array_equal(got_mask, want_mask)
    np.testing.assert_allclose(got[got_mask].astype(np.float32), want[want_mask].astype(np.float32), atol=2e-3)
    assert not got[~got_mask].any()  # zero padding
    tokens = colbert.tokenize([texts[i] for i in perm], "doc")["input_ids"]
    width = tokens.shape[1]  # the longest document's tokens; the mask is False beyond it
    assert not want_mask[:, width:].any()
    assert np.array_equal(token_ids[:, :width][want_mask[:, :width]], tokens[want_mask[:, :width]].numpy())
    # queries: every position of the [MASK]-padded query takes part
    q_store = encode_into_store(colbert, ["a query", "another query here"], ["q1", "q2"], tmp_path / "q.emb", "query")
    assert np.array_equal(q_store.lengths(), [16, 16])
    (q_emb, _), (q_got, _) = encode_texts(colbert, ["a query"], "query"), q_store.lookup(id_hashes(["q1"]))
    np.testing.assert_allclose(q_got[0].astype(np.float32), q_emb[0].float().numpy(), atol=2e-3)
    # chunks give each token vector with its document's key
    keys, vectors = _contents(store)
    assert np.array_equal(keys, np.repeat(id_hashes(ids), mask.sum(1).numpy()))
    np.testing.assert_allclose(vectors.astype(np.float32), emb[mask].float().numpy(), atol=2e-3)


# ---------------------------------------------------------------- 2. lookups


def test_lookup_of_shuffled_keys(de_store, corpus):
    _, ids = corpus
    _, vectors = _contents(de_store)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, N_DOCS, size=1000)  # any order, repeats included
    got = de_store.lookup(id_hashes([ids[i] for i in rows]))
    assert got.dtype == np.float16 and np.array_equal(got, vectors[rows])
    assert np.array_equal(de_store.rows(id_hashes(["d-unknown", ids[7]])), [-1, 7])
    with pytest.raises(UnknownIdError, match=r"1 of 2 keys are not in the store"):
        de_store.lookup(id_hashes([ids[0], "d-unknown"]))


# ---------------------------------------------------------------- 3. resume after a kill; several processes


def _same_threads() -> dict[str, str]:
    """The thread count of this process (Fabric would give each CPU rank its share of the cores): the same float
    reductions, so the same bits."""
    return {"OMP_NUM_THREADS": str(torch.get_num_threads())}


def _script_env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])} | _same_threads()


def test_killed_encoding_resumes_to_the_same_bits(de_store, tiny_student, corpus, quickstart, tmp_path):
    from kdir.retrieval.stream_encode import encode_into_store

    path = tmp_path / "killed.emb"
    progress = path / "shard-00000-of-00001" / "progress.json"
    args = ["encode", str(quickstart["model"]), str(quickstart["data"]), str(N_DOCS), str(path), str(CHUNK), "0.3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "test_embedding_store", *args],
        cwd=ROOT,
        env=_script_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done, deadline = 0, time.time() + 180
    while time.time() < deadline and proc.poll() is None and not done:
        time.sleep(0.02)
        if progress.is_file():
            done = len(json.loads(progress.read_text())["chunks"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= done < 5, f"the job should have been killed after its first chunk (5 in all); it wrote {done}"
    with pytest.raises(IncompleteStoreError, match="has not finished .*shard 0: "):
        EmbeddingStore.open(path)
    vectors = path / "shard-00000-of-00001" / "vectors.fp16"
    with open(vectors, "ab") as f:  # a chunk cut short by the kill
        f.write(b"\x01" * 1000)
    texts, ids = corpus
    resumed = encode_into_store(tiny_student, texts, ids, path, "doc", BATCH, CHUNK, dataset="quickstart/test")
    _assert_same_bits(resumed, de_store)
    assert resumed.verify()["chunks"] == 5


def test_two_fabric_processes_write_the_same_bits(de_store, quickstart, tmp_path):
    from conftest import run_cli

    path = tmp_path / "ddp.emb"
    r = run_cli(
        "test_embedding_store", "fabric", str(quickstart["model"]), str(quickstart["data"]), str(N_DOCS), str(path),
        str(CHUNK), timeout=480, env=_same_threads(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    store = EmbeddingStore.open(path)
    assert sorted(p.name for p in path.glob("shard-*")) == ["shard-00000-of-00002", "shard-00001-of-00002"]
    assert store.meta["shards"] == 2 and store.meta["finished"]
    _assert_same_bits(store, de_store)
    assert shard_layout(N_DOCS, CHUNK, 2, 0)[:2] == (0, 192) and shard_layout(N_DOCS, CHUNK, 2, 1)[:2] == (192, 400)


# ---------------------------------------------------------------- 4. refusals and damage


def test_another_encoder_is_refused_and_the_printed_store_works(de_store, corpus, quickstart, tmp_path):
    from kdir.models import DualEncoder
    from kdir.retrieval.stream_encode import encode_into_store

    other = DualEncoder(quickstart["model"], pooling="cls", query_max_length=16, doc_max_length=32)
    with pytest.raises(ConfigError, match=r"holds doc embeddings of DualEncoder \w+, not of DualEncoder \w+ .*"
                       r"pooling 'mean' -> 'cls'.*encode into a new store, e.g. (\S+)$") as e:  # fmt: skip
        de_store.check_provenance(other.provenance(), "doc")
    de_store.check_provenance(json.loads(json.dumps(de_store.meta["encoder"])), "doc")  # its own encoder: fine
    with pytest.raises(ConfigError, match="side doc -> query"):
        de_store.check_provenance(de_store.meta["encoder"], "query")
    texts, ids = corpus
    path = tmp_path / "docs.emb"
    shutil.copytree(de_store.path, path)
    with pytest.raises(ConfigError, match="pooling 'mean' -> 'cls'") as e:
        encode_into_store(other, texts[:50], ids[:50], path, "doc", BATCH, CHUNK, dataset="quickstart/test")
    sibling = str(e.value).rsplit("e.g. ", 1)[1]
    assert Path(sibling).parent == tmp_path and Path(sibling).name.startswith("docs-")
    store = encode_into_store(other, texts[:50], ids[:50], sibling, "doc", BATCH, CHUNK)  # the printed path works
    assert len(store) == 50 and store.meta["encoder"]["config"]["pooling"] == "cls"


def test_other_data_or_layout_is_refused(de_store, tiny_student, corpus, tmp_path):
    from kdir.retrieval.stream_encode import encode_into_store

    texts, ids = corpus
    path = tmp_path / "docs.emb"
    shutil.copytree(de_store.path, path)
    with pytest.raises(OutputExistsError, match=r"embeddings of other data \(data.count 400 -> 50"):
        encode_into_store(tiny_student, texts[:50], ids[:50], path, "doc", BATCH, CHUNK, dataset="quickstart/test")
    # a finished store is reused as it is, whatever layout wrote it; an unfinished one must resume with its own
    reused = encode_into_store(tiny_student, texts, ids, path, "doc", BATCH, 64, dataset="quickstart/test")
    assert reused.meta["chunk_size"] == CHUNK and np.array_equal(
        reused.lookup(reused.keys()), de_store.lookup(de_store.keys())
    )
    meta = embedding_meta(
        tiny_student.provenance(), "doc", de_store.dim, False, id_hashes(ids), "quickstart/test", 1, CHUNK
    )
    EmbeddingStore.create(tmp_path / "started.emb", meta)  # started, no chunk written yet
    with pytest.raises(ConfigError, match=r"started with 1 processes and chunk_size=96 \(chunk_size 96 -> 64\)"):
        encode_into_store(
            tiny_student, texts, ids, tmp_path / "started.emb", "doc", BATCH, 64, dataset="quickstart/test"
        )


def _copy(store: EmbeddingStore, tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "copy.emb"
    shutil.copytree(store.path, path)
    return path, path / "shard-00000-of-00001"


def test_a_short_or_missing_shard_file_is_named(de_store, tiny_student, corpus, tmp_path):
    from kdir.retrieval.stream_encode import encode_into_store

    path, shard = _copy(de_store, tmp_path)
    with open(shard / "vectors.fp16", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DamagedStoreError, match=r"shard-00000-of-00001/vectors.fp16: 1000 bytes, but the progress .*"
                       r"delete it \(or the shard's folder\) and rerun the encoding"):  # fmt: skip
        EmbeddingStore.open(path)
    shutil.rmtree(shard)  # as the message says: the shard's folder deleted, the encoding rerun
    texts, ids = corpus
    rebuilt = encode_into_store(tiny_student, texts, ids, path, "doc", BATCH, CHUNK, dataset="quickstart/test")
    _assert_same_bits(rebuilt, de_store)
    shutil.rmtree(path)
    path, shard = _copy(de_store, tmp_path)
    (shard / "sorted_keys.npy").unlink()
    with pytest.raises(DamagedStoreError, match=r"shard-00000-of-00001/sorted_keys.npy: missing"):
        EmbeddingStore.open(path)
    (shard / "progress.json").write_text("{not json")
    with pytest.raises(DamagedStoreError, match=r"shard-00000-of-00001/progress.json: unreadable JSON"):
        EmbeddingStore.open(path)


def test_changed_bytes_are_found_by_verify(de_store, tmp_path):
    path, shard = _copy(de_store, tmp_path)
    with open(shard / "vectors.fp16", "r+b") as f:
        f.seek(300 * 64 * 2 + 10)  # a byte of row 300: chunk 3
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    store = EmbeddingStore.open(path)  # sizes are right: opening is cheap and does not read the data
    with pytest.raises(DamagedStoreError, match=r"shard-00000-of-00001/vectors.fp16: the bytes of chunk 3 changed"):
        store.verify()


def test_an_unfinished_store_opens_only_when_asked(tmp_path):
    keys = id_hashes([f"d{i}" for i in range(10)])
    meta = embedding_meta({"name": "Synthetic", "config": {}, "weights": "w"}, "doc", 4, False, keys, chunk_size=4)
    store = EmbeddingStore.create(tmp_path / "s.emb", meta)
    writer = store.writer(0, keys)
    assert writer.pending == [(0, 4), (4, 8), (8, 10)]
    writer.write(np.arange(16, dtype=np.float16).reshape(4, 4))
    writer.close()
    with pytest.raises(IncompleteStoreError, match=r"shard 0: 4 of 10 rows"):
        EmbeddingStore.open(tmp_path / "s.emb")
    partial = EmbeddingStore.open(tmp_path / "s.emb", allow_incomplete=True)
    assert len(partial) == 4 and np.array_equal(partial.lookup(keys[[3, 1]]), [[12, 13, 14, 15], [4, 5, 6, 7]])
    with store.writer(0, keys) as again:  # reopened: resumes at the second chunk
        assert again.done == 1
        with pytest.raises(Exception, match="another process is writing this shard"):
            store.writer(0, keys)


# ---------------------------------------------------------------- 5. FAISS from the store


def _synthetic_store(path: Path, n: int, dim: int, shards: int, seed: int = 0) -> tuple[EmbeddingStore, np.ndarray]:
    """``n`` unit vectors around 64 centres, written by ``shards`` writers in chunks of 512."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim))
    x = centres[rng.integers(0, 64, n)] + 1.0 * rng.standard_normal((n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    keys = id_hashes([f"d{i}" for i in range(n)])
    meta = embedding_meta(
        {"name": "Synthetic", "config": {}, "weights": "w"}, "doc", dim, False, keys, "", shards, 512
    )
    store = EmbeddingStore.create(path, meta)
    for rank in range(shards):
        start, stop, _ = shard_layout(n, 512, shards, rank)
        writer = store.writer(rank, keys[start:stop])
        for lo, hi in writer.pending:
            writer.write(x[lo:hi])
        writer.finish()
    assert store.finalize()
    return EmbeddingStore.open(path), x


def test_ivf_index_from_the_store_recalls_exact_search(tmp_path):
    import faiss

    from kdir.retrieval.store_index import build_index_from_store

    store, x = _synthetic_store(tmp_path / "s.emb", 5000, 32, shards=3)
    queries = x[np.random.default_rng(1).choice(5000, 100, replace=False)].astype(np.float32)
    queries += 0.1 * np.random.default_rng(2).standard_normal(queries.shape).astype(np.float32)
    exact = np.argsort(-(queries @ x.astype(np.float32).T), axis=1, kind="stable")[:, :10]  # numpy, not faiss
    flat, keys = build_index_from_store(store, "Flat", chunk_size=700)
    assert np.array_equal(keys, store.keys()) and flat.ntotal == 5000
    _, rows = flat.search(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)]) >= 0.99  # ties aside, exact
    ivf, ivf_keys = build_index_from_store(store, "IVF64,Flat", train_sample=4000)
    faiss.extract_index_ivf(ivf).nprobe = 8
    _, rows = ivf.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
    assert recall >= 0.95, recall  # recall@10 with 8 of 64 lists: 0.971 (1 list: 0.79, 4: 0.94)
    faiss.extract_index_ivf(ivf).nprobe = 64  # every list: exhaustive
    _, rows = ivf.search(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)]) >= 0.99
    assert np.array_equal(ivf_keys[rows[:, 0]], keys[rows[:, 0]])
    with pytest.raises(ConfigError, match="IVF lists need at least 8192 documents"):
        build_index_from_store(store, "IVF8192,Flat")


def test_colbert_token_index_maps_rows_to_documents(colbert, corpus, tmp_path):
    from kdir.retrieval.store_index import build_index_from_store
    from kdir.retrieval.stream_encode import encode_into_store

    texts, ids = corpus
    store = encode_into_store(colbert, texts[:40], ids[:40], tmp_path / "cb.emb", "doc", BATCH, 16)
    index, keys = build_index_from_store(store, "Flat", chunk_size=7)
    assert index.ntotal == store.n_vectors and np.array_equal(keys, np.repeat(id_hashes(ids[:40]), store.lengths()))


# ---------------------------------------------------------------- the encoding job of the tests above


def _main(argv: list[str]) -> None:
    mode, model_dir, data, n, path, chunk = argv[:6]
    from kdir.retrieval.stream_encode import encode_into_store

    texts, ids = _corpus(data, int(n))
    model = _student(model_dir)
    fabric = None
    if mode == "fabric":
        from lightning_fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
        fabric.launch()
    if len(argv) > 6:  # slow each batch down, so that a kill lands part-way (the values are untouched)
        encode, pause = model.encode, float(argv[6])
        model.encode = lambda *a, **kw: (time.sleep(pause), encode(*a, **kw))[1]
    encode_into_store(model, texts, ids, path, "doc", BATCH, int(chunk), dataset="quickstart/test", fabric=fabric)


if __name__ == "__main__":
    _main(sys.argv[1:])
