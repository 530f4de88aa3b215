"""Readers, datasets, examples and negative samplers on small hand-made files."""

from __future__ import annotations

import numpy as np
import pytest

from kdir.data.dataset import IRDataset, holdout, load_texts
from kdir.data.examples import QrelsExamples, RandomNegatives, RunNegatives, TripleExamples
from kdir.data.formats import read_margin_scores, read_qrels, read_trec_run, read_tsv_texts
from kdir.errors import DataFormatError, EmptySplitError, UnknownIdError


@pytest.fixture(autouse=True)
def _fresh_text_cache():
    load_texts.cache_clear()


def test_beir_folder_with_and_without_qrels_header(beir_dir):
    train = IRDataset.from_beir(beir_dir, "train")
    assert train.queries.ids == ["q1", "q2"]
    assert train.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 2}}
    assert train.corpus.texts[train.corpus.index["d1"]] == "Td1 document number 1 about topic 1"  # title + text
    test = IRDataset.from_beir(beir_dir, "test")  # no header line
    assert test.queries.ids == ["q3"] and test.qrels == {"q3": {"d4": 1}}
    assert IRDataset.from_beir(beir_dir, "train", min_relevance=2).positives() == {"q2": ["d3"]}


def test_missing_split_lists_available_ones(beir_dir):
    with pytest.raises(FileNotFoundError, match=r"dev.tsv.*available splits: \['test', 'train'\]"):
        IRDataset.from_beir(beir_dir, "dev")


def test_malformed_jsonl_line_reports_file_and_line(beir_dir):
    with (beir_dir / "corpus.jsonl").open("a") as f:
        f.write('{"title": "no id"}\n')
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:7: expected a JSON object"):
        IRDataset.from_beir(beir_dir, "train")


def test_malformed_qrels_line_reports_file_and_line(tmp_path):
    p = tmp_path / "qrels.tsv"
    p.write_text("q1\t0\td1\t1\nq2 d2\n")
    with pytest.raises(DataFormatError, match=r"qrels.tsv:2: expected 'qid pid rel'"):
        read_qrels(p)
    p.write_text("q1\td1\tx\n")
    with pytest.raises(DataFormatError, match=r"qrels.tsv:1: expected relevance to be a number"):
        read_qrels(p)


def test_trec_qrels_and_run(tmp_path):
    (tmp_path / "q.txt").write_text("q1 0 d1 2\nq1 0 d2 0\n")
    assert read_qrels(tmp_path / "q.txt") == {"q1": {"d1": 2, "d2": 0}}
    (tmp_path / "run.trec").write_text("q1 Q0 d1 1 3.5 bm25\nq1 Q0 d2 2 1.0 bm25\nq1 Q0 d3 3 bad bm25\n")
    with pytest.raises(DataFormatError, match=r"run.trec:3: expected score to be a number"):
        read_trec_run(tmp_path / "run.trec")


def test_unknown_qrels_id_is_an_error(beir_dir):
    (beir_dir / "qrels" / "train.tsv").write_text("q1\td99\t1\n")
    with pytest.raises(UnknownIdError, match="d99"):
        IRDataset.from_beir(beir_dir, "train")


def test_empty_split_is_an_error(beir_dir):
    (beir_dir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(EmptySplitError):
        IRDataset.from_beir(beir_dir, "train")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv: no such file"):
        list(read_tsv_texts(tmp_path / "nope.tsv"))


def test_msmarco_tsv_files(tmp_path):
    (tmp_path / "collection.tsv").write_text("0\tpassage zero\n1\tpassage one\n2\tpassage two\n")
    (tmp_path / "queries.tsv").write_text("10\twhat is one\n11\twhat is two\n12\tunjudged\n")
    (tmp_path / "qrels.tsv").write_text("10\t0\t1\t1\n11\t0\t2\t1\n")
    (tmp_path / "triples.tsv").write_text("10\t1\t2\n11\t2\t0\n")
    ds = IRDataset.from_msmarco(tmp_path / "collection.tsv", tmp_path / "queries.tsv", tmp_path / "qrels.tsv")
    assert ds.queries.ids == ["10", "11"] and len(ds.corpus) == 3
    ex = TripleExamples(tmp_path / "triples.tsv").build(ds)
    assert ex.queries.tolist() == [0, 1] and ex.positives.tolist() == [1, 2] and ex.negatives.tolist() == [[2], [0]]
    (tmp_path / "triples.tsv").write_text("10\t1\t7\n")
    with pytest.raises(UnknownIdError, match=r"triples.tsv:1: id '7'"):
        TripleExamples(tmp_path / "triples.tsv").build(ds)


def test_margin_scores_reader(tmp_path):
    (tmp_path / "t2.tsv").write_text("10.5\t-2.25\t10\t1\t2\n")
    assert list(read_margin_scores(tmp_path / "t2.tsv")) == [(1, 10.5, -2.25, "10", "1", "2")]
    (tmp_path / "t2.tsv").write_text("10.5\t-2.25\t10\t1\n")
    with pytest.raises(DataFormatError, match=r"t2.tsv:1: expected 'pos_score"):
        list(read_margin_scores(tmp_path / "t2.tsv"))


def test_holdout_is_disjoint_and_reproducible(quickstart):
    train = IRDataset.from_beir(quickstart["data"], "train")
    held, rest = holdout(train, 100, "held"), holdout(train, 100, "rest")
    assert len(held.qrels) == 100 and len(rest.qrels) == len(train.qrels) - 100
    assert not set(held.qrels) & set(rest.qrels)
    assert set(holdout(train, 100, "held").qrels) == set(held.qrels)


def test_random_negatives_are_never_positives(beir_dir):
    ds = IRDataset.from_beir(beir_dir, "train")
    ex = QrelsExamples(RandomNegatives(), n_negatives=4).build(ds)
    assert len(ex) == 3  # one example per (query, positive)
    negs = ex.negatives_for(np.arange(3), np.random.default_rng(0))
    assert negs.shape == (3, 4)
    pos_of = {0: {0}, 1: {1, 2}}  # q1 -> d1, q2 -> d2, d3 (codes)
    for q, row in zip(ex.queries, negs):
        assert not set(row.tolist()) & pos_of[int(q)]


def test_run_negatives_come_from_the_run_without_positives(beir_dir, tmp_path):
    ds = IRDataset.from_beir(beir_dir, "train")
    run = tmp_path / "run.trec"
    run.write_text(
        "q1 Q0 d1 1 9 x\nq1 Q0 d5 2 8 x\nq1 Q0 d6 3 7 x\nq1 Q0 d4 4 1 x\n"
        "q2 Q0 d3 1 9 x\nq2 Q0 d4 2 8 x\nqX Q0 d4 1 1 x\n"
    )
    ex = QrelsExamples(RunNegatives(run, depth=3), n_negatives=2).build(ds)
    negs = ex.negatives_for(np.arange(len(ex)), np.random.default_rng(0))
    code = ds.corpus.index
    for q, row in zip(ex.queries.tolist(), negs.tolist()):
        if q == 0:  # top-3 minus the positive d1 = {d5, d6}
            assert set(row) == {code["d5"], code["d6"]}
        else:  # only d4 left after removing d3 (positive): topped up with a random non-positive
            assert code["d4"] in row and not {code["d2"], code["d3"]} & set(row)


def test_ir_datasets_loader_on_a_local_registered_copy(beir_dir, tmp_path):
    import ir_datasets
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.formats import GenericQuery, TrecQrels, TsvDocs, TsvQueries
    from ir_datasets.util import LocalDownload

    (tmp_path / "docs.tsv").write_text("d1\tfirst doc\nd2\tsecond doc\n")
    (tmp_path / "queries.tsv").write_text("q1\tfirst\nq2\tsecond\n")
    (tmp_path / "qrels").write_text("q1 0 d1 1\nq2 0 d2 1\n")
    name = "kdir-test/local"
    if name not in ir_datasets.registry._registered:
        ir_datasets.registry.register(
            name,
            Dataset(
                TsvDocs(LocalDownload(tmp_path / "docs.tsv")),
                TsvQueries(LocalDownload(tmp_path / "queries.tsv"), query_cls=GenericQuery),
                TrecQrels(LocalDownload(tmp_path / "qrels"), {1: "relevant"}),
            ),
        )
    ds = IRDataset.from_ir_datasets(name)
    assert ds.queries.ids == ["q1", "q2"] and ds.corpus.texts == ["first doc", "second doc"]
    with pytest.raises(KeyError, match="unknown ir_datasets id"):
        IRDataset.from_ir_datasets("kdir-test/does-not-exist")
