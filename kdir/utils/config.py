"""Small helpers shared by the entry points: config resolvers, instantiation, output, tables."""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("kdir")


def _quickstart(what: str = "data") -> str:
    from kdir.data.quickstart import ensure

    return ensure(what)


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


def register_resolvers() -> None:
    """``${quickstart:data|model}``, ``${pypi_model:package,hub_name}``, ``${wandb_offline:}``."""
    for name, fn in (("quickstart", _quickstart), ("pypi_model", _pypi_model), ("wandb_offline", _wandb_offline)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


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


def save_json(obj: Mapping, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
    return path


def print_metrics(columns: Mapping[str, Mapping[str, float]], title: str) -> None:
    """Print a metrics table: one column per named result, one row per measure."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    for name in columns:
        table.add_column(name, justify="right")
    measures = list(dict.fromkeys(m for col in columns.values() for m in col))
    for m in measures:
        table.add_row(m, *(f"{col[m]:.4f}" if m in col else "-" for col in columns.values()))
    Console(width=120).print(table)


def instantiate_model(node: DictConfig, what: str = "student") -> Any:
    """Instantiate a model node; a folder or hub name that cannot be loaded is a :class:`KdirError` naming it."""
    from hydra.utils import instantiate

    from kdir.errors import KdirError

    path = str(node.get("path") or node.get("model_name_or_path"))
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise KdirError(f"{path}: no such {what} folder (expected an exported kdir model or an HF encoder)")
    try:
        return instantiate(node)
    except Exception as e:  # Hydra wraps the loader's OSError / ValueError in an InstantiationException
        cause = e.__cause__ or e
        raise KdirError(f"cannot load the {what} from {path}: {type(cause).__name__}: {cause}") from None
