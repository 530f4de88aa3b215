"""One wrapper for every command: settings check, saved config, the value for sweepers, and the error policy.

Each command is ``@hydra.main(...)`` over ``@task_wrapper(...)`` over a function that runs the task and
returns its metrics (or nothing). The wrapper

1. registers the config resolvers;
2. checks the typed settings (:mod:`kdir.utils.settings`);
3. saves the resolved config to ``<paths.output_dir>/config.yaml`` (a value left ``???`` is written as it is:
   it is an error only if the task reads it);
4. runs the task and returns the metric named by ``optimized_metric`` (``stage/name`` reads nested results),
   or by the command's default metric, for Hydra sweepers;
5. applies the error policy: a :class:`~kdir.errors.KdirError` (a bad file, option or path; also when raised
   inside ``hydra.utils.instantiate``, or a mandatory ``???`` value left unset) is printed as one line on
   stderr and exits with status 2; any other exception is a bug: it is logged with its full traceback to
   the job's log file and re-raised (Hydra prints the traceback and exits with status 1).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdir.errors import KdirError
from kdir.utils.config import register_resolvers
from kdir.utils.io import save_text
from kdir.utils.settings import Setting, check_settings

log = logging.getLogger("kdir")

Task = Callable[[DictConfig], Any]
_FULL_KEY = re.compile(r"full_key: (\S+)")
_UNSET = re.compile(r"Missing mandatory value: (\S+)")


def user_error(exc: BaseException) -> str | None:
    """The one-line message of the user error ``exc`` stands for, or ``None`` if ``exc`` is a bug.

    User errors are :class:`~kdir.errors.KdirError` and unset mandatory values (``???``). Hydra wraps what
    a constructor raises in an ``InstantiationException``: the wrapped error counts, and its message is
    prefixed with the config node it came from (``data.train: ...``). A resolver's ``KdirError`` (e.g. a teacher
    folder only the quickstart fills in) is unwrapped from OmegaConf's ``InterpolationResolutionError`` too.
    """
    from hydra.errors import InstantiationException
    from omegaconf.errors import InterpolationResolutionError, InterpolationToMissingValueError, MissingMandatoryValue

    node = None
    while True:  # a constructor's or a resolver's error, wrapped by Hydra / OmegaConf
        if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
            if m := _FULL_KEY.search(str(exc)):
                node = m[1]
            exc = exc.__cause__
        elif isinstance(exc, InterpolationResolutionError) and isinstance(exc.__context__, KdirError):
            exc = exc.__context__  # OmegaConf re-raises a resolver's error without chaining it as the cause
        else:
            break
    if isinstance(exc, (MissingMandatoryValue, InterpolationToMissingValueError)):
        key = exc.full_key or node
        unset = m[1] if (m := _UNSET.search(str(exc))) else key or "a setting"  # an interpolation names it
        via = f" (via {key})" if key and unset != key else ""
        return f"{unset} has no value (???){via}: set it on the command line, e.g. {unset}=..."
    if not isinstance(exc, KdirError):
        return None
    return re.sub(r"\s*\n\s*", " ", f"{node}: {exc}" if node else str(exc))  # one line


def pick_metric(results: Any, name: str | None) -> float | None:
    """``results[name]``, or for ``a/b`` ``results[a][b]``; ``None`` where absent or not a number."""
    if not name or not isinstance(results, Mapping):
        return None
    value = results.get(name)
    if value is None and "/" in name:
        head, _, rest = name.partition("/")
        return pick_metric(results.get(head), rest)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _resolved(node: Any) -> Any:
    """Plain content of a config node, resolved; a value that does not resolve (an unset ``???``) stays as written.

    A task may never read such a value, so it is reported when read, not when the config is saved.
    """
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    values = []
    for key in keys:
        try:
            values.append(_resolved(node[key]))
        except (MissingMandatoryValue, InterpolationResolutionError):
            values.append(OmegaConf.to_container(node, resolve=False)[key])
    return dict(zip(keys, values)) if isinstance(node, DictConfig) else values


def save_config(cfg: DictConfig) -> Path | None:
    """Write the resolved ``cfg`` to ``<paths.output_dir>/config.yaml`` (atomically); ``None`` without one."""
    out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    if out is None:
        return None
    return save_text(OmegaConf.to_yaml(_resolved(cfg)), Path(out) / "config.yaml")


def _prog(task: Task) -> str:
    """The command's module name (``kdir.run``), also when it runs as ``__main__``."""
    module = task.__module__
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else Path(sys.argv[0]).stem
    return module


def _log_to_files(message: str, exc_info: BaseException | None = None) -> None:
    """Log an error to the file handlers only: the terminal gets it once, on stderr."""
    exc = (type(exc_info), exc_info, exc_info.__traceback__) if exc_info is not None else None
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), exc)
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        logger = logger.parent if logger.propagate else None


def task_wrapper(
    task: Task | None = None,
    *,
    metric: str | Callable[[DictConfig], str] | None = None,
    settings: Mapping[str, Setting] | None = None,
) -> Any:
    """Decorate a command's task function (``cfg -> metrics``); usable bare or with arguments.

    Args:
        task: the task function; it returns a metrics mapping (possibly nested by stage) or anything else
            (then the command returns ``None``).
        metric: the metric returned when the config has no ``optimized_metric``: a name, or a function of
            the config giving one.
        settings: typed settings of this command, added to (and replacing) :data:`kdir.utils.settings.SETTINGS`.
    """

    def decorate(fn: Task) -> Callable[[DictConfig], float | None]:
        @functools.wraps(fn)
        def wrapped(cfg: DictConfig) -> float | None:
            register_resolvers()
            try:
                check_settings(cfg, settings)
                save_config(cfg)
                results = fn(cfg)
            except Exception as e:
                error = user_error(e)
                prog = _prog(fn)
                if error is None:
                    _log_to_files(f"{prog} failed: {type(e).__name__}: {e}", exc_info=e)
                    raise
                _log_to_files(f"{prog}: error: {error}")
                print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            name = cfg.get("optimized_metric") or (metric(cfg) if callable(metric) else metric)
            value = pick_metric(results, name)
            if value is not None:
                log.info("%s = %.4f", name, value)
            return value

        return wrapped

    return decorate(task) if task is not None else decorate


def run_command(module: str, *overrides: str) -> int:
    """Run ``python -m <module> <overrides>`` in this process, through its Hydra entry point.

    Returns the exit status: 0 on success, 2 on a user error, 1 on a bug (Hydra prints the traceback;
    with ``HYDRA_FULL_ERROR=1`` the exception propagates instead). The root logger is restored afterwards.
    """
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    root = logging.getLogger()
    handlers, level, argv = root.handlers[:], root.level, sys.argv
    sys.argv = [module, *overrides]
    GlobalHydra.instance().clear()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return 0
