"""Encode a corpus (or queries) into an embedding store: ``python -m kdir.encode student=<option> data=<data>
out=<store dir> [side=doc|query] [devices=N]``.

Streamed, sharded and resumable (:func:`kdir.retrieval.stream_encode.encode_into_store`): texts are encoded chunk by
chunk and each finished chunk is written to disk, so memory holds one chunk whatever the corpus size; rank ``r`` of
``devices`` (Lightning Fabric: GPUs, or CPU processes on gloo) writes shard ``r``; a killed job rerun with the same
arguments resumes at its last finished chunk. ``kdir.evaluate`` / ``kdir.mine`` with ``corpus_store=<the same
dir>`` then build their FAISS index from the store without encoding again; a frozen teacher's store caches its
embeddings. Any single- or multi-vector encoder: ``student=checkpoint student.path=<folder>`` for a saved model.
``precision`` (``auto``: bf16-mixed on CUDA, 32-true elsewhere) is Fabric's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import kdir  # noqa: F401  (registers config resolvers)
from kdir.errors import ConfigError
from kdir.retrieval.encode import accelerator_device, resolve_precision
from kdir.retrieval.stream_encode import encode_into_store
from kdir.stores import EmbeddingStore
from kdir.utils import Setting, launch_fabric, task_wrapper
from kdir.utils.settings import count

log = logging.getLogger("kdir.encode")


def encode(cfg: DictConfig) -> EmbeddingStore:
    if cfg.side not in ("doc", "query"):
        raise ConfigError(f"side={cfg.side!r}: expected doc (the corpus) or query (the split's queries)")
    cfg.precision = resolve_precision(cfg.precision, accelerator_device(cfg.accelerator))  # auto: for the device
    fabric = launch_fabric(cfg)
    dataset = instantiate(cfg.dataset) if cfg.get("dataset") else instantiate(cfg.data.train)
    texts = dataset.corpus if cfg.side == "doc" else dataset.queries
    model = instantiate(cfg.student).to(fabric.device)
    log.info(
        "rank %d/%d: encoding %d %s texts of %s into %s",
        fabric.global_rank,
        fabric.world_size,
        len(texts),
        cfg.side,
        dataset.name,
        cfg.out,
    )
    with fabric.autocast():
        store = encode_into_store(
            model,
            texts.texts,
            texts.ids,
            cfg.out,
            cfg.side,
            batch_size=cfg.batch_size,
            chunk_size=cfg.chunk_size,
            progress=cfg.progress and fabric.is_global_zero,
            dataset=dataset.name,
            num_workers=cfg.num_workers,
            fabric=fabric,
        )
    if fabric.is_global_zero:
        size = sum(f.stat().st_size for f in Path(cfg.out).rglob("*") if f.is_file())
        print(f"{store} ({size / 2**20:.1f} MiB)\noutputs: {cfg.paths.output_dir}")
    return store


@hydra.main(version_base="1.3", config_path="../conf", config_name="encode")
@task_wrapper(settings={"devices": Setting(int, 1, also=(-1, "auto")), "num_workers": count()})
def main(cfg: DictConfig) -> None:
    """Hydra entry point: :func:`encode`."""
    encode(cfg)


if __name__ == "__main__":
    main()
