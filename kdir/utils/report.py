"""Tables printed by the commands, and the records of finished runs read back: curves, results, seed groups.

A run folder (``python -m kdir.run``; a multirun job) holds ``config.yaml`` (the resolved config),
``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` (the composed config before resolution, and the command-line
overrides), ``metrics.json`` (test metrics ``untrained`` / ``trained``), ``throughput.json`` and, with the CSV
logger (``logger=csv``, the default, or ``logger=many``), ``csv/metrics.csv``: one row per logged step
(``train/*`` every ``trainer.log_every_n_steps``, ``val/*`` per validation, ``test/*`` at step 0 before
training and after it). :func:`find_runs` reads every run under the given folders (a run, a multirun's sweep
folder, a study folder of several); :func:`group_by_seed` puts together the runs whose composed configs differ
only by ``seed``; :func:`results_rows` / :func:`markdown_table` / :func:`write_tables` give their test metrics as
mean ± sample standard deviation over the seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdir.errors import MissingFileError
from kdir.utils.io import save_text

__all__ = [
    "Group",
    "Run",
    "find_runs",
    "group_by_seed",
    "markdown_table",
    "mean_std",
    "print_metrics",
    "read_curves",
    "results_rows",
    "write_tables",
]
Curve = list[tuple[int, float]]  # (step, value), in logged order
_SKIP = {"checkpoints", "student", "runs", "wandb", "csv", ".hydra", "report", "__pycache__"}


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


# ---------------------------------------------------------------------------------------------- run records
@dataclass
class Run:
    """What one run folder recorded (each part empty when its file is absent: a run may have stopped early)."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)  # config.yaml (resolved)
    composed: dict[str, Any] | None = None  # .hydra/config.yaml (before resolution)
    overrides: list[str] = field(default_factory=list)  # .hydra/overrides.yaml
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json
    throughput: dict[str, Any] = field(default_factory=dict)  # throughput.json
    curves: dict[str, Curve] = field(default_factory=dict)  # csv/metrics.csv: key -> [(step, value)]

    @property
    def name(self) -> str:
        return str(self.config.get("run_name") or self.path.name)

    @property
    def seed(self) -> Any:
        return (self.composed or self.config).get("seed")

    def test(self, stage: str = "trained") -> dict[str, float]:
        """The test metrics ``untrained`` or ``trained`` (metrics.json)."""
        return {k: float(v) for k, v in (self.metrics.get(stage) or {}).items()}

    def best(self, key: str) -> float | None:
        """The best (largest) value of a logged curve, e.g. ``val/nDCG@10``; ``None`` if it was never logged."""
        values = [v for _, v in self.curves.get(key, []) if not math.isnan(v)]
        return max(values) if values else None


def _yaml(path: Path) -> Any:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_curves(path: str | Path) -> dict[str, Curve]:
    """The curves of a Lightning ``CSVLogger`` ``metrics.csv``: each logged key's ``(step, value)`` pairs."""
    curves: dict[str, Curve] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.pop("step", "")
            row.pop("epoch", None)
            if not step.strip().lstrip("-").isdigit():
                continue
            for key, value in row.items():
                if key and value not in ("", None):
                    try:
                        curves.setdefault(key, []).append((int(step), float(value)))
                    except ValueError:
                        continue
    return curves


def is_run(folder: Path) -> bool:
    """Whether ``folder`` holds a kdir run (its config plus a result, a log or its Hydra record)."""
    return (folder / "config.yaml").is_file() and any(
        (folder / name).exists() for name in ("metrics.json", "csv", ".hydra", "throughput.json")
    )


def read_run(folder: str | Path) -> Run:
    """The records of the run in ``folder``."""
    folder = Path(folder)
    composed, overrides = folder / ".hydra" / "config.yaml", folder / ".hydra" / "overrides.yaml"
    curves_file = folder / "csv" / "metrics.csv"
    return Run(
        path=folder,
        config=_yaml(folder / "config.yaml") or {},
        composed=_yaml(composed) if composed.is_file() else None,
        overrides=[str(o) for o in (_yaml(overrides) or [])] if overrides.is_file() else [],
        metrics=_json(folder / "metrics.json"),
        throughput=_json(folder / "throughput.json"),
        curves=read_curves(curves_file) if curves_file.is_file() else {},
    )


def _run_folders(folder: Path) -> Iterable[Path]:
    if is_run(folder):
        yield folder
        return
    for child in sorted(folder.iterdir(), key=_natural):
        if child.is_dir() and child.name not in _SKIP and not child.name.startswith("."):
            yield from _run_folders(child)


def _natural(path: Path) -> tuple:
    """Sort multirun jobs by number (``2_x`` before ``10_x``), then by name."""
    head = path.name.split("_", 1)[0]
    return (0, int(head), path.name) if head.isdigit() else (1, 0, path.name)


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run in or under ``paths`` (run folders, sweep folders, folders of sweeps), each once, in order.

    Raises :class:`~kdir.errors.MissingFileError` for a path that is not a folder or holds no run.
    """
    runs, seen = [], set()
    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            raise MissingFileError(f"{folder}: no such folder (expected a run folder or a multirun's sweep folder)")
        found = list(_run_folders(folder))
        if not found:
            raise MissingFileError(
                f"{folder}: no kdir run under it (a run folder holds config.yaml and metrics.json or csv/)"
            )
        for run_folder in found:
            if run_folder.resolve() not in seen:
                seen.add(run_folder.resolve())
                runs.append(read_run(run_folder))
    return runs


# --------------------------------------------------------------------------------------------------- groups
@dataclass
class Group:
    """Runs that differ only by ``seed``, with a label naming what sets them apart from the other groups."""

    label: str
    runs: list[Run]

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    def values(self, measure: str, stage: str = "trained") -> list[float]:
        """``measure`` of each run's test metrics (runs without it left out)."""
        return [r.test(stage)[measure] for r in self.runs if measure in r.test(stage)]

    def best(self, key: str) -> list[float]:
        """Each run's best value of the logged curve ``key`` (runs that never logged it left out)."""
        return [b for r in self.runs if (b := r.best(key)) is not None]

    def speeds(self) -> list[float]:
        """Each run's training queries/s (after the warm-up batches when it had more), from ``throughput.json``."""
        speeds = (r.throughput.get("steady_queries_per_s", r.throughput.get("queries_per_s")) for r in self.runs)
        return [float(t) for t in speeds if t]


def _without_seed(run: Run) -> str:
    """What must be equal for two runs to be seeds of one setting: the composed config without ``seed``."""
    if run.composed is None:
        return f"path:{run.path.resolve()}"  # no record of how it was composed: a group of its own
    return json.dumps({k: v for k, v in run.composed.items() if k != "seed"}, sort_keys=True, default=str)


def _seedless(overrides: list[str]) -> list[str]:
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "seed"]


def group_by_seed(runs: Sequence[Run]) -> list[Group]:
    """Group ``runs`` whose composed configs (``.hydra/config.yaml``) are equal but for ``seed``, in first-seen order.

    A group's label is its overrides other than ``seed`` that not every group shares (``loss=infonce``), else its
    runs' ``run_name``; labels that would repeat are numbered.
    """
    keyed: dict[str, list[Run]] = {}
    for run in runs:
        keyed.setdefault(_without_seed(run), []).append(run)
    members = list(keyed.values())
    overrides = [_seedless(g[0].overrides) for g in members]
    shared = set.intersection(*(set(o) for o in overrides)) if overrides else set()
    labels = [" ".join(o for o in ov if o not in shared) or g[0].name for ov, g in zip(overrides, members)]
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for label, group in zip(labels, members):
        if counts[label] > 1:
            seen[label] = seen.get(label, 0) + 1
            label = f"{label} #{seen[label]}"
        out.append(Group(label, group))
    return out


# --------------------------------------------------------------------------------------------------- tables
def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def measures_of(runs: Iterable[Run]) -> list[str]:
    """The test measures of the runs, in the order they were logged."""
    return list(dict.fromkeys(m for r in runs for m in [*r.test("trained"), *r.test("untrained")]))


def results_rows(groups: Sequence[Group]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of the results: per group its runs, seeds, each trained test measure's mean and std, the
    untrained student's value of the first measure, the best dev value of that measure and the training speed."""
    measures = measures_of(r for g in groups for r in g.runs)
    first = measures[0] if measures else None
    columns = ["run", "n", "seeds"]
    for m in measures:
        columns += [f"{m} mean", f"{m} std"]
    if first:
        columns += [f"untrained {first} mean", f"best val/{first} mean", f"best val/{first} std"]
    columns += ["queries/s mean"]
    rows = []
    for g in groups:
        row: dict[str, Any] = {"run": g.label, "n": len(g.runs), "seeds": " ".join(str(s) for s in g.seeds)}
        for m in measures:
            row[f"{m} mean"], row[f"{m} std"] = mean_std(g.values(m))
        if first:
            row[f"untrained {first} mean"] = mean_std(g.values(first, "untrained"))[0]
            row[f"best val/{first} mean"], row[f"best val/{first} std"] = mean_std(g.best(f"val/{first}"))
        row["queries/s mean"] = mean_std(g.speeds())[0]
        rows.append(row)
    return columns, rows


def markdown_table(groups: Sequence[Group]) -> str:
    """The results as a Markdown table: mean ± std over seeds (the mean alone for one run)."""
    measures = measures_of(r for g in groups for r in g.runs)
    first = measures[0] if measures else None
    head = ["run", "n", *measures] + ([f"untrained {first}", f"best val/{first}"] if first else []) + ["queries/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [g.label, str(len(g.runs)), *(_fmt(g.values(m)) for m in measures)]
        if first:
            cells += [_fmt(g.values(first, "untrained")), _fmt(g.best(f"val/{first}"))]
        cells.append(_fmt(g.speeds(), 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        blank = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
        writer.writerow({k: "" if blank(v) else v for k, v in row.items()})
    return buf.getvalue()


def write_tables(groups: Sequence[Group], out: str | Path) -> dict[str, Path]:
    """Write ``<out>/results.md`` (mean ± std) and ``<out>/results.csv`` (means and stds in columns of their own)."""
    out = Path(out)
    columns, rows = results_rows(groups)
    return {
        "results.md": save_text(markdown_table(groups), out / "results.md"),
        "results.csv": save_text(_csv_text(columns, rows), out / "results.csv"),
    }
