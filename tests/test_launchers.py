"""Clusters: ``hydra/launcher=slurm`` (hydra-submitit-launcher) for every command, a real sweep through submitit's
local executor, and Lightning's SLURM ranks from ``trainer=slurm_ddp`` (docs/cluster.md)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import CONF, ROOT, run_cli, run_command
from conftest import compose_cfg as _cfg
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")

COMMANDS = sorted(p.stem for p in CONF.glob("*.yaml"))  # every Hydra app: run, score, evaluate, mine, ...
REQUIRED = {"score": ["teacher=cross_encoder"]}  # a mandatory group choice
CLUSTER = [  # what a user fills in (docs/cluster.md)
    "hydra/launcher=slurm",
    "hydra.launcher.partition=gpu",
    "hydra.launcher.account=proj42",
    "hydra.launcher.qos=high",
    "hydra.launcher.nodes=2",
    "hydra.launcher.gpus_per_node=4",
    "hydra.launcher.timeout_min=600",
    "hydra.launcher.array_parallelism=3",
    "hydra.launcher.setup=[module load cuda/12.4]",
]
SESSION_RENDEZVOUS = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}  # as the session started
# A SLURM task's environment: rank 5 of 2 nodes x 4 tasks (what srun sets for the 6th process of the job).
SLURM_TASK = {
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_NNODES": "2",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NAME": "run",
    "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "123456",
}


def _hydra_cfg(name: str, overrides: list[str]) -> DictConfig:
    """The command's config with its ``hydra`` node, as its app composes it (``hydra:`` resolvers set)."""
    import kdir  # noqa: F401  (the ${run_uid:} resolver of the sweep folder)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=REQUIRED.get(name, []) + overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch) -> None:
    """An ``srun`` on PATH, which submitit's SLURM executor looks for before it writes a batch script (it never
    runs here: no job is submitted)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\necho 'srun: not a SLURM cluster' >&2\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _sbatch_script(cfg: DictConfig) -> str:
    """The batch script submitit writes for ``cfg``'s launcher: the plugin's parameter mapping
    (``SlurmLauncher.launch``), handed to submitit, which refuses a parameter it does not know."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(instantiate(cfg.hydra.launcher).params)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit <folder>", "0")


# ---------------------------------------------------------------- the SLURM launcher composes for every command


@pytest.mark.parametrize("name", COMMANDS)
def test_the_slurm_launcher_composes_for_every_command(name):
    cfg = _hydra_cfg(name, CLUSTER)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.account, launcher.qos) == ("gpu", "proj42", "high")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)  # one rank per GPU
    assert (launcher.timeout_min, launcher.array_parallelism, launcher.setup) == (600, 3, ["module load cuda/12.4"])
    assert launcher.max_num_timeout >= 1 and launcher.cpus_per_task >= 1 and launcher.mem_gb >= 1
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # logs beside the sweep's jobs


def test_the_batch_script_asks_slurm_for_what_the_launcher_says(tmp_path, srun_on_path):
    cfg = _hydra_cfg("run", [*CLUSTER, "trainer=slurm_ddp", f"hydra.sweep.dir={tmp_path}"])
    script = _sbatch_script(cfg)
    for flag in (
        "--partition=gpu",
        "--account=proj42",
        "--qos=high",
        "--nodes=2",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--time=600",
        "--signal=USR2@120",  # submitit requeues on it (timeout or preemption)
        f"--output={tmp_path}/.submitit/%j/%j_0_log.out",
    ):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert script.index("module load cuda/12.4") < script.index("srun ")  # setup runs before the processes start
    assert "NCCL_DEBUG" not in script  # setup=[...] replaces the shipped lines


def test_single_process_commands_ask_for_one_task(srun_on_path):
    """kdir.evaluate / kdir.mine are one process: hydra.launcher.tasks_per_node=1 with the GPUs it wants."""
    cfg = _hydra_cfg(
        "mine", ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=2", "hydra.launcher.tasks_per_node=1"]
    )
    script = _sbatch_script(cfg)
    assert "#SBATCH --ntasks-per-node=1\n" in script and "#SBATCH --gpus-per-node=2\n" in script
    assert "#SBATCH --partition" not in script and "#SBATCH --account" not in script  # null: the cluster's defaults
    assert "\nexport NCCL_DEBUG=WARN\n" in script  # the shipped setup line


# ---------------------------------------------------------------- a real sweep through submitit (local executor)


def test_a_two_job_sweep_runs_through_submitit_and_matches_the_basic_launcher(tmp_path, quickstart):
    sweep = ["-m", "student.pooling=mean,cls"]
    submitit_dir, basic_dir = tmp_path / "submitit", tmp_path / "basic"
    done = run_cli(
        "kdir.evaluate", *sweep, "hydra/launcher=slurm_local", f"hydra.sweep.dir={submitit_dir}", timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_command("kdir.evaluate", *sweep, f"hydra.sweep.dir={basic_dir}") == 0  # Hydra's basic launcher
    assert (submitit_dir / "multirun.yaml").is_file()
    logs = sorted((submitit_dir / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 2, logs  # one submitit job each, with its own log
    for num, pooling in enumerate(["mean", "cls"]):
        job = submitit_dir / f"{num}_tiny__quickstart"
        assert OmegaConf.load(job / "config.yaml").student.pooling == pooling
        assert (job / "run.trec").stat().st_size > 0
        got = json.loads((job / "metrics.json").read_text())["metrics"]
        want = json.loads((basic_dir / job.name / "metrics.json").read_text())["metrics"]
        assert got == pytest.approx(want, abs=1e-6) and 0 <= got["nDCG@10"] <= 1
        assert any(f"outputs: {job}" in log.read_text() for log in logs)  # the job's table went to its log
    a, b = (json.loads((submitit_dir / f"{n}_tiny__quickstart" / "metrics.json").read_text()) for n in (0, 1))
    assert a["metrics"] != b["metrics"]  # two jobs, two students


# ---------------------------------------------------------------- Lightning on SLURM: nodes, devices, ranks


def test_num_nodes_is_a_trainer_argument(tmp_path):
    cfg = _cfg(tmp_path, ["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"])
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (2, 4, "ddp")
    assert _cfg(tmp_path, []).trainer.num_nodes == 1


def test_slurm_ddp_reads_nodes_and_ranks_from_slurm(tmp_path, monkeypatch):
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from lightning_fabric.plugins.environments import SLURMEnvironment
    from pytorch_lightning.utilities import rank_zero_only

    assert _cfg(tmp_path, ["trainer=slurm_ddp"]).trainer.num_nodes == 1  # outside SLURM: one node, one GPU
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # Lightning sets them from SLURM's: removed again afterwards
        monkeypatch.setenv(key, "unset")  # (delenv alone records nothing for an absent key, and they would leak)
        monkeypatch.delenv(key)
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    cfg = _cfg(tmp_path, ["trainer=slurm_ddp"])
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (2, 4, "ddp")
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the Trainer sets it: restored afterwards
    trainer = instantiate(
        cfg.trainer, accelerator="cpu", precision="32-true", logger=False, enable_checkpointing=False
    )
    assert isinstance(trainer, pl.Trainer) and rank_zero_only.rank == 5  # only rank 0 prints and logs
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 4, 8)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (5, 1, 1)
    assert (env.main_address, env.main_port) == ("gpu07", 15000 + 3456)  # the first node; port from the job id
    env.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)  # what Lightning checks
    with pytest.raises(ValueError, match="num_nodes=1"):
        env.validate_settings(num_devices=4, num_nodes=1)  # trainer=ddp alone on 2 nodes: refused by Lightning


def test_the_trainer_under_slurm_leaves_no_rendezvous_address_behind():
    """Runs after the test above: Lightning wrote MASTER_ADDR / MASTER_PORT of the fake SLURM job into os.environ;
    left there, every later multi-process test would wait for a rendezvous at that host."""
    assert {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")} == SESSION_RENDEZVOUS


# ---------------------------------------------------------------- a requeued job resumes


RESUME_ON_REQUEUE = 'resume="${oc.decode:${oc.env:SLURM_RESTART_COUNT,0}}"'  # docs/cluster.md (quoted: nested)


def test_resume_on_requeue_is_true_only_in_a_requeued_job(tmp_path, monkeypatch):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdir.errors import MissingFileError
    from kdir.utils.rundir import resume_from as _resume_from

    (parsed,) = OverridesParser.create().parse_overrides([RESUME_ON_REQUEUE])
    assert not parsed.is_sweep_override()  # its comma does not make a sweep of it under -m
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    cfg = _cfg(tmp_path, [RESUME_ON_REQUEUE])
    assert not cfg.resume and _resume_from(cfg, tmp_path) is None  # first start: a fresh run
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM counts requeues (scontrol requeue, preemption)
    cfg = _cfg(tmp_path, [RESUME_ON_REQUEUE])
    with pytest.raises(MissingFileError, match="no checkpoints/last.ckpt"):
        _resume_from(cfg, tmp_path)  # requeued before its first checkpoint
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert _resume_from(cfg, tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")


def test_the_cluster_guide_commands_compose():
    """Every ``python -m kdir.<command>`` line of docs/cluster.md and of the README's cluster section composes, with
    Hydra's own override parser (a sweep composes its first job); ``<placeholders>`` are left to the user."""
    import re
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    readme = (ROOT / "README.md").read_text().split("## Clusters (SLURM)")[1].split("\n## ")[0]
    text = (ROOT / "docs" / "cluster.md").read_text() + readme
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("python -m kdir.")]
    assert len(lines) >= 9, lines
    for line in lines:
        args = shlex.split(re.sub(r"\S*<[^>]*>\S*", "", line.split("  # ")[0]))
        assert args[:3] == ["python", "-m", args[2]] and "-m" in args[3:], line  # a launcher needs a multirun
        overrides = []
        for o in OverridesParser.create().parse_overrides([a for a in args[3:] if a != "-m"]):
            value = next(o.sweep_string_iterator()) if o.is_sweep_override() else o.get_value_element_as_str()
            overrides.append(f"{o.get_key_element()}={value}")
        cfg = _hydra_cfg(args[2].removeprefix("kdir."), overrides)
        assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm", line
