"""Cached teacher embeddings (signal.doc_embeddings / query_embeddings) and generated queries' source passages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdir.data.collate import TrainCollator
from kdir.data.dataset import IRDataset
from kdir.data.generated import GeneratedQueries
from kdir.errors import ConfigError
from kdir.models import DualEncoder
from kdir.stores import EmbeddingStore, id_hashes
from kdir.training.signal import TeacherSignal


@pytest.fixture
def teacher(quickstart):
    return DualEncoder(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32)


@pytest.fixture
def data(quickstart):
    ds = IRDataset.from_beir(quickstart["data"], "train", name="quickstart")
    docs = ds.corpus.ids
    gen = GeneratedQueries(ids=["g0", "g1", "g2"], texts=["alpha beta", "gamma", "delta x"], sources=docs[20:23])
    return ds, gen


def _item(ds, n=4):
    q = np.arange(n)
    p = np.array([ds.corpus.index[next(iter(ds.qrels[ds.queries.ids[i]]))] for i in q])
    negs = np.arange(2 * n).reshape(n, 2) + 40
    return {"rows": torch.arange(n), "queries": q, "positives": p, "negatives": negs}


def _batch(ds, gen, signal, student):
    collate = TrainCollator(ds, student.preparer(), "inbatch", signal, gen, generated_per_batch=2, seed=3)
    return collate(_item(ds))


def test_cached_teacher_embeddings_equal_the_online_teacher(data, teacher, tiny_student, tmp_path):
    ds, gen = data
    online = TeacherSignal("online", model=teacher).bind(ds, gen)
    cached = TeacherSignal(
        "online", model=teacher, doc_embeddings=tmp_path / "doc", query_embeddings=tmp_path / "query"
    ).bind(ds, gen)
    assert len(EmbeddingStore.open(tmp_path / "doc")) == len(ds.corpus)  # filled at bind
    assert len(EmbeddingStore.open(tmp_path / "query")) == len(ds.queries) + len(gen)
    b_online, b_cached = _batch(ds, gen, online, tiny_student), _batch(ds, gen, cached, tiny_student)
    assert b_cached.teacher_inputs is None  # nothing to tokenise for the teacher: queries and documents are cached
    assert set(b_cached.teacher_embeddings) == {"query", "doc"}
    positive = b_online.positive
    expected, eq, ed = online.outputs(b_online, positive)
    got, gq, gd = cached.outputs(b_cached, positive)
    assert expected.shape == got.shape == (6, 12)  # 4 real + 2 generated rows over the batch's 12 documents
    # the same teacher scores and embeddings, to fp16 storage precision
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gq, eq, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gd, ed, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached.scores(b_cached), online.scores(b_online), atol=2e-3, rtol=2e-3)
    # documents only: the teacher encodes the batch's queries (real and generated) in the step
    docs_only = TeacherSignal("online", model=teacher, doc_embeddings=tmp_path / "doc").bind(ds, gen)
    b_docs = _batch(ds, gen, docs_only, tiny_student)
    assert set(b_docs.teacher_embeddings) == {"doc"} and b_docs.teacher_inputs["query"]["input_ids"].shape[0] == 6
    torch.testing.assert_close(docs_only.scores(b_docs), expected, atol=2e-3, rtol=2e-3)


def test_a_store_of_another_teacher_is_refused(data, teacher, quickstart, tmp_path):
    ds, gen = data
    TeacherSignal("online", model=teacher, doc_embeddings=tmp_path / "doc").bind(ds)
    other = DualEncoder(quickstart["model"], pooling="cls", query_max_length=16, doc_max_length=32)
    with pytest.raises(ConfigError, match="holds doc embeddings of"):
        TeacherSignal("online", model=other, doc_embeddings=tmp_path / "doc").bind(ds)


def test_an_interrupted_fill_resumes_and_gives_the_uninterrupted_store(data, teacher, tmp_path):
    ds, _ = data
    from kdir.retrieval.stream_encode import encode_into_store

    calls = {"n": 0}
    forward = teacher.doc_encoder.forward

    def dies_in_the_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the probe, then chunk 1 (two batches) is written, then chunk 2 dies
            raise KeyboardInterrupt("killed")
        return forward(*args, **kwargs)

    teacher.doc_encoder.forward = dies_in_the_second_chunk
    with pytest.raises(KeyboardInterrupt):
        encode_into_store(
            teacher, ds.corpus.texts, ds.corpus.ids, tmp_path / "doc", "doc", batch_size=16, chunk_size=32
        )
    teacher.doc_encoder.forward = forward
    partial = EmbeddingStore.open(tmp_path / "doc", allow_incomplete=True)
    assert 0 < len(partial) < len(ds.corpus)  # the finished chunk is on disk
    TeacherSignal("online", model=teacher, doc_embeddings=tmp_path / "doc").bind(ds)  # resumes the fill
    resumed = EmbeddingStore.open(tmp_path / "doc")
    encode_into_store(teacher, ds.corpus.texts, ds.corpus.ids, tmp_path / "clean", "doc", batch_size=16, chunk_size=32)
    keys = id_hashes(ds.corpus.ids)
    np.testing.assert_array_equal(resumed.lookup(keys), EmbeddingStore.open(tmp_path / "clean").lookup(keys))


def test_cached_embeddings_need_a_single_vector_online_teacher(teacher, tmp_path):
    with pytest.raises(ConfigError, match="single-vector bi-encoder"):
        TeacherSignal("fill", tmp_path / "s", model=teacher, doc_embeddings=tmp_path / "doc")
    with pytest.raises(ConfigError, match="needs signal.doc_embeddings"):
        TeacherSignal("online", model=teacher, query_embeddings=tmp_path / "q")


def test_generated_queries_bring_their_source_passages_into_the_batch(data, tiny_student):
    ds, gen = data
    collate = TrainCollator(
        ds,
        tiny_student.preparer(),
        "inbatch",
        generated=gen,
        generated_per_batch=2,
        seed=3,
        generated_source_docs=True,
    )
    batch = collate(_item(ds))
    plain = TrainCollator(ds, tiny_student.preparer(), "inbatch", generated=gen, generated_per_batch=2, seed=3)(
        _item(ds)
    )
    cand, before = batch.inputs["candidates"], plain.inputs["candidates"]
    assert cand.shape == (6, 14) and before.shape == (6, 12)  # the two drawn queries' passages: two more columns
    assert torch.equal(cand[:, :12], before)  # the batch's own columns keep their places
    n_docs = batch.inputs["doc"]["input_ids"].shape[0]
    assert n_docs == plain.inputs["doc"]["input_ids"].shape[0] + 2  # each passage tokenised once
    assert batch.positive.tolist() == [0, 1, 2, 3, -1, -1]  # never a label
    infilled = GeneratedQueries(ids=["g0"], texts=["x y"], sources=[ds.queries.ids[0] + "-not-a-doc"])
    with pytest.raises(ConfigError, match="generated_source_docs=false"):
        TrainCollator(
            ds,
            tiny_student.preparer(),
            "inbatch",
            generated=infilled,
            generated_per_batch=1,
            generated_source_docs=True,
        )


def test_batch_document_matching_by_hand(data, teacher, quickstart, tmp_path):
    """side=docs: mean over the batch's distinct documents of ||t_d - s_d||_2, teacher vectors from the cache."""
    from kdir.losses import Composite, EmbedMatch, SoftmaxCEDistill
    from kdir.training.module import DistillModule

    ds, gen = data
    signal = TeacherSignal("online", model=teacher, doc_embeddings=tmp_path / "doc").bind(ds, gen)
    student = DualEncoder(quickstart["model"], pooling="cls", query_max_length=16, doc_max_length=32)
    loss = Composite(
        {"score": SoftmaxCEDistill("inbatch"), "docs": EmbedMatch("docs", layout="inbatch", weight=2.0)}, "inbatch"
    )
    module = DistillModule(student, loss, torch.optim.AdamW, signal=signal)
    batch = _batch(ds, gen, signal, student)
    c = module.candidates(batch)
    s_d, t_d = c.embeddings["docs"]
    docs = [
        ds.corpus.texts[i] for i in np.unique(np.concatenate([_item(ds)["positives"], _item(ds)["negatives"].ravel()]))
    ]
    with torch.no_grad():
        expected_t = teacher.encode(teacher.formatter("doc")(docs), "doc")
        expected_s = student.encode(student.formatter("doc")(docs), "doc")
    torch.testing.assert_close(t_d, expected_t, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(s_d.detach(), expected_s, atol=1e-5, rtol=1e-5)
    by_hand = 2.0 * torch.linalg.vector_norm(expected_t - expected_s, dim=1).mean()
    torch.testing.assert_close(loss.terms(c)["docs"].detach(), by_hand, atol=2e-3, rtol=2e-3)


def test_the_readme_unlabelled_queries_commands_compose(tmp_path):
    """Every ``python -m kdir.<command>`` line of the README's section on unlabelled queries composes."""
    import re
    import shlex

    from conftest import ROOT, compose_cfg

    section = (ROOT / "README.md").read_text().split("## Distilling on unlabelled queries")[1].split("\n## ")[0]
    lines = [x.strip() for x in section.replace("\\\n", " ").splitlines() if x.strip().startswith("python -m kdir.")]
    assert len(lines) == 2, lines
    for line in lines:
        words = shlex.split(re.sub(r"\S*<[^>]*>\S*", "", line.split("  #")[0]))
        cfg = compose_cfg(tmp_path, words[3:], name=words[2].removeprefix("kdir."))
        assert cfg is not None, line
    cfg = compose_cfg(tmp_path, shlex.split(re.sub(r"\S*<[^>]*>\S*", "", lines[1]))[3:] + ["teacher.path=x"])
    assert cfg.signal.doc_embeddings == "l6.doc" and cfg.data.generated_source_docs is True
    assert cfg.loss.terms.emb_docs.weight == 1
