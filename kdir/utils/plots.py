"""Figures of finished runs and the run report: learning curves, distillation diagnostics, results across runs.

:func:`write_report` reads the runs under some folders (:func:`kdir.utils.report.find_runs`), groups the seeds of
each setting (:func:`~kdir.utils.report.group_by_seed`) and writes into one folder

* ``results.md`` / ``results.csv``: test metrics, mean ± std over seeds (:func:`~kdir.utils.report.write_tables`);
* ``curves.png``: training loss (and its terms), the dev metric per validation (with the test metric before and
  after training as markers), the learning rate;
* ``diagnostics.png``: teacher–student agreement, margins, score scale, masked teacher pairs, gradient norm,
  throughput (``train/kd/*`` etc., :class:`kdir.training.callbacks.KDDiagnostics`);
* ``results.png``: a bar chart of every group's test metrics (untrained and trained, seeds as dots);
* ``report.png``: one overview of the above.

A group of seeds is drawn as its mean (a line) with every seed's own curve faint behind it. Figures are drawn with
matplotlib's object API on the Agg canvas (no pyplot, no display). :class:`SweepReport` is the Hydra callback that
writes the report of a multirun into ``<sweep dir>/report`` when the sweep ends, reading its jobs' folders from
disk (so with any launcher: basic, joblib, submitit, or a sweeper such as Optuna).
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdir.errors import KdirError
from kdir.utils.report import Group, find_runs, group_by_seed, measures_of, write_tables

log = logging.getLogger(__name__)
__all__ = ["SweepReport", "plot_curves", "plot_diagnostics", "plot_overview", "plot_results", "write_report"]

_STYLES = ("-", "--", ":", "-.")
# (title, keys, log scale): the diagnostics figure's panels
DIAGNOSTIC_PANELS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("teacher–student agreement", ("train/kd/spearman", "train/kd/top1_agreement"), False),
    ("margin: positive − mean negative", ("train/kd/student_margin_mean", "train/kd/teacher_margin_mean"), False),
    ("margin: positive − max negative", ("train/kd/student_margin_max", "train/kd/teacher_margin_max"), False),
    ("score mean", ("train/kd/student_mean", "train/kd/teacher_mean"), False),
    ("score std", ("train/kd/student_std", "train/kd/teacher_std"), False),
    ("masked teacher pairs (fraction)", ("train/kd/masked_fraction",), False),
    ("gradient norm (before clipping)", ("train/grad_norm",), True),
    ("throughput (queries/s)", ("train/queries_per_s",), False),
)


def _figure(n: int, cols: int, width: float = 4.2, height: float = 3.0):
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _colors(groups: Sequence[Group]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {g.label: cmap(i % 10) for i, g in enumerate(groups)}


def _series(group: Group, key: str) -> tuple[list[list[tuple[int, float]]], list[int], list[float]]:
    """Each run's curve of ``key``, and the group mean at the steps every run logged."""
    curves = [[(s, v) for s, v in r.curves.get(key, []) if not math.isnan(v)] for r in group.runs]
    curves = [c for c in curves if c]
    if not curves:
        return [], [], []
    common = set.intersection(*({s for s, _ in c} for c in curves))
    steps = sorted(common)
    by_step = [dict(c) for c in curves]  # a step logged twice (e.g. a resumed run): its last value
    mean = [sum(d[s] for d in by_step) / len(by_step) for s in steps]
    return curves, steps, mean


def _has(groups: Sequence[Group], key: str) -> bool:
    return any(key in r.curves for g in groups for r in g.runs)


def _short(key: str) -> str:
    return key.rsplit("/", 1)[-1].replace("_", " ")


def _curve_panel(
    ax, groups: Sequence[Group], keys: Sequence[str], title: str, colors: dict, logy: bool = False
) -> None:
    """Draw ``keys`` (one line style each) for every group (one colour each) on ``ax``."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    handles = []
    for g in groups:
        for i, key in enumerate(keys):
            curves, steps, mean = _series(g, key)
            style = _STYLES[i % len(_STYLES)]
            if len(curves) > 1:
                for c in curves:
                    ax.plot([s for s, _ in c], [v for _, v in c], style, color=colors[g.label], alpha=0.25, lw=0.8)
            if steps:
                ax.plot(steps, mean, style, color=colors[g.label], lw=1.8, marker="." if len(steps) < 12 else None)
            elif curves:
                c = curves[0]
                ax.plot([s for s, _ in c], [v for _, v in c], style, color=colors[g.label], lw=1.8)
    if len(keys) > 1:  # the groups' colours are in the figure's legend
        handles += [Line2D([], [], color="0.3", ls=_STYLES[i % 4], label=_short(k)) for i, k in enumerate(keys)]
        ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if logy:
        from matplotlib.ticker import FuncFormatter, LogFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))


def _dev_panel(ax, groups: Sequence[Group], metric: str, colors: dict) -> None:
    """The dev metric per validation, and the test metric at step 0 (untrained) and after training (markers)."""
    from matplotlib.lines import Line2D

    _curve_panel(ax, groups, [f"val/{metric}"], f"{metric} (dev; test: ◇ untrained, ◆ trained)", colors)
    for g in groups:
        curves = [c for r in g.runs if (c := r.curves.get(f"test/{metric}"))]
        before = [v for c in curves for s, v in c if s == 0]
        after = [c[-1] for c in curves if c[-1][0] > 0]  # the last test: the trained student's
        if before:
            ax.plot([0], [sum(before) / len(before)], "D", mfc="white", color=colors[g.label], ms=6)
        if after:
            step = max(s for s, _ in after)
            ax.plot([step], [sum(v for _, v in after) / len(after)], "D", color=colors[g.label], ms=6)
    handles = [Line2D([], [], color="0.3", lw=1.8, label=f"val/{metric}")]
    handles += [Line2D([], [], ls="", marker="D", color="0.3", label=f"test/{metric}")]
    ax.legend(handles=handles, fontsize=7, loc="best")


def _results_panel(ax, groups: Sequence[Group], metric: str, colors: dict) -> None:
    """Bars per group: untrained (hollow) and trained (filled) test ``metric``, mean ± std, seeds as dots."""
    from kdir.utils.report import mean_std

    width = 0.38
    for i, g in enumerate(groups):
        for offset, stage, filled in ((-width / 2, "untrained", False), (width / 2, "trained", True)):
            values = g.values(metric, stage)
            if not values:
                continue
            m, s = mean_std(values)
            x = i + offset
            ax.bar(
                x,
                m,
                width,
                yerr=s or 0.0,
                capsize=3,
                color=colors[g.label] if filled else "white",
                edgecolor=colors[g.label],
                hatch=None if filled else "//",
            )
            ax.plot([x] * len(values), values, "o", color="black", ms=3, alpha=0.7)
            top = max(m + (s or 0.0), *values)
            ax.annotate(f"{m:.3f}", (x, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    labels = [textwrap.fill(g.label, 24, break_long_words=False) for g in groups]
    crowded = len(groups) > 1 and max(len(line) for label in labels for line in label.splitlines()) > 14
    tilt = {"rotation": 20, "ha": "right"} if crowded else {}
    ax.set_xticks(range(len(groups)), labels, fontsize=7, **tilt)
    ax.margins(y=0.1)  # room for the labels above the bars
    ax.set_title(f"test {metric} (hatched: untrained; mean ± std)", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3, axis="y")


def _loss_terms(groups: Sequence[Group]) -> list[str]:
    keys = sorted({k for g in groups for r in g.runs for k in r.curves if k.startswith("train/loss/")})
    return keys if len(keys) > 1 else []  # one term: the loss itself


def _primary(groups: Sequence[Group], metric: str | None) -> str | None:
    measures = measures_of(r for g in groups for r in g.runs)
    if metric:
        return metric
    if measures:
        return measures[0]
    vals = sorted({k.removeprefix("val/") for g in groups for r in g.runs for k in r.curves if k.startswith("val/")})
    return vals[0] if vals else None


def _save(fig, path: Path, groups: Sequence[Group]) -> Path:
    """Add the groups' legend (several groups) or name (one) and write the PNG."""
    from matplotlib.lines import Line2D

    if len(groups) > 1:
        handles = [Line2D([], [], color=c, lw=3, label=label) for label, c in _colors(groups).items()]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(groups), 3), fontsize=8)
    elif groups:
        runs = groups[0].runs
        seeds = f" ({len(runs)} seeds: mean and each seed)" if len(runs) > 1 else ""
        fig.suptitle(f"{groups[0].label}{seeds}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_curves(groups: Sequence[Group], path: str | Path, metric: str | None = None) -> Path | None:
    """Training loss, its terms, the dev ``metric`` and the learning rate over steps; ``None`` with no curves."""
    metric, colors = _primary(groups, metric), _colors(groups)
    panels = []
    if _has(groups, "train/loss"):
        panels.append(lambda ax: _curve_panel(ax, groups, ["train/loss"], "training loss", colors))
    if terms := _loss_terms(groups):
        panels.append(lambda ax: _curve_panel(ax, groups, terms, "loss terms (weighted)", colors))
    if metric and (_has(groups, f"val/{metric}") or _has(groups, f"test/{metric}")):
        panels.append(lambda ax: _dev_panel(ax, groups, metric, colors))
    if _has(groups, "train/lr"):
        panels.append(lambda ax: _curve_panel(ax, groups, ["train/lr"], "learning rate", colors))
    if not panels:
        return None
    fig, axes = _figure(len(panels), len(panels) if len(panels) <= 3 else 2)
    for draw, ax in zip(panels, axes):
        draw(ax)
    return _save(fig, Path(path), groups)


def plot_diagnostics(groups: Sequence[Group], path: str | Path) -> Path | None:
    """The distillation diagnostics over steps (:data:`DIAGNOSTIC_PANELS` that were logged); ``None`` if none."""
    colors = _colors(groups)
    panels = [(t, [k for k in keys if _has(groups, k)], logy) for t, keys, logy in DIAGNOSTIC_PANELS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig, axes = _figure(len(panels), min(len(panels), 4), width=3.8)
    for (title, keys, logy), ax in zip(panels, axes):
        _curve_panel(ax, groups, keys, title, colors, logy)
    return _save(fig, Path(path), groups)


def plot_results(groups: Sequence[Group], path: str | Path) -> Path | None:
    """Bar chart of each test measure across the groups; ``None`` when no run has test metrics."""
    measures = measures_of(r for g in groups for r in g.runs)
    if not measures:
        return None
    colors = _colors(groups)
    shown = measures[:4]
    fig, axes = _figure(len(shown), min(len(shown), 2), width=max(3.6, 1.2 * len(groups) + 1.5), height=3.4)
    for metric, ax in zip(shown, axes):
        _results_panel(ax, groups, metric, colors)
    return _save(fig, Path(path), groups)


def plot_overview(groups: Sequence[Group], path: str | Path, metric: str | None = None) -> Path | None:
    """One figure: training loss, dev metric, agreement, margins, gradient norm, test results."""
    metric, colors = _primary(groups, metric), _colors(groups)
    panels = []
    if _has(groups, "train/loss"):
        panels.append(lambda ax: _curve_panel(ax, groups, ["train/loss"], "training loss", colors))
    if metric and (_has(groups, f"val/{metric}") or _has(groups, f"test/{metric}")):
        panels.append(lambda ax: _dev_panel(ax, groups, metric, colors))
    for title, keys, logy in (DIAGNOSTIC_PANELS[0], DIAGNOSTIC_PANELS[1], DIAGNOSTIC_PANELS[6]):
        present = [k for k in keys if _has(groups, k)]
        if present:
            panels.append(lambda ax, t=title, k=present, lg=logy: _curve_panel(ax, groups, k, t, colors, lg))
    if metric and any(g.values(metric) for g in groups):
        panels.append(lambda ax: _results_panel(ax, groups, metric, colors))
    if not panels:
        return None
    fig, axes = _figure(len(panels), min(len(panels), 3))
    for draw, ax in zip(panels, axes):
        draw(ax)
    return _save(fig, Path(path), groups)


def write_report(paths: Sequence[str | Path], out: str | Path, metric: str | None = None) -> dict[str, Path]:
    """Read the runs under ``paths`` and write the tables and figures into ``out``; returns the files by name.

    Without matplotlib only the tables are written (with a warning).
    """
    out = Path(out)
    groups = group_by_seed(find_runs(paths))
    files = write_tables(groups, out)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: tables only, no figures (pip install matplotlib)")
        return files
    figures = {
        "curves.png": lambda p: plot_curves(groups, p, metric),
        "diagnostics.png": lambda p: plot_diagnostics(groups, p),
        "results.png": lambda p: plot_results(groups, p),
        "report.png": lambda p: plot_overview(groups, p, metric),
    }
    for name, draw in figures.items():
        if (written := draw(out / name)) is not None:
            files[name] = written
    return files


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks``): at the end of a multirun, :func:`write_report` of its sweep folder into
    ``<sweep dir>/<folder>``. A failure to write it is logged (with its traceback) and does not fail the sweep, whose
    jobs have finished."""

    def __init__(self, folder: str = "report", metric: str | None = None):
        self.folder, self.metric = folder, metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        try:
            files = write_report([sweep], sweep / self.folder, self.metric)
        except KdirError as e:
            log.warning("no report of the sweep: %s", e)
            return
        except Exception:
            log.exception("could not write the report of the sweep %s", sweep)
            return
        print(files["results.md"].read_text(encoding="utf-8"), end="", flush=True)
        log.info("sweep report: %s", ", ".join(str(p) for p in files.values()))
