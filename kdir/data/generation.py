"""Query generation helpers (EmbedDistill, Kim et al. 2023, arXiv 2301.12005, §3.5): source draws, masked spans,
de-duplication against the real queries, batched seq2seq generation."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kdir.data.dataset import IRDataset
from kdir.errors import KdirError

log = logging.getLogger(__name__)

SOURCES = ("docs", "queries")


def normalise(text: str) -> str:
    """The form under which two queries count as identical: lower-cased, whitespace collapsed."""
    return " ".join(text.lower().split())


def dedupe(texts: Sequence[str], real_queries: Iterable[str]) -> tuple[list[int], Counter]:
    """Indices of ``texts`` to keep: the first of each distinct text that is not a copy of a real query.

    Returns ``(kept, dropped)`` where ``dropped`` counts ``copies_of_real`` and ``duplicates``.
    """
    real = {normalise(q) for q in real_queries}
    seen: set[str] = set()
    kept: list[int] = []
    dropped: Counter = Counter(copies_of_real=0, duplicates=0)
    for i, text in enumerate(texts):
        key = normalise(text)
        if key in real:
            dropped["copies_of_real"] += 1
        elif key in seen:
            dropped["duplicates"] += 1
        else:
            seen.add(key)
            kept.append(i)
    return kept, dropped


def mask_span(text: str, mask_token: str, rng: np.random.Generator, max_span: int = 3) -> str:
    """Replace a random span of ``1..min(max_span, n_words - 1)`` words of ``text`` by one ``mask_token``.

    At least one word is kept when the text has two or more; a one-word text becomes the mask alone.
    """
    words = text.split()
    if len(words) <= 1:
        return mask_token
    span = int(rng.integers(1, max(1, min(max_span, len(words) - 1)) + 1))
    start = int(rng.integers(0, len(words) - span + 1))
    return " ".join(words[:start] + [mask_token] + words[start + span :])


def pick_sources(dataset: IRDataset, source: str, n: int | None, seed: int) -> tuple[list[str], list[str]]:
    """``(ids, texts)`` of ``n`` documents (``source=docs``) or training queries (``queries``), drawn with ``seed``.

    ``n=None`` (or more than there are) takes them all; the draw keeps the store's order.
    """
    if source not in SOURCES:
        raise KdirError(f"generator.source must be one of {SOURCES}, got {source!r}")
    store = dataset.corpus if source == "docs" else dataset.queries
    if n is not None and n < 1:
        raise KdirError(f"n_sources must be a positive number or null, got {n}")
    if n is None or n >= len(store):
        if n is not None and n > len(store):
            log.warning("n_sources=%d but %s has %d %s: taking them all", n, dataset.name, len(store), source)
        rows = np.arange(len(store))
    else:
        rows = np.sort(np.random.default_rng(seed).choice(len(store), size=n, replace=False))
    return [store.ids[i] for i in rows], [store.texts[i] for i in rows]


@torch.inference_mode()
def generate_texts(
    model,
    tokenizer,
    inputs: Sequence[str],
    per_input: int = 1,
    batch_size: int = 32,
    max_source_length: int = 256,
    generation: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> list[list[str]]:
    """``per_input`` generated texts (whitespace collapsed, possibly empty) for each input text, batched."""
    generation = {k: v for k, v in (generation or {}).items() if v is not None}
    out: list[list[str]] = []
    for b in tqdm(range(0, len(inputs), batch_size), desc="generate", unit="batch"):
        batch = list(inputs[b : b + batch_size])
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_source_length, return_tensors="pt")
        ids = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            num_return_sequences=per_input,
            **generation,
        )
        texts = [" ".join(t.split()) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        out += [texts[i * per_input : (i + 1) * per_input] for i in range(len(batch))]
    return out
