"""Shared fixtures: the quickstart assets (generated once per session, offline) and tiny data files."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="session", autouse=True)
def kdir_cache(tmp_path_factory) -> Path:
    """Point KDIR_CACHE at a session folder so the quickstart is built fresh, once, offline."""
    cache = tmp_path_factory.mktemp("kdir_cache")
    os.environ["KDIR_CACHE"] = str(cache)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("WANDB_API_KEY", None)
    return cache


@pytest.fixture(scope="session")
def quickstart(kdir_cache) -> dict[str, Path]:
    from kdir.data.quickstart import ensure

    return {"data": Path(ensure("data")), "model": Path(ensure("model"))}


@pytest.fixture(scope="session")
def tiny_student(quickstart):
    from kdir.models import DualEncoder

    return DualEncoder(quickstart["model"], pooling="mean", query_max_length=16, doc_max_length=32)


@pytest.fixture
def beir_dir(tmp_path) -> Path:
    """A 6-document BEIR folder: train has q1→d1, q2→d2 (+ d3 graded 2); test has q3→d4."""
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = {f"d{i}": f"document number {i} about topic {i % 3}" for i in range(1, 7)}
    (root / "corpus.jsonl").write_text(
        "".join(f'{{"_id": "{k}", "title": "T{k}", "text": "{v}"}}\n' for k, v in docs.items())
    )
    queries = {"q1": "first query", "q2": "second query", "q3": "third query"}
    (root / "queries.jsonl").write_text("".join(f'{{"_id": "{k}", "text": "{v}"}}\n' for k, v in queries.items()))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq2\td3\t2\n")
    (root / "qrels" / "test.tsv").write_text("q3\td4\t1\n")  # no header line
    return root


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300, env: dict[str, str] | None = None):
    """Run ``python -m <args>`` in a subprocess with the test environment; returns CompletedProcess.

    ``tests/`` is on the path too, so a config may point ``_target_`` at a class of a test module. The command
    runs in a session of its own: past ``timeout`` it is killed with every process it started (DDP ranks).
    ``env`` adds to (or overrides) the test environment.
    """
    import signal
    import subprocess

    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])} | (env or {})
    cmd = [sys.executable, "-m", *args]
    with subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_command(module: str, *overrides: str) -> int:
    """Run ``python -m <module> <overrides>`` in this process, through the command's real Hydra entry point.

    Returns the exit status (0 success, 2 user error, 1 bug); the outputs are wherever ``hydra.run.dir=...``
    (or the command's own settings) put them.
    """
    from kdir.utils import run_command as run

    return run(module, *overrides)


def compose_cfg(tmp_path: Path, overrides: list[str], name: str = "run"):
    """Compose ``conf/<name>.yaml`` with ``overrides`` as the command would (``hydra:`` resolvers set, the task config
    without its ``hydra`` node), writing its outputs to ``tmp_path``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        del cfg["hydra"]  # as in the real app: the task config has no hydra node
    return cfg


@contextmanager
def counting_doc_encodes(model) -> Iterator[list[int]]:
    """Within the block, the sizes of the document batches ``model.encode`` is called with (a spy on the real
    method, which is put back afterwards)."""
    sizes: list[int] = []
    encode = model.encode

    def counting(tokens, side):
        if side == "doc":
            sizes.append(len(tokens["input_ids"]))
        return encode(tokens, side)

    model.encode = counting
    try:
        yield sizes
    finally:
        del model.encode


# ------------------------------------------------------------------ multi-process tests
GLOO_TIMEOUT = 300  # seconds a collective may wait for a rank starved of CPU on a loaded machine


@contextmanager
def gloo_group(store: str | Path, rank: int, world: int) -> Iterator[None]:
    """A gloo process group met through the file ``store`` (no TCP port to pick, so none to clash over).

    On success every rank waits for the others (a barrier) before it destroys the group, so that none leaves while
    another is still in a collective; on an error the group is destroyed at once and the error propagates.
    """
    import torch.distributed as dist

    timeout = timedelta(seconds=GLOO_TIMEOUT)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


def _run_then_exit(rank: int, fn: Callable, *args: Any) -> None:
    fn(rank, *args)
    # Done, results saved, group torn down: skip the interpreter's teardown of torch's distributed state, which
    # now and then aborts ("terminate called without an active exception", SIGABRT) on a loaded machine.
    os._exit(0)


def spawn(fn: Callable, args: tuple, nprocs: int, timeout: float = 600) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``, failing (and killing the processes) after ``timeout`` s.

    A process that raises is reported with its traceback, as by ``mp.spawn``.
    """
    import torch.multiprocessing as mp

    ctx = mp.spawn(_run_then_exit, args=(fn, *args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{nprocs} processes still running after {timeout} s")
