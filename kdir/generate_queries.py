"""EmbedDistill query generation (Kim et al. 2023, arXiv 2301.12005, §3.5): ``python -m kdir.generate_queries``.

``python -m kdir.generate_queries generator=<doc2query_t5|bart_infill|title|sentence|crop> data=<data config>
out=<file.tsv>`` writes synthetic queries that cover more of the query manifold than the training queries do.

Seq2seq generators (``generator.model``, ``generator.source``):

* ``docs``: doc2query-style generation, passage → ``per_source`` sampled queries (T5);
* ``queries``: masked-span infilling, a random word span of a real training query is replaced by the
  tokenizer's mask token and a seq2seq denoiser (BART) fills it in, ``per_source`` maskings per query.

Model-free generators (a ``_target_`` in :mod:`kdir.data.generation`, no model or tokenizer loaded), from documents:
``title`` (the document's title), ``sentence`` (random sentences), ``crop`` (random word spans, Contriever's cropping).

Sources are drawn reproducibly (``n_sources``, ``seed``); each gives ``per_source`` queries, so at most
``n_sources × per_source`` are written. With ``dedupe`` a generated text identical (case and whitespace aside) to
another generated text or to a real training query is dropped: a generated query must not copy a labelled one.
The output (:mod:`kdir.data.generated`, ids ``gen-<n>``) is unlabelled; ``<out>.meta.json`` records the
generator, settings, counts (with what was dropped, and why) and timings.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import kdir  # noqa: F401  (registers config resolvers)
from kdir.data.dataset import IRDataset
from kdir.data.generated import write_generated
from kdir.data.generation import SOURCES, QueryGenerator, dedupe, generate_texts, mask_span, pick_sources
from kdir.errors import KdirError
from kdir.utils import resolve_device, save_json, task_wrapper
from kdir.utils.settings import positive_int

log = logging.getLogger("kdir.generate_queries")


def model_free(cfg: DictConfig, dataset: IRDataset, src_ids: list[str], src_texts: list[str]) -> dict[str, Any]:
    """Queries of a model-free generator (``generator._target_``) for the drawn documents."""
    generator: QueryGenerator = instantiate(cfg.generator)
    corpus = dataset.corpus
    titles = None if corpus.titles is None else [corpus.titles[corpus.index[i]] for i in src_ids]
    start = time.perf_counter()
    outputs = generator.generate(src_texts, titles, np.random.default_rng(cfg.seed))
    return {
        "name": generator.name,
        "per_source": generator.per_source,
        "shortfall": generator.shortfall,
        "outputs": outputs,
        "settings": {},
        "seconds": {"generate": time.perf_counter() - start},
    }


def seq2seq(cfg: DictConfig, dataset: IRDataset, src_ids: list[str], src_texts: list[str]) -> dict[str, Any]:
    """Queries of a seq2seq generator (``generator.model``) for the drawn documents or training queries."""
    import transformers

    from kdir.models.hf import load_seq2seq

    gen, per_source = cfg.generator, cfg.generator.per_source
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
    log.info("generating with %s on %s", gen.model, device)

    transformers.set_seed(cfg.seed)
    start = time.perf_counter()
    generation = OmegaConf.to_container(gen.generation, resolve=True) if gen.get("generation") else {}
    outputs = generate_texts(
        model, tokenizer, inputs, per_input, cfg.batch_size, gen.max_source_length, generation, device
    )
    if gen.source == "queries":  # one output per masked input: regroup them per real query
        flat = [t for group in outputs for t in group]
        outputs = [flat[i : i + per_source] for i in range(0, len(flat), per_source)]
    return {
        "name": str(gen.model),
        "per_source": per_source,
        "shortfall": "empty",
        "outputs": outputs,
        "settings": {"batch_size": cfg.batch_size, "device": device},
        "seconds": {"load": load_seconds, "generate": time.perf_counter() - start},
    }


def generate_queries(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage; returns the ``<out>.meta.json`` content."""
    gen = cfg.generator
    free = "_target_" in gen
    source = "docs" if free else gen.source
    if source not in SOURCES:
        raise KdirError(f"generator.source must be one of {SOURCES}, got {source!r}")
    per_source = gen.get("per_source", 1)
    if per_source < 1 or cfg.batch_size < 1:
        raise KdirError(f"generator.per_source and batch_size must be >= 1, got {per_source} and {cfg.batch_size}")
    out = Path(cfg.out)
    dataset: IRDataset = instantiate(cfg.data.train)
    src_ids, src_texts = pick_sources(dataset, source, cfg.n_sources, cfg.seed)
    result = (model_free if free else seq2seq)(cfg, dataset, src_ids, src_texts)
    per_source = result["per_source"]
    n_generated = len(src_ids) * per_source
    log.info(
        "%d queries at most (%d %s of %s x per_source=%d) with %s",
        n_generated,
        len(src_ids),
        source,
        dataset.name,
        per_source,
        result["name"],
    )

    texts, sources = [], []
    for src, group in zip(src_ids, result["outputs"]):
        for text in group[:per_source]:
            if text:
                texts.append(text)
                sources.append(src)
    dropped = Counter({result["shortfall"]: n_generated - len(texts), "copies_of_real": 0, "duplicates": 0})
    if cfg.dedupe:
        kept, removed = dedupe(texts, dataset.queries.texts)
        dropped.update(removed)
        texts, sources = [texts[i] for i in kept], [sources[i] for i in kept]
    if not texts:
        raise KdirError(f"{result['name']} generated no usable query ({dict(dropped)} dropped)")
    write_generated(out, [f"gen-{n}" for n in range(len(texts))], texts, sources)
    meta = {
        "generator": result["name"],
        "source": source,
        "data": dataset.name,
        "settings": {
            "generator": OmegaConf.to_container(gen, resolve=True),
            "n_sources": cfg.n_sources,
            "seed": cfg.seed,
            "dedupe": cfg.dedupe,
            **result["settings"],
        },
        "counts": {
            "sources": len(src_ids),
            "generated": n_generated,
            "dropped": dict(dropped),
            "written": len(texts),
        },
        "seconds": result["seconds"],
    }
    save_json(meta, Path(f"{out}.meta.json"))
    log.info("wrote %d of %d generated queries to %s (dropped: %s)", len(texts), n_generated, out, dict(dropped))
    print(f"generated queries: {out} ({len(texts)} written)")
    return meta


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate_queries")
@task_wrapper(
    settings={
        "n_sources": positive_int(None),
        "generator.per_source": positive_int(),
        "generator.min_words": positive_int(),
        "generator.max_words": positive_int(),
    }
)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: :func:`generate_queries`."""
    generate_queries(cfg)


if __name__ == "__main__":
    main()
