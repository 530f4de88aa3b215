"""Helpers shared by the commands: the task wrapper, typed settings, config helpers, atomic writes, reports."""

from __future__ import annotations

from kdir.utils.config import instantiate_group, launch_fabric, register_resolvers, resolve_device
from kdir.utils.io import atomic_write, save_json, save_npy, save_text
from kdir.utils.report import print_metrics
from kdir.utils.settings import Setting, check_settings
from kdir.utils.task import run_command, task_wrapper

__all__ = [
    "Setting",
    "atomic_write",
    "check_settings",
    "instantiate_group",
    "launch_fabric",
    "print_metrics",
    "register_resolvers",
    "resolve_device",
    "run_command",
    "save_json",
    "save_npy",
    "save_text",
    "task_wrapper",
]
