"""EmbedDistill query generation (Kim et al. 2023, arXiv 2301.12005, §3.5): ``python -m kdir.generate_queries``.

``python -m kdir.generate_queries generator=<doc2query_t5|bart_infill> [generator.model=<name or folder>]
data=<data config> out=<file.tsv>`` writes synthetic queries that cover more of the query manifold than
the training queries do. Two modes (``generator.source``):

* ``docs``: doc2query-style generation, passage → ``per_source`` sampled queries (T5);
* ``queries``: masked-span infilling, a random word span of a real training query is replaced by the
  tokenizer's mask token and a seq2seq denoiser (BART) fills it in, ``per_source`` maskings per query.

Sources are drawn reproducibly (``n_sources``, ``seed``). With ``dedupe`` a generated text identical
(case and whitespace aside) to another generated text or to a real training query is dropped: a generated
query must not copy a labelled one. The output (:mod:`kdir.data.generated`, ids ``gen-<n>``) is
unlabelled; ``<out>.meta.json`` records the generator, settings, counts and timings.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import transformers
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import kdir  # noqa: F401  (registers config resolvers)
from kdir.data.dataset import IRDataset
from kdir.data.generated import write_generated
from kdir.data.generation import SOURCES, dedupe, generate_texts, mask_span, pick_sources
from kdir.errors import KdirError
from kdir.models.hf import load_seq2seq
from kdir.utils import resolve_device, save_json, task_wrapper
from kdir.utils.settings import positive_int

log = logging.getLogger("kdir.generate_queries")


def generate_queries(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage; returns the ``<out>.meta.json`` content."""
    gen = cfg.generator
    if gen.source not in SOURCES:
        raise KdirError(f"generator.source must be one of {SOURCES}, got {gen.source!r}")
    per_source = gen.per_source
    if per_source < 1 or cfg.batch_size < 1:
        raise KdirError(f"generator.per_source and batch_size must be >= 1, got {per_source} and {cfg.batch_size}")
    out = Path(cfg.out)
    dataset: IRDataset = instantiate(cfg.data.train)
    src_ids, src_texts = pick_sources(dataset, gen.source, cfg.n_sources, cfg.seed)
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    model, tokenizer = load_seq2seq(gen.model)
    model = model.to(device)
    load_seconds = time.perf_counter() - start

    if gen.source == "queries":
        if tokenizer.mask_token is None:
            raise KdirError(f"generator.source=queries needs a tokenizer with a mask token; {gen.model} has none")
        rng = np.random.default_rng(cfg.seed)
        max_span = OmegaConf.select(gen, "mask.max_span", default=3)
        inputs = [mask_span(t, tokenizer.mask_token, rng, max_span) for t in src_texts for _ in range(per_source)]
        per_input = 1  # a fresh masking per generated query
    else:
        inputs, per_input = src_texts, per_source
    log.info(
        "generating %d queries from %d %s of %s with %s on %s",
        len(src_ids) * per_source,
        len(src_ids),
        gen.source,
        dataset.name,
        gen.model,
        device,
    )

    transformers.set_seed(cfg.seed)
    start = time.perf_counter()
    generation = OmegaConf.to_container(gen.generation, resolve=True) if gen.get("generation") else {}
    outputs = generate_texts(
        model, tokenizer, inputs, per_input, cfg.batch_size, gen.max_source_length, generation, device
    )
    gen_seconds = time.perf_counter() - start

    texts = [t for group in outputs for t in group]
    sources = [src_ids[i // per_source] for i in range(len(texts))]  # each source yields per_source texts
    nonempty = [i for i, t in enumerate(texts) if t]
    texts, sources = [texts[i] for i in nonempty], [sources[i] for i in nonempty]
    n_generated = len(src_ids) * per_source
    dropped = Counter(empty=n_generated - len(texts), copies_of_real=0, duplicates=0)
    if cfg.dedupe:
        kept, removed = dedupe(texts, dataset.queries.texts)
        dropped.update(removed)
        texts, sources = [texts[i] for i in kept], [sources[i] for i in kept]
    if not texts:
        raise KdirError(f"{gen.model} generated no usable query ({dict(dropped)} dropped)")
    write_generated(out, [f"gen-{n}" for n in range(len(texts))], texts, sources)
    meta = {
        "generator": str(gen.model),
        "source": str(gen.source),
        "data": dataset.name,
        "settings": {
            "generator": OmegaConf.to_container(gen, resolve=True),
            "n_sources": cfg.n_sources,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "dedupe": cfg.dedupe,
            "device": device,
        },
        "counts": {
            "sources": len(src_ids),
            "generated": n_generated,
            "dropped": dict(dropped),
            "written": len(texts),
        },
        "seconds": {"load": load_seconds, "generate": gen_seconds},
    }
    save_json(meta, Path(f"{out}.meta.json"))
    log.info("wrote %d generated queries to %s (dropped: %s)", len(texts), out, dict(dropped))
    print(f"generated queries: {out} ({len(texts)} written)")
    return meta


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate_queries")
@task_wrapper(settings={"n_sources": positive_int(None), "generator.per_source": positive_int()})
def main(cfg: DictConfig) -> None:
    """Hydra entry point: :func:`generate_queries`."""
    generate_queries(cfg)


if __name__ == "__main__":
    main()
