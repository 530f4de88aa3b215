"""Exact resume: the states of every random generator a training step draws from, saved with each checkpoint;
and the interrupted run's logged metrics, carried over.

Dropout draws from torch's global generator (and CUDA's on GPUs); numpy's and Python's global generators are
saved too, for code that uses them. Each rank has its own states: a checkpoint holds those of every rank
(:func:`gathered_rng_states`, a collective when several processes train), and a resumed rank restores its own
where the interrupted run stood when it saved them (:meth:`kdir.training.module.DistillModule.on_load_checkpoint`):
before the next epoch's loader starts, or right before the next step. The states are stored as tensors and lists
of numbers only, so a checkpoint loads with ``weights_only=True`` too.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["checkpoint_step", "gathered_rng_states", "keep_logged_rows", "rng_states", "set_rng_states"]


def rng_states() -> dict[str, Any]:
    """This process's generator states: ``torch``, ``cuda`` (per device; none without CUDA), ``numpy``, ``python``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only where CUDA is available)."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def gathered_rng_states() -> list[dict[str, Any]]:
    """The states of every rank, in rank order (a collective under ``torch.distributed``: every rank calls it)."""
    mine = rng_states()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint was saved at (its tensors are memory-mapped, not read)."""
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["global_step"])


def keep_logged_rows(logger: Any, before_step: int) -> int:
    """Carry a resumed run's CSV metrics over: the rows logged before the checkpoint's step (returns how many).

    Lightning's ``CSVLogger`` starts its ``metrics.csv`` afresh; the interrupted run's rows of the steps it redoes
    are dropped, the others are written back with the resumed run's. Call it before the logger writes anything.
    Other loggers are left as they are.
    """
    from pytorch_lightning.loggers import CSVLogger

    path = Path(logger.log_dir) / "metrics.csv" if isinstance(logger, CSVLogger) else None
    if path is None or not path.is_file():
        return 0
    with open(path, newline="") as f:
        rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    rows = [row for row in rows if row.get("step", "").isdigit() and int(row["step"]) < before_step]
    logger.experiment.metrics[:0] = rows  # written with the first rows of the resumed run
    return len(rows)
