"""Re-ranking evaluation: separable models encode each distinct candidate document once per evaluation, and their
scores equal the model's own scores of each (query, candidates) batch; cross-encoders score every pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import counting_doc_encodes

from kdir.data.dataset import IRDataset
from kdir.models import ColBERT, CrossEncoder, DualEncoder
from kdir.retrieval.evaluators import RerankEvaluator
from kdir.retrieval.metrics import write_trec_run

DEPTH = 6


@pytest.fixture(scope="module")
def split(quickstart, tmp_path_factory):
    """40 test queries of the quickstart and a first-stage run: each query's DEPTH candidates drawn from a pool of
    60 documents, so that candidates repeat across queries and query batches."""
    ds = IRDataset.from_beir(quickstart["data"], "test")
    rng = np.random.default_rng(0)
    pool = rng.choice(len(ds.corpus), size=60, replace=False)
    run = {}
    for qid in ds.queries.ids[:40]:
        docs = rng.choice(pool, size=DEPTH, replace=False)
        run[qid] = {ds.corpus.ids[d]: float(DEPTH - r) for r, d in enumerate(docs)}
    path = write_trec_run(run, tmp_path_factory.mktemp("rerank") / "run.trec")
    return ds, path, run


def _models(quickstart):
    torch.manual_seed(0)
    yield "dual", DualEncoder(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32)
    yield "colbert", ColBERT(quickstart["model"], dim=16, query_max_length=8, doc_max_length=32)
    # CollectiveKD's ColBERT v1: masked document positions score as zero vectors, so padding matters
    yield (
        "colbert_l2_zero",
        ColBERT(
            quickstart["model"],
            dim=16,
            query_max_length=8,
            doc_max_length=64,
            similarity="l2",
            masked_doc_tokens="zero",
        ),
    )


@pytest.mark.parametrize("kind", ["dual", "colbert", "colbert_l2_zero"])
def test_separable_models_encode_each_document_once_and_score_as_themselves(kind, split, quickstart):
    ds, path, first_stage = split
    model = dict(_models(quickstart))[kind].eval()
    evaluator = RerankEvaluator(ds, str(path), depth=DEPTH, metrics=["nDCG@10"], batch_size=4, encode_batch_size=16)
    with counting_doc_encodes(model) as encoded_docs:
        metrics, run = evaluator.evaluate(model, progress=False)
    distinct = {p for docs in first_stage.values() for p in docs}
    assert sum(encoded_docs) == len(distinct)  # 40 queries × 6 candidates, each document encoded once
    assert set(run) == set(first_stage) and 0 <= metrics["nDCG@10"] <= 1
    # the model's own scores of each batch of 4 queries with their candidates, tokenised together
    qids = ds.queries.ids[:40]
    for s in range(0, 40, 4):
        rows = qids[s : s + 4]
        cands = [list(first_stage[q]) for q in rows]
        docs = sorted({p for c in cands for p in c})
        grid = np.array([[docs.index(p) for p in c] for c in cands])
        texts = [ds.corpus.texts[ds.corpus.index[p]] for p in docs]
        direct = model.score([ds.queries.texts[ds.queries.ids.index(q)] for q in rows], texts, grid)
        got = torch.tensor([[run[q][p] for p in c] for q, c in zip(rows, cands)])
        assert torch.allclose(got, direct, atol=1e-4), (kind, (got - direct).abs().max())


def test_cross_encoders_score_every_pair(split, quickstart):
    ds, path, first_stage = split
    torch.manual_seed(0)
    model = CrossEncoder(quickstart["model"], query_max_length=16, max_length=48).eval()
    assert not model.separable
    metrics, run = RerankEvaluator(ds, str(path), depth=DEPTH, metrics=["nDCG@10"], batch_size=8).evaluate(
        model, progress=False
    )
    qid = ds.queries.ids[3]
    pids = list(first_stage[qid])
    direct = model.score(
        [ds.queries.texts[3]], [ds.corpus.texts[ds.corpus.index[p]] for p in pids], np.arange(DEPTH)[None]
    )[0]
    assert np.allclose([run[qid][p] for p in pids], direct.numpy(), atol=1e-4)
