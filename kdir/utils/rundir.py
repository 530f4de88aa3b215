"""One run per folder: a Hydra callback refuses a folder that holds a run already, unless the run resumes it.

Hydra names run folders by time and ``${run_uid:}`` (6 random hex digits, ``conf/hydra/default.yaml``), so two
runs started in the same second get folders of their own. A folder named on the command line
(``hydra.run.dir=...``; ``hydra.sweep.dir=...`` for a multirun) that holds a run already (``.hydra/`` or
``config.yaml``; ``multirun.yaml`` for a sweep) is refused before Hydra writes anything into it, unless
``resume=true`` continues that run; ``resume=true`` on a folder that holds no run is refused too. Either is one
line on stderr and exit status 2, like every user error. Ranks other than 0 of a multi-process job (whose
launcher names the folder rank 0 made) are not checked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdir.errors import KdirError, MissingFileError, OutputExistsError

RUN_RECORDS = (".hydra", "config.yaml")
SWEEP_RECORDS = ("multirun.yaml",)
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def run_records(folder: str | Path, names: tuple[str, ...] = RUN_RECORDS) -> list[str]:
    """The records of a run that ``folder`` holds (``[]``: none, or no such folder)."""
    folder = Path(folder)
    return [name for name in names if (folder / name).exists()]


def checkpoint_file(path: str | Path) -> Path:
    """``path`` if it is a file, else a :class:`~kdir.errors.MissingFileError` naming ``ckpt_path``."""
    if not Path(path).is_file():
        raise MissingFileError(f"ckpt_path={path}: no such checkpoint file")
    return Path(path)


def check_run_dir(folder: str | Path, resume: bool, sweep: bool = False, ckpt_path: str | None = None) -> None:
    """Raise a :class:`~kdir.errors.KdirError` unless ``folder`` may take this run (see the module docstring)."""
    if ckpt_path:
        checkpoint_file(ckpt_path)
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    found = run_records(folder, SWEEP_RECORDS if sweep else RUN_RECORDS)
    if resume and not sweep and not found:
        raise MissingFileError(
            f"resume=true: {folder} holds no run to resume (no .hydra/ or config.yaml); "
            f"set {key}=<the folder of the run to continue>"
        )
    if found and not resume:
        raise OutputExistsError(
            f"{folder} holds a run already ({', '.join(found)}): add resume=true to continue it from its last "
            f"checkpoint, or choose a new {key} (left unset, every run gets a folder of its own)"
        )


def _command() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


class FreshRunDir(Callback):
    """Hydra callback (``hydra.callbacks``): :func:`check_run_dir` on the run folder or the sweep folder."""

    def _check(self, config: DictConfig, key: str, sweep: bool) -> None:
        if any(os.environ.get(v, "0") != "0" for v in _RANK_VARIABLES):
            return
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(config)  # ${hydra:...} in the folder name (the run name)
        try:
            resume = bool(OmegaConf.select(config, "resume", default=False))
            check_run_dir(
                OmegaConf.select(config, key), resume, sweep, OmegaConf.select(config, "ckpt_path", default=None)
            )
        except KdirError as e:
            print(f"{_command()}: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir", sweep=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir", sweep=True)


def resume_from(cfg: DictConfig, out: Path) -> str | None:
    """The checkpoint to continue from: ``ckpt_path``, or with ``resume=true`` the run folder's ``last.ckpt``."""
    if cfg.get("ckpt_path"):
        return str(checkpoint_file(cfg.ckpt_path))
    if not cfg.get("resume"):
        return None
    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None) or out / "checkpoints"
    last = Path(folder) / "last.ckpt"
    if not last.is_file():
        shown = last.relative_to(out) if last.is_relative_to(out) else last
        raise MissingFileError(
            f"resume=true: nothing to resume in {out}: no {shown} (the run stopped before its first checkpoint); "
            "start it again in a new folder, or give a checkpoint file with ckpt_path=..."
        )
    return str(last)
