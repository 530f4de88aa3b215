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
from pathlib import Path

import hydra
from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig

import kdir  # noqa: F401  (registers config resolvers)
from kdir.errors import KdirError
from kdir.stores import ScoreStore
from kdir.stores.scoring import candidate_pairs, score_into_store
from kdir.training.signal import teacher_meta
from kdir.utils import Setting, task_wrapper

log = logging.getLogger("kdir.score")


def score(cfg: DictConfig) -> Path:
    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        precision=cfg.precision,
        strategy="ddp" if cfg.devices not in (1, "1") else "auto",
    )
    fabric.launch()
    model = instantiate(cfg.teacher).freeze().to(fabric.device)
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
@task_wrapper(settings={"devices": Setting(int, 1, also=(-1, "auto"))})
def main(cfg: DictConfig) -> None:
    """Hydra entry point: :func:`score`."""
    score(cfg)


if __name__ == "__main__":
    main()
