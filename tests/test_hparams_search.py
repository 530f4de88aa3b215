"""``hparams_search=...``: Hydra's Optuna sweeper over kdir.run, selecting trials on the dev split only."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from conftest import CONF, run_cli, run_command
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[sweeps]'")

SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
# the embeddistill_sym row of experiments/scifact_kd/Makefile, less the searched keys (folders: placeholders)
SCIFACT_ROW = [
    "experiment=embeddistill_symmetric",
    "data=scifact",
    "eval=scifact",
    "student=minilm_l3",
    "student.model_name_or_path=models/paraphrase-MiniLM-L3-v2",
    "student.doc_max_length=128",
    "student.pooling=mean",
    "student.similarity=cosine",
    "teacher.path=models/all-MiniLM-L6-v2",
    "teacher.pooling=mean",
    "teacher.similarity=cosine",
    "optim=adamw",
    "trainer=cpu",
    "trainer.max_epochs=2",
]
ROWS = {"quickstart": [], "scifact_kd": SCIFACT_ROW}
FAST = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "data.batch_size=8",
    "logger=csv",
    "export_student=false",
]


def _compose(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="run", overrides=overrides, return_hydra_config=True)


def _a_value(override: str) -> str:
    """One value of a search dimension written in Hydra's sweep syntax (an interval's midpoint, a choice's last)."""
    parsed = OverridesParser.create().parse_override(override)
    value = parsed.value()
    if parsed.is_interval_sweep():
        lo, hi = value.start, value.end
        mid = math.sqrt(lo * hi) if "log" in value.tags else (lo + hi) / 2
        return repr(round(mid) if isinstance(lo, int) and isinstance(hi, int) else mid)
    assert parsed.is_choice_sweep(), override
    return str(list(parsed.sweep_string_iterator())[-1])


def _dev_scores(job: Path) -> list[float]:
    """The ``val/nDCG@10`` of each validation of a run, as its CSV logger wrote them."""
    with (job / "csv" / "metrics.csv").open() as f:
        return [float(row["val/nDCG@10"]) for row in csv.DictReader(f) if row.get("val/nDCG@10")]


def test_a_search_runs_trials_and_returns_the_best_dev_score(tmp_path, quickstart):
    sweep = tmp_path / "sweep"
    search = ["-m", "hparams_search=quickstart", "hydra.sweeper.n_trials=2"]
    r = run_cli("kdir.run", *search, *FAST, f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert result.name == "optuna" and set(result.best_params) == {"optim.optimizer.lr", "optim.warmup"}
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(jobs) == 2
    best_dev, lrs = {}, []
    for job in jobs:
        config = OmegaConf.load(job / "config.yaml")
        assert config.optimized_metric == "val/nDCG@10"
        lrs.append(config.optim.optimizer.lr)
        assert 3e-4 <= config.optim.optimizer.lr <= 3e-2 and 0.0 <= config.optim.warmup <= 0.3
        scores = _dev_scores(job)
        assert len(scores) == 2  # one validation per epoch: the trial's value is the best of them, not the last
        best_dev[job] = max(scores)
    assert lrs[0] != lrs[1]
    winner = max(best_dev, key=best_dev.get)
    assert result.best_value == pytest.approx(best_dev[winner], abs=1e-6)
    winner_lr = OmegaConf.load(winner / "config.yaml").optim.optimizer.lr
    assert result.best_params["optim.optimizer.lr"] == pytest.approx(winner_lr)
    assert (sweep / "report" / "results.md").is_file()  # the sweep's report, as for every multirun


@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_selects_on_dev_and_its_keys_exist(search):
    cfg = _compose([f"hparams_search={search}", *ROWS[search]])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and isinstance(sweeper.sampler.seed, int)
    assert (sweeper.direction, sweeper.n_jobs, sweeper.storage) == ("maximize", 1, None) and sweeper.n_trials > 1
    assert cfg.optimized_metric == "val/nDCG@10" and cfg.eval.val is not None
    assert "test/" not in OmegaConf.to_yaml(sweeper)
    # every searched key is one the config has, and a trial's value for it composes
    picked = [f"{key}={_a_value(f'{key}={space}')}" for key, space in sweeper.params.items()]
    trial = _compose([f"hparams_search={search}", *ROWS[search], *picked])
    for override in picked:
        key, value = override.split("=", 1)
        assert OmegaConf.select(trial, key) == pytest.approx(float(value)), override


def test_the_scifact_search_covers_the_rows_knobs():
    cfg = _compose(["hparams_search=scifact_kd", *SCIFACT_ROW])
    assert set(cfg.hydra.sweeper.params) == {
        "optim.optimizer.lr",
        "loss.terms.score.temperature",
        "loss.terms.emb_q.weight",
        "data.generated_per_batch",
    }
    assert "log" in cfg.hydra.sweeper.params["optim.optimizer.lr"]
    assert cfg.eval.val.dataset == cfg.datasets.scifact.dev  # the held-out train queries, not SciFact test


def test_a_search_on_test_is_refused_before_training(tmp_path, quickstart, capsys):
    sweep = tmp_path / "sweep"
    overrides = ["hparams_search=quickstart", "optimized_metric=test/nDCG@10", "hydra.sweeper.n_trials=1"]
    assert run_command("kdir.run", "-m", *overrides, f"hydra.sweep.dir={sweep}") == 2
    err = capsys.readouterr().err
    assert "optimized_metric=test/nDCG@10" in err and "hparams_search=quickstart" in err, err
    assert "optimized_metric=val/nDCG@10" in err  # the fix it names
    assert not list(sweep.glob("*/checkpoints"))


def test_a_dev_metric_without_validation_is_refused_before_training(tmp_path, quickstart, capsys):
    assert run_command("kdir.run", "optimized_metric=val/nDCG@10", "eval.val=null", f"hydra.run.dir={tmp_path}") == 2
    err = capsys.readouterr().err
    assert "optimized_metric=val/nDCG@10" in err and "eval.val" in err, err
    assert not (tmp_path / "checkpoints").exists()


def test_a_dev_metric_no_validation_logged_is_an_error_after_the_run(tmp_path, quickstart, capsys):
    overrides = ["optimized_metric=val/nDCG@10", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=2"]
    quick = ["trainer.limit_train_batches=1", "eval_untrained=false", "logger=none", "export_student=false"]
    assert run_command("kdir.run", *overrides, *quick, f"hydra.run.dir={tmp_path}") == 2
    err = capsys.readouterr().err
    assert "optimized_metric=val/nDCG@10: no validation of this run logged it" in err, err
    assert (tmp_path / "metrics.json").is_file()  # the run itself finished and was recorded
