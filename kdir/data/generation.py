"""Query generation (EmbedDistill, Kim et al. 2023, arXiv 2301.12005, §3.5): source draws, masked spans,
de-duplication against the real queries, batched seq2seq generation, and the model-free generators.

The model-free generators (``generator=title|sentence|crop``) make pseudo-queries from the documents themselves,
with no weights to load: one class each, built from ``conf/generator/<name>.yaml`` by ``_target_``, all with
``generate(texts, titles, rng) -> [[query, ...] per document]``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from kdir.data.dataset import IRDataset
from kdir.errors import ConfigError, KdirError

log = logging.getLogger(__name__)

SOURCES = ("docs", "queries")
_BOUNDARY = re.compile(r"(?<=[.!?])\s+")  # a candidate sentence end: ., ! or ? then whitespace


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


# ---------------------------------------------------------------- model-free generators


def split_sentences(text: str) -> list[str]:
    """Split ``text`` after ``.``, ``!`` or ``?`` followed by whitespace and an upper-case letter or a digit.

    A deliberately simple rule (no abbreviation list: "e.g. The" splits, "e.g. the" does not); whitespace is
    collapsed in every sentence.
    """
    sentences: list[str] = []
    for piece in _BOUNDARY.split(text.strip()):
        if sentences and not (piece[:1].isupper() or piece[:1].isdigit()):
            sentences[-1] += " " + piece  # no capital or digit after the mark: the same sentence goes on
        elif piece:
            sentences.append(piece)
    return [" ".join(s.split()) for s in sentences]


def body(text: str, title: str) -> str:
    """``text`` without the ``title`` that the readers put in front of it (``"<title> <text>"``)."""
    if title and text.startswith(title):
        return text[len(title) :].strip()
    return text


class QueryGenerator(Protocol):
    """A model-free generator: up to ``per_source`` queries per document; ``shortfall`` names the missing ones."""

    name: str
    per_source: int
    shortfall: str

    def generate(
        self, texts: Sequence[str], titles: Sequence[str] | None, rng: np.random.Generator
    ) -> list[list[str]]: ...


class TitleQueries:
    """A document's title as its query: the title–body pairs of Chang et al. 2020 (arXiv 2002.03932) and of E5's
    weakly supervised pre-training (Wang et al. 2022, arXiv 2212.03533).

    One query per document; a document with an empty title gives none (counted as ``empty_title``). Needs a corpus
    with titles (a BEIR ``corpus.jsonl`` with ``"title"`` fields, or an ir_datasets corpus that has them).
    """

    name = "title"
    per_source = 1
    shortfall = "empty_title"

    def generate(
        self, texts: Sequence[str], titles: Sequence[str] | None, rng: np.random.Generator
    ) -> list[list[str]]:
        if titles is None:
            raise ConfigError(
                'generator=title: the corpus has no document titles (no non-empty "title" in its corpus.jsonl); '
                "use generator=sentence or generator=crop"
            )
        return [[t] if (t := " ".join(title.split())) else [] for title in titles]


class SentenceQueries:
    """A random sentence of a document as a query, as in the inverse cloze task (Lee et al. 2019, arXiv 1906.00300).

    Sentences come from :func:`split_sentences` on the document's text without its title; those shorter than
    ``min_words`` words are never drawn. Each document gives ``per_source`` distinct sentences (fewer if it has
    fewer: the missing ones count as ``too_few_sentences``), in document order.

    Args:
        per_source: sentences drawn per document.
        min_words: the shortest sentence, in whitespace-separated words, that may be drawn.
    """

    name = "sentence"
    shortfall = "too_few_sentences"

    def __init__(self, per_source: int = 1, min_words: int = 4) -> None:
        if per_source < 1 or min_words < 1:
            raise ConfigError(f"per_source and min_words must be >= 1, got {per_source} and {min_words}")
        self.per_source, self.min_words = per_source, min_words

    def generate(
        self, texts: Sequence[str], titles: Sequence[str] | None, rng: np.random.Generator
    ) -> list[list[str]]:
        out: list[list[str]] = []
        for i, text in enumerate(texts):
            found = split_sentences(body(text, titles[i]) if titles else text)
            sentences = [s for s in found if len(s.split()) >= self.min_words]
            if not sentences:
                out.append([])
                continue
            rows = np.sort(rng.choice(len(sentences), size=min(self.per_source, len(sentences)), replace=False))
            out.append([sentences[r] for r in rows])
        return out


class SpanCropQueries:
    """A random contiguous span of a document's words as a query: Contriever's random cropping (Izacard et al. 2021,
    "Unsupervised Dense Information Retrieval with Contrastive Learning", arXiv 2112.09118), a cousin of the inverse
    cloze task (Lee et al. 2019, arXiv 1906.00300).

    Each crop's length is drawn uniformly from ``[min_words, min(max_words, n_words)]``, then its start uniformly
    among the positions where it fits, from the document's text without its title; ``per_source`` independent
    crops per document (a repeated one is dropped as a duplicate). A document of fewer than ``min_words`` words
    gives none (counted as ``too_short``).

    Args:
        per_source: crops per document.
        min_words: the shortest crop, in whitespace-separated words.
        max_words: the longest crop.
    """

    name = "crop"
    shortfall = "too_short"

    def __init__(self, per_source: int = 1, min_words: int = 4, max_words: int = 12) -> None:
        if per_source < 1 or not 1 <= min_words <= max_words:
            raise ConfigError(
                f"need per_source >= 1 and 1 <= min_words <= max_words, got {per_source}, {min_words}, {max_words}"
            )
        self.per_source, self.min_words, self.max_words = per_source, min_words, max_words

    def generate(
        self, texts: Sequence[str], titles: Sequence[str] | None, rng: np.random.Generator
    ) -> list[list[str]]:
        out: list[list[str]] = []
        for i, text in enumerate(texts):
            words = (body(text, titles[i]) if titles else text).split()
            crops = []
            if len(words) >= self.min_words:
                for _ in range(self.per_source):
                    length = int(rng.integers(self.min_words, min(self.max_words, len(words)) + 1))
                    start = int(rng.integers(0, len(words) - length + 1))
                    crops.append(" ".join(words[start : start + length]))
            out.append(crops)
        return out
