"""The SciFact study's bookkeeping (record.py, table.py) and the training-throughput callback, by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT

from kdir.training.callbacks import Throughput

STUDY = ROOT / "experiments" / "scifact_kd"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"scifact_kd_{name}", STUDY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module
    spec.loader.exec_module(mod)
    return mod


def test_throughput_overall_and_after_warmup():
    t = Throughput(warmup_steps=2)
    t.stamps = [10.0, 11.0, 12.0, 14.0, 16.0]  # 4 batches
    s = t.summary(queries_per_step=32)
    assert s["steps"] == 4 and s["seconds"] == 6.0
    assert s["queries_per_s"] == pytest.approx(4 * 32 / 6)
    assert s["steady_seconds"] == 4.0 and s["steady_queries_per_s"] == pytest.approx(2 * 32 / 4)
    t.warmup_steps = 4
    assert "steady_seconds" not in t.summary(32)  # nothing left after the warm-up


def test_throughput_leaves_validation_out(monkeypatch):
    import kdir.training.callbacks as cb

    clock = iter([0.0, 1.0, 5.0, 25.0, 26.0])  # train start, batch, val start, val end, batch
    monkeypatch.setattr(cb.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(fast_dev_run=False, loggers=[], log_every_n_steps=50, global_step=0)  # no logging
    t = Throughput(warmup_steps=0)
    t.on_train_start(trainer, None)
    t.on_train_batch_end(trainer, None, None, None, 0)
    t.on_validation_start(trainer, None)
    t.on_validation_end(trainer, None)
    t.on_train_batch_end(trainer, None, None, None, 1)
    assert t.stamps == [0.0, 1.0, 6.0]  # 20 s of validation removed
    assert t.summary(8)["queries_per_s"] == pytest.approx(16 / 6)


def _rec(ndcg: float, seconds: float = 60.0, val: list | None = None) -> str:
    metrics = {"nDCG@10": ndcg, "R@100": 0.9, "RR@10": ndcg - 0.05}
    return json.dumps({"seconds": seconds, "metrics": metrics, "val": val or [], "hardware": "test cpu"})


def test_results_table_means_stds_and_gap_closed(tmp_path):
    table = _module("table")
    (tmp_path / "l3_zero.json").write_text(_rec(0.5))
    (tmp_path / "teacher_ce.json").write_text(_rec(0.7))
    (tmp_path / "margin_mse_s1.json").write_text(
        _rec(0.58, 100, [{"epoch": 0, "step": 9, "val/nDCG@10": 0.3}, {"epoch": 1, "step": 19, "val/nDCG@10": 0.4}])
    )
    (tmp_path / "margin_mse_s2.json").write_text(_rec(0.60, 200, [{"epoch": 0, "step": 9, "val/nDCG@10": 0.5}]))
    text, bars = table.build(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| margin_mse |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2"
    assert cells[3] == "0.5900 ± 0.0141"  # mean and sample std of 0.58, 0.60
    assert cells[6].startswith("+45%")  # (0.59 - 0.5) / (0.7 - 0.5)
    assert cells[7] == "n=2 vs 0"  # no hard-label baseline recorded: no test
    assert cells[8] == "0.4500 ± 0.0707"  # best dev score of each seed: 0.4 and 0.5
    assert cells[9] == "1.7 min"  # the fastest seed
    for seed, v in ((1, 0.55), (2, 0.56)):  # the baseline: Welch's t-test, by hand
        (tmp_path / f"infonce_s{seed}.json").write_text(_rec(v))
    text, _ = table.build(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| margin_mse |"))
    se2 = 0.0002 / 2 + 0.00005 / 2  # sample variances 0.0002 and 0.00005 over 2 seeds each
    t = 0.035 / se2**0.5
    df = se2**2 / ((0.0002 / 2) ** 2 + (0.00005 / 2) ** 2)  # Welch-Satterthwaite
    from scipy.stats import t as student_t

    assert f"+0.0350 vs infonce, t={t:+.2f}, p={2 * student_t.sf(t, df):.3f}" in row
    assert "| infonce |" in text and "not run" in text
    (tmp_path / "teacher_ce.json").write_text(_rec(0.45))  # a teacher below the student's start: no gap to close
    text, _ = table.build(tmp_path)
    assert "n/a (teacher 0.4500 ≤ L3)" in text
    assert [b[0] for b in bars] == ["l3_zero", "teacher_ce", "margin_mse"]


def test_record_reads_the_validation_curve_and_test_metrics(tmp_path):
    record = _module("record")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/nDCG@10,val/R@100\n0,5,1.2,,\n0,9,,0.25,0.8\n1,19,,0.5,0.9\n"
    )
    (tmp_path / "metrics.json").write_text(json.dumps({"untrained": {"nDCG@10": 0.1}, "trained": {"nDCG@10": 0.4}}))
    assert record.val_curve(tmp_path) == [
        {"epoch": 0, "step": 9, "val/nDCG@10": 0.25, "val/R@100": 0.8},
        {"epoch": 1, "step": 19, "val/nDCG@10": 0.5, "val/R@100": 0.9},
    ]
    assert record.test_metrics(tmp_path) == {"nDCG@10": 0.4}
    (tmp_path / "metrics.json").write_text(json.dumps({"metrics": {"nDCG@10": 0.7}, "train_seconds": 3.0}))
    assert record.test_metrics(tmp_path) == {"nDCG@10": 0.7}


def test_every_command_of_the_study_composes(tmp_path):
    """Each ``python -m kdir.<command> ...`` line the study's Makefile runs (``make -n``) composes with Hydra: no
    override names a key the config lacks."""
    import shlex
    import shutil
    import subprocess

    from conftest import compose_cfg

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    printed = subprocess.run(
        ["make", "-n", "-B", "-f", str(STUDY / "Makefile"), f"PYTHON={sys.executable}", "all", "speed"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.replace("\\\n", " ")  # fmt: skip
    composed = set()
    for line in printed.splitlines():
        words = shlex.split(line)
        if "-m" not in words or not words[words.index("-m") + 1].startswith("kdir."):
            continue
        at = words.index("-m")
        command = words[at + 1].removeprefix("kdir.")
        overrides = [w for w in words[at + 2 :] if not w.startswith("hydra.")]
        compose_cfg(tmp_path, overrides, name=command)
        composed.add(command)
    assert {"run", "evaluate", "train_teacher", "score", "expand", "evaluate_teacher", "mine"} <= composed
