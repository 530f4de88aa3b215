"""The commands' error policy: a user error is one line and exit status 2; a bug keeps its traceback.

Also the typed settings, the unwrapping of errors raised inside ``hydra.utils.instantiate`` and the value a
command returns to Hydra sweepers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF, compose_cfg, run_cli, run_command
from omegaconf import OmegaConf

from kdir.errors import ConfigError, DataFormatError, KdirError, MissingFileError, UnknownNameError
from kdir.losses import MarginMSE
from kdir.utils import Setting, check_settings, task_wrapper
from kdir.utils.task import pick_metric, user_error


class BuggyLoss(MarginMSE):
    """Margin-MSE with a bug: it reads a key that was never stored."""

    def compute(self, c):
        margins: dict[str, float] = {}
        return margins["pos - neg"]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower()]


# ---------------------------------------------------------------------------------------------- a bug


def test_a_bug_exits_non_zero_with_its_traceback(tmp_path, quickstart):
    r = run_cli("kdir.run", f"loss._target_={__name__}.BuggyLoss", "debug=fast", f"hydra.run.dir={tmp_path}")
    assert r.returncode not in (0, 2), r.stderr[-3000:]
    assert "Traceback (most recent call last)" in r.stderr
    assert "KeyError: 'pos - neg'" in r.stderr
    assert f'File "{Path(__file__).resolve()}", line ' in r.stderr and "in compute" in r.stderr
    log = (tmp_path / "run.log").read_text()  # the job's log keeps the full traceback
    assert "kdir.run failed: KeyError" in log and "Traceback (most recent call last)" in log


# ---------------------------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=abc", "data.batch_size=abc: expected an integer >= 1"),
        ("data.batch_size=0", "data.batch_size=0: expected an integer >= 1"),
        ("data.batch_size=-4", "data.batch_size=-4: expected an integer >= 1"),
        ("optim.optimizer.lr=abc", "optim.optimizer.lr=abc: expected a number > 0"),
    ],
)
def test_a_bad_setting_exits_2_with_one_line_naming_it(tmp_path, override, message, quickstart):
    r = run_cli("kdir.run", override, f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert _error_lines(r.stderr) == [f"kdir.run: error: {message}"]
    assert "Traceback" not in r.stderr + r.stdout
    assert (tmp_path / "run.log").read_text().strip().endswith(message)


def test_a_malformed_data_file_exits_2_naming_file_and_line(beir_dir, tmp_path, quickstart):
    corpus = beir_dir / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    lines[2] = '{"_id": "d3", "text": '
    corpus.write_text("\n".join(lines) + "\n")
    r = run_cli("kdir.mine", f"datasets.quickstart.root={beir_dir}", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = _error_lines(r.stderr)
    assert line.startswith("kdir.mine: error: ") and f"{corpus}:3: expected" in line
    assert "Traceback" not in r.stderr + r.stdout


def test_a_missing_path_exits_2_naming_it(tmp_path, quickstart):
    missing = tmp_path / "nowhere"
    r = run_cli("kdir.mine", f"datasets.quickstart.root={missing}", f"hydra.run.dir={tmp_path / 'job'}")
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = _error_lines(r.stderr)
    assert f"{missing}: no such dataset folder" in line
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize(
    "module, overrides, message",
    [
        ("kdir.run", ["data.num_workers=-1"], "data.num_workers=-1: expected an integer >= 0"),
        ("kdir.run", ["data.examples.n_negatives=-2"], "data.examples.n_negatives=-2: expected an integer >= 0"),
        ("kdir.run", ["optim.optimizer.lr=0"], "optim.optimizer.lr=0: expected a number > 0"),
        ("kdir.run", ["optim.warmup=-0.5"], "optim.warmup=-0.5: expected a number >= 0"),
        ("kdir.run", ["trainer.max_epochs=-2"], "trainer.max_epochs=-2: expected an integer >= -1 or null"),
        ("kdir.run", ["eval.test.batch_size=0"], "eval.test.batch_size=0: expected an integer >= 1"),
        ("kdir.evaluate", ["eval.test.depth=1.5"], "eval.test.depth=1.5: expected an integer >= 1"),
        ("kdir.mine", ["depth=0"], "depth=0: expected an integer >= 1"),
        ("kdir.mine", ["batch_size=many"], "batch_size=many: expected an integer >= 1"),
        ("kdir.expand", ["fb_k=0"], "fb_k=0: expected an integer >= 1"),
        ("kdir.expand", ["depth=-1"], "depth=-1: expected an integer >= 0"),
        ("kdir.generate_queries", ["n_sources=0"], "n_sources=0: expected an integer >= 1 or null"),
        ("kdir.train_teacher", ["temperature=0"], "temperature=0: expected a number > 0"),
        ("kdir.score", ["teacher=cross_encoder", "devices=0"], "devices=0: expected an integer >= 1 or -1 or 'auto'"),
        ("kdir.score", ["teacher=cross_encoder", "chunk_size=0"], "chunk_size=0: expected an integer >= 1"),
    ],
)
def test_typed_settings_of_every_command(module, overrides, message, tmp_path, capsys, quickstart):
    assert run_command(module, *overrides, f"hydra.run.dir={tmp_path}") == 2
    assert _error_lines(capsys.readouterr().err) == [f"{module}: error: {message}"]


def test_an_error_raised_in_a_constructor_names_its_config_node(tmp_path, capsys, quickstart):
    assert run_command("kdir.mine", "student.pooling=max", f"hydra.run.dir={tmp_path}") == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == ["kdir.mine: error: student: pooling must be 'cls' or 'mean', got 'max'"]
    assert "Traceback" not in err


def test_an_unset_mandatory_value_is_a_user_error(tmp_path, capsys, quickstart):
    assert run_command("kdir.expand", f"hydra.run.dir={tmp_path}") == 2
    assert _error_lines(capsys.readouterr().err) == [
        "kdir.expand: error: out has no value (???): set it on the command line, e.g. out=..."
    ]


def test_the_wrapper_saves_the_resolved_config(tmp_path, quickstart):
    assert run_command("kdir.mine", "depth=5", "data.batch_size=7", f"hydra.run.dir={tmp_path}") == 0
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.depth == 5 and saved.data.batch_size == 7 and "${" not in (tmp_path / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------- the pieces


def test_user_errors_keep_their_builtin_bases():
    assert issubclass(ConfigError, ValueError) and issubclass(MissingFileError, FileNotFoundError)
    assert str(UnknownNameError("unknown ir_datasets id 'x'")) == "unknown ir_datasets id 'x'"  # not quoted
    with pytest.raises(KeyError, match="unknown ir_datasets id"):
        raise UnknownNameError("unknown ir_datasets id 'x'")


def _raises_config_error(value: int) -> None:
    raise ConfigError(f"value={value}: not allowed")


def _raises_type_error(value: int) -> None:
    raise TypeError("a bug")


def test_user_error_unwraps_instantiation_and_names_the_node():
    from hydra.utils import instantiate

    cfg = OmegaConf.create({"model": {"_target_": f"{__name__}._raises_config_error", "value": 3}})
    with pytest.raises(Exception) as info:
        instantiate(cfg.model)
    assert user_error(info.value) == "model: value=3: not allowed"
    cfg.model._target_ = f"{__name__}._raises_type_error"
    with pytest.raises(Exception) as info:
        instantiate(cfg.model)
    assert user_error(info.value) is None  # a bug
    assert user_error(DataFormatError("f.tsv", 4, "3 columns", got="a b")) == "f.tsv:4: expected 3 columns, got 'a b'"
    assert user_error(KeyError("x")) is None and user_error(FileNotFoundError("y")) is None
    unset = OmegaConf.create({"teacher": {"store": "???"}, "store": "${teacher.store}"})
    with pytest.raises(Exception) as info:
        _ = unset.store
    assert user_error(info.value) == (
        "teacher.store has no value (???) (via store): set it on the command line, e.g. teacher.store=..."
    )


def test_task_wrapper_returns_the_optimized_metric_and_applies_the_policy(tmp_path):
    results = {"untrained": {"nDCG@10": 0.1}, "trained": {"nDCG@10": 0.6}, "test": {"nDCG@10": 0.6}}

    @task_wrapper(metric="untrained/nDCG@10")
    def task(cfg):
        if cfg.get("fail") == "user":
            raise ConfigError("bad option")
        if cfg.get("fail") == "bug":
            raise KeyError("bug")
        return results

    paths = {"paths": {"output_dir": str(tmp_path)}}
    assert task(OmegaConf.create(paths)) == 0.1  # the command's default metric
    assert task(OmegaConf.create(paths | {"optimized_metric": "test/nDCG@10"})) == 0.6
    assert task(OmegaConf.create(paths | {"optimized_metric": "val/nDCG@10"})) is None
    assert (tmp_path / "config.yaml").is_file()
    with pytest.raises(SystemExit) as info:
        task(OmegaConf.create({"fail": "user"}))
    assert info.value.code == 2
    with pytest.raises(KeyError, match="bug"):
        task(OmegaConf.create({"fail": "bug"}))
    assert pick_metric({"nDCG@10": 0.5, "R@100": True}, "nDCG@10") == 0.5 and pick_metric(results, "R@100") is None


def test_check_settings_reports_every_bad_key_and_skips_absent_ones():
    cfg = OmegaConf.create(
        {
            "data": {"batch_size": 8, "num_workers": -1},
            "optim": {"optimizer": {"lr": "1e-3"}},
            "eval": {"metrics": ["nDCG@10"], "val": None, "test": {"depth": 10, "batch_size": False}},
            "devices": "auto",
            "out": "???",
        }
    )
    with pytest.raises(ConfigError) as info:
        check_settings(cfg, {"devices": Setting(int, 1, also=(-1, "auto"))})
    assert str(info.value) == (
        "data.num_workers=-1: expected an integer >= 0; optim.optimizer.lr=1e-3: expected a number > 0; "
        "eval.test.batch_size=false: expected an integer >= 1"
    )
    assert isinstance(info.value, KdirError)
    check_settings(OmegaConf.create({"data": {"batch_size": 1}, "trainer": {"max_epochs": None}}))
    with pytest.raises(ConfigError, match=r"devices=0: expected an integer >= 1 or -1 or 'auto'"):
        check_settings(OmegaConf.create({"devices": 0}), {"devices": Setting(int, 1, also=(-1, "auto"))})


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_the_shipped_configs_pass_the_settings_check(tmp_path, quickstart):
    """No option of the numeric groups, no recipe and no command's defaults trips the typed settings."""
    runs = [
        [f"{group}={option}"]
        for group in ("experiment", "optim", "trainer", "eval", "data")
        for option in _options(group)
    ]
    others = [
        (name, []) for name in ("evaluate", "evaluate_teacher", "train_teacher", "mine", "expand", "generate_queries")
    ]
    for name, overrides in [("run", o) for o in runs] + others + [("score", ["teacher=cross_encoder"])]:
        check_settings(compose_cfg(tmp_path, overrides, name))
