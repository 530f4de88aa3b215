"""Run reports: reading run folders back, grouping seeds (mean ± std), the plots, ``python -m kdir.report``, and the
summary a multirun (joblib launcher) writes into its sweep folder by itself."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from kdir.utils.report import find_runs, group_by_seed, markdown_table, read_curves, results_rows

PNGS = ("curves.png", "diagnostics.png", "results.png", "report.png")


def _fake_run(folder: Path, seed: int, loss: str, ndcg: float, val: list[float], extra: list[str] = ()) -> Path:
    """A run folder as kdir.run leaves it (the files the report reads), with made-up numbers."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / "csv").mkdir()
    composed = {"seed": seed, "loss": {"_target_": f"kdir.losses.{loss}"}, "data": {"seed": "${seed}"}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(composed))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}", f"loss={loss}", *extra]))
    resolved = composed | {"run_name": f"tiny__{loss}", "data": {"seed": seed}}
    (folder / "config.yaml").write_text(yaml.safe_dump(resolved))
    metrics = {"untrained": {"nDCG@10": 0.01, "R@100": 0.1}, "trained": {"nDCG@10": ndcg, "R@100": 0.9}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "throughput.json").write_text(json.dumps({"queries_per_s": 100.0 + seed, "steady_queries_per_s": 120.0}))
    rows = ["epoch,step,test/nDCG@10,train/loss,train/kd/spearman,val/nDCG@10", ",0,0.01,,,"]
    rows += [f"0,{s},,{5.0 - s},{0.1 * s},{v}" for s, v in enumerate(val, start=1)]
    rows += [f"1,{len(val) + 1},{ndcg},,,"]
    (folder / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def study(tmp_path) -> Path:
    """Two multiruns: margin_mse seeds 1-3, infonce seeds 1-2 (and a folder that is no run)."""
    root = tmp_path / "study"
    values = {("MarginMSE", 1): 0.60, ("MarginMSE", 2): 0.64, ("MarginMSE", 3): 0.65, ("InfoNCE", 1): 0.5}
    values[("InfoNCE", 2)] = 0.52
    for i, ((loss, seed), ndcg) in enumerate(values.items()):
        sweep = root / ("sweep_a" if loss == "MarginMSE" else "sweep_b")
        _fake_run(sweep / f"{i}_run", seed, loss, ndcg, [0.2, ndcg - 0.01], ["trainer.max_epochs=1"])
    (root / "notes").mkdir()
    return root


def test_reading_runs_back(study):
    runs = find_runs([study])
    assert len(runs) == 5 and [r.seed for r in runs] == [1, 2, 3, 1, 2]
    curves = read_curves(study / "sweep_a" / "0_run" / "csv" / "metrics.csv")
    assert curves["test/nDCG@10"] == [(0, 0.01), (3, 0.6)] and curves["val/nDCG@10"] == [(1, 0.2), (2, 0.59)]
    assert curves["train/loss"] == [(1, 4.0), (2, 3.0)]
    assert runs[0].best("val/nDCG@10") == pytest.approx(0.59)
    assert [r.path for r in find_runs([study / "sweep_a", study / "sweep_a" / "0_run"])] == [r.path for r in runs[:3]]


def test_runs_differing_only_by_seed_are_grouped_with_mean_and_std(study):
    groups = group_by_seed(find_runs([study]))
    assert [g.label for g in groups] == ["loss=MarginMSE", "loss=InfoNCE"]  # the shared override is left out
    assert [g.seeds for g in groups] == [[1, 2, 3], [1, 2]]
    columns, rows = results_rows(groups)
    mm = [0.60, 0.64, 0.65]
    assert rows[0]["nDCG@10 mean"] == pytest.approx(statistics.fmean(mm))
    assert rows[0]["nDCG@10 std"] == pytest.approx(statistics.stdev(mm))
    assert rows[1]["nDCG@10 std"] == pytest.approx(statistics.stdev([0.5, 0.52]))
    assert rows[0]["best val/nDCG@10 mean"] == pytest.approx(statistics.fmean(v - 0.01 for v in mm))
    assert rows[0]["untrained nDCG@10 mean"] == pytest.approx(0.01) and rows[0]["queries/s mean"] == 120.0
    table = markdown_table(groups)
    assert f"| loss=MarginMSE | 3 | {statistics.fmean(mm):.4f} ± {statistics.stdev(mm):.4f} |" in table
    assert "R@100 mean" in columns


def test_a_single_setting_is_labelled_by_its_run_name_and_a_single_seed_has_no_std(tmp_path):
    _fake_run(tmp_path / "a", 7, "MarginMSE", 0.6, [0.3])
    (group,) = group_by_seed(find_runs([tmp_path]))
    assert group.label == "tiny__MarginMSE"
    _, (row,) = results_rows([group])
    assert row["nDCG@10 mean"] == 0.6 and row["nDCG@10 std"] is None
    assert "| tiny__MarginMSE | 1 | 0.6000 |" in markdown_table([group])


def test_kdir_report_writes_tables_and_plots_of_a_study(study, tmp_path):
    out = tmp_path / "out"
    r = run_cli("kdir.report", str(study / "sweep_a"), str(study / "sweep_b"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| loss=MarginMSE | 3 |" in r.stdout
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["run"] for row in rows] == ["loss=MarginMSE", "loss=InfoNCE"]
    assert float(rows[1]["nDCG@10 mean"]) == pytest.approx(0.51)


def test_kdir_report_user_errors_are_one_line(tmp_path, study):
    r = run_cli("kdir.report", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith(f"kdir.report: error: {tmp_path / 'missing'}: no such folder")
    r = run_cli("kdir.report", str(study / "notes"))
    assert r.returncode == 2 and "no kdir run under it" in r.stderr
    r = run_cli("kdir.report", str(study / "sweep_a"), str(study / "sweep_b"))
    assert r.returncode == 2 and "choose where their report goes with --out <folder>" in r.stderr


# ------------------------------------------------------------------- a real multirun (joblib launcher)
@pytest.fixture(scope="module")
def sweep(tmp_path_factory, quickstart) -> Path:
    """Two quickstart jobs (seeds 1 and 2) in parallel processes: 4 steps each, logged every 2."""
    folder = tmp_path_factory.mktemp("joblib") / "sweep"
    r = run_cli(
        "kdir.run",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=1,2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.log_every_n_steps=2",
        f"hydra.sweep.dir={folder}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return folder


def _expected(sweep: Path) -> tuple[list[float], float, float]:
    values = [json.loads((job / "metrics.json").read_text())["trained"]["nDCG@10"] for job in _jobs(sweep)]
    return values, statistics.fmean(values), statistics.stdev(values)


def _jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())


def test_a_joblib_multirun_writes_its_summary_into_the_sweep_folder(sweep):
    assert [p.name for p in _jobs(sweep)] == ["0_tiny__quickstart__margin_mse", "1_tiny__quickstart__margin_mse"]
    report = sweep / "report"
    for name in ("results.md", "results.csv", *PNGS):
        assert (report / name).is_file(), name
    values, mean, std = _expected(sweep)
    assert f"| tiny__quickstart__margin_mse | 2 | {mean:.4f} ± {std:.4f} |" in (report / "results.md").read_text()
    with open(report / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["seeds"] == "1 2" and float(row["nDCG@10 mean"]) == pytest.approx(mean)
    assert float(row["nDCG@10 std"]) == pytest.approx(std)


def test_kdir_report_on_the_two_seeds_gives_mean_and_std(sweep, tmp_path):
    jobs = _jobs(sweep)
    r = run_cli("kdir.report", *map(str, jobs), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    _, mean, std = _expected(sweep)
    assert f"| {mean:.4f} ± {std:.4f} |" in r.stdout
    for name in PNGS:
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG", name
    curves = read_curves(jobs[0] / "csv" / "metrics.csv")
    assert [s for s, _ in curves["train/kd/spearman"]] == [1, 3] and curves["test/nDCG@10"][0][0] == 0
