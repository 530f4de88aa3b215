"""End to end: the Hydra apps, every experiment config, multirun, loggers, DDP, and error exits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import CONF, run_cli, run_command
from conftest import compose_cfg as _cfg

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem != "none")  # none: the defaults
# The paper recipes read MS MARCO and hub models: tests/test_recipes.py runs each on the quickstart instead.
PAPER_RECIPES = [
    "collective_kd",
    "embeddistill",
    "embeddistill_ce",
    "embeddistill_symmetric",
    "margin_mse",
    "tct_colbert",
]
QUICK_EXPERIMENTS = [e for e in EXPERIMENTS if e not in PAPER_RECIPES]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_quickstart_student_beats_its_untrained_self(tmp_path, quickstart):
    assert run_command("kdir.run", "logger=csv", f"hydra.run.dir={tmp_path}") == 0
    results = _metrics(tmp_path)
    before, after = results["untrained"], results["trained"]
    assert after["nDCG@10"] > before["nDCG@10"] + 0.2, results
    for f in ("config.yaml", "metrics.json", "runs/test.trec", "student/config.json", "csv/metrics.csv"):
        assert (tmp_path / f).is_file(), f
    assert json.loads((tmp_path / "test_metrics.json").read_text())["nDCG@10"] == pytest.approx(after["nDCG@10"])
    assert "val/nDCG@10" in (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    speed = json.loads((tmp_path / "throughput.json").read_text())  # kdir.training.callbacks.Throughput
    assert speed["queries_per_s"] > 0 and speed["steps"] > 5 and speed["queries_per_step"] == 32


class TrainModeProbe(pl.Callback):
    """Records whether the student's layers are in train mode (dropout on) during training steps."""

    seen: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        TrainModeProbe.seen.append(all(m.training for m in pl_module.student.modules()))


def test_students_train_with_dropout(tmp_path, quickstart):
    """Hugging Face loads models in eval mode; the training steps must see them in train mode."""
    TrainModeProbe.seen = []
    probe = ["~callbacks", "+callbacks.probe._target_=test_run.TrainModeProbe"]  # the probe alone
    assert run_command("kdir.run", "debug=fast", "data.num_workers=0", *probe, f"hydra.run.dir={tmp_path}") == 0
    assert TrainModeProbe.seen == [True]


@pytest.mark.parametrize("experiment", QUICK_EXPERIMENTS)
def test_every_experiment_config_runs_fast_dev_run(tmp_path, experiment, quickstart):
    overrides = [f"experiment={experiment}", "debug=fast", "data.num_workers=0", f"hydra.run.dir={tmp_path}"]
    assert run_command("kdir.run", *overrides) == 0
    assert set(_metrics(tmp_path)["trained"]) >= {"nDCG@10", "RR@10", "R@100", "R@1000"}


def test_all_config_options_compose_and_instantiate_where_offline(tmp_path, quickstart):
    from hydra.utils import instantiate

    for option in ("infonce", "margin_mse", "kl", "softmax_ce_distill"):
        assert instantiate(_cfg(tmp_path, [f"loss={option}"]).loss).name == option
    for option, terms in (("embeddistill", {"score", "emb_q", "emb_d"}), ("kl_hard", {"kd"})):
        assert set(instantiate(_cfg(tmp_path, [f"loss={option}"]).loss).parts) == terms  # zero weights dropped
    for option in ("cpu", "ddp_cpu", "default"):
        assert _cfg(tmp_path, [f"trainer={option}"]).trainer._target_ == "pytorch_lightning.Trainer"
    assert _cfg(tmp_path, ["teacher=none"]).teacher is None


def test_multirun_writes_one_directory_per_job(tmp_path, quickstart):
    sweep = tmp_path / "sweep"
    r = run_cli(
        "kdir.run",
        "-m",
        "loss=margin_mse,infonce",
        "trainer.max_epochs=1",
        "eval_untrained=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [p.name for p in jobs] == ["0_tiny__quickstart__margin_mse", "1_tiny__quickstart__infonce"]
    for job in jobs:
        for f in ("config.yaml", "metrics.json", "runs/test.trec", "student/model.safetensors"):
            assert (job / f).is_file(), job / f
        assert list((job / "checkpoints").glob("best-*.ckpt"))
    assert "infonce" in (jobs[1] / "config.yaml").read_text()


def test_wandb_logger_works_offline(tmp_path, quickstart):
    overrides = ["logger=wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "eval_untrained=false"]
    assert run_command("kdir.run", *overrides, f"hydra.run.dir={tmp_path}") == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb")).read_bytes()  # offline: metrics and config live in the run log
    for key in (b"val/nDCG@10", b"test/nDCG@10", b"margin_mse"):
        assert key in log, key


def test_evaluate_cli_writes_run_metrics_and_table(tmp_path, quickstart):
    r = run_cli(
        "kdir.evaluate", f"hydra.run.dir={tmp_path}", "eval.test.index_factory=HNSW32", "eval.metrics=[nDCG@10,P@5]"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"nDCG@10", "P@5"}
    assert (tmp_path / "run.trec").read_text().count("\n") == 200 * 1000
    assert "nDCG@10" in r.stdout


def test_ddp_two_cpu_processes_train_and_evaluate(tmp_path, quickstart):
    r = run_cli(
        "kdir.run",
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        "eval_untrained=false",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        timeout=900,  # two processes on a loaded machine
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["trained"]["nDCG@10"] > 0.05
    assert (tmp_path / "runs" / "test.trec").read_text().count("\n") == 200 * 1000


@pytest.mark.parametrize(
    "args,message",
    [
        (["loss=nope"], "Could not find 'loss/nope'"),
        (["trainer.no_such_key=1"], "no_such_key"),
        (["datasets.quickstart.root=/does/not/exist"], "/does/not/exist: no such dataset folder"),
        (["teacher=none"], "loss 'margin_mse' needs a teacher signal"),
        (["eval.metrics=[nDGC@10]"], "unknown ir-measures measure 'nDGC@10'"),
    ],
)
def test_bad_config_exits_non_zero_with_a_clear_message(tmp_path, args, message, quickstart):
    r = run_cli("kdir.run", *args, "eval_untrained=false", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0
    assert message in r.stderr + r.stdout


def test_ddp_gather_across_devices_trains_with_the_global_in_batch_pool(tmp_path, quickstart):
    """Two gloo processes, hard-label InfoNCE over every rank's in-batch documents (the gather carries gradients)."""
    r = run_cli(
        "kdir.run",
        "experiment=quickstart_infonce",
        "trainer=ddp_cpu",
        "gather_across_devices=true",
        "trainer.max_epochs=1",
        "eval_untrained=false",
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
        timeout=900,  # two processes on a loaded machine
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["trained"]["nDCG@10"] > 0.05
    r = run_cli("kdir.run", "gather_across_devices=true", "debug=fast", f"hydra.run.dir={tmp_path / 'pairwise'}")
    assert r.returncode != 0 and "gather_across_devices needs the inbatch layout" in r.stderr + r.stdout


def test_headline_command_runs_as_typed_on_the_quickstart(tmp_path, quickstart):
    """``python -m kdir.run teacher=colbert loss=margin_mse``: the quickstart trains its ColBERT teacher once (a real
    teacher there), scores online, and the student beats its untrained self."""
    assert run_command("kdir.run", "teacher=colbert", "loss=margin_mse", f"hydra.run.dir={tmp_path}") == 0
    results = _metrics(tmp_path)
    assert results["trained"]["nDCG@10"] > results["untrained"]["nDCG@10"] + 0.3, results
    teacher = Path(quickstart["data"]).parent / "teachers" / "colbert"
    assert (teacher / "kdir_model.json").is_file()
    assert str(teacher) in (tmp_path / "config.yaml").read_text()


def test_a_model_teacher_on_other_data_names_the_setting_to_fill_in(tmp_path):
    r = run_cli(
        "kdir.run", "teacher=colbert", "loss=margin_mse", "data=scifact", "eval=scifact", f"hydra.run.dir={tmp_path}"
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and "set teacher.path=" in errors[0] and "Traceback" not in r.stderr
