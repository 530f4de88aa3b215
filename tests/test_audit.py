"""The teacher audit: teacher against the untrained student on the same candidates, before training or alone."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import ir_measures
import numpy as np
import pytest
import torch
from conftest import run_command
from scipy import stats

N_DOCS = 15
QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 2}, "q3": {"d4": 1}}


def _lines(path: Path, n: int) -> list[str]:
    with open(path) as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


@pytest.fixture
def collection(tmp_path, quickstart) -> dict:
    """A 15-document BEIR folder (texts of the quickstart's, which the tiny model's vocabulary knows) with 3 training
    queries, a run of 13 candidates each, and oracle teacher scores."""
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = dict(zip((f"d{i}" for i in range(1, N_DOCS + 1)), _lines(quickstart["data"] / "corpus.jsonl", N_DOCS)))
    queries = dict(zip(QRELS, _lines(quickstart["data"] / "queries.jsonl", len(QRELS))))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in docs.items()))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (root / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{r}\n" for q, ds in QRELS.items() for d, r in ds.items())
    )
    rng = np.random.default_rng(0)
    run, scores = root / "run.trec", {}
    with open(run, "w") as f:
        for q in QRELS:
            for rank, i in enumerate(rng.permutation(np.arange(1, N_DOCS + 1))[:13], start=1):
                f.write(f"{q} Q0 d{i} {rank} {20 - rank} lexical\n")
    for q in QRELS:  # the oracle: the judged documents first (by grade), the others below, all distinct
        for i in range(1, N_DOCS + 1):
            d = f"d{i}"
            scores[q, d] = 10.0 * QRELS[q].get(d, 0) - 0.1 * i + (5.0 if d in QRELS[q] else 0.0)
    return {"root": root, "run": run, "scores": scores}


def _teacher(tmp_path: Path, collection: dict, sign: float, name: str):
    """A cached teacher signal bound to the collection's train split, whose scores are ``sign`` × the oracle's."""
    from kdir.data.dataset import IRDataset
    from kdir.data.examples import QrelsExamples, RunNegatives
    from kdir.training.signal import TeacherSignal

    tsv = tmp_path / f"{name}.tsv"
    tsv.write_text("".join(f"{q}\t{d}\t{sign * s}\n" for (q, d), s in collection["scores"].items()))
    train = IRDataset.from_beir(collection["root"], "train", name="hand")
    examples = QrelsExamples(RunNegatives(collection["run"], depth=13), n_negatives=3).build(train)
    signal = TeacherSignal("cached", store=tmp_path / f"{name}.store", import_file=tsv).bind(train)
    return train, examples, signal


def _by_hand(student, train, examples, sign: float, scores: dict) -> tuple[dict, dict]:
    """The teacher's and the student's runs over each query's positives + run pool, scored directly."""
    pool, counts = examples.sampler.pool, examples.sampler.counts
    teacher, mine = {}, {}
    for q, qid in enumerate(train.queries.ids):
        docs = sorted(set(pool[q, : counts[q]].tolist()) | {train.corpus.index[d] for d in QRELS[qid]})
        texts = [train.corpus.texts[d] for d in docs]
        s = student.score([train.queries.texts[q]], texts, np.arange(len(docs))[None, :])[0]
        ids = [train.corpus.ids[d] for d in docs]
        teacher[qid] = {d: sign * scores[qid, d] for d in ids}
        mine[qid] = {d: float(x) for d, x in zip(ids, s)}
    return teacher, mine


def test_agreement_of_hand_made_candidate_lists_matches_hand_values_and_scipy():
    from kdir.training.audit import agreement, kendall, scale

    # row 0: student ranks (1, 2, 3), teacher (1, 3, 2): ρ = 1 − 6·2 / (3·8) = 0.5; τ = (2 − 1) / 3; the student's
    # top candidate (the third) is not the teacher's top (the second): top-1 0
    student = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.3, 0.1, 0.1, 0.9]])
    teacher = torch.tensor([[1.0, 3.0, 2.0, 9.0], [2.0, 1.0, 3.0, 4.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    a = agreement(student, teacher, mask)
    rho1 = stats.spearmanr([0.3, 0.1, 0.1, 0.9], [2.0, 1.0, 3.0, 4.0]).statistic  # ties: average ranks
    tau1 = stats.kendalltau([0.3, 0.1, 0.1, 0.9], [2.0, 1.0, 3.0, 4.0]).statistic  # tau-b
    assert kendall(student, teacher, mask)[0].item() == pytest.approx(1 / 3)
    assert a["spearman"] == pytest.approx((0.5 + rho1) / 2)
    assert a["kendall"] == pytest.approx((1 / 3 + tau1) / 2)
    assert a["top1"] == pytest.approx(0.5)  # row 1: both put the fourth candidate first
    sc = scale(teacher, mask)
    values = [1.0, 3.0, 2.0, 2.0, 1.0, 3.0, 4.0]
    assert sc["mean"] == pytest.approx(np.mean(values)) and sc["std"] == pytest.approx(np.std(values))
    assert (sc["min"], sc["max"]) == (1.0, 4.0)
    assert sc["query_std"] == pytest.approx((np.std([1.0, 3.0, 2.0]) + np.std([2.0, 1.0, 3.0, 4.0])) / 2)


def test_audit_on_training_candidates_equals_ir_measures_on_runs_written_by_hand(tmp_path, collection, tiny_student):
    from kdir.training.audit import audit

    train, examples, signal = _teacher(tmp_path, collection, 1.0, "oracle")
    result = audit(tiny_student, signal, train, examples, None, name="oracle", max_queries=10, batch_size=2)
    teacher, student = _by_hand(tiny_student, train, examples, 1.0, collection["scores"])
    assert result["split"] == "hand/train" and result["queries"] == 3
    assert result["pairs"] == sum(len(d) for d in teacher.values())
    measures = [ir_measures.parse_measure(m) for m in ("nDCG@10", "RR@10", "R@50")]
    for side, run in (("teacher", teacher), ("student", student)):
        expected = ir_measures.calc_aggregate(measures, QRELS, run)
        for m in measures:
            assert result[side][str(m)] == pytest.approx(expected[m], abs=1e-6), (side, m)
        values = np.concatenate([list(d.values()) for d in run.values()])
        assert result[side]["mean"] == pytest.approx(values.mean(), rel=1e-5)
        assert result[side]["max"] == pytest.approx(values.max(), rel=1e-5)
    assert result["teacher"]["nDCG@10"] == pytest.approx(1.0)  # the oracle ranks the judged documents by grade
    rho = [stats.spearmanr(*zip(*[(student[q][d], teacher[q][d]) for d in teacher[q]])).statistic for q in teacher]
    tau = [stats.kendalltau(*zip(*[(student[q][d], teacher[q][d]) for d in teacher[q]])).statistic for q in teacher]
    assert result["agreement"]["spearman"] == pytest.approx(np.mean(rho), abs=1e-5)
    assert result["agreement"]["kendall"] == pytest.approx(np.mean(tau), abs=1e-5)
    assert result["teacher_above_student"] and result["warning"] is None


def test_a_teacher_below_the_untrained_student_is_warned_about(tmp_path, collection, tiny_student, capsys, caplog):
    from kdir.training.audit import run_audit

    train, examples, signal = _teacher(tmp_path, collection, -1.0, "negated")  # the oracle, upside down
    was_training = tiny_student.training
    state = torch.get_rng_state()
    result = run_audit(tiny_student, signal, train, examples, None, tmp_path / "out", (), {"max_queries": 10},
                       name="negated")  # fmt: skip
    assert result["teacher"]["nDCG@10"] == 0.0  # 13+ candidates: every judged document ranked below 10
    assert not result["teacher_above_student"]
    text = "teacher negated (0.0000) is not above the untrained student"
    assert text in result["warning"] and "distillation will likely not help" in result["warning"]
    assert text in capsys.readouterr().out  # the line under the table
    assert any(text in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    saved = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert saved["teacher"]["nDCG@10"] == 0.0 and text in saved["warning"]
    assert torch.equal(torch.get_rng_state(), state) and tiny_student.training == was_training


def test_audit_settings_are_checked(tmp_path, collection, tiny_student):
    from kdir.errors import ConfigError
    from kdir.training.audit import run_audit

    train, examples, signal = _teacher(tmp_path, collection, 1.0, "oracle")
    with pytest.raises(ConfigError, match=r"audit.depth=0: expected an integer >= 1"):
        run_audit(tiny_student, signal, train, examples, None, None, (), {"depth": 0})
    with pytest.raises(ConfigError, match=r"audit.queries: unknown setting"):
        run_audit(tiny_student, signal, train, examples, None, None, (), {"queries": 3})


def test_audit_command_on_the_quickstart_writes_audit_json(tmp_path, quickstart, capsys):
    assert run_command("kdir.audit", f"hydra.run.dir={tmp_path}") == 0
    out = capsys.readouterr().out
    assert "teacher audit: quickstart/train" in out and "untrained student" in out
    result = json.loads((tmp_path / "audit.json").read_text())
    assert result["teacher_name"] == "quickstart" and result["queries"] == 200
    assert result["teacher"]["nDCG@10"] > result["student"]["nDCG@10"]  # the noisy oracle knows the labels
    assert not (tmp_path / "checkpoints").exists()  # no training


def test_audit_command_on_the_dev_split_with_the_student_as_its_own_teacher(tmp_path, quickstart):
    # a model teacher with a dev split: the student's own top 50, re-ranked by a teacher that is the student itself
    same = ["teacher.pooling=mean", "teacher.similarity=dot", "teacher.query_max_length=16"]
    args = ["teacher=bi_encoder", f"teacher.path={quickstart['model']}", *same, "teacher.doc_max_length=32"]
    assert run_command("kdir.audit", *args, "audit.max_queries=40", f"hydra.run.dir={tmp_path}") == 0
    result = json.loads((tmp_path / "audit.json").read_text())
    assert result["split"] == "quickstart/dev" and result["queries"] == 40 and result["pairs"] == 40 * 50
    assert "judged positives not added" in result["candidates"]
    assert result["teacher"]["R@50"] == result["student"]["R@50"]  # the same candidates
    assert result["teacher"]["nDCG@10"] == pytest.approx(result["student"]["nDCG@10"], abs=0.02)
    assert result["agreement"]["spearman"] > 0.99
    assert result["teacher"]["mean"] == pytest.approx(result["student"]["mean"], rel=1e-3)


def _csv(folder: Path) -> list[dict]:
    with open(folder / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_kdir_run_audits_before_training_and_trains_as_without_it(tmp_path, quickstart):
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=8", "trainer.log_every_n_steps=2", "logger=csv"]
    short += ["eval_untrained=false", "eval.val=null", "export_student=false"]
    assert run_command("kdir.run", *short, f"hydra.run.dir={tmp_path / 'on'}") == 0
    assert run_command("kdir.run", *short, "audit.enabled=false", f"hydra.run.dir={tmp_path / 'off'}") == 0
    result = json.loads((tmp_path / "on" / "audit.json").read_text())
    assert not (tmp_path / "off" / "audit.json").exists()
    rows = _csv(tmp_path / "on")
    logged = {k: float(v) for r in rows if r["step"] == "0" for k, v in r.items() if k.startswith("audit/") and v}
    assert logged["audit/teacher/nDCG@10"] == pytest.approx(result["teacher"]["nDCG@10"])
    assert {"audit/student/nDCG@10", "audit/agreement/spearman", "audit/teacher/query_std"} <= set(logged)
    on, off = (json.loads((tmp_path / k / "metrics.json").read_text())["trained"] for k in ("on", "off"))
    assert on == off  # the audit leaves the seeded run alone
    losses = [[r["train/loss"] for r in _csv(tmp_path / k) if r.get("train/loss")] for k in ("on", "off")]
    assert losses[0] == losses[1] and losses[0]
    assert all(math.isfinite(v) for v in on.values())


def test_the_dev_audit_reads_a_cached_teachers_documents_from_its_store(tmp_path, quickstart):
    """signal.doc_embeddings: the audit's teacher scores come from the store (filled at bind), as online ones."""
    args = [
        "teacher=bi_encoder",
        f"teacher.path={quickstart['model']}",
        "teacher.pooling=mean",
        "teacher.similarity=cosine",
    ]
    args += ["teacher.query_max_length=16", "teacher.doc_max_length=32", "audit.max_queries=20"]
    assert run_command("kdir.audit", *args, f"hydra.run.dir={tmp_path / 'online'}") == 0
    store = tmp_path / "doc.store"
    assert run_command("kdir.audit", *args, f"signal.doc_embeddings={store}", f"hydra.run.dir={tmp_path / 'c'}") == 0
    assert (store / "meta.json").is_file()
    online, cached = (json.loads((tmp_path / d / "audit.json").read_text()) for d in ("online", "c"))
    for key in ("nDCG@10", "RR@10", "R@50", "mean", "std"):
        assert cached["teacher"][key] == pytest.approx(online["teacher"][key], abs=2e-3)
    assert cached["agreement"]["spearman"] == pytest.approx(online["agreement"]["spearman"], abs=0.02)


def test_the_printed_audit_keeps_bracketed_split_names(capsys):
    from kdir.training.audit import print_audit

    side = {"nDCG@10": 0.5, "mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "query_std": 0.0}
    result = {
        "measures": ["nDCG@10"], "split": "scifact/train[held]", "queries": 1, "pairs": 2, "teacher_name": "t",
        "teacher": side, "student": side | {"nDCG@10": 0.4}, "agreement": {"spearman": 0, "kendall": 0, "top1": 0},
        "candidates": "c", "stage": "train", "warning": None,
    }  # fmt: skip
    print_audit(result)
    out = capsys.readouterr().out
    assert "teacher audit: scifact/train[held]" in out and "untrained student on scifact/train[held]" in out
