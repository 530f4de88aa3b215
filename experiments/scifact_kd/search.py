"""Summarise an Optuna sweep of the SciFact KD study (``hparams_search=scifact_kd``) into ``results/<name>.json``.

    python experiments/scifact_kd/search.py <sweep dir> <results/name.json>

Per trial: the searched values (its Hydra overrides of the sweep's ``params``), the dev curve and best dev score
(``val/nDCG@10``, what Optuna maximised) and the test metrics (reported, never selected on); then the best trial and
its parameters as Optuna's ``optimization_results.yaml`` gives them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from record import hardware, test_metrics, val_curve


def trials(sweep: Path) -> list[dict]:
    out = []
    runs = [p for p in sweep.iterdir() if (p / ".hydra").is_dir()]
    for run_dir in sorted(runs, key=lambda p: int(p.name.split("_")[0])):
        cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        searched = set(cfg["sweeper"]["params"])
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        values = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in searched)
        curve = val_curve(run_dir)
        done = (run_dir / "metrics.json").exists()
        out.append({
            "trial": int(run_dir.name.split("_")[0]),
            "params": values,
            "dev_nDCG@10": max((r["val/nDCG@10"] for r in curve if "val/nDCG@10" in r), default=None),
            "test": test_metrics(run_dir) if done else None,
            "run_dir": str(run_dir),
        })  # fmt: skip
    return out


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sweep, out = Path(sys.argv[1]), Path(sys.argv[2])
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    rows = trials(sweep)
    record = {"sweep_dir": str(sweep), "best_params": best["best_params"], "best_dev_nDCG@10": best["best_value"],
              "trials": rows, "hardware": hardware()}  # fmt: skip
    out.write_text(json.dumps(record, indent=1) + "\n")
    for r in rows:
        test = (r["test"] or {}).get("nDCG@10")
        print(f"trial {r['trial']}: dev {r['dev_nDCG@10']}, test {test}, {r['params']}")
    print(f"best: dev {best['best_value']:.4f} with {best['best_params']} -> {out}")


if __name__ == "__main__":
    main()
