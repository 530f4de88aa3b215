"""Score (query, document) pairs with a teacher once, into a score store: ``python -m kdir.score``.

The pairs are the training candidates (positives + the run-file pool of ``data.examples``, or fixed
triples) or the top-``depth`` candidates of any run file (``run_file=...``). They are sorted and cut into
fixed chunks; chunk ``k`` is scored by rank ``k mod world_size``, which scores only the pairs the store lacks
(:mod:`kdir.stores.scoring`). A killed job restarted with the same arguments resumes where it stopped; a run
over another pair set adds just the new pairs; any number of processes gives the same store. The job ends
with every requested pair in the store (else an error) and, with ``verify=true``, every segment re-hashed
against its checksums. ``meta["scoring"]`` records the job (its pairs, start, finish): ``python -m kdir.store verify``
reports a job that did not finish. A store of another teacher, or of the same weights with other scoring settings, is
refused. Processes are launched by Lightning Fabric (``devices=N``). ``embeddings=<dir>`` (separable teachers: dual
encoders, ColBERT) encodes the corpus once into an embedding store, sharded over the ranks and reused by later jobs
(and by ``kdir.evaluate`` / ``kdir.mine`` / ``kdir.expand``), and scores pairs from it: each document is encoded once
instead of once per pair, each query once per chunk (scores from fp16 document embeddings). Without it, each chunk's
pairs are scored in batches sorted by text length (less padding), tokenised by ``num_workers`` DataLoader workers.
``precision`` (``auto``: bf16-mixed on CUDA, 32-true elsewhere) is Fabric's; the job record names the one used.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import hydra
import numpy as np
from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig

import kdir  # noqa: F401  (registers config resolvers)
from kdir.errors import ConfigError, KdirError
from kdir.retrieval.encode import accelerator_device, resolve_precision
from kdir.retrieval.stream_encode import encode_into_store
from kdir.stores import EmbeddingStore, ScoreStore, sibling_store, teacher_differences
from kdir.stores.scoring import candidate_pairs, missing_pairs, score_into_store
from kdir.training.signal import teacher_meta
from kdir.utils import Setting, launch_fabric, task_wrapper
from kdir.utils.settings import count

log = logging.getLogger("kdir.score")


def score(cfg: DictConfig) -> Path:
    cfg.precision = resolve_precision(cfg.precision, accelerator_device(cfg.accelerator))  # auto: for the device
    fabric = launch_fabric(cfg)
    model = instantiate(cfg.teacher).freeze().to(fabric.device)
    dataset = instantiate(cfg.data.train)
    examples = instantiate(cfg.data.examples) if cfg.run_file is None else None
    pairs = candidate_pairs(dataset, examples, cfg.run_file, cfg.depth)
    teacher = teacher_meta(model)
    data = {
        "dataset": dataset.name,
        "pairs": len(pairs),
        "queries": len(np.unique(pairs[:, 0])),
        "source": cfg.run_file or "training examples",
        "depth": cfg.depth if cfg.run_file else None,
    }
    job = {"data": data, "precision": cfg.precision}
    path = Path(cfg.store)
    if fabric.is_global_zero and not (path / "meta.json").is_file():
        ScoreStore.create(path, {"teacher": teacher, "data": data})
    fabric.barrier()
    store = ScoreStore.open(path)
    _check_teacher(store, teacher)
    started = dt.datetime.now().isoformat(timespec="seconds")
    if fabric.is_global_zero:  # `python -m kdir.store verify` reports a job that never set `finished`
        store.update_meta(scoring=job | {"started": started, "finished": None})
    fabric.barrier()
    log.info(
        "rank %d/%d: %d pairs in chunks of %d -> %s",
        fabric.global_rank,
        fabric.world_size,
        len(pairs),
        cfg.chunk_size,
        path,
    )
    doc_embeddings = _doc_embeddings(cfg, fabric, model, dataset)
    done = score_into_store(
        fabric, model, dataset, pairs, store, cfg.chunk_size, cfg.batch_size, doc_embeddings, cfg.num_workers
    )
    log.info("rank %d scored %d new pairs", fabric.global_rank, done)
    fabric.barrier()
    if len(missing := missing_pairs(dataset, pairs, store)):  # every rank: all of them stop alike
        q, d = pairs[missing[0]]
        raise KdirError(
            f"{path}: {len(missing)} of the {len(pairs)} requested pairs are not in the store after scoring (e.g. "
            f"qid={dataset.queries.ids[q]!r}, pid={dataset.corpus.ids[d]!r}); rerun the same command to score them"
        )
    fabric.barrier()  # every rank has looked before rank 0 compacts
    if fabric.is_global_zero:
        if cfg.compact:
            store.compact()
        if cfg.verify:
            report = store.verify()
            log.info(
                "verified %d of %d segments against their checksums%s",
                len(report["verified"]),
                report["segments"],
                f" ({len(report['without_checksums'])} were written without checksums)"
                if report["without_checksums"]
                else "",
            )
        finished = dt.datetime.now().isoformat(timespec="seconds")
        store.update_meta(
            count=len(store), data=data, finished=finished, scoring=job | {"started": started, "finished": finished}
        )
        log.info("score store %s: %d pairs, all %d requested pairs present", path, len(store), len(pairs))
    fabric.barrier()
    return path


def _doc_embeddings(cfg: DictConfig, fabric: Fabric, model, dataset) -> EmbeddingStore | None:
    """With ``embeddings=<dir>``: the teacher's document embeddings of the corpus, encoded into that store once (over
    the ranks; reused when it holds them already), so that scoring reads documents instead of encoding them."""
    if not cfg.get("embeddings"):
        return None
    if not model.separable:
        raise ConfigError(
            f"embeddings={cfg.embeddings}: {type(model).__name__} scores each pair jointly (a cross-encoder); "
            "cached document embeddings need a teacher that encodes documents apart (dual encoder, ColBERT)"
        )
    with fabric.autocast():
        return encode_into_store(
            model, dataset.corpus.texts, dataset.corpus.ids, cfg.embeddings, "doc", batch_size=cfg.batch_size,
            dataset=dataset.name, num_workers=cfg.num_workers, fabric=fabric,
        )  # fmt: skip


def _check_teacher(store: ScoreStore, teacher: dict) -> None:
    """Refuse a store holding scores of another teacher, or of the same weights with other scoring settings."""
    meta = store.meta
    if imported := meta.get("imported") or meta.get("data", {}).get("imported_from"):
        differs = [f"scores imported from {imported.get('file') if isinstance(imported, dict) else imported}"]
    else:
        differs = teacher_differences(meta.get("teacher", {}), teacher)
    if differs:
        raise KdirError(
            f"{store.path} holds scores of another teacher or other scoring settings ({'; '.join(differs)}): "
            f"score into a new store, e.g. store={sibling_store(store.path, teacher)}"
        )


@hydra.main(version_base="1.3", config_path="../conf", config_name="score")
@task_wrapper(settings={"devices": Setting(int, 1, also=(-1, "auto")), "num_workers": count()})
def main(cfg: DictConfig) -> None:
    """Hydra entry point: :func:`score`."""
    score(cfg)


if __name__ == "__main__":
    main()
