"""Tables printed by the commands."""

from __future__ import annotations

from collections.abc import Mapping


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
