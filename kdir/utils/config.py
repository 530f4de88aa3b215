"""Config helpers shared by the commands: resolvers, instantiation, devices."""

from __future__ import annotations

import importlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdir.errors import ConfigError

log = logging.getLogger("kdir")


def _quickstart(what: str = "data") -> str:
    from kdir.data.quickstart import ensure

    return ensure(what)


def _quickstart_teacher(kind: str, *, _root_: DictConfig) -> str:
    """The quickstart's own ``kind`` teacher when the run trains on the quickstart; else the setting to fill in."""
    if "quickstart" not in (_root_.get("datasets") or {}):
        raise ConfigError(
            f"teacher.path: no teacher folder given (only the offline quickstart builds its own {kind} teacher): "
            "set teacher.path=<a kdir or published folder>"
        )
    from kdir.training.quickstart_teachers import ensure_teacher

    return ensure_teacher(kind)


def _pypi_model(package: str, hub_name: str) -> str:
    """Local folder of a model shipped as a PyPI package (``get_model_path()``), else the hub name."""
    try:
        return str(importlib.import_module(package).get_model_path())
    except ImportError:
        return hub_name


def _wandb_offline() -> bool:
    """Offline unless an API key (env or ``~/.netrc``) is configured or ``WANDB_MODE`` says otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"] in ("offline", "disabled", "dryrun")
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return not has_key


def _run_uid() -> str:
    """6 random hex digits: with the time, a run folder name no other run takes (also on a shared file system)."""
    return secrets.token_hex(3)


def register_resolvers() -> None:
    """``${quickstart:data|model}``, ``${quickstart_teacher:colbert}``, ``${pypi_model:package,hub_name}``,
    ``${wandb_offline:}``, ``${run_uid:}``.

    ``${run_uid:}`` is cached: one value per composed config (and per multirun, whose jobs share its cache).
    """
    resolvers = (
        ("quickstart", _quickstart),
        ("quickstart_teacher", _quickstart_teacher),
        ("pypi_model", _pypi_model),
        ("wandb_offline", _wandb_offline),
    )
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("run_uid"):
        OmegaConf.register_new_resolver("run_uid", _run_uid, use_cache=True)


def resolve_device(device: str | None) -> str:
    """``auto`` / ``None`` → ``cuda`` when available, else ``cpu``; any other value as given."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every named node of a group such as ``callbacks`` or ``logger`` (``null`` → [])."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    out = []
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("instantiating %s <%s>", name, node._target_)
            out.append(instantiate(node))
    return out
