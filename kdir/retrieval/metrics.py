"""Run files and metrics with `ir-measures <https://ir-measur.es>`_ (the same measures as the papers)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import ir_measures
import numpy as np

from kdir.errors import ConfigError
from kdir.utils.io import atomic_write

if TYPE_CHECKING:
    from kdir.data.dataset import IRDataset

Run = dict[str, dict[str, float]]


def parse_measures(names: Iterable[str]) -> list:
    """Parse ir-measures strings (``nDCG@10``, ``RR(rel=2)@10``, ``R@1000``); a bad name is a clear error."""
    out = []
    for name in names:
        try:
            out.append(ir_measures.parse_measure(str(name)))
        except Exception as e:  # ir-measures raises several types on bad input
            raise ConfigError(f"unknown ir-measures measure {name!r}: {e}") from None
    return out


def run_from_topk(query_ids: list[str], doc_ids: list[str], scores: np.ndarray, rows: np.ndarray) -> Run:
    """``{qid: {pid: score}}`` from FAISS output (``rows`` index ``doc_ids``; -1 = no hit)."""
    run: Run = {}
    for qid, s_row, d_row in zip(query_ids, scores.tolist(), rows.tolist()):
        run[qid] = {doc_ids[d]: s for s, d in zip(s_row, d_row) if d >= 0}
    return run


def evaluate_run(run: Run, qrels: Mapping[str, Mapping[str, int]], measures: Iterable[str]) -> dict[str, float]:
    """Aggregate metrics of ``run`` against ``qrels``: ``{"nDCG@10": 0.64, ...}`` (keys as given)."""
    names = [str(m) for m in measures]
    parsed = parse_measures(names)
    agg = ir_measures.calc_aggregate(parsed, qrels, run)
    return {name: float(agg[m]) for name, m in zip(names, parsed)}


def write_trec_run(run: Run, path: str | Path, tag: str = "kdir") -> Path:
    """Write ``qid Q0 pid rank score tag`` lines, ranks from 1 by descending score (atomic)."""
    path = Path(path)
    with atomic_write(path) as f:
        for qid, docs in run.items():
            for rank, (pid, score) in enumerate(sorted(docs.items(), key=lambda x: -x[1]), start=1):
                f.write(f"{qid} Q0 {pid} {rank} {score:.6f} {tag}\n")
    return path


def positive_share(run: Run, dataset: IRDataset) -> float:
    """Fraction of the run's candidates that are labelled positives (negatives too, unless excluded)."""
    pos = dataset.positives()
    total = sum(len(docs) for docs in run.values())
    hits = sum(1 for qid, docs in run.items() for pid in docs if pid in pos.get(qid, ()))
    return hits / total if total else 0.0
