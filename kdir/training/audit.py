"""The teacher audit: is the teacher worth distilling? Teacher and untrained student ranked on the same candidates.

Run by ``python -m kdir.run`` before training (``audit.enabled``, on rank 0) and alone by ``python -m kdir.audit``.
A teacher whose ranking is no better than the student's own gives it little to learn (the cross-architecture KD of
Hofstätter et al. 2020, https://arxiv.org/abs/2010.02666, distils teachers well above their students), so a teacher
whose nDCG@10 is not above the untrained student's is warned about before any training time is spent.

Which candidates:

* **dev** (the run has a validation evaluator and the teacher is a model): each dev query's candidates are the
  untrained student's own top-``depth`` (its dense retrieval with the validation evaluator's index settings); the
  judged positives are *not* added, so neither side is shown the answer. The teacher re-ranks them
  (:class:`~kdir.retrieval.evaluators.RerankEvaluator`: a batch's distinct documents are tokenised once, separable
  teachers encode each candidate document once). R@depth is then the same for both: the candidates' ceiling.
* **train** (a score-file teacher, no dev split, or a teacher that reads per-query data of the training queries such
  as CollectiveKD's expansions): a seeded sample of ``max_queries`` training queries with their training candidates
  (labelled positives + the examples' negatives: the run pool, the fixed triples, else the run a ``kdir.score``
  store recorded, else ``depth`` random documents), judged by the training qrels; the teacher's scores come from
  its store (``cached``) or its model. Positives are among the candidates (as in training) and a teacher trained on
  these qrels has seen them: read these metrics as agreement with the labels, not as generalisation.

Reported for both sides: nDCG@10, RR@10 and R@depth (ir-measures), the scores' mean, std, min and max and the mean
per-query std (the scale a temperature or Margin-MSE sees); their agreement per query: Spearman's ρ, Kendall's τ-b
(``scipy.stats.kendalltau``; scipy comes with scikit-learn) and top-1 agreement, averaged over queries
(:mod:`kdir.training.diagnostics`).

Cost: *dev*: one encoding of the dev corpus by the student (as one validation) and ``queries × depth`` teacher pairs
(quickstart, ColBERT teacher, 150 × 50: 8 s on the shared 2-core CPU; SciFact, 100 × 50 with a MiniLM cross-encoder:
about 5 minutes by the study's re-ranking speed); *train*: the distinct candidate documents of ``max_queries``
queries encoded by the student once, and store lookups (quickstart, 200 × 31 pairs: 4-10 s). Under DDP only rank 0
audits; the other ranks meet it when training starts.

Training is unchanged by it: the random generators (torch, numpy, Python) are restored, the models' modes and
devices put back.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdir.data.dataset import IRDataset, TextStore
from kdir.data.examples import Examples, RunNegatives
from kdir.data.formats import read_trec_run, top_ranked
from kdir.errors import ConfigError, KdirError
from kdir.models.base import to_device
from kdir.retrieval.evaluators import RerankEvaluator, RetrievalEvaluator
from kdir.retrieval.metrics import Run, evaluate_run, write_trec_run
from kdir.stores import EmbeddingStore, id_hashes, pair_keys
from kdir.training.diagnostics import masked_mean_std, spearman, top1_agreement
from kdir.utils.io import save_json

if TYPE_CHECKING:
    from kdir.models.base import Scorer
    from kdir.training.signal import TeacherSignal

log = logging.getLogger(__name__)

SETTINGS = ("enabled", "depth", "max_queries", "batch_size")  # the ``audit`` block of conf/run.yaml
SCALE = ("mean", "std", "min", "max", "query_std")


# ------------------------------------------------------------------------------------------------ statistics
def kendall(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` Kendall's τ-b of each row's student and teacher scores over its ``mask`` ed candidates
    (``scipy.stats.kendalltau``; NaN for fewer than two candidates or constant scores)."""
    from scipy.stats import kendalltau

    m = torch.ones_like(student, dtype=torch.bool) if mask is None else mask
    out = torch.full((student.shape[0],), float("nan"))
    s, t, m = student.double().cpu().numpy(), teacher.double().cpu().numpy(), m.cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: NaN, as documented
        for i in range(len(s)):
            if m[i].sum() >= 2:
                out[i] = float(kendalltau(s[i][m[i]], t[i][m[i]]).statistic)
    return out


def _nanmean(x: torch.Tensor) -> float:
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if keep.any() else math.nan


def scale(scores: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean, (population) std, min and max of the ``mask`` ed entries of ``[Q, C]`` scores, and the mean over queries
    with at least two candidates of each query's own std."""
    mean, std = masked_mean_std(scores, mask)
    x = scores.double()
    n = mask.sum(1)
    row_mean = x.where(mask, 0.0).sum(1) / n.clamp(min=1)
    row_std = ((x - row_mean[:, None]).where(mask, 0.0).pow(2).sum(1) / n.clamp(min=1)).sqrt()
    return {
        "mean": float(mean),
        "std": float(std),
        "min": float(x[mask].min()),
        "max": float(x[mask].max()),
        "query_std": _nanmean(row_std.where(n >= 2, float("nan")).float()),
    }


def agreement(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean over queries of Spearman's ρ, Kendall's τ-b and top-1 agreement of ``[Q, C]`` scores over ``mask``."""
    return {
        "spearman": _nanmean(spearman(student, teacher, mask)),
        "kendall": _nanmean(kendall(student, teacher, mask)),
        "top1": _nanmean(top1_agreement(student, teacher, mask)),
    }


def _grid(runs: Sequence[Run], queries: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``[Q, C]`` score grids (NaN-padded) of the runs over the candidates every run scored, and their mask."""
    rows = [[[run[q][d] for run in runs] for d in runs[0][q] if all(d in run[q] for run in runs)] for q in queries]
    width = max((len(r) for r in rows), default=1)
    grids = torch.full((len(runs), len(rows), width), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        if r:
            grids[:, i, : len(r)] = torch.tensor(r, dtype=torch.float64).T
    return list(grids), ~torch.isnan(grids).any(0)


# ------------------------------------------------------------------------------------------------ candidates
def _subset(dataset: IRDataset, codes: np.ndarray, label: str) -> IRDataset:
    """The split restricted to the queries ``codes`` (sorted), with their qrels."""
    ids = [dataset.queries.ids[i] for i in codes]
    queries = TextStore.from_pairs(((q, dataset.queries.texts[i]) for q, i in zip(ids, codes)), source=label)
    qrels = {q: dataset.qrels[q] for q in ids if q in dataset.qrels}
    return IRDataset(dataset.corpus, queries, qrels, dataset.min_relevance, name=dataset.name)


def _sample(codes: np.ndarray, max_queries: int, seed: int) -> np.ndarray:
    """A seeded sample of ``max_queries`` of ``codes`` (all of them when there are not more), sorted."""
    codes = np.unique(codes)
    if len(codes) <= max_queries:
        return codes
    return np.sort(np.random.default_rng(seed).choice(codes, size=max_queries, replace=False))


def train_candidates(
    dataset: IRDataset,
    examples: Examples,
    queries: np.ndarray,
    depth: int,
    seed: int,
    store_run: tuple[str, int] | None = None,
) -> tuple[list[np.ndarray], str]:
    """Each of ``queries``' training candidates (document codes) and how they were formed.

    Its labelled positives, and its negatives: the fixed triples', a run sampler's pool (the pairs
    :func:`kdir.stores.scoring.candidate_pairs` scores), else the top-``depth`` of the run a store recorded
    (``store_run``: path, depth), else ``depth`` seeded random documents."""
    positives = dataset.positives()
    pos = [dataset.corpus.codes(positives.get(dataset.queries.ids[q], ())) for q in queries]
    if examples.negatives is not None:
        order = np.argsort(examples.queries, kind="stable")
        starts = np.searchsorted(examples.queries[order], np.stack([queries, queries + 1]))
        negs = [examples.negatives[order[a:b]].ravel() for a, b in zip(*starts)]
        how = "positives + the fixed triples' negatives"
    elif isinstance(examples.sampler, RunNegatives):
        sampler = examples.sampler
        negs = [sampler.pool[q, : sampler.counts[q]] for q in queries]
        how = f"positives + the negatives pool (top {sampler.depth} of {Path(sampler.path).name})"
    elif store_run is not None:
        run, run_depth = store_run
        ranked = read_trec_run(run)
        ids = [dataset.queries.ids[q] for q in queries]
        negs = [dataset.corpus.codes(top_ranked(ranked.get(q, {}), run_depth), source=run) for q in ids]
        how = f"positives + the store's run (top {run_depth} of {Path(run).name})"
    else:
        rng = np.random.default_rng(seed)
        negs = [rng.choice(len(dataset.corpus), size=min(depth, len(dataset.corpus)), replace=False) for _ in queries]
        how = f"positives + {depth} random documents"
    return [np.unique(np.concatenate([p, n]).astype(np.int64)) for p, n in zip(pos, negs)], how


def rerank(model: Scorer, dataset: IRDataset, candidates: Run, batch_size: int, progress: bool = False) -> Run:
    """``model``'s scores of each query's ``candidates`` (:class:`~kdir.retrieval.evaluators.RerankEvaluator`: a
    batch's distinct documents are tokenised once; a separable model encodes each distinct document once)."""
    depth = max((len(c) for c in candidates.values()), default=1)
    with tempfile.TemporaryDirectory(prefix="kdir-audit-") as tmp:
        run_file = write_trec_run(candidates, Path(tmp) / "candidates.trec", tag="audit")
        evaluator = RerankEvaluator(dataset, str(run_file), depth=depth, metrics=["nDCG@10"], batch_size=batch_size)
        return evaluator.evaluate(model, progress=progress)[1]


@torch.no_grad()
def rerank_from_store(teacher: Scorer, store: EmbeddingStore, candidates: Run, dataset: IRDataset) -> Run | None:
    """A bi-encoder ``teacher``'s scores of ``candidates`` from its cached document embeddings (``store``): only the
    queries are encoded. ``None`` when the store lacks a candidate document (then the teacher encodes them)."""
    qids = [q for q in candidates if candidates[q]]
    pids = sorted({p for q in qids for p in candidates[q]})
    keys = id_hashes(pids)
    if not len(pids) or (store.rows(keys) < 0).any():
        return None
    docs = torch.from_numpy(store.lookup(keys)).float()
    index = {p: i for i, p in enumerate(pids)}
    texts = [dataset.queries.texts[dataset.queries.index[q]] for q in qids]
    queries = teacher.encode(to_device(teacher.formatter("query")(texts), teacher.device), "query").float().cpu()
    scores = queries @ docs.T  # [Q, distinct candidates]
    return {q: {p: float(scores[i, index[p]]) for p in candidates[q]} for i, q in enumerate(qids)}


def _as_run(dataset: IRDataset, queries: np.ndarray, cands: list[np.ndarray], scores: list[np.ndarray]) -> Run:
    """``{qid: {pid: score}}`` of the candidates with a finite score."""
    ids, docs = dataset.queries.ids, dataset.corpus.ids
    return {
        ids[q]: {docs[d]: float(x) for d, x in zip(c, s) if math.isfinite(x)}
        for q, c, s in zip(queries, cands, scores)
    }


# ------------------------------------------------------------------------------------------------ the audit
def _check(depth: int, max_queries: int, batch_size: int) -> None:
    for name, value in (("depth", depth), ("max_queries", max_queries), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"audit.{name}={value!r}: expected an integer >= 1")


def _dev_audit(
    student: Scorer, teacher: Scorer, val: RetrievalEvaluator, measures: list[str], depth: int, max_queries: int,
    batch_size: int, seed: int, device: torch.device | None, progress: bool, store: EmbeddingStore | None = None,
) -> tuple[dict[str, Any], Run, Run]:  # fmt: skip
    """The student's own top-``depth`` of (a sample of) the dev queries, re-ranked by the teacher."""
    ds = val.dataset
    sub = _subset(ds, _sample(np.arange(len(ds.queries)), max_queries, seed), ds.name)
    retrieval = copy.copy(val)  # the validation evaluator's index settings, at the audit's depth, nothing saved
    retrieval.dataset, retrieval.depth, retrieval.metrics, retrieval.index_path = sub, depth, measures, None
    _, student_run = retrieval.evaluate(student, device=device, progress=progress)
    teacher_run = rerank_from_store(teacher, store, student_run, sub) if store is not None else None
    if teacher_run is None:
        teacher_run = rerank(teacher, sub, student_run, batch_size, progress)
    where = {
        "stage": "dev",
        "split": ds.name,
        "queries": len(sub.queries),
        "candidates": f"the untrained student's top {depth} (judged positives not added)",
    }
    return where, teacher_run, student_run


def _train_audit(
    student: Scorer, signal: TeacherSignal, train: IRDataset, examples: Examples, depth: int, max_queries: int,
    batch_size: int, seed: int, progress: bool,
) -> tuple[dict[str, Any], Run, Run]:  # fmt: skip
    """A seeded sample of training queries with their training candidates, teacher scores from the store or model."""
    queries = _sample(examples.queries, max_queries, seed)
    store_run = None
    if signal.store is not None:
        data = signal.store.meta.get("data") or {}
        run, run_depth = data.get("source"), data.get("depth")
        if data.get("dataset") == train.name and isinstance(run, str) and isinstance(run_depth, int):
            store_run = (run, run_depth) if Path(run).is_file() else None
    cands, how = train_candidates(train, examples, queries, depth, seed, store_run)
    sub = _subset(train, queries, train.name)
    if signal.mode == "cached":
        q_hash, d_hash = id_hashes(sub.queries.ids), id_hashes(train.corpus.ids)
        scores = [signal.store.lookup(pair_keys(np.full(len(c), h), d_hash[c])) for h, c in zip(q_hash, cands)]
        teacher_run = _as_run(train, queries, cands, scores)
        source = f"its store {signal.store_path}"
    else:
        teacher_run = rerank(signal.model, sub, _as_run(train, queries, cands, [np.zeros(len(c)) for c in cands]),
                             batch_size, progress)  # fmt: skip
        source = f"its model ({signal.mode} signal)"
    teacher_run = {q: docs for q, docs in teacher_run.items() if len(docs) >= 2}  # queries with two scored candidates
    if not teacher_run:
        raise KdirError(
            f"teacher audit: none of {len(queries)} sampled training queries has two candidates with teacher scores "
            f"in {signal.store_path} ({how}); set audit.enabled=false to train without the audit"
        )
    sub = _subset(train, np.sort(train.queries.codes(teacher_run)), train.name)
    student_run = rerank(student, sub, teacher_run, batch_size, progress)
    where = {"stage": "train", "split": train.name, "queries": len(teacher_run)}
    where["candidates"] = f"{how}; teacher scores from {source}"
    return where, teacher_run, student_run


@contextlib.contextmanager
def restored_random_state() -> Iterator[None]:
    """Within the block anything may draw from torch's (CPU and initialised CUDA), numpy's and Python's global
    generators: they are given back as they were on exit."""
    np_state, py_state = np.random.get_state(), random.getstate()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def audit(
    student: Scorer,
    signal: TeacherSignal,
    train: IRDataset,
    examples: Examples,
    val: Any = None,
    *,
    name: str | None = None,
    depth: int = 50,
    max_queries: int = 200,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Compare the teacher of ``signal`` with the (untrained) ``student`` on the same candidates (module docstring).

    Args:
        student: the student as it starts training.
        signal: the bound teacher signal (its store and / or model).
        train: the training split; ``examples``: its built examples (the datamodule's).
        val: the validation evaluator, if any (dev candidates when the teacher is a model).
        name: what the table and the warning call the teacher (``None``: its class, or its store's folder).
        depth: the student's top-``depth`` per dev query (train: random negatives when no pool is known).
        max_queries: queries sampled (seeded by ``seed``) from the dev or training split.
        batch_size: queries per scoring call.
        device: where the models run (``None``: where they are); they are moved back afterwards.

    Returns:
        ``{"stage": "dev" | "train", "split", "queries", "candidates", "pairs", "teacher": {measure / scale: value},
        "student": {...}, "agreement": {"spearman", "kendall", "top1"}, "teacher_above_student", "warning", ...}``.
    """
    _check(depth, max_queries, batch_size)
    start = time.perf_counter()
    if name is None:
        name = type(signal.model).__name__ if signal.model is not None else Path(str(signal.store_path)).name
    measures = ["nDCG@10", "RR@10", f"R@{depth}"]
    model = signal.model
    dev = val is not None and isinstance(val, RetrievalEvaluator) and model is not None and not model.uses_query_keys
    devices = {m: m.device for m in (student, model) if m is not None}
    modes = {m: m.training for m in devices}
    target = torch.device(device) if device is not None else None
    try:
        with restored_random_state():
            if target is not None:
                for m in devices:
                    m.to(target)
            student.eval()
            if dev:
                cached = getattr(signal, "embedding_stores", {}).get("doc")  # the teacher's cached documents
                where, teacher_run, student_run = _dev_audit(
                    student, model, val, measures, depth, max_queries, batch_size, seed, target, progress, cached
                )
            else:
                where, teacher_run, student_run = _train_audit(
                    student, signal, train, examples, depth, max_queries, batch_size, seed, progress
                )
    finally:
        for m, d in devices.items():
            m.to(d)
            m.train(modes[m])
    qrels = (val.dataset if dev else train).qrels
    queries = list(teacher_run)
    (t, s), mask = _grid([teacher_run, student_run], queries)
    judged = {q: qrels[q] for q in queries if q in qrels}
    result: dict[str, Any] = {"teacher_name": name, **where, "pairs": int(mask.sum()), "measures": measures}
    for side, run, grid in (("teacher", teacher_run, t), ("student", student_run, s)):
        common = {q: {d: run[q][d] for d in teacher_run[q] if d in student_run[q]} for q in queries}
        result[side] = evaluate_run(common, judged, measures) | scale(grid, mask)
    result["agreement"] = agreement(s, t, mask)
    teacher_ndcg, student_ndcg = result["teacher"]["nDCG@10"], result["student"]["nDCG@10"]
    result["teacher_above_student"] = bool(teacher_ndcg > student_ndcg)
    result["warning"] = None if result["teacher_above_student"] else warning_text(result)
    result["seconds"] = time.perf_counter() - start
    return result


def warning_text(result: Mapping[str, Any]) -> str:
    """The warning for a teacher whose nDCG@10 is not above the untrained student's."""
    t, s = result["teacher"]["nDCG@10"], result["student"]["nDCG@10"]
    return (
        f"teacher {result['teacher_name']} ({t:.4f}) is not above the untrained student ({s:.4f}) on "
        f"{result['split']}: distillation will likely not help; check that the teacher is the model meant (its "
        "folder, training and scoring settings: lengths, similarity), that its scores are of this data, and how it "
        "ranks on its own (kdir.evaluate_teacher), or choose a stronger teacher"
    )


def flat_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The audit's numbers as ``audit/<name>`` keys: ``audit/teacher/nDCG@10``, ``audit/agreement/spearman``, ..."""
    out = {
        f"audit/{side}/{k}": float(v) for side in ("teacher", "student", "agreement") for k, v in result[side].items()
    }
    return out | {"audit/queries": float(result["queries"]), "audit/pairs": float(result["pairs"])}


def print_audit(result: Mapping[str, Any]) -> None:
    """The audit as a rich table (teacher and student rows), its agreement and its verdict below."""
    from rich.console import Console
    from rich.table import Table

    measures = list(result["measures"])
    title = f"teacher audit: {result['split']}, {result['queries']} queries, {result['pairs']} pairs"
    table = Table(title=title)
    table.add_column("ranker")
    for col in [*measures, "score mean", "std", "min", "max", "query std"]:
        table.add_column(col, justify="right")
    for side, label in (("teacher", f"teacher ({result['teacher_name']})"), ("student", "untrained student")):
        row = result[side]
        table.add_row(label, *(f"{row[m]:.4f}" for m in measures), *(f"{row[k]:.4g}" for k in SCALE))
    console = Console(width=120, markup=False)  # split names such as "scifact/train[held]" are text, not markup
    console.print(table)
    a = result["agreement"]
    console.print(f"candidates: {result['candidates']}", soft_wrap=True, highlight=False)
    console.print(
        f"agreement over each query's candidates: Spearman {a['spearman']:.4f}, Kendall {a['kendall']:.4f}, "
        f"top-1 {a['top1']:.4f}",
        highlight=False,
    )
    recall = result["student"].get(measures[-1], 1.0)
    if result["stage"] == "dev" and recall < 0.5:  # few judged documents among the student's own candidates
        console.print(
            f"note: the candidates hold {measures[-1]} {recall:.4f} of the judged documents: nDCG@10 compares the "
            "rankers on few of them (a larger audit.depth gives more)",
            soft_wrap=True,
            highlight=False,
        )
    if result["warning"]:
        console.print(f"WARNING: {result['warning']}", soft_wrap=True, highlight=False)
    else:
        t, s = result["teacher"]["nDCG@10"], result["student"]["nDCG@10"]
        console.print(
            f"teacher {result['teacher_name']} is above the untrained student on {result['split']}: nDCG@10 "
            f"{t:.4f} vs {s:.4f} ({t - s:+.4f})",
            highlight=False,
        )


def audit_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``audit`` block's settings for :func:`audit` (``enabled`` left out); an unknown key is a config error."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"audit.{unknown[0]}: unknown setting (the audit block has {', '.join(SETTINGS)})")
    settings.pop("enabled", None)
    return settings


def run_audit(
    student: Scorer,
    signal: TeacherSignal,
    train: IRDataset,
    examples: Examples,
    val: Any,
    out: str | Path | None,
    loggers: Iterable[Any] = (),
    settings: Mapping[str, Any] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`audit` with the ``audit`` block's ``settings``, then printed, warned about (``log.warning``), logged to
    ``loggers`` as ``audit/<name>`` at step 0 and saved to ``<out>/audit.json``."""
    result = audit(student, signal, train, examples, val, **audit_settings(settings), **kw)
    print_audit(result)
    if result["warning"]:
        log.warning(result["warning"])
    metrics = flat_metrics(result)
    for lg in loggers:
        lg.log_metrics(metrics, step=0)
    if out is not None:
        save_json(result, Path(out) / "audit.json")
    log.info("teacher audit done in %.1f s", result["seconds"])
    return result
