"""Hard-negative mining (``python -m kdir.mine``): the run it writes, its metrics, and RunNegatives reading it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import run_cli

DEPTH = 50


def _parse_run(path: Path) -> dict[str, list[tuple[str, int, float]]]:
    """``{qid: [(pid, rank, score), ...]}`` in file order, checking the 6-column TREC layout."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    for line in path.read_text().splitlines():
        qid, q0, pid, rank, score, _tag = line.split()
        assert q0 == "Q0"
        out.setdefault(qid, []).append((pid, int(rank), float(score)))
    return out


def test_mine_writes_top_depth_run_of_training_queries_usable_as_run_negatives(tmp_path, quickstart):
    from kdir.data.dataset import IRDataset
    from kdir.data.examples import QrelsExamples, RunNegatives

    r = run_cli("kdir.mine", f"depth={DEPTH}", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    train = IRDataset.from_beir(quickstart["data"], split="train")
    path = tmp_path / "negatives.trec"
    run = _parse_run(path)
    assert set(run) == set(train.queries.ids)
    for ranked in run.values():
        assert len(ranked) == DEPTH
        assert [rank for _, rank, _ in ranked] == list(range(1, DEPTH + 1))
        scores = [s for _, _, s in ranked]
        assert scores == sorted(scores, reverse=True)
        assert len({pid for pid, _, _ in ranked}) == DEPTH
        assert all(pid in train.corpus.index for pid, _, _ in ranked)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["depth"] == DEPTH and saved["queries"] == len(train.queries)
    assert 0.0 <= saved["metrics"][f"R@{DEPTH}"] <= 1.0
    assert 0.0 <= saved["positive_share"] <= 1.0
    assert (tmp_path / "config.yaml").is_file()

    # the run plugs into training as TCT-ColBERT's (unfiltered) hard-negative pool
    examples = QrelsExamples(n_negatives=2, negatives=RunNegatives(path, depth=DEPTH, exclude_positives=False))
    ex = examples.build(train)
    assert int(ex.sampler.counts.min()) == DEPTH  # every training query has its full pool, positives included
    rows = np.arange(len(ex))
    negs = ex.negatives_for(rows, np.random.default_rng(0))
    assert negs.shape == (len(ex), 2)
    for q, pair in zip(ex.queries[:100], negs[:100]):
        pool = {pid for pid, _, _ in run[train.queries.ids[q]]}
        assert {train.corpus.ids[d] for d in pair} <= pool
    filtered = QrelsExamples(n_negatives=2, negatives=RunNegatives(path, depth=DEPTH, exclude_positives=True))
    positives = train.positives()
    in_run = sum(pid in positives.get(qid, ()) for qid, ranked in run.items() for pid, _, _ in ranked)
    assert filtered.build(train).sampler.counts.sum() == DEPTH * len(train.queries) - in_run  # CollectiveKD's pool


def test_mine_with_an_exported_student_and_custom_output(tmp_path, quickstart, tiny_student):
    student = tiny_student.save_pretrained(tmp_path / "student")
    out = tmp_path / "mined" / "hn.trec"
    r = run_cli(
        "kdir.mine",
        "student=checkpoint",
        f"student.path={student}",
        "depth=5",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'job'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(len(ranked) == 5 for ranked in _parse_run(out).values())
    assert json.loads((tmp_path / "job" / "metrics.json").read_text())["run"] == str(out)


def test_mine_missing_student_exits_2_naming_the_path(tmp_path, quickstart):
    missing = tmp_path / "no_such_student"
    r = run_cli("kdir.mine", "student=checkpoint", f"student.path={missing}", f"hydra.run.dir={tmp_path / 'job'}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert str(missing) in r.stderr
