"""Typed settings: the numeric options every command checks before it starts.

:data:`SETTINGS` maps dotted keys of a composed config (``*`` matches any child node, e.g. ``eval.*.depth``)
to the value they expect; :func:`check_settings` tests the keys a config has and raises one
:class:`~kdir.errors.ConfigError` naming every bad one, e.g. ``data.batch_size=abc: expected an integer >= 1``.
A command adds or overrides entries for its own top-level options (``depth``, ``chunk_size``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdir.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """What a setting accepts: an integer or a number, a lower bound, and extra literal values.

    Attributes:
        kind: ``int`` (booleans excluded) or ``float`` (any int or float).
        low: the lower bound, or ``None``.
        strict: the bound itself is excluded (``> low`` rather than ``>= low``).
        also: other accepted values (``None``, ``"auto"``, ``-1``, ...).
    """

    kind: type = int
    low: float | None = None
    strict: bool = False
    also: tuple = ()

    def accepts(self, value: Any) -> bool:
        if any(value is a or (type(value) is type(a) and value == a) for a in self.also):
            return True
        if isinstance(value, bool) or not isinstance(value, (int,) if self.kind is int else (int, float)):
            return False
        if self.low is None:
            return True
        return value > self.low if self.strict else value >= self.low

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None:
            low = int(self.low) if float(self.low).is_integer() else self.low
            what += f" {'>' if self.strict else '>='} {low}"
        if self.also:
            shown = ["null" if a is None else repr(a) if isinstance(a, str) else str(a) for a in self.also]
            what += f" or {' or '.join(shown)}"
        return what


def positive_int(*also: Any) -> Setting:
    """An integer >= 1 (or one of ``also``)."""
    return Setting(int, 1, also=also)


def count(*also: Any) -> Setting:
    """An integer >= 0 (or one of ``also``)."""
    return Setting(int, 0, also=also)


#: Settings every command checks where its config has them.
SETTINGS: dict[str, Setting] = {
    "seed": Setting(int, also=(None,)),
    "batch_size": positive_int(),
    "chunk_size": positive_int(),
    "depth": positive_int(),
    "data.batch_size": positive_int(),
    "data.num_workers": count(),
    "data.examples.n_negatives": count(),
    "optim.optimizer.lr": Setting(float, 0, strict=True),
    "optim.optimizer.weight_decay": Setting(float, 0),
    "optim.warmup": Setting(float, 0),
    "trainer.max_epochs": Setting(int, -1, also=(None,)),
    "trainer.max_steps": Setting(int, -1),
    "trainer.accumulate_grad_batches": positive_int(),
    "trainer.check_val_every_n_epoch": positive_int(None),
    "trainer.log_every_n_steps": positive_int(),
    "eval.*.batch_size": positive_int(),
    "eval.*.depth": positive_int(),
    "teacher_eval.batch_size": positive_int(),
    "teacher_eval.depth": positive_int(),
}


def _present(cfg: DictConfig, key: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every node of ``cfg`` that ``key`` (``*``: any child) names."""
    head, _, rest = key.partition(".")
    if head == "*":
        children = [k for k, v in cfg.items_ex(resolve=False) if isinstance(v, DictConfig)] if rest else []
        for child in children:
            node = cfg[child]
            for sub, value in _present(node, rest):
                yield f"{child}.{sub}", value
        return
    if head not in cfg or OmegaConf.is_missing(cfg, head):
        return  # absent, or a mandatory value (reported when it is read)
    try:
        node = cfg[head]
    except OmegaConfBaseException:
        return  # an interpolation that does not resolve: reported when it is read
    if not rest:
        yield head, node
        return
    if isinstance(node, DictConfig):
        for sub, value in _present(node, rest):
            yield f"{head}.{sub}", value


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def check_settings(cfg: DictConfig, extra: Mapping[str, Setting] | None = None) -> None:
    """Raise :class:`~kdir.errors.ConfigError` naming every setting of ``cfg`` that does not fit its entry.

    Args:
        cfg: the composed config.
        extra: entries of one command, added to (and replacing) :data:`SETTINGS`.
    """
    table = SETTINGS | dict(extra or {})
    bad = []
    for key, setting in table.items():
        for name, value in _present(cfg, key):
            if not setting.accepts(value):
                bad.append(f"{name}={_shown(value)}: expected {setting.describe()}")
    if bad:
        raise ConfigError("; ".join(bad))
