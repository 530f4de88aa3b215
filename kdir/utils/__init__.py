"""Helpers shared by the commands: config resolvers and instantiation, atomic writes, reports."""

from __future__ import annotations

from kdir.utils.config import (
    instantiate_group,
    instantiate_model,
    print_metrics,
    register_resolvers,
    resolve_device,
    save_json,
)

__all__ = [
    "instantiate_group",
    "instantiate_model",
    "print_metrics",
    "register_resolvers",
    "resolve_device",
    "save_json",
]
