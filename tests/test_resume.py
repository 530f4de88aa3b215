"""Reliability of runs: one folder per run, and a killed run resumed (resume=true) ends as if never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, run_cli, run_command
from torch.utils.data import DataLoader

from kdir.data.examples import Examples
from kdir.data.stream import ExampleStream

# two epochs of 8 steps; last.ckpt every 3 steps and after each validation (steps 3, 6, 8, 9, 12, 15, 16)
SMALL = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=8",
    "eval_untrained=false",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "+logger.csv.flush_logs_every_n_steps=1",  # a killed run's rows are on disk up to its last step
    "callbacks.step_checkpoint.every_n_train_steps=3",
]


class Kill(pl.Callback):
    """Ends the process at once, like ``kill -9``, at global step ``step`` (after its batch, or as validation starts).

    Checkpoint callbacks run after this one, so the step's own checkpoint (if any) is never written.
    """

    def __init__(self, step: int, when: str = "batch_end"):
        self.step, self.when = step, when

    def _maybe(self, trainer: pl.Trainer, when: str) -> None:
        if when == self.when and trainer.global_step == self.step:
            os._exit(9)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._maybe(trainer, "batch_end")

    def on_validation_start(self, trainer, pl_module):
        self._maybe(trainer, "validation_start")


class Rows(pl.Callback):
    """Appends ``[epoch, global step, example rows]`` of every trained batch to ``<out>/rows-<rank>.jsonl``."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"rows-{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([trainer.current_epoch, trainer.global_step, batch.rows.tolist()]) + "\n")


def _kill(step: int, when: str = "batch_end") -> list[str]:
    kill = "+callbacks.kill"
    return [f"{kill}._target_=test_resume.Kill", f"{kill}.step={step}", f"{kill}.when={when}"]


def _rows(out: Path) -> list[str]:
    return ["+callbacks.rows._target_=test_resume.Rows", f"+callbacks.rows.out={out}"]


def _run(*args: str, killed: bool = False, timeout: int = 600) -> None:
    r = run_cli("kdir.run", *args, timeout=timeout)
    assert r.returncode == (9 if killed else 0), r.stderr[-3000:]


def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _untimed(path: Path) -> bytes:
    """The file's bytes; for a metrics.csv without its wall-clock column (train/queries_per_s)."""
    if path.suffix != ".csv":
        return path.read_bytes()
    rows = [line.split(",") for line in path.read_text().splitlines()]
    col = rows[0].index("train/queries_per_s") if "train/queries_per_s" in rows[0] else None
    return "\n".join(",".join(r[:col] + r[col + 1 :] if col is not None else r) for r in rows).encode()


def _same_result(run: Path, ref: Path) -> None:
    got, want = (json.loads((p / "metrics.json").read_text()) for p in (run, ref))
    assert got["trained"] == want["trained"]  # exactly, not approximately
    assert Path(got["best_checkpoint"]).name == Path(want["best_checkpoint"]).name
    a, b = _state(run), _state(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the stream's position
class _Uniform:
    """Negatives drawn uniformly from 1000 documents with the stream's per-batch generator."""

    def sample(self, queries: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, 1000, (len(queries), n))


def _items(stream: ExampleStream, workers: int) -> list[tuple[list[int], list]]:
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [(it["rows"].tolist(), it["negatives"].tolist()) for it in loader]


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_a_resumed_epoch_trains_exactly_the_batches_not_yet_trained(workers, world):
    n, batch = 75, 8  # 10 batches: 5 steps per rank on 2 ranks
    examples = Examples(np.arange(n), np.arange(n) % 7, sampler=_Uniform(), n_negatives=2)

    def stream(rank: int, start: int = 0) -> ExampleStream:
        s = ExampleStream(examples, batch, seed=3, rank=rank, world_size=world)
        s.set_epoch(1, start)
        return s

    full = [_items(stream(r), workers) for r in range(world)]
    for done in range(len(full[0]) + 1):  # interrupted after `done` steps on every rank
        resumed = [_items(stream(r, done), workers) for r in range(world)]
        assert [f[:done] + p for f, p in zip(full, resumed)] == full  # same batches, order and negatives
        seen = Counter(i for f, p in zip(full, resumed) for rows, _ in f[:done] + p for i in rows)
        assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}
    with pytest.raises(ValueError, match="outside the epoch"):
        stream(0).set_epoch(1, len(full[0]) + 1)


# ---------------------------------------------------------------- exact resume
def test_a_killed_run_resumed_ends_exactly_as_the_uninterrupted_run(tmp_path, quickstart):
    """Killed as epoch 0's validation starts, then after step 9, then mid-epoch 1: each time resume=true."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(*SMALL, f"hydra.run.dir={ref}")
    # killed as validation starts at step 8: last.ckpt is step 6's (no step checkpoint before a validation)
    _run(*SMALL, f"hydra.run.dir={run}", *_kill(8, "validation_start"), killed=True)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    # resumed mid-epoch 0, killed after step 9 (before its checkpoint): last.ckpt is the one after validation
    _run(*SMALL, f"hydra.run.dir={run}", "resume=true", *_kill(9), killed=True)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    # resumed at the start of epoch 1, killed after step 13: last.ckpt is step 12's (epoch 1, 4 steps done)
    _run(*SMALL, f"hydra.run.dir={run}", "resume=true", *_kill(13), killed=True)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12 and ckpt["DistillDataModule"]["epoch"] == 1
    assert ckpt["DistillDataModule"]["steps_done"] == 4 and len(ckpt["rng_states"]) == 1
    _run(*SMALL, f"hydra.run.dir={run}", "resume=true")

    _same_result(run, ref)
    for f in ("student/model.safetensors", "csv/metrics.csv"):  # the exported student; every step's loss
        assert _untimed(run / f) == _untimed(ref / f), f
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (ref / "checkpoints").iterdir()
    )  # best + last.ckpt, nothing left over from the killed parts


def test_two_ddp_ranks_resumed_see_every_example_once_and_end_as_uninterrupted(tmp_path, quickstart):
    """trainer=ddp_cpu (2 gloo processes), 10 steps per epoch; killed after step 7 of 20, resumed from step 6."""
    ddp = ["trainer=ddp_cpu", "data.batch_size=64", "trainer.max_epochs=2", "eval_untrained=false", "logger=none"]
    ddp += ["callbacks.step_checkpoint.every_n_train_steps=3", "export_student=false"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(*ddp, f"hydra.run.dir={ref}", *_rows(tmp_path / "rows_ref"))
    _run(*ddp, f"hydra.run.dir={run}", *_rows(tmp_path / "rows_killed"), *_kill(7), killed=True)
    assert len(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["rng_states"]) == 2  # one per rank
    _run(*ddp, f"hydra.run.dir={run}", "resume=true", *_rows(tmp_path / "rows_resumed"))

    def rows(name: str, rank: int) -> list:
        return [json.loads(line) for line in (tmp_path / name / f"rows-{rank}.jsonl").read_text().splitlines()]

    n_examples = len({i for r in (0, 1) for _, _, b in rows("rows_ref", r) for i in b})
    for rank in (0, 1):
        trained = [x for x in rows("rows_killed", rank) if x[1] <= 6] + rows("rows_resumed", rank)
        assert trained == rows("rows_ref", rank)  # the same batches at the same steps
    for epoch in (0, 1):
        seen = Counter(i for r in (0, 1) for e, s, b in rows("rows_ref", r) if e == epoch for i in b)
        seen_resumed = Counter(
            i
            for r in (0, 1)
            for e, s, b in [x for x in rows("rows_killed", r) if x[1] <= 6] + rows("rows_resumed", r)
            if e == epoch
            for i in b
        )
        assert seen_resumed == seen and len(seen) == n_examples and set(seen.values()) == {1}
    _same_result(run, ref)


def test_resume_with_nothing_to_resume_exits_2(tmp_path, capsys, quickstart):
    assert run_command("kdir.run", "resume=true", f"hydra.run.dir={tmp_path / 'new'}") == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # refused before anything was written
    assert run_command("kdir.run", "ckpt_path=/no/such.ckpt", f"hydra.run.dir={tmp_path / 'x'}") == 2
    assert "ckpt_path=/no/such.ckpt: no such checkpoint file" in capsys.readouterr().err
    # a run killed before its first checkpoint: its folder holds a run, but nothing to resume from
    early = tmp_path / "early"
    (early / ".hydra").mkdir(parents=True)
    (early / "config.yaml").write_text("seed: 42\n")
    assert run_command("kdir.run", "resume=true", "debug=fast", f"hydra.run.dir={early}") == 2
    err = capsys.readouterr().err
    assert f"resume=true: nothing to resume in {early}: no checkpoints/last.ckpt" in err


# ---------------------------------------------------------------- run folders
def test_a_rerun_into_a_run_folder_is_refused_and_leaves_it_as_it_was(tmp_path, capsys, quickstart):
    assert run_command("kdir.run", "debug=fast", f"hydra.run.dir={tmp_path}") == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert run_command("kdir.run", "debug=fast", "seed=7", f"hydra.run.dir={tmp_path}") == 2
    err = capsys.readouterr().err
    assert f"kdir.run: error: {tmp_path} holds a run already (.hydra, config.yaml): add resume=true" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    sweep = tmp_path / "sweep"
    assert run_command("kdir.run", "-m", "debug=fast", f"hydra.sweep.dir={sweep}") == 0
    assert run_command("kdir.run", "-m", "debug=fast", f"hydra.sweep.dir={sweep}") == 2
    assert f"{sweep} holds a run already (multirun.yaml)" in capsys.readouterr().err


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch, quickstart):
    import hydra.core.utils

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    for seed in (1, 2):
        assert run_command("kdir.run", "debug=fast", f"seed={seed}") == 0
    runs = sorted((tmp_path / "outputs" / "run" / "2030-01-02").iterdir())
    assert len(runs) == 2 and all(p.name.startswith("03-04-05-") for p in runs), runs
    assert sorted(_seed(p) for p in runs) == [1, 2]


def _seed(run: Path) -> int:
    seed = int(next(line for line in (run / "config.yaml").read_text().splitlines() if line.startswith("seed:"))[5:])
    assert f"seed={seed}" in (run / ".hydra" / "overrides.yaml").read_text()
    return seed


def test_two_concurrent_runs_keep_separate_consistent_records(tmp_path, quickstart):
    args = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "eval_untrained=false", "export_student=false"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kdir.run", *args, f"seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    runs = sorted(p for p in (tmp_path / "outputs" / "run").glob("*/*") if p.is_dir())
    assert len(runs) == 2 and sorted(_seed(p) for p in runs) == [1, 2]
    for run in runs:
        trained = json.loads((run / "metrics.json").read_text())["trained"]
        lines = [line.split(",") for line in (run / "csv" / "metrics.csv").read_text().splitlines()]
        col = lines[0].index("test/nDCG@10")
        tested = [float(row[col]) for row in lines[1:] if row[col]]
        assert tested == [pytest.approx(trained["nDCG@10"])]  # one run's test metrics in its folder: its own
