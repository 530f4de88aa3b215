"""Config helpers shared by the commands: resolvers, instantiation, devices."""

from __future__ import annotations

import importlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from kdir.errors import ConfigError

log = logging.getLogger("kdir")


def _quickstart(what: str = "data") -> str:
    from kdir.data.quickstart import ensure

    return ensure(what)


def _quickstart_teacher(kind: str, seed: int = 0, *, _root_: DictConfig) -> str:
    """The quickstart's own ``kind`` teacher when the run trains on the quickstart; else the setting to fill in."""
    if "quickstart" not in (_root_.get("datasets") or {}):
        raise ConfigError(
            f"teacher.path: no teacher folder given (only the offline quickstart builds its own {kind} teacher): "
            "set teacher.path=<a kdir or published folder>"
        )
    from kdir.training.quickstart_teachers import ensure_teacher

    return ensure_teacher(kind, int(seed))


def _trains_on_quickstart(root: DictConfig) -> bool:
    return OmegaConf.select(root, "data.train.name", default=None) == "quickstart"


def _node(root: DictConfig, key: str, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved config node ``key`` as a dict, without the keys ``drop`` (not resolved)."""
    node = OmegaConf.select(root, key)
    return {
        k: OmegaConf.to_object(node[k]) if OmegaConf.is_config(node[k]) else node[k] for k in node if k not in drop
    }


def _quickstart_store(name: str, elsewhere: str | None = None, *, _root_: DictConfig) -> str:
    """On the quickstart, its store of ``cfg.teacher``'s scores of the run's training pool (scored once); on other
    data, or when the pool is drawn at random (nothing to score in advance), ``elsewhere`` (the usual store
    folder), or the setting to fill in."""
    if not _trains_on_quickstart(_root_):
        if elsewhere is None:
            raise ConfigError("signal.store: no score store given: set signal.store=<dir> (python -m kdir.score)")
        return elsewhere
    from kdir.errors import KdirError
    from kdir.training.quickstart_teachers import ensure_store, pool_is_fixed, settings_key

    try:
        teacher, examples = _node(_root_, "teacher"), _node(_root_, "data.examples")
        sampler = _instantiate(examples)
    except Exception as e:  # settings a run cannot build either (a user's to fix): the run says so, not this store
        cause = e.__cause__ or e.__context__
        if not isinstance(e, (KdirError, MissingMandatoryValue)) and not isinstance(cause, KdirError):
            raise
        sampler = None
    if sampler is None or not pool_is_fixed(sampler):  # random negatives: no pool to score in advance
        if elsewhere is None:
            raise ConfigError("signal.store: no score store given: set signal.store=<dir> (python -m kdir.score)")
        return elsewhere  # a cached run then asks for the store (or signal=fill)
    return ensure_store(
        name,
        settings_key(teacher, examples),
        lambda: _instantiate(teacher),
        lambda: _instantiate(_root_.data.train),
        sampler,
    )


def _quickstart_expansion(*, _root_: DictConfig) -> str:
    """On the quickstart, the collective knowledge of its training queries built once with ``cfg.teacher``'s
    ColBERT (its settings besides ``expansion``); on other data the setting to fill in."""
    if not _trains_on_quickstart(_root_):
        raise ConfigError(
            "teacher.expansion: no expansion store given (only the offline quickstart builds its own): set "
            "teacher.expansion=<dir> (python -m kdir.expand teacher.path=<ColBERT folder> data=<data> out=<dir>)"
        )
    from kdir.models import ColBERT
    from kdir.training.quickstart_teachers import ensure_expansion, settings_key

    settings = _node(_root_, "teacher", drop=("_target_", "expansion"))
    settings.setdefault("similarity", "l2")  # CollectiveColBERT's default
    return ensure_expansion(
        settings_key(settings),
        lambda: ColBERT.from_pretrained(**settings),
        lambda: _instantiate(_root_.data.train),
    )


def _instantiate(node: Any) -> Any:
    from hydra.utils import instantiate

    return instantiate(node)


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
    """``${quickstart:data|model}``, ``${quickstart_teacher:kind[,seed]}``, ``${quickstart_store:name[,elsewhere]}``,
    ``${quickstart_expansion:}``, ``${pypi_model:package,hub_name}``,
    ``${wandb_offline:}``, ``${run_uid:}``.

    ``${run_uid:}`` is cached: one value per composed config (and per multirun, whose jobs share its cache).
    """
    resolvers = (
        ("quickstart", _quickstart),
        ("quickstart_teacher", _quickstart_teacher),
        ("quickstart_store", _quickstart_store),
        ("quickstart_expansion", _quickstart_expansion),
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


def launch_fabric(cfg: DictConfig) -> Any:
    """A launched Lightning Fabric of ``cfg.accelerator`` / ``devices`` / ``precision`` (DDP for more than one
    device): the processes of ``kdir.score`` and ``kdir.encode``."""
    from lightning_fabric import Fabric

    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        precision=cfg.precision,
        strategy="ddp" if cfg.devices not in (1, "1") else "auto",
    )
    fabric.launch()
    return fabric


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
