"""Retrieval evaluation: encode queries and corpus, FAISS top-k, TREC run, ir-measures metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdir.data.collate import EncodeCollator
from kdir.data.dataset import IRDataset
from kdir.retrieval.metrics import Run, evaluate_run, parse_measures, run_from_topk, write_trec_run
from kdir.retrieval.search import search
from kdir.stores import id_hashes
from kdir.utils import print_metrics, save_json

if TYPE_CHECKING:
    from kdir.models.dual_encoder import DualEncoder, TextFormatter

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("nDCG@10", "RR@10", "R@100", "R@1000")


class LengthSortedRows(Dataset):
    """Row numbers of ``texts``, longest first, so encoding batches carry little padding."""

    def __init__(self, texts: Sequence[str]):
        self.order = np.argsort([-len(t) for t in texts], kind="stable")

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> int:
        return int(self.order[i])


class RetrievalEvaluator:
    """End-to-end dense retrieval over a dataset's whole corpus, scored with ir-measures.

    Args:
        dataset: the split to evaluate (its queries, its qrels, the full corpus).
        metrics: ir-measures strings, e.g. ``nDCG@10``, ``RR(rel=2)@10``, ``R@1000``.
        depth: documents retrieved per query (the run file's depth).
        index_factory: FAISS ``index_factory`` string (``Flat`` = exact inner product).
        use_gpu: FAISS on GPU (``None``: when available).
        batch_size: encoding batch size.
    """

    def __init__(
        self,
        dataset: IRDataset,
        metrics: Sequence[str] = DEFAULT_METRICS,
        depth: int = 1000,
        index_factory: str = "Flat",
        use_gpu: bool | None = None,
        batch_size: int = 128,
    ):
        parse_measures(metrics)  # fail early on a bad name
        self.dataset, self.metrics, self.depth = dataset, list(metrics), depth
        self.index_factory, self.use_gpu, self.batch_size = index_factory, use_gpu, batch_size

    def dataloaders(
        self, query_formatter: TextFormatter, doc_formatter: TextFormatter, num_workers: int = 0
    ) -> list[DataLoader]:
        """``[queries, corpus]`` loaders of ``{"tokens", "rows"}`` batches (Lightning shards them under DDP)."""
        out = []
        for texts, fmt in ((self.dataset.queries.texts, query_formatter), (self.dataset.corpus.texts, doc_formatter)):
            out.append(
                DataLoader(
                    LengthSortedRows(texts),
                    batch_size=self.batch_size,
                    shuffle=False,
                    num_workers=num_workers,
                    collate_fn=EncodeCollator(texts, fmt),
                )
            )
        return out

    def retrieve(self, queries: np.ndarray | torch.Tensor, docs: np.ndarray | torch.Tensor) -> Run:
        """Top-``depth`` run from query ``[Nq, d]`` and corpus ``[Nd, d]`` embeddings (rows in dataset order)."""
        q = np.asarray(queries, dtype=np.float32)
        d = np.asarray(docs, dtype=np.float32)
        scores, rows = search(q, d, self.depth, self.index_factory, self.use_gpu)
        return run_from_topk(self.dataset.queries.ids, self.dataset.corpus.ids, scores, rows)

    def score(self, run: Run) -> dict[str, float]:
        return evaluate_run(run, self.dataset.qrels, self.metrics)

    def evaluate(
        self, encoder: DualEncoder, device: str | torch.device | None = None, progress: bool = True
    ) -> tuple[dict[str, float], Run]:
        """Encode, search and score in one process (``python -m kdir.evaluate``); returns ``(metrics, run)``."""
        kw = dict(batch_size=self.batch_size, device=device, progress=progress)
        q = encoder.encode_queries(self.dataset.queries.texts, **kw)
        d = encoder.encode_docs(self.dataset.corpus.texts, **kw)
        run = self.retrieve(q.numpy(), d.numpy())
        return self.score(run), run


def _candidate_lists(dataset: IRDataset, run_file: str, depth: int) -> list[np.ndarray]:
    from kdir.data.formats import read_trec_run, top_ranked

    run = read_trec_run(run_file)
    out = []
    for qid in dataset.queries.ids:
        cands = run.get(qid, {})
        out.append(dataset.corpus.codes(top_ranked(cands, depth), source=run_file))
    return out


class RerankEvaluator:
    """Re-rank the top-``depth`` candidates of a first-stage run with any scorer (e.g. a cross-encoder teacher).

    Args:
        dataset: the split (queries, qrels, corpus).
        run_file: the first-stage TREC run (e.g. ``run.trec`` of ``python -m kdir.evaluate``).
        depth: candidates re-ranked per query.
        metrics: ir-measures strings.
        batch_size: queries per scoring call.
    """

    def __init__(
        self,
        dataset: IRDataset,
        run_file: str,
        depth: int = 100,
        metrics: Sequence[str] = DEFAULT_METRICS,
        batch_size: int = 8,
    ):
        parse_measures(metrics)
        self.dataset, self.run_file, self.depth, self.metrics, self.batch_size = (
            dataset,
            run_file,
            depth,
            list(metrics),
            batch_size,
        )

    @torch.no_grad()
    def evaluate(self, model, device: str | torch.device | None = None, progress: bool = True) -> tuple[dict, Run]:
        from tqdm.auto import tqdm

        ds, cands = self.dataset, _candidate_lists(self.dataset, self.run_file, self.depth)
        model.eval()
        uses_keys = getattr(model, "uses_query_keys", False)  # the collective ColBERT: per-query expansions
        run: Run = {}
        for s in tqdm(range(0, len(cands), self.batch_size), desc="re-rank", disable=not progress):
            rows = range(s, min(s + self.batch_size, len(cands)))
            width = max(len(cands[i]) for i in rows)
            if width == 0:
                continue
            grid = np.stack(
                [
                    np.pad(cands[i], (0, width - len(cands[i])), mode="edge")
                    if len(cands[i])
                    else np.zeros(width, dtype=np.int64)
                    for i in rows
                ]
            )
            docs, inverse = np.unique(grid, return_inverse=True)
            keys = {"query_keys": id_hashes([ds.queries.ids[i] for i in rows])} if uses_keys else {}
            inputs = model.prepare(
                [ds.queries.texts[i] for i in rows],
                [ds.corpus.texts[d] for d in docs],
                inverse.reshape(grid.shape),
                **keys,
            )
            scores = model(inputs).float().cpu().numpy()
            for r, i in enumerate(rows):
                run[ds.queries.ids[i]] = {ds.corpus.ids[d]: float(x) for d, x in zip(cands[i], scores[r])}
        return evaluate_run(run, ds.qrels, self.metrics), run


class MaxSimEvaluator(RetrievalEvaluator):
    """End-to-end ColBERT retrieval by exhaustive MaxSim over the whole corpus (fine up to ~10^5 documents).

    Token embeddings are kept in fp16, padded to the model's maximum lengths; each block of queries is
    scored against every document and the top-``depth`` kept. In training, the module encodes (sharded
    across ranks) and calls :meth:`retrieve`; standalone, :meth:`evaluate` does everything.
    """

    def __init__(
        self,
        dataset: IRDataset,
        depth: int = 1000,
        metrics: Sequence[str] = DEFAULT_METRICS,
        batch_size: int = 64,
        doc_chunk: int = 1024,
    ):
        super().__init__(dataset, metrics, depth, batch_size=batch_size)
        self.doc_chunk = doc_chunk

    @torch.no_grad()
    def retrieve(
        self,
        queries: tuple[torch.Tensor, torch.Tensor],
        docs: tuple[torch.Tensor, torch.Tensor],
        similarity: str = "cosine",
        device: str | torch.device | None = None,
    ) -> Run:
        """Top-``depth`` run from ``(embeddings [N, L, dim], mask [N, L])`` of the queries and the corpus."""
        from kdir.models.colbert import maxsim

        (q, q_mask), (d, d_mask) = queries, docs
        device = device or d.device
        d, d_mask = d.to(device), d_mask.to(device)
        k = min(self.depth, len(d))
        top_scores, top_rows = [], []
        for s in range(0, len(q), self.batch_size):
            qb, mb = q[s : s + self.batch_size].to(device).float(), q_mask[s : s + self.batch_size].to(device)
            scores = torch.cat(
                [
                    maxsim(qb, mb, d[c : c + self.doc_chunk].float(), d_mask[c : c + self.doc_chunk], similarity)
                    for c in range(0, len(d), self.doc_chunk)
                ],
                dim=1,
            )
            top = scores.topk(k, dim=1)
            top_scores.append(top.values.cpu())
            top_rows.append(top.indices.cpu())
        scores, rows = torch.cat(top_scores).numpy(), torch.cat(top_rows).numpy()
        return run_from_topk(self.dataset.queries.ids, self.dataset.corpus.ids, scores, rows)

    @torch.no_grad()
    def encode_side(
        self, model, texts: Sequence[str], side: str, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fp16 embeddings [N, L, dim], bool mask [N, L])`` of ``texts``, padded to the model's maximum length."""
        from tqdm.auto import tqdm

        dev = next(model.parameters()).device
        L = model.config[f"{side}_max_length"]
        emb = torch.zeros(len(texts), L, model.config["dim"], dtype=torch.float16, device=dev)
        mask = torch.zeros(len(texts), L, dtype=torch.bool, device=dev)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        fmt = model.formatter(side)
        for s in tqdm(range(0, len(texts), self.batch_size), desc=f"encode {side}", disable=not progress):
            idx = order[s : s + self.batch_size]
            e, m = model.encode({k: v.to(dev) for k, v in fmt([texts[i] for i in idx]).items()}, side)
            emb[idx, : e.shape[1]], mask[idx, : e.shape[1]] = e.half(), m
        return emb, mask

    @torch.no_grad()
    def evaluate(self, model, device: str | torch.device | None = None, progress: bool = True) -> tuple[dict, Run]:
        was_training = model.training
        model.eval()
        try:
            docs = self.encode_side(model, self.dataset.corpus.texts, "doc", progress)
            queries = self.encode_side(model, self.dataset.queries.texts, "query", progress)
        finally:
            model.train(was_training)
        run = self.retrieve(queries, docs, model.config["similarity"])
        return self.score(run), run


def evaluate_and_save(
    evaluator, model: torch.nn.Module, out: Path, run_name: str, progress: bool = True, **extra
) -> dict[str, float]:
    """Evaluate a teacher; write ``run.trec`` and ``metrics.json`` (+ ``extra`` fields) to ``out``; print a table."""
    start = time.perf_counter()
    metrics, run = evaluator.evaluate(model, progress=progress)
    seconds = time.perf_counter() - start
    write_trec_run(run, out / "run.trec", tag=run_name)
    record = {"dataset": evaluator.dataset.name, "metrics": metrics, "eval_seconds": seconds, **extra}
    save_json(record, out / "metrics.json")
    print_metrics({run_name: metrics}, title=f"{evaluator.dataset.name} (teacher, {seconds:.1f} s)")
    return metrics
