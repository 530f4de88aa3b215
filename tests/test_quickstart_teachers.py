"""The quickstart's own teachers: every teacher option of the headline command runs as typed on the quickstart, what
it builds is built once and leaves a seeded run's generators alone, and the hints of the teacher-signal errors work
as printed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, run_command


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# The ColBERT teacher's headline run is in test_run.py (as typed, full length). These run 3 of its 10 epochs.
@pytest.mark.parametrize("teacher", ["cross_encoder", "collective", "ensemble"])
def test_every_teacher_option_runs_on_the_quickstart_and_the_student_beats_its_untrained_self(
    teacher, tmp_path, quickstart
):
    args = (f"teacher={teacher}", "loss=margin_mse", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path}")
    assert run_command("kdir.run", *args) == 0
    results = _metrics(tmp_path)
    # 3 of 10 epochs (measured: cross-encoder 0.17, ensemble 0.17, collective 0.04); the collective teacher's margins
    # are ~60 (L2 + β·idf-weighted expansions), which Margin-MSE at the quickstart's lr follows slowly (0.39 at 10)
    assert results["trained"]["nDCG@10"] > results["untrained"]["nDCG@10"] + 0.02, results
    config = (tmp_path / "config.yaml").read_text()
    teachers = Path(quickstart["data"]).parent / "teachers"
    assert str(teachers) in config  # the quickstart's own teacher folders, resolved into the saved config


def test_the_quickstart_builds_a_store_per_teacher_setting_and_reuses_it(tmp_path, quickstart):
    from kdir.stores import ScoreStore

    scores = Path(quickstart["data"]).parent / "teacher_scores"
    args = ["teacher=cross_encoder", "loss=margin_mse", "debug=fast"]
    assert run_command("kdir.run", *args, f"hydra.run.dir={tmp_path / 'a'}") == 0
    first = sorted(scores.glob("cross_encoder-*.store"))
    stamps = {p: (p / "meta.json").stat().st_mtime_ns for p in first}
    assert run_command("kdir.run", *args, f"hydra.run.dir={tmp_path / 'b'}") == 0
    assert {p: (p / "meta.json").stat().st_mtime_ns for p in first} == stamps  # read, not rebuilt
    assert run_command("kdir.run", *args, "negatives.depth=20", f"hydra.run.dir={tmp_path / 'c'}") == 0
    second = sorted(scores.glob("cross_encoder-*.store"))
    assert len(second) == len(first) + 1  # another training pool: its own store, complete
    new = ScoreStore.open(next(p for p in second if p not in first))
    assert new.meta["teacher"]["name"] == "CrossEncoder" and len(new) == new.meta["data"]["pairs"]


def test_building_a_quickstart_teacher_leaves_the_callers_generators_as_they_were(tmp_path, monkeypatch, quickstart):
    """The builders draw from every generator (as training does); the caller's draws are those of a cached run."""
    from kdir.training import quickstart_teachers

    def drawing_trainer(out: Path, data: Path, model: Path, seed: int) -> None:
        random.random(), np.random.random(), torch.rand(3)
        out.mkdir()
        (out / "kdir_model.json").write_text("{}")

    monkeypatch.setitem(quickstart_teachers.TRAINERS, "colbert", drawing_trainer)
    monkeypatch.setattr(quickstart_teachers, "ensure", lambda what: str(tmp_path / what))  # an empty cache
    (tmp_path / "data").mkdir()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = random.random(), np.random.random(), torch.rand(1).item()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    folder = quickstart_teachers.ensure_teacher("colbert")  # built here, drawing numbers
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected
    assert Path(folder) == tmp_path / "teachers" / "colbert"


def test_the_first_run_on_a_fresh_cache_equals_every_later_run(tmp_path):
    """Building the quickstart during config resolution must not move the run's seeded generators."""
    env = {"KDIR_CACHE": str(tmp_path / "cache")}
    args = ("debug=fast", "data.num_workers=0")  # one step with dropout: a moved generator changes the weights
    results = []
    for name in ("first", "second"):
        r = run_cli("kdir.run", *args, f"hydra.run.dir={tmp_path / name}", env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        results.append(_metrics(tmp_path / name)["trained"])
    assert results[0] == results[1]


# ------------------------------------------------------------------------------- hints that work as printed


def _error(r) -> str:
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ": error: " in ln]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def test_missing_store_hint_signal_fill_works_as_printed(tmp_path, quickstart):
    store = tmp_path / "nothing.store"
    base = ["teacher=cross_encoder", "loss=margin_mse", "debug=fast", f"signal.store={store}"]
    err = _error(run_cli("kdir.run", *base, f"hydra.run.dir={tmp_path / 'a'}"))
    assert "no score store" in err and "signal=fill" in err
    assert run_command("kdir.run", *base, "signal=fill", f"hydra.run.dir={tmp_path / 'b'}") == 0
    assert (store / "meta.json").is_file()


def test_missing_pairs_hints_work_as_printed(tmp_path, quickstart):
    """A store holding a few of the pairs (scored over a 2-query run file): both printed remedies run."""
    qrels = (Path(quickstart["data"]) / "qrels" / "train.tsv").read_text().splitlines()
    qids = [line.split("\t")[0] for line in qrels[1:3]]
    run = tmp_path / "few.trec"
    run.write_text("".join(f"{q} Q0 d{i} {i + 1} {10 - i} x\n" for q in qids for i in range(3)))
    store = tmp_path / "few.store"
    assert run_command("kdir.score", "teacher=cross_encoder", f"run_file={run}", f"store={store}") == 0
    base = ["teacher=cross_encoder", "loss=margin_mse", "debug=fast", f"signal.store={store}"]
    err = _error(run_cli("kdir.run", *base, f"hydra.run.dir={tmp_path / 'a'}"))
    assert "signal=fill" in err and "signal.force=true" in err
    for i, hint in enumerate(("signal.force=true", "signal=fill")):  # masking first: filling completes the store
        assert run_command("kdir.run", *base, hint, f"hydra.run.dir={tmp_path / str(i)}") == 0, hint


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["teacher=cross_encoder"], "set teacher.path=<"),
        (["teacher=collective", "teacher.path=/nowhere"], "set teacher.expansion=<"),
        (["teacher=cross_encoder", "teacher.path=/nowhere"], "/nowhere"),
    ],
)
def test_a_teacher_on_other_data_names_what_to_set(args, setting, tmp_path):
    r = run_cli("kdir.run", *args, "loss=margin_mse", "data=scifact", "eval=scifact", f"hydra.run.dir={tmp_path}")
    assert setting in _error(r)
