"""Bad input is refused where it enters, naming the file and line (or the step), never trained on.

Non-finite scores (files, the online teacher, the loss), bad negative counts, and text fields: missing, null or
empty texts, byte-order marks and bytes that are not UTF-8.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from kdir.data.dataset import IRDataset, load_texts
from kdir.data.examples import QrelsExamples, RandomNegatives, RunNegatives
from kdir.data.formats import (
    read_jsonl_scores,
    read_jsonl_texts,
    read_margin_scores,
    read_pair_scores,
    read_qrels,
    read_trec_run,
    read_tsv_texts,
)
from kdir.data.generated import GeneratedQueries
from kdir.errors import ConfigError, DataFormatError, NonFiniteError
from kdir.stores import ScoreStore
from kdir.training.signal import TeacherSignal, force_positive_max

BOM = "\ufeff"


@pytest.fixture(autouse=True)
def _fresh_text_cache():
    load_texts.cache_clear()


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------- non-finite scores

NOT_FINITE = ["inf", "-inf", "Infinity", "nan", "1e39", "-3.5e38"]  # 3.5e38 overflows float32


@pytest.mark.parametrize("value", NOT_FINITE)
def test_score_readers_refuse_non_finite_scores(tmp_path, value):
    expected = r"expected {} to be a finite float32 number"
    cases = [
        ("pairs.tsv", f"q1\td1\t1.5\nq1\td2\t{value}\n", read_pair_scores, "score"),
        ("margins.tsv", f"1.0\t0.5\tq1\td1\td2\n{value}\t0.5\tq1\td1\td3\n", read_margin_scores, "pos_score"),
        ("margins2.tsv", f"1.0\t0.5\tq1\td1\td2\n1.0\t{value}\tq1\td1\td3\n", read_margin_scores, "neg_score"),
        ("run.trec", f"q1 Q0 d1 1 2.0 x\nq1 Q0 d2 2 {value} x\n", read_trec_run, "score"),
    ]
    for name, text, reader, what in cases:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataFormatError, match=rf"{name}:2: " + expected.format(what)):
            result = reader(tmp_path / name)
            list(result) if not isinstance(result, dict) else None
    json_value = {"inf": "Infinity", "-inf": "-Infinity", "Infinity": "Infinity", "nan": "NaN"}.get(value, value)
    (tmp_path / "s.jsonl").write_text(
        '{"qid": "q1", "pid": "d1", "score": 1.5}\n' + f'{{"qid": "q1", "pid": "d2", "score": {json_value}}}\n'
    )
    with pytest.raises(DataFormatError, match=r"s.jsonl:2: " + expected.format("score")):
        list(read_jsonl_scores(tmp_path / "s.jsonl"))


def test_finite_float32_scores_are_read(tmp_path):
    (tmp_path / "pairs.tsv").write_text("q1\td1\t3.4e38\nq1\td2\t-1e-50\nq1\td3\t7\n")
    assert [s for *_, s in read_pair_scores(tmp_path / "pairs.tsv")] == [3.4e38, -1e-50, 7.0]
    (tmp_path / "s.jsonl").write_text(
        '{"qid": "q1", "pid": 7, "score": 2}\n{"qid": "q1", "pid": "d", "score": true}\n'
    )
    with pytest.raises(DataFormatError, match=r"s.jsonl:2: expected a JSON object"):
        list(read_jsonl_scores(tmp_path / "s.jsonl"))
    assert next(read_jsonl_scores(tmp_path / "s.jsonl")) == (1, "q1", "7", 2.0)


def test_store_import_refuses_a_non_finite_score(tmp_path):
    (tmp_path / "s.tsv").write_text("q1\td1\t1.0\nq1\td2\t-inf\n")
    store = ScoreStore.create(tmp_path / "store", {"teacher": {"name": "t"}, "data": {}})
    with pytest.raises(DataFormatError, match=r"s.tsv:2: expected score to be a finite"):
        store.import_tsv(tmp_path / "s.tsv")
    (tmp_path / "s.jsonl").write_text('{"qid": "q1", "pid": "d2", "score": 1e39}\n')
    with pytest.raises(DataFormatError, match=r"s.jsonl:1: expected score to be a finite"):
        store.import_jsonl(tmp_path / "s.jsonl")


def test_a_poisoned_score_file_stops_the_run_with_one_line(tmp_path, quickstart):
    src = quickstart["data"] / "teacher" / "scores.tsv"
    lines = src.read_text().splitlines(keepends=True)
    qid, pid, _ = lines[9].split("\t")
    lines[9] = f"{qid}\t{pid}\tinf\n"
    (tmp_path / "scores.tsv").write_text("".join(lines))
    out = tmp_path / "out"
    r = run_cli(
        "kdir.run",
        "signal=cached",
        f"signal.store={tmp_path / 'store'}",
        f"signal.import_file={tmp_path / 'scores.tsv'}",
        "debug=fast",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 2, r.stderr[-3000:]
    line = _error_line(r.stderr)
    assert "scores.tsv:10: expected score to be a finite float32 number (|x| <= 3.4e38), got 'inf'" in line
    assert not (out / "metrics.json").exists()


def _scores_signal(mode: str) -> TeacherSignal:
    signal = TeacherSignal.__new__(TeacherSignal)  # only the checks: no store, no model
    signal.mode, signal.store_path, signal.model = mode, Path("teacher.store"), torch.nn.Identity()
    return signal


def test_teacher_signal_counts_unusable_scores_without_a_sync():
    scores = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    cached, online = _scores_signal("cached"), _scores_signal("online")
    assert cached.nonfinite(scores).ndim == 0  # a tensor: the training step reads it once, with the loss
    assert int(cached.nonfinite(scores)) == 1  # cached: NaN is a missing pair (masked), inf is not usable
    assert int(online.nonfinite(scores)) == 2
    assert int(online.nonfinite(torch.ones(2, 3))) == 0
    msg = str(online.nonfinite_error(scores, "global step 7 (epoch 0, batch 7)"))
    assert msg.startswith("global step 7 (epoch 0, batch 7): 2 of 4 teacher scores are not finite")
    assert "online teacher Identity" in msg
    assert "teacher.store" in str(cached.nonfinite_error(scores, "step"))


def test_force_positive_max_keeps_a_row_of_missing_pairs_missing():
    nan = float("nan")
    scores = torch.tensor([[1.0, 3.0, nan], [nan, nan, nan]])
    out = force_positive_max(scores, torch.tensor([0, 1]))
    assert out[0].tolist()[:2] == [3.0, 3.0]
    assert torch.isnan(out[1]).all()  # not -inf: the row stays masked out


def _bad_teacher(tmp_path: Path, quickstart) -> Path:
    """The quickstart model with one LayerNorm weight set to inf: every score it gives is inf or NaN."""
    from kdir.models import DualEncoder

    model = DualEncoder(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32)
    with torch.no_grad():
        dict(model.named_parameters())["query_encoder.encoder.layer.1.output.LayerNorm.weight"][0] = float("inf")
    return model.save_pretrained(tmp_path / "teacher")


def test_an_online_teacher_giving_non_finite_scores_stops_the_run(tmp_path, quickstart):
    out = tmp_path / "out"
    r = run_cli(
        "kdir.run",
        "teacher=bi_encoder",
        f"teacher.path={_bad_teacher(tmp_path, quickstart)}",
        "debug=fast",
        "eval_untrained=false",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 2, r.stderr[-3000:]
    line = _error_line(r.stderr)
    assert "global step 0 (epoch 0, batch 0): " in line and "teacher scores are not finite" in line
    assert "from the online teacher DualEncoder; training stopped, no results written" in line
    assert not (out / "metrics.json").exists() and not (out / "student").exists()


def test_a_diverging_loss_stops_the_run_naming_the_step_and_the_term(tmp_path):
    out = tmp_path / "out"
    r = run_cli(
        "kdir.run",
        "optim.optimizer.lr=1e30",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=6",
        "eval_untrained=false",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 2, r.stderr[-3000:]
    line = _error_line(r.stderr)
    assert "the training loss is not finite (margin_mse=nan); training stopped, no results written" in line
    assert "global step " in line and "lower the learning rate (e.g. optim.optimizer.lr=1e+29)" in line
    for result in ("metrics.json", "test_metrics.json", "student", "runs"):
        assert not (out / result).exists(), result


def test_the_loss_check_names_every_non_finite_term(tiny_student):
    from functools import partial
    from types import SimpleNamespace

    from kdir.losses import MarginMSE
    from kdir.training.module import DistillModule

    module = DistillModule(tiny_student, MarginMSE("pairwise"), partial(torch.optim.AdamW, lr=0.5))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    module._trainer = SimpleNamespace(global_step=12, current_epoch=1, optimizers=[opt])
    c = SimpleNamespace(teacher=None)
    terms = {"kl": torch.tensor(float("inf")), "emb": torch.tensor(0.5), "ce": torch.tensor(float("nan"))}
    match = r"global step 12 \(epoch 1, batch 3\): the training loss is not finite \(kl=inf, emb=0.5, ce=nan\)"
    with pytest.raises(NonFiniteError, match=match) as info:
        module._check_finite(c, terms, 3)
    assert str(info.value).endswith("lower the learning rate (e.g. optim.optimizer.lr=0.05)")
    module._check_finite(c, {"kl": torch.tensor(1.0)}, 4)  # finite: no error


# ------------------------------------------------------------------------------------- negatives


def _run_dataset(tmp_path: Path) -> tuple[IRDataset, Path]:
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(12))
    )
    (root / "queries.jsonl").write_text(
        '{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "b"}\n{"_id": "q3", "text": "c"}\n'
    )
    (root / "qrels" / "train.tsv").write_text("q1\td0\t1\nq2\td1\t1\nq2\td2\t1\nq3\td3\t1\n")
    run = tmp_path / "run.trec"  # q1: d0 (positive), d4, d5; q2: d6 only; q3: not in the run
    run.write_text("q1 Q0 d0 1 9 x\nq1 Q0 d4 2 8 x\nq1 Q0 d5 3 7 x\nq2 Q0 d6 1 5 x\nq2 Q0 d2 2 4 x\n")
    return IRDataset.from_beir(root, "train"), run


@pytest.mark.parametrize("n", [3, 5, 9])
def test_run_negatives_beyond_the_depth_are_topped_up_at_random(tmp_path, n):
    ds, run = _run_dataset(tmp_path)
    ex = QrelsExamples(RunNegatives(run, depth=3), n_negatives=n).build(ds)
    c = ds.corpus.index
    positives = {0: {c["d0"]}, 1: {c["d1"], c["d2"]}, 2: {c["d3"]}}
    pools = {0: {c["d4"], c["d5"]}, 1: {c["d6"]}, 2: set()}
    for seed in range(5):
        negs = ex.negatives_for(np.arange(len(ex)), np.random.default_rng(seed))
        assert negs.shape == (len(ex), n)
        assert ((negs >= 0) & (negs < len(ds.corpus))).all()
        for q, row in zip(ex.queries.tolist(), negs.tolist()):
            assert not set(row) & positives[q], (q, row)
            assert set(row[: len(pools[q])]) == pools[q]  # the run's candidates first, then random ones


def test_run_negatives_without_fallback_refuse_a_short_pool(tmp_path):
    ds, run = _run_dataset(tmp_path)
    ex = QrelsExamples(RunNegatives(run, depth=3, fallback_random=False), n_negatives=4).build(ds)
    with pytest.raises(Exception, match="fewer than 4 negative candidates"):
        ex.negatives_for(np.arange(len(ex)), np.random.default_rng(0))


@pytest.mark.parametrize("n", [-1, -30, 1.5, True])
def test_a_bad_number_of_negatives_is_refused(n):
    with pytest.raises(ConfigError, match=r"data.examples.n_negatives must be a whole number >= 0"):
        QrelsExamples(RandomNegatives(), n_negatives=n)


def test_a_bad_run_depth_is_refused(tmp_path):
    for depth in (0, -1, 2.5):
        with pytest.raises(ConfigError, match=r"negatives.depth must be a whole number >= 1"):
            RunNegatives(tmp_path / "run.trec", depth=depth)


# ------------------------------------------------------------------------------------- text fields


def _beir(tmp_path: Path, corpus: list[str], queries: list[str] | None = None) -> Path:
    root = tmp_path / "t"
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(line + "\n" for line in corpus))
    queries = queries or ['{"_id": "q1", "text": "a query"}']
    (root / "queries.jsonl").write_text("".join(line + "\n" for line in queries))
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    return root


GOOD_DOC = '{"_id": "d1", "title": "", "text": "a document"}'


@pytest.mark.parametrize(
    "line",
    [
        '{"_id": "d2", "title": "", "text": null}',
        '{"_id": "d2", "text": 3}',
        '{"_id": "d2", "title": "T"}',  # no "text" at all
        '{"_id": "d2", "title": ["T"], "text": "x"}',
        '{"_id": null, "text": "x"}',
    ],
)
def test_a_text_that_is_not_a_string_is_refused_with_file_and_line(tmp_path, line):
    root = _beir(tmp_path, [GOOD_DOC, line])
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:2: expected a JSON object with \"_id\" and a string"):
        IRDataset.from_beir(root, "test")


def test_documents_with_a_title_only_or_no_text_are_kept_with_one_warning(tmp_path, caplog):
    root = _beir(
        tmp_path,
        [
            GOOD_DOC,
            '{"_id": "d2", "title": "Only a title", "text": ""}',
            '{"_id": "d3", "title": "", "text": ""}',
            '{"_id": "d4", "title": null, "text": "  "}',
        ],
    )
    with caplog.at_level(logging.WARNING, logger="kdir.data.formats"):
        ds = IRDataset.from_beir(root, "test")
    assert ds.corpus.texts == ["a document", "Only a title", "", "  "]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "corpus.jsonl: 2 rows have an empty text" in warnings[0]


@pytest.mark.parametrize("query", ['{"_id": "q2", "text": ""}', '{"_id": "q2", "text": "   "}'])
def test_an_empty_query_is_refused_with_file_and_line(tmp_path, query):
    root = _beir(tmp_path, [GOOD_DOC], ['{"_id": "q1", "text": "a query"}', query])
    with pytest.raises(DataFormatError, match=r"queries.jsonl:2: expected a non-empty \"text\""):
        IRDataset.from_beir(root, "test")


def test_tsv_texts_empty_queries_refused_empty_passages_warned(tmp_path, caplog):
    (tmp_path / "collection.tsv").write_text("d1\tone passage\nd2\t\n")
    (tmp_path / "queries.tsv").write_text("q1\ta query\nq2\t \n")
    (tmp_path / "qrels.tsv").write_text("q1\t0\td1\t1\n")
    with pytest.raises(DataFormatError, match=r"queries.tsv:2: expected 'id<TAB>text' with a non-empty text"):
        IRDataset.from_msmarco(tmp_path / "collection.tsv", tmp_path / "queries.tsv", tmp_path / "qrels.tsv")
    (tmp_path / "queries.tsv").write_text("q1\ta query\n")
    with caplog.at_level(logging.WARNING, logger="kdir.data.formats"):
        ds = IRDataset.from_msmarco(tmp_path / "collection.tsv", tmp_path / "queries.tsv", tmp_path / "qrels.tsv")
    assert ds.corpus.texts == ["one passage", ""]
    assert any("collection.tsv: 1 rows have an empty text" in r.getMessage() for r in caplog.records)
    assert list(read_tsv_texts(tmp_path / "collection.tsv", allow_empty=True))[1] == ("d2", "")


def test_byte_order_marks_are_accepted_everywhere(tmp_path):
    root = _beir(tmp_path, [BOM + GOOD_DOC], [BOM + '{"_id": "q1", "text": "a query"}'])
    (root / "qrels" / "test.tsv").write_text(BOM + "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    ds = IRDataset.from_beir(root, "test")
    assert ds.corpus.ids == ["d1"] and ds.queries.ids == ["q1"] and ds.qrels == {"q1": {"d1": 1}}
    (tmp_path / "run.trec").write_text(BOM + "q1 Q0 d1 1 2.0 x\n", encoding="utf-8")
    assert read_trec_run(tmp_path / "run.trec") == {"q1": {"d1": 2.0}}
    (tmp_path / "pairs.tsv").write_text(BOM + "q1\td1\t2.0\n")
    assert list(read_pair_scores(tmp_path / "pairs.tsv")) == [(1, "q1", "d1", 2.0)]
    (tmp_path / "margins.tsv").write_text(BOM + "2.0\t1.0\tq1\td1\td2\n")
    assert list(read_margin_scores(tmp_path / "margins.tsv")) == [(1, 2.0, 1.0, "q1", "d1", "d2")]
    (tmp_path / "s.jsonl").write_text(BOM + '{"qid": "q1", "pid": "d1", "score": 2.0}\n')
    assert list(read_jsonl_scores(tmp_path / "s.jsonl")) == [(1, "q1", "d1", 2.0)]
    (tmp_path / "qrels.txt").write_text(BOM + "q1 0 d1 1\n")
    assert read_qrels(tmp_path / "qrels.txt") == {"q1": {"d1": 1}}
    (tmp_path / "gen.tsv").write_text(BOM + "g1\ta generated query\n")
    assert GeneratedQueries.from_tsv(tmp_path / "gen.tsv").ids == ["g1"]


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    body = b"q1\td1\t1.0\n" * 3000 + b"q1\td\xe9\t1.0\n"
    cases = [
        ("pairs.tsv", body, read_pair_scores, 3001),
        ("corpus.jsonl", b'{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": "caf\xe9"}\n', read_jsonl_texts, 2),
        ("run.trec", b"q1 Q0 d1 1 1.0 x\n" * 5000 + b"q1 Q0 d\xff 2 1.0 x\n", read_trec_run, 5001),
    ]
    for name, data, reader, line in cases:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataFormatError, match=rf"{name}:{line}: expected UTF-8 text \(byte 0x..") as info:
            result = reader(tmp_path / name)
            list(result) if not isinstance(result, dict) else None
        assert len(str(info.value)) < 200
    (tmp_path / "gen.tsv").write_bytes(b"g1\tfine\ng2\tnot \xff fine\n")
    with pytest.raises(DataFormatError, match=r"gen.tsv:2: expected UTF-8 text"):
        GeneratedQueries.from_tsv(tmp_path / "gen.tsv")
