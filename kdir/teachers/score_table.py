"""Cached teacher scores keyed by (query, document), looked up vectorised.

Reads ``qid<TAB>pid<TAB>score`` files or Hofstätter et al.'s Margin-MSE TSV
(``pos_score neg_score qid pos_pid neg_pid``, https://zenodo.org/record/4068216). Scores are used raw
(logits, no normalisation), as Margin-MSE requires.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from kdir.data.dataset import IRDataset
from kdir.data.readers import read_margin_scores, read_pair_scores
from kdir.errors import EmptySplitError, UnknownIdError


class ScoreTable:
    """``(query, doc) → score`` over a dataset's int codes: sorted int64 keys + float32 values.

    Args:
        path: score file.
        format: ``pairs`` (``qid pid score``) or ``margin_scores`` (Hofstätter TSV).
        ignore_unknown: skip rows whose ids are not in the bound dataset instead of failing.
    """

    def __init__(
        self, path: str | Path, format: Literal["pairs", "margin_scores"] = "pairs", ignore_unknown: bool = False
    ):
        if format not in ("pairs", "margin_scores"):
            raise ValueError(f"unknown score format {format!r}: expected 'pairs' or 'margin_scores'")
        self.path, self.format, self.ignore_unknown = str(path), format, ignore_unknown
        self.keys: np.ndarray | None = None

    def _rows(self):
        if self.format == "pairs":
            yield from read_pair_scores(self.path)
        else:
            for lineno, ps, ns, qid, pos, neg in read_margin_scores(self.path):
                yield lineno, qid, pos, ps
                yield lineno, qid, neg, ns

    def bind(self, dataset: IRDataset) -> ScoreTable:
        """Read the file and key it by ``dataset``'s query and document codes."""
        qi, di, n_docs = dataset.queries.index, dataset.corpus.index, len(dataset.corpus)
        keys, values = [], []
        for lineno, qid, pid, score in self._rows():
            q, d = qi.get(qid), di.get(pid)
            if q is None or d is None:
                if self.ignore_unknown:
                    continue
                what = f"query {qid!r}" if q is None else f"document {pid!r}"
                raise UnknownIdError(f"{self.path}:{lineno}: {what} is not in {dataset.name} "
                                     "(set ignore_unknown=true to skip such rows)")  # fmt: skip
            keys.append(q * n_docs + d)
            values.append(score)
        if not keys:
            raise EmptySplitError(f"{self.path}: no scores for {dataset.name}")
        keys_arr = np.asarray(keys, dtype=np.int64)
        self.keys, first = np.unique(keys_arr, return_index=True)
        self.values = np.asarray(values, dtype=np.float32)[first]
        self.n_docs = n_docs
        return self

    def __len__(self) -> int:
        return 0 if self.keys is None else len(self.keys)

    def lookup(self, queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
        """Scores ``[B, C]`` of ``queries [B]`` against ``docs [B, C]``; ``NaN`` where a pair is not cached."""
        if self.keys is None:
            raise RuntimeError("ScoreTable.bind(dataset) must be called before lookup")
        keys = queries[:, None] * self.n_docs + docs
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.values[pos], np.float32("nan"))
