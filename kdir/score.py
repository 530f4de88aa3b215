"""Score (query, document) pairs with a teacher once, into a score store: ``python -m kdir.score``.

The pairs are the training candidates (positives + the run-file pool of ``data.examples``, or fixed
triples) or the top-``depth`` candidates of any run file (``run_file=...``). They are sorted, cut into
fixed chunks, and chunk ``k`` is scored by rank ``k mod world_size`` and written atomically as segment
``chunk-<k>``. A killed job restarted with the same arguments skips the finished chunks; any number of
processes gives the same store. Processes are launched by Lightning Fabric (``devices=N``).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import kdir  # noqa: F401  (registers config resolvers)
from kdir.data.dataset import IRDataset
from kdir.data.examples import QrelsExamples, RunNegatives, TripleExamples, positive_keys
from kdir.data.formats import read_trec_run, top_ranked
from kdir.errors import KdirError
from kdir.stores import ScoreStore, id_hashes, pair_keys
from kdir.training.signal import teacher_meta

log = logging.getLogger("kdir.score")


def candidate_pairs(dataset: IRDataset, examples=None, run_file: str | None = None, depth: int = 100) -> np.ndarray:
    """Sorted unique ``[N, 2]`` (query code, doc code) pairs to score."""
    n_docs = len(dataset.corpus)
    keys = [positive_keys(dataset)]
    if run_file is not None:
        for qid, cands in read_trec_run(run_file).items():
            q = dataset.queries.index.get(qid)
            if q is not None:
                keys.append(q * n_docs + dataset.corpus.codes(top_ranked(cands, depth), source=run_file))
    elif isinstance(examples, TripleExamples):
        ex = examples.build(dataset)
        keys.append((ex.queries[:, None] * n_docs + ex.negatives).reshape(-1))
    elif isinstance(examples, QrelsExamples) and isinstance(examples.sampler, RunNegatives):
        examples.build(dataset)
        pool, counts = examples.sampler.pool, examples.sampler.counts
        q, slot = np.nonzero(np.arange(pool.shape[1])[None, :] < counts[:, None])
        keys.append(q * n_docs + pool[q, slot])
    else:
        raise KdirError(
            "cannot enumerate the pairs to score: the training negatives are random. Score a run file "
            "(run_file=...), use fixed triples, or let training fill the store (teacher.mode=fill)"
        )
    keys = np.unique(np.concatenate(keys))
    return np.stack([keys // n_docs, keys % n_docs], axis=1)


def score_into_store(
    fabric: Fabric, model, dataset: IRDataset, pairs: np.ndarray, store: ScoreStore, chunk_size: int, batch_size: int
) -> int:
    """Score this rank's unfinished chunks; returns the number of pairs scored by this rank."""
    keys = pair_keys(id_hashes(dataset.queries.ids)[pairs[:, 0]], id_hashes(dataset.corpus.ids)[pairs[:, 1]])
    qtexts, dtexts = dataset.queries.texts, dataset.corpus.texts
    n_chunks = math.ceil(len(pairs) / chunk_size)
    mine = [
        k for k in range(fabric.global_rank, n_chunks, fabric.world_size) if not store.has_segment(f"chunk-{k:06d}")
    ]
    done = 0
    for k in tqdm(mine, desc=f"score rank {fabric.global_rank}", disable=not fabric.is_global_zero, unit="chunk"):
        chunk = pairs[k * chunk_size : (k + 1) * chunk_size]
        values = []
        for b in range(0, len(chunk), batch_size):
            q, d = chunk[b : b + batch_size, 0], chunk[b : b + batch_size, 1]
            docs, inverse = np.unique(d, return_inverse=True)
            inputs = model.prepare([qtexts[i] for i in q], [dtexts[i] for i in docs], inverse[:, None])
            with torch.no_grad(), fabric.autocast():
                values.append(model(inputs).float()[:, 0].cpu().numpy())
        store.append_segment(f"chunk-{k:06d}", keys[k * chunk_size : (k + 1) * chunk_size], np.concatenate(values))
        done += len(chunk)
    return done


def score(cfg: DictConfig) -> Path:
    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        precision=cfg.precision,
        strategy="ddp" if cfg.devices not in (1, "1") else "auto",
    )
    fabric.launch()
    model = instantiate(cfg.teacher.model).freeze().to(fabric.device)
    dataset = instantiate(cfg.data.train)
    examples = instantiate(cfg.data.examples) if cfg.run_file is None else None
    pairs = candidate_pairs(dataset, examples, cfg.run_file, cfg.depth)
    meta = {
        "teacher": teacher_meta(model),
        "data": {
            "dataset": dataset.name,
            "pairs": len(pairs),
            "source": cfg.run_file or "training examples",
            "depth": cfg.depth if cfg.run_file else None,
        },
    }
    path = Path(cfg.store)
    if fabric.is_global_zero:
        store = ScoreStore.create(path, meta, exist_ok=True)
        if store.meta.get("teacher", {}).get("weights") != meta["teacher"]["weights"]:
            raise KdirError(f"{path} holds scores of another teacher; choose a new store path")
    fabric.barrier()
    store = ScoreStore.open(path)
    log.info(
        "rank %d/%d: %d pairs in chunks of %d -> %s",
        fabric.global_rank,
        fabric.world_size,
        len(pairs),
        cfg.chunk_size,
        path,
    )
    done = score_into_store(fabric, model, dataset, pairs, store, cfg.chunk_size, cfg.batch_size)
    log.info("rank %d scored %d new pairs", fabric.global_rank, done)
    fabric.barrier()
    if fabric.is_global_zero:
        store.refresh()
        if cfg.compact:
            store.compact()
        store.update_meta(count=len(store), finished=dt.datetime.now().isoformat(timespec="seconds"))
        log.info("score store %s: %d pairs", path, len(store))
    fabric.barrier()
    return path


@hydra.main(version_base="1.3", config_path="../conf", config_name="score")
def main(cfg: DictConfig) -> None:
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / "config.yaml", resolve=True)
    try:
        score(cfg)
    except (KdirError, FileNotFoundError, ValueError, KeyError) as e:
        log.error("%s: %s", type(e).__name__, e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
