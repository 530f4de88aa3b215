"""Plots and tables of finished runs: ``python -m kdir.report <run or sweep folder> [<folder> ...] [--out DIR]``.

Reads every run under the folders (a ``kdir.run`` folder, a multirun's sweep folder, a folder of several sweeps):
their ``csv/metrics.csv`` curves, ``metrics.json`` test results, ``throughput.json`` and Hydra records; groups the
runs whose configs differ only by ``seed``; writes ``results.md`` / ``results.csv`` (test metrics, mean ± std over
seeds) and ``curves.png``, ``diagnostics.png``, ``results.png``, ``report.png`` into ``--out`` (default: the
folder's ``report/``; required for several folders). A multirun writes the same report into its sweep folder
by itself (``kdir.utils.plots.SweepReport``, a Hydra callback of ``conf/run.yaml``).

Unlike the other commands this is an argparse command, not a Hydra app: it reads folders that exist and composes no
config, so it takes them as plain arguments and makes no run folder of its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdir.errors import KdirError


def main(argv: list[str] | None = None) -> int:
    """Write the report; returns the exit status (2 on a user error: a missing folder, no runs, no ``--out``)."""
    parser = argparse.ArgumentParser(prog="kdir.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, sweep folders, or folders of sweeps")
    parser.add_argument("--out", type=Path, default=None, help="where the report goes (default: <folder>/report)")
    parser.add_argument("--metric", default=None, help="the test/dev measure plotted (default: the first logged)")
    args = parser.parse_args(argv)
    try:
        if args.out is None and len(args.folders) > 1:
            raise KdirError(f"{len(args.folders)} folders given: choose where their report goes with --out <folder>")
        from kdir.utils.plots import write_report

        out = args.out or args.folders[0] / "report"
        files = write_report(args.folders, out, args.metric)
    except KdirError as e:
        print(f"kdir.report: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(files["results.md"].read_text(encoding="utf-8"), end="")
    print("\n".join(f"wrote {p}" for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
