"""Run one stage of the SciFact KD study, time it, and record its metrics in ``results/<row>.json``.

    python experiments/scifact_kd/record.py <results/row.json> <run dir> -- <command ...>

The record holds the wall time, the command, the hardware, the run's test metrics (``metrics.json`` of
``kdir.run`` / ``kdir.evaluate`` / ``kdir.train_teacher``) and, for trained students, the validation curve
(``val/*`` from the CSV log: the dev split the hyperparameters were chosen on). A failed command records
nothing, so ``make`` re-runs it.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path


def hardware() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        threads = torch.get_num_threads()
    except ImportError:
        threads = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch threads"


def test_metrics(run_dir: Path) -> dict[str, float]:
    """Test metrics from a run directory, whichever kdir app wrote it."""
    data = json.loads((run_dir / "metrics.json").read_text())
    if "trained" in data:  # kdir.run: {"untrained": ..., "trained": ..., "best_checkpoint": ...}
        return data["trained"]
    return data["metrics"]  # kdir.evaluate / kdir.train_teacher / kdir.evaluate_teacher


def val_curve(run_dir: Path) -> list[dict[str, float]]:
    """One row per validation: epoch, step and the ``val/*`` metrics of the CSV logger."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return []
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            vals = {k: float(v) for k, v in row.items() if k.startswith("val/") and v not in ("", None)}
            if vals:
                rows.append({"epoch": int(float(row["epoch"])), "step": int(float(row["step"])), **vals})
    return rows


def main() -> None:
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        raise SystemExit(__doc__)
    out, run_dir, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4:]
    start = time.perf_counter()
    code = subprocess.call(command)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{shlex.join(command)} failed with exit code {code}; nothing recorded in {out}")
    record = {
        "seconds": round(seconds, 1),
        "metrics": test_metrics(run_dir) if (run_dir / "metrics.json").exists() else {},
        "val": val_curve(run_dir),
        "hardware": hardware(),
        "command": shlex.join(command),
        "run_dir": str(run_dir),
    }
    extra = run_dir / "metrics.json"
    if extra.exists():
        data = json.loads(extra.read_text())
        record["stage_seconds"] = {k: data[k] for k in ("train_seconds", "eval_seconds", "seconds") if k in data}
        if data.get("untrained"):  # kdir.run eval_untrained=true: the student's own start
            record["untrained"] = data["untrained"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"recorded {out}: {seconds:.0f} s, {record['metrics']}")


if __name__ == "__main__":
    main()
